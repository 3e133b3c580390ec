"""The report cache: the same data scanned again with the same options, code and models gives back its report.

A warm scan whose activations, codes and heads are all cached still imports torch and transformers and reads each
stage's cache, seconds from the shell before any work. ``scan_report`` keys the whole report (``report_key``) and,
when the key has an entry that reads back whole, returns that report without importing torch; the scan command
writes and prints it as the scan that made it did (the same files, byte for byte, and the same lines: the warnings
that scan gave are kept with it). Its run header keeps the time it was made and its stages' timings.

The key is the sha256 of, as canonical JSON:

- the data: the bytes of the file scanned, and its path as given (the report names it);
- every option: the whole ScanConfig;
- the code: safer-audit's version and a digest of every file of the package (a changed rule or default is another
  key), and the versions of Python and of the libraries that compute (torch, transformers, tokenizers, numpy...);
- each model the profile reads: its identity and fingerprint as the activation cache has them (the config and the
  weight files' names and sizes, or a GGUF's header), from a backend that can tell them without loading the model
  (``identify``: the built-in ``hf``), and the profile's layers, positions and lengths; and the embedded sentence
  model the harm judge and the offline labeller read;
- the files a scan reads beside the data, by their bytes: an ``--sae`` directory's config and weights, a
  ``--features`` file, a taxonomy, a ``--salience-from`` dataset;
- what the report's paths are written relative to: the working, home and cache directories;
- with ``--device auto`` or cuda, whether this machine has a GPU torch could use: ``--dtype auto`` computes in
  bfloat16 there and in float32 on a CPU; with ``--dtype auto``, the CPU's bfloat16 flags (the harm judge, and
  SmolLM2 in the thorough profile, compute in bfloat16 on a CPU that has them).

Only a scan whose every part is safer-audit's own (its code is in the digest) and reproducible is cached: a judge,
labeller, model or SAE backend from another plugin (an LLM endpoint above all, whose answers can change) makes the
scan run every time, as does a source that is not a regular local file (standard input, a directory, a hub dataset,
a table in memory) or a model named by hub id. ``use_cache=False`` (``scan --no-cache``) neither reads nor writes.

The entry, ``<cache>/reports/<key>.json``: the report's header (run, features, the scan's warnings) on one line, a
line per finding, then a last line with the format, the key, the number of findings and the sha256 of everything
before it. It is read only if it is a regular file of at most MAX_ENTRY_BYTES whose digest, key and format match and
whose report reads back as a report (Report.from_dict's checks); anything else is scanned again and written over.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from ..common.digests import sha256_file
from ..common.files import read_bounded, write_atomic
from ..common.progress import no_progress
from ..config import LOCAL_ENGINE, MAX_REPORT_BYTES, NO_LABELLER, PROFILES, ScanConfig
from ..data import HUB_PREFIX, STDIN, is_table
from ..errors import CacheError, ConfigError
from ..plugins import registry
from ..report.types import Report
from ..sae.config import CFG_FILE, SPARSIFY_WEIGHTS_FILE, WEIGHTS_FILE
from ..scoring.types import LENGTH_RESIDUAL_SUFFIX
from ..version import __version__

REPORT_CACHE_FORMAT = 2  # bump when the entry's layout or the key's parts change
REPORTS = "reports"  # the cache's directory of report entries
MAX_ENTRY_BYTES = MAX_REPORT_BYTES  # an entry is the report in compact JSON, smaller than the JSON report
# the libraries whose version can change a number in the report
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "gguf", "jinja2", "polars", "pyarrow")
PACKAGE = Path(__file__).resolve().parent.parent


@dataclass
class ScanReport:
    """A scan's report, and what the command says beside it."""

    report: Report
    judge_costs: dict[str, dict] = field(default_factory=dict)  # judge -> requests, tokens (judges that spend)
    cached: bool = False  # read back from the report cache
    warnings: list[str] = field(default_factory=list)  # what the scan told ``warn``


def scan_report(source, config: ScanConfig, *, steps=no_progress, warn=None, use_cache: bool = True) -> ScanReport:
    """``run_scan(source, config).report``, from the report cache when it holds this scan (no torch is imported
    then), else scanned and kept there. ``warn(message)`` is told what the scan tells it (a cached report's scan's
    warnings, again); ``use_cache=False`` neither reads nor writes the cache."""
    key = report_key(source, config) if use_cache else None
    path = entry_path(config.activations.cache_dir, key) if key is not None else None
    if path is not None and os.path.lexists(path):
        with steps("Reading the cached report", "reports") as update:
            found = read_entry(path, key)
            update(1, 1)
        if found is not None:
            for message in found.warnings:
                if warn is not None:
                    warn(message)
            return found
    from .scan import run_scan

    told: list[str] = []

    def tell(message: str) -> None:
        told.append(message)
        if warn is not None:
            warn(message)

    result = run_scan(source, config, steps=steps, warn=tell)
    # a judge that spends answers anew; a file changed while it was scanned is not the file the key names
    if path is not None and not result.judge_costs and report_key(source, config) == key:
        try:
            write_entry(path, key, result.report, told)
        except (OSError, ConfigError) as exc:  # the scan stands; only the next one is slower
            if warn is not None:
                warn(f"the report is not kept in the cache: {exc}")
    return ScanReport(result.report, result.judge_costs, False, told)


def entry_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / REPORTS / f"{key}.json"


def report_key(source, config: ScanConfig) -> str | None:
    """The report cache's key of scanning ``source`` with ``config`` (see the module's docstring); None when the
    scan cannot be keyed without running it."""
    data = _data_file(source)
    if data is None or not _own_parts(config):
        return None
    models = _models(config)
    if models is None:
        return None
    files = {name: _file_digest(path) for name, path in _side_files(config).items()}
    if config.sae_path is not None:
        files["sae"] = _sae_digest(Path(config.sae_path))
    if any(digest is None for digest in files.values()):
        return None
    parts = {
        "format": REPORT_CACHE_FORMAT,
        "code": {"version": __version__, "package": _package_digest(), "libraries": _library_versions(),
                 "python": platform.python_version()},
        "data": {"path": os.fspath(source), "sha256": sha256_file(data)},
        "config": asdict(config),
        "models": models,
        "files": files,
        "where": {"cwd": os.getcwd(), "home": os.path.expanduser("~"),
                  "cache": os.path.abspath(config.activations.cache_dir)},
        "accelerator": _accelerator(config.activations.device),
        "cpu": _cpu_bfloat16(config),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _data_file(source) -> Path | None:
    """The regular local file ``source`` names, or None (standard input, a directory, a hub dataset, a table)."""
    if is_table(source) or not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if text == STDIN or text.startswith(HUB_PREFIX) or not os.path.isfile(text):
        return None
    return Path(text)


def _own(component) -> bool:
    """Whether a registered factory or backend is safer-audit's own code (covered by the package's digest)."""
    module = getattr(component, "__module__", None) or ""
    return module == "safer_audit" or module.startswith("safer_audit.")


def _own_parts(config: ScanConfig) -> bool:
    """Every plugin the scan runs is safer-audit's own: the model and SAE backends, the judges and the labeller."""
    try:
        parts = [registry("model")[config.activations.backend], registry("sae")[config.sae_backend]]
        judges = registry("judge")
        for name in config.judges or ():
            base = name.removesuffix(LENGTH_RESIDUAL_SUFFIX)
            parts.append(judges[name] if name in judges else judges[base])
        if config.labeller != NO_LABELLER:
            parts.append(registry("labeller")[config.labeller])
        if config.activations.engine != LOCAL_ENGINE:
            parts.append(registry("engine")[config.activations.engine])
    except KeyError:  # an unknown name: the scan says so
        return False
    return all(_own(part) for part in parts)


def _models(config: ScanConfig) -> list | None:
    """Identity and fingerprint of every model the profile reads (the scan's own first), with the layer, positions
    and length each is read at; None when the backend cannot tell them without loading the model."""
    identify = getattr(registry("model")[config.activations.backend], "identify", None)
    if identify is None:
        return None
    extras = PROFILES.get(config.profile)
    if extras is None:
        return None
    models = []
    # then the embedded sentence model, whatever model is scanned: the harm judge (the default flipped rule) and
    # the offline labeller read it (None: the backend's embedded model)
    read_by = [(config.activations.model, None), *((extra.model, asdict(extra)) for extra in extras),
               (None, "sentence encoder")]
    for model, read in read_by:
        try:
            named = identify(model)
        except (OSError, ValueError, ConfigError):  # a model that is not there: the scan says so
            return None
        if named is None:
            return None
        models.append([*named, read])
    return models


def _side_files(config: ScanConfig) -> dict[str, Path | None]:
    files = {}
    if config.features_file is not None:
        files["features"] = Path(config.features_file)
    if config.labeller_options.get("taxonomy") is not None:
        files["taxonomy"] = Path(config.labeller_options["taxonomy"])
    if config.salience_from is not None:
        files["salience_from"] = _data_file(config.salience_from)
    return files


def _file_digest(path: Path | None) -> str | None:
    """The file's sha256; None for what is not a regular file (not keyed: the scan runs)."""
    return sha256_file(path) if path is not None and path.is_file() else None


def _sae_digest(directory: Path) -> str | None:
    """The sha256 of an SAE directory's config and weights files (what the SAE backends read)."""
    digest = hashlib.sha256()
    found = False
    for name in (CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE):
        path = directory / name
        if path.is_file():
            digest.update(f"{name}:{sha256_file(path)};".encode())
            found = True
    return digest.hexdigest() if found else None


def _package_digest() -> str:
    """The sha256 of every source and data file of the package, by relative path: any change to the code."""
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(PACKAGE):
        subdirectories[:] = sorted(name for name in subdirectories if name != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".yaml", ".json")):
                path = Path(directory) / name
                digest.update(f"{path.relative_to(PACKAGE).as_posix()}\0".encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _accelerator(device: str) -> dict | None:
    """What decides whether ``--device auto`` runs on a GPU (and so what ``--dtype auto`` computes in), read without
    torch: the driver's presence and the devices a process may see."""
    if device != "auto" and not device.startswith("cuda"):
        return None
    return {"machine": platform.machine(), "nvidia": os.path.exists("/proc/driver/nvidia/version"),
            "rocm": os.path.exists("/dev/kfd"), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "hip_visible": os.environ.get("HIP_VISIBLE_DEVICES")}


# the CPU flags that decide whether torch computes bfloat16 natively here (pipeline.profiles.native_bfloat16)
BFLOAT16_FLAGS = ("avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO_BYTES = 1 << 20


def _cpu_bfloat16(config) -> dict | None:
    """With ``--dtype auto``, what decides whether a CPU computes the harm judge and SmolLM2 in bfloat16, read
    without torch: the machine and its bfloat16-related CPU flags (a cache copied to another CPU misses)."""
    if config.activations.dtype != "auto":
        return None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", "rb") as handle:  # Linux; elsewhere the machine name alone
            for line in handle.read(CPUINFO_BYTES).decode("ascii", "replace").splitlines():
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "flags": sorted(flags & set(BFLOAT16_FLAGS))}


def write_entry(path: Path, key: str, report: Report, warnings: list[str]) -> None:
    """The report (a finding at a time: a scan's findings are made as they are read) and its checks, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        digest, count = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            def line(value) -> None:
                data = json.dumps(value, separators=(",", ":")).encode("ascii") + b"\n"
                digest.update(data)
                out.write(data)

            line({**report.to_dict(include_findings=False), "warnings": list(warnings)})
            for finding in report.findings:
                line(asdict(finding))
                count += 1
            out.write(json.dumps({"format": REPORT_CACHE_FORMAT, "key": key, "findings": count,
                                  "sha256": digest.hexdigest()}).encode("ascii") + b"\n")

    write_atomic(path, write)


def read_entry(path: Path, key: str) -> ScanReport | None:
    """The entry at ``path`` if it is whole and is ``key``'s; None (scan again) otherwise."""
    if not os.path.lexists(path):
        return None
    try:
        raw = read_bounded(path, MAX_ENTRY_BYTES, CacheError)
    except CacheError:
        return None
    body, _, last = raw.rstrip(b"\n").rpartition(b"\n")
    body += b"\n"
    try:
        check = json.loads(last)
        if not (isinstance(check, dict) and check.get("format") == REPORT_CACHE_FORMAT and check.get("key") == key
                and check.get("sha256") == hashlib.sha256(body).hexdigest()):
            return None
        lines = body.splitlines()
        head = json.loads(lines[0])
        warnings = head.pop("warnings")
        findings = [json.loads(line) for line in lines[1:]]
        if len(findings) != check.get("findings") or not (
                isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
            return None
        report = Report.from_dict({**head, "findings": findings})
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):  # ConfigError: ValueError
        return None
    return ScanReport(report, {}, True, warnings)
