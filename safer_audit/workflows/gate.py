"""The gate: freeze a reviewed dataset's scan as a baseline, then fail only on new suspects.

``build_baseline`` scans the data once (scan.scan_pairs) and writes what later checks
compare against; ``run_gate`` scores only the pairs that are new or changed since then,
with the frozen SAE, features and heads, and says which of them cross the thresholds.
Like detect-secrets, what the baseline holds is accepted; ``accept`` (``gate
--update-baseline``) takes the current state as the new baseline after review.

Design, and why:

- The frozen reference. The baseline header records the model (identity, fingerprint,
  whether it has a reward head, where to load it, its backend), layer, positions, max_length,
  how the data was read (config.ReadOptions, whole: ``data``), the SAE (its backend, its
  directory relative to the baseline when inside the
  repository, and ``TopKSAE.file_hash``), the selected features (latent, sign, label),
  the heads file (hash), the tool version, the ranking weights and the thresholds. The
  gate never retrains the SAE or reselects features; a tool version, SAE, heads file or
  model that differs from the recorded one is a ``BaselineError`` naming each difference,
  never a silent rescore.
- Without ``--sae`` the baseline saves the SAE it trained beside itself
  (``<stem>-sae/``): the activation cache is not part of the repository.
- Reward margin of a new pair: the model's own head if it has one; else a Bradley-Terry
  head fitted on ALL baseline pairs (pooled activation differences, column-scaled as
  scoring.heads.cross_fitted_margins does), saved in ``<stem>-heads.safetensors``. New pairs
  were never in its training data, so no cross-fitting is needed. The sparse head on
  SAE codes (``sae_margin``) is frozen the same way.
- One scoring path: the signals, the suspicion and the category come from scoring/,
  as in a scan (``compute_signals`` with the frozen heads, ``percentile_against``,
  ``combine``, ``categorise_pair``), so a pair scored by the gate against a baseline of
  the same data gets the scan's signals, suspicion and category.
- Suspicion of a new pair: for each signal, the fraction of the other baseline pairs with
  a higher value (ties count half), as a scan ranks a pair among the other pairs; the
  pair's own entry is left out (its old version when it changed, or the same content under
  another id). The values compared are the 6-digit ones the baseline holds. The baseline's
  own margins are cross-fitted (out-of-sample), the new pairs' margins come from heads
  that never saw them: the same kind of number.
- Categories of a new pair, as a scan's: ``quality`` when data.find_quality_issues
  finds a categorising problem (the known pairs are checked first, so a new pair that
  contradicts an existing one carries the finding); ``flipped`` when its suspicion reaches
  the flipped cut-off (the suspicion of the last baseline pair inside the flipped
  fraction, stored exactly) and every signal the ranking uses is negative; ``noisy`` when
  it reaches the noisy cut-off.
- New or changed: a pair id that is not in the baseline, or whose content digest
  (data.pair_digest, as clean and decisions use) differs (an edited record that keeps its
  ``id`` field). Pair ids are assumed unique across the data files; the data layer makes
  them unique within a file.
- The file is ``{"header": {...}, "pairs": {pair_id: {category, digest, reward_margin,
  sae_margin, score_safe}}}``: keys sorted, scores to 6 significant digits, every flat
  object on one line (one line per pair and per feature), no timestamps. The same inputs
  give the same bytes, and a change to the data shows as the lines of the pairs it touched.
  Format 2 (digests by data.pair_digest, exact cut-offs); format 1 is refused with a
  BaselineError that says to make a new baseline.
- The model is loaded (and its fingerprint checked) only when there are new pairs to
  score, so an unchanged dataset is gated without running it.
- Removed and swapped pairs: a baseline pair whose id is not in the data is listed as
  removed (a failure only with ``--fail-on removed``). A new id whose chosen and rejected,
  swapped back, give a removed pair's digest is that pair swapped in place: it is reported
  as changed, with its old and new category and scores, and not as removed.
- Review decisions (decisions.py): a pair marked ``ok`` (by its content digest) is still
  listed but never fails the gate: a person looked at it and cleared it.
- Output formats (text, JSON, JUnit) and the GitHub annotations are plugins: backends/gate_formats.py.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from ..common.digests import DIGEST_LENGTH, is_short_digest, sha256_file, short_digest
from ..common.domain import SIGNALS, Category
from ..common.files import refuse_inputs, render_json, write_atomic
from ..common.progress import no_progress
from ..config import POSITIONS, ActivationConfig, ReadOptions, ScanConfig, option_fields
from ..data import find_quality_issues, load_pairs, pair_digest
from ..errors import BaselineError, ConfigError
from ..pipeline.context import RunContext
from ..plugins import lookup
from ..sae.config import weights_hash
from ..version import __version__

# Gating unchanged data reads the baseline and the data and nothing else: torch, the model and the scoring
# stages are imported where new pairs are scored (a pre-commit hook runs at every commit)
if TYPE_CHECKING:
    import torch

    from ..features.salience import FeatureSet
    from ..sae import TopKSAE
    from ..scoring.categories import Cutoffs

# 2: pair digests by data.pair_digest (context and both final responses, as clean and decisions
# use), hashes of DIGEST_LENGTH, cut-offs stored exactly. 1: digests of the messages, 16 digits.
BASELINE_FORMAT = 2


GATE_CATEGORIES = (Category.FLIPPED, Category.NOISY, Category.QUALITY)


DEFAULT_FAIL_ON = (Category.FLIPPED, Category.QUALITY)  # noisy holds 10% of any data by construction


FAIL_ON_CHOICES = (*GATE_CATEGORIES, "removed")  # removed: baseline pairs no longer in the data


_HEADER_FIELDS = ("format", "tool_version", "model", "activations", "data", "sae", "heads", "features", "ranking",
                  "thresholds")


_PAIR_FIELDS = ("category", "digest", *SIGNALS)


# fields a format-2 baseline made before they were recorded lacks: read as these defaults
_MODEL_DEFAULTS = {"backend": ActivationConfig.backend}


_SAE_DEFAULTS = {"backend": ScanConfig.sae_backend}


@dataclass
class Baseline:
    """A baseline file: the frozen reference (header) and every accepted pair's entry."""

    path: Path
    header: dict
    pairs: dict[str, dict]
    cleared: set[str] = field(default_factory=set, repr=False)  # ids marked ok in review; not written

    def resolve(self, location: str) -> Path:
        """A path recorded relative to the baseline's directory (absolute ones stay)."""
        return self.path.parent / location

    @property
    def features(self) -> FeatureSet:
        from ..features.salience import Feature, FeatureSet

        return FeatureSet([Feature(f["latent"], f["sign"], 0.0, f.get("label")) for f in self.header["features"]],
                          str(self.path))

    @property
    def read(self) -> ReadOptions:
        """How the data was read; a field the baseline does not record (made before it existed) is the default."""
        return ReadOptions(**self.header["data"])

    @property
    def sae_backend(self) -> str:
        return self.header["sae"].get("backend", _SAE_DEFAULTS["backend"])

    def activation_config(self, cache_dir: Path | None = None, device: str = "auto") -> ActivationConfig:
        model = self.header["model"]
        location = model["location"]
        if location is not None and self.resolve(location).is_dir():
            location = str(self.resolve(location))
        act = self.header["activations"]
        config = ActivationConfig(model=location, backend=model.get("backend", _MODEL_DEFAULTS["backend"]),
                                  layer=act["layer"], positions=act["positions"], max_length=act["max_length"],
                                  device=device)
        if cache_dir is not None:
            config.cache_dir = Path(cache_dir)
        return config

    @property
    def cutoffs(self) -> Cutoffs:
        from ..scoring.categories import Cutoffs

        thresholds = self.header["thresholds"]
        return Cutoffs(thresholds["flipped_cutoff"], thresholds["noisy_cutoff"])

    def signal(self, name: str) -> torch.Tensor:
        """The baseline's values of one signal (NaN where it was missing)."""
        import torch

        return torch.tensor([math.nan if e[name] is None else e[name] for e in self.pairs.values()],
                            dtype=torch.float64)

    def text(self) -> str:
        return render_json({"header": self.header, "pairs": self.pairs})

    def write(self, protect: Iterable[str | os.PathLike] = ()) -> None:
        write_atomic(self.path, self.text(), protect=protect)


def read_baseline(path: str | os.PathLike) -> Baseline:
    """Read and check a baseline file; a problem is a one-line BaselineError naming the field.

    Every field is checked by type and range before use, so a hand-edited or truncated file is
    an error here rather than a traceback (or a silently wrapped latent index) later.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys,
                          parse_constant=_no_constant)
    except FileNotFoundError:
        raise BaselineError(f"{path}: no baseline here; make one with `safer-audit baseline DATA --out {path}`") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot read the baseline ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise BaselineError(f"{path}: not a baseline (nested too deeply)") from None
    except _BadJson as exc:
        raise BaselineError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("header"), dict) or not isinstance(data.get("pairs"), dict):
        raise BaselineError(f'{path}: expected an object with "header" and "pairs" objects')
    header = data["header"]
    for name in _HEADER_FIELDS:
        if name not in header:
            raise BaselineError(f'{path}: field "header.{name}" is missing')
    if isinstance(header["format"], bool) or header["format"] != BASELINE_FORMAT:
        older = isinstance(header["format"], int) and not isinstance(header["format"], bool) \
            and 1 <= header["format"] < BASELINE_FORMAT
        raise BaselineError(f"{path}: baseline format {_shown(header['format'])} is not supported "
                            f"(this safer-audit reads format {BASELINE_FORMAT})"
                            + ("; it was made by an older safer-audit, whose pair digests this one does not "
                               f"compare: make a new one with `safer-audit baseline DATA --out {path}`"
                               if older else ""))
    check = _Checker(path)
    check.header(header)
    for pair_id, entry in data["pairs"].items():
        check.pair(pair_id, entry)
    return Baseline(path, header, data["pairs"])


class _BadJson(ValueError):
    pass


def _unique_keys(items: list[tuple[str, object]]) -> dict:
    """json object hook: a key given twice (two entries for one pair id) is an error, not last-wins."""
    out: dict = {}
    for key, value in items:
        if key in out:
            raise _BadJson(f"key {_shown(key)} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str):
    raise _BadJson(f"{name} is not a JSON value (a missing score is written as null)")


def _shown(value) -> str:
    """A short repr for an error line."""
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Type and range checks of a baseline's fields; each failure names the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field_name: str, message: str):
        raise BaselineError(f'{self.path}: field "{field_name}" {message}')

    def section(self, value, name: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(name, f"must be an object, not {_shown(value)}")
        for key in fields:
            if key not in value:
                self.fail(f"{name}.{key}", "is missing")
        unknown = sorted(set(value) - set(fields) - set(optional))
        if unknown:
            self.fail(f"{name}.{unknown[0]}", "is not a baseline field")
        return value

    def string(self, value, name: str, *, optional: bool = False, choices: tuple = ()) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            self.fail(name, f"must be a string{' or null' if optional else ''}, not {_shown(value)}")
        if choices and value not in choices:
            self.fail(name, f"is {_shown(value)}; expected one of {', '.join(choices)}")

    def boolean(self, value, name: str) -> None:
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, not {_shown(value)}")

    def integer(self, value, name: str, low: int | None, high: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be an integer, not {_shown(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(name, f"must be in {low}..{'' if high is None else high}, not {value}")

    def number(self, value, name: str, *, low: float | None = None, high: float | None = None,
               optional: bool = False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, f"must be a finite number{' or null' if optional else ''}, not {_shown(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(name, f"must be in [{low}, {high}], not {value}")

    def digest(self, value, name: str) -> None:
        if not is_short_digest(value):
            self.fail(name, f"must be {DIGEST_LENGTH} lowercase hex digits, not {_shown(value)}")

    def header(self, h: dict) -> None:
        self.section(h, "header", _HEADER_FIELDS)
        self.string(h["tool_version"], "header.tool_version")
        model = self.section(h["model"], "header.model", ("identity", "fingerprint", "reward_head", "location"),
                             optional=tuple(_MODEL_DEFAULTS))
        self.string(model.get("backend", ""), "header.model.backend")
        self.string(model["identity"], "header.model.identity")
        self.string(model["fingerprint"], "header.model.fingerprint")
        self.boolean(model["reward_head"], "header.model.reward_head")
        self.string(model["location"], "header.model.location", optional=True)
        act = self.section(h["activations"], "header.activations", ("layer", "positions", "max_length"))
        self.integer(act["layer"], "header.activations.layer", 0)
        self.string(act["positions"], "header.activations.positions", choices=POSITIONS)
        self.integer(act["max_length"], "header.activations.max_length", 1)
        self.options(h["data"], "header.data", ReadOptions)
        sae = self.section(h["sae"], "header.sae", ("path", "hash", "latents", "d_in"), optional=tuple(_SAE_DEFAULTS))
        self.string(sae.get("backend", ""), "header.sae.backend")
        self.string(sae["path"], "header.sae.path")
        self.digest(sae["hash"], "header.sae.hash")
        self.integer(sae["latents"], "header.sae.latents", 1)
        self.integer(sae["d_in"], "header.sae.d_in", 1)
        heads = self.section(h["heads"], "header.heads", ("path", "hash"))
        self.string(heads["path"], "header.heads.path")
        self.digest(heads["hash"], "header.heads.hash")
        if not isinstance(h["features"], list):
            self.fail("header.features", f"must be a list, not {_shown(h['features'])}")
        seen: set[int] = set()
        for i, feature in enumerate(h["features"]):
            name = f"header.features[{i}]"
            self.section(feature, name, ("latent", "sign", "label"))
            # a negative latent would index from the end of the SAE: another feature, silently
            self.integer(feature["latent"], f"{name}.latent", 0, sae["latents"] - 1)
            if feature["latent"] in seen:
                self.fail(f"{name}.latent", f"repeats latent {feature['latent']}")
            seen.add(feature["latent"])
            if isinstance(feature["sign"], bool) or feature["sign"] not in (1, -1):
                self.fail(f"{name}.sign", f"must be 1 or -1, not {_shown(feature['sign'])}")
            self.string(feature["label"], f"{name}.label", optional=True)
        ranking = h["ranking"]
        if not isinstance(ranking, dict):
            self.fail("header.ranking", f"must be an object, not {_shown(ranking)}")
        for name, weight in ranking.items():
            if name not in SIGNALS:
                self.fail(f"header.ranking.{name}", f"is not a signal; expected one of {', '.join(SIGNALS)}")
            self.number(weight, f"header.ranking.{name}", low=0.0)
        if not any(ranking.values()):
            self.fail("header.ranking", "must give at least one signal a positive weight")
        thresholds = self.section(h["thresholds"], "header.thresholds",
                                  ("flipped_fraction", "noisy_fraction", "flipped_cutoff", "noisy_cutoff"))
        for name in ("flipped_fraction", "noisy_fraction"):
            self.number(thresholds[name], f"header.thresholds.{name}", low=0.0, high=1.0)
        for name in ("flipped_cutoff", "noisy_cutoff"):
            self.number(thresholds[name], f"header.thresholds.{name}", low=0.0, high=1.0, optional=True)

    def options(self, value, name: str, cls) -> None:
        """A config dataclass stored whole (ReadOptions): each field by its type; a missing one is its default."""
        specs = {spec.name: spec for spec in option_fields(cls)}
        self.section(value, name, (), optional=tuple(specs))
        for key, item in value.items():
            spec, label = specs[key], f"{name}.{key}"
            if spec.kind is bool:
                self.boolean(item, label)
            elif spec.kind is int:
                self.integer(item, label, spec.metadata.get("min"))
            else:
                self.string(item, label, optional=spec.optional, choices=spec.choices or ())

    def pair(self, pair_id: str, entry) -> None:
        name = f"pairs.{pair_id}"
        self.section(entry, name, _PAIR_FIELDS)
        self.string(entry["category"], f"{name}.category", choices=tuple(Category))
        self.digest(entry["digest"], f"{name}.digest")
        for signal in SIGNALS:
            self.number(entry[signal], f"{name}.{signal}", optional=True)


def _round(value: float) -> float | None:
    """6 significant digits; None for a value that could not be computed (JSON has no NaN)."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def row_digest(row: dict) -> str:
    """data.pair_digest of a pairs-table row: "the same pair", as clean and decisions tell it."""
    return pair_digest(row["context"], row["chosen"], row["rejected"])


def _file_hash(path: Path) -> str:
    return short_digest(sha256_file(path))


def _portable(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside the git work tree holding ``base`` (or, out
    of any repository, inside ``base``), else absolute: the baseline travels with its repository."""
    path, base = path.resolve(), base.resolve()
    root = next((p for p in (base, *base.parents) if (p / ".git").exists()), base)
    if path.is_relative_to(root):
        return Path(os.path.relpath(path, base)).as_posix()
    return str(path)


def read_sources(sources: list[str], read: ReadOptions | None = None, **keywords) -> pl.DataFrame:
    """The pairs of every source, in order, as one table (``keywords``: ReadOptions fields)."""
    read = ReadOptions.of(read, **keywords)
    frames = [load_pairs(s, read).pairs for s in sources]
    return pl.concat(frames) if len(frames) > 1 else frames[0]


def build_baseline(sources: list[str], out: str | os.PathLike, config: ScanConfig, *,
                   steps=no_progress, decisions: dict | None = None) -> Baseline:
    """Scan ``sources`` and write the baseline to ``out`` (and its SAE and heads beside it).

    ``decisions``: the returned baseline's ``cleared`` holds the ids of pairs marked ok (not written).
    """
    from safetensors.torch import save as save_safetensors

    from ..pipeline.scan import scan_pairs
    from ..scoring.categories import Cutoffs
    from ..scoring.heads import HeadFit, fit_heads

    out = Path(out)
    for path in (out, out.with_name(f"{out.stem}-heads.safetensors")):
        refuse_inputs(path, sources)
    pairs = read_sources(sources, config.read)
    result = scan_pairs(pairs, config, source=", ".join(sources), steps=steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    if config.sae_path is None:
        # the trained SAE lives in the activation cache, which is not part of the repository
        sae_dir = result.sae.save(out.with_name(f"{out.stem}-sae"))
    else:
        sae_dir = Path(config.sae_path)
    heads_path = out.with_name(f"{out.stem}-heads.safetensors")
    pooled = None if result.backend.has_reward_head else result.stats.pooled
    heads = fit_heads(result.stats, HeadFit.of(config), pooled)
    write_atomic(heads_path, save_safetensors(heads), protect=sources)

    entries: dict[str, dict] = {}
    where: dict[str, str] = {}
    cleared: set[str] = set()
    categories = {f.pair_id: f.category for f in result.report.findings}
    for i, row in enumerate(pairs.iter_rows(named=True)):
        entry = {"category": categories[row["pair_id"]], "digest": row_digest(row),
                 **{name: _round(result.signals[name][i]) for name in SIGNALS}}
        known = entries.get(row["pair_id"])
        if known is not None and known["digest"] != entry["digest"]:
            raise BaselineError(f"pair id {row['pair_id']!r} is used by two different pairs: "
                                f"{where[row['pair_id']]} and {row['source']}:{row['line']}")
        entries[row["pair_id"]] = entry
        where[row["pair_id"]] = f"{row['source']}:{row['line']}"
        decision = (decisions or {}).get(row_digest(row))
        if decision is not None and decision.verdict == "ok":
            cleared.add(row["pair_id"])
    backend, run = result.backend, result.report.run
    # exact (not rounded like the scores): the gate compares a suspicion computed the same way against them
    cutoffs = Cutoffs.from_ranking(result.suspicion, config.flipped_fraction, config.noisy_fraction)
    model_location = config.activations.model
    if model_location is not None and Path(model_location).is_dir():
        model_location = _portable(Path(model_location), out.parent)
    header = {
        "format": BASELINE_FORMAT,
        "tool_version": __version__,
        "model": {"identity": backend.identity, "fingerprint": backend.fingerprint,
                  "reward_head": bool(backend.has_reward_head), "location": model_location,
                  "backend": config.activations.backend},
        "activations": {"layer": run.layer, "positions": run.positions, "max_length": run.max_length},
        "data": config.read.to_dict(),
        "sae": {"backend": config.sae_backend, "path": _portable(sae_dir, out.parent),
                "hash": weights_hash(sae_dir),
                "latents": result.sae.cfg.n_latents, "d_in": result.sae.cfg.d_in},
        "heads": {"path": _portable(heads_path, out.parent), "hash": _file_hash(heads_path)},
        "features": [{"latent": f.latent, "sign": f.sign, "label": f.label} for f in result.features.features],
        "ranking": {name: float(w) for name, w in config.ranking.items()},
        "thresholds": {"flipped_fraction": config.flipped_fraction, "noisy_fraction": config.noisy_fraction,
                       "flipped_cutoff": cutoffs.flipped, "noisy_cutoff": cutoffs.noisy},
    }
    baseline = Baseline(out, header, entries, cleared)
    baseline.write(protect=sources)
    return baseline


@dataclass
class GateFinding:
    """A new or changed pair that is not clean."""

    source: str
    line: int
    pair_id: str
    category: Category
    changed: bool  # the id was in the baseline with other content
    suspicion: float
    score_safe: float | None
    reward_margin: float | None
    sae_margin: float | None
    quality: list[str]  # data-quality findings, "kind: detail"
    verdict: str | None = None  # a review decision on this pair's content, if any
    previous: dict | None = None  # a changed pair's baseline entry (category, scores)
    previous_id: str | None = None  # the baseline id of a pair swapped in place (another id now)

    def message(self) -> str:
        scores = ", ".join(f"{name} {_fmt(getattr(self, name))}" for name in SIGNALS)
        text = (f"{'changed' if self.changed else 'new'} pair {self.pair_id} is {self.category} "
                f"(suspicion {self.suspicion:.3f}; {scores})")
        if self.previous is not None:
            text += "; " + _was(self.previous, self.previous_id)
        if self.verdict is not None:
            text += f"; marked {self.verdict} in review"
        return text + "".join(f"; {q}" for q in self.quality)


def _was(entry: dict, previous_id: str | None) -> str:
    swapped = f"swapped in place from pair {previous_id}, " if previous_id else ""
    return swapped + f"was {entry['category']} (" + ", ".join(
        f"{name} {_fmt(entry[name])}" for name in SIGNALS) + ")"


@dataclass
class ChangedPair:
    """A pair the baseline holds whose content changed (an edit under a kept id, or its
    responses swapped in place): old and new category and scores."""

    source: str
    line: int
    pair_id: str
    previous_id: str | None  # the baseline id, when the swap gave the pair another id
    old: dict
    new: dict

    def message(self) -> str:
        old = ", ".join(f"{name} {_fmt(self.old[name])} -> {_fmt(self.new[name])}" for name in SIGNALS)
        how = f"swapped in place (was pair {self.previous_id})" if self.previous_id else "changed in place"
        return f"pair {self.pair_id} {how}: {self.old['category']} -> {self.new['category']} ({old})"


@dataclass
class RemovedPair:
    """A pair the baseline holds that the data no longer does."""

    pair_id: str
    category: str
    score_safe: float | None

    def message(self) -> str:
        return (f"removed pair {self.pair_id} ({self.category} in the baseline, score_safe "
                f"{_fmt(self.score_safe)}) is no longer in the data")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@dataclass
class GateResult:
    """What the gate found: counts, every new pair that is not clean, and what fails."""

    baseline: Baseline
    sources: list[str]
    pairs: int  # pairs in the data given
    new: int  # new or changed pairs, scored
    changed: int  # of them, ids the baseline has with other content
    findings: list[GateFinding]  # new pairs that are not clean, most suspicious first
    fail_on: tuple[str, ...]
    max_new: int
    new_entries: dict[str, dict] = field(default_factory=dict, repr=False)  # baseline entries of the new pairs
    current_ids: list[str] = field(default_factory=list, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    removed: list[RemovedPair] = field(default_factory=list)  # in the baseline, not in the data
    changed_pairs: list[ChangedPair] = field(default_factory=list)  # old and new scores of each changed pair
    decisions: str | None = None  # the decisions file read, if any

    @property
    def failures(self) -> list[GateFinding]:
        """New suspects in the --fail-on categories, less those a reviewer marked ok."""
        return [f for f in self.findings if f.category in self.fail_on and f.verdict != "ok"]

    @property
    def failed(self) -> bool:
        return len(self.failures) > self.max_new or ("removed" in self.fail_on and bool(self.removed))

    def to_dict(self) -> dict:
        return {"baseline": str(self.baseline.path), "sources": self.sources, "pairs": self.pairs,
                "new": self.new, "changed": self.changed, "fail_on": list(self.fail_on), "max_new": self.max_new,
                "failed": self.failed, "failures": len(self.failures), "decisions": self.decisions,
                "findings": [asdict(f) for f in self.findings], "changed_pairs": [asdict(c) for c in self.changed_pairs],
                "removed": [asdict(r) for r in self.removed], "timings": self.timings}


def check_reference(baseline: Baseline) -> None:
    """Raise BaselineError, naming every difference, if the tool, SAE or heads changed since."""
    header, differences = baseline.header, []
    if header["tool_version"] != __version__:
        differences.append(f"tool version {header['tool_version']} (now {__version__})")
    for name, hash_of in (("sae", weights_hash), ("heads", lambda p: _file_hash(Path(p)))):
        path = baseline.resolve(header[name]["path"])
        try:
            now = hash_of(path)
        except (OSError, ValueError):
            differences.append(f"{name} {path} is missing or unreadable")
            continue
        if now != header[name]["hash"]:
            differences.append(f"{name} {path} has hash {now} (baseline: {header[name]['hash']})")
    if differences:
        raise BaselineError(_mismatch(baseline, differences))


def _mismatch(baseline: Baseline, differences: list[str]) -> str:
    return (f"{baseline.path}: made with another reference than the one in use: {'; '.join(differences)}; "
            f"make a new baseline with `safer-audit baseline`")


def _check_model(baseline: Baseline, backend, sae: TopKSAE) -> None:
    model, differences = baseline.header["model"], []
    if backend.fingerprint != model["fingerprint"]:
        differences.append(f"model {backend.identity} has fingerprint {backend.fingerprint} "
                           f"(baseline: {model['identity']} with {model['fingerprint']})")
    if bool(backend.has_reward_head) != model["reward_head"]:
        differences.append(f"model {backend.identity} {'has' if backend.has_reward_head else 'has no'} reward head")
    if sae.cfg.d_in != backend.d_model:
        differences.append(f"SAE reads width {sae.cfg.d_in}, the model has width {backend.d_model}")
    if differences:
        raise BaselineError(_mismatch(baseline, differences))


def score_frozen(pairs: pl.DataFrame, baseline: Baseline, backend, sae: TopKSAE, config: ActivationConfig,
                 *, steps=no_progress, ctx: RunContext | None = None) -> dict[str, torch.Tensor]:
    """score_safe, reward_margin and sae_margin of ``pairs`` with the baseline's frozen SAE,
    features and heads (scoring.heads.compute_signals, as a scan): the scan's activation and encoding
    stages, so activations and codes come from (and go to) the same caches."""
    from safetensors.torch import load as load_safetensors

    from ..pipeline import stages
    from ..scoring.heads import compute_signals

    heads_path = baseline.resolve(baseline.header["heads"]["path"])
    heads = load_safetensors(heads_path.read_bytes())
    ctx = ctx or RunContext.of(ScanConfig(activations=config), steps=steps)
    model = stages.model(ctx, backend)
    acts = stages.activations(pairs, model, ctx)
    stats = stages.encode(acts.store, sae, ctx)
    try:
        if backend.has_reward_head:
            return compute_signals(stats, baseline.features, rewards=stats.scores, heads=heads)
        return compute_signals(stats, baseline.features, pooled=stats.pooled, heads=heads)
    except KeyError as exc:
        raise BaselineError(f"{heads_path}: the heads file has no tensor {exc}; make a new baseline") from None


def suspicion_against(values: dict[str, list[float | None]], baseline: Baseline,
                      own_entries: list[dict | None]) -> torch.Tensor:
    """The suspicion of pairs (their rounded signal values) among the baseline's pairs, as a scan
    ranks a pair among the others: scoring.ranks.percentile_against per signal, leaving out each
    pair's own entry (None: none), combined with the baseline's ranking weights."""
    import torch

    from ..scoring.ranks import combine, percentile_against

    def column(items) -> torch.Tensor:
        return torch.tensor([math.nan if v is None else v for v in items], dtype=torch.float64)

    percentiles = {name: percentile_against(column(values[name]), baseline.signal(name),
                                            leave_out=column(None if e is None else e[name] for e in own_entries))
                   for name in SIGNALS}
    return combine(percentiles, baseline.header["ranking"])


def _own_entries(baseline: Baseline, rows: list[dict], digests: list[str]) -> list[dict | None]:
    """Each row's own baseline entry, left out of what it is ranked against: the entry of its id
    (the old version of a changed pair), else one with its digest (the same pair under another id)."""
    by_digest: dict[str, dict] = {}
    for entry in baseline.pairs.values():
        by_digest.setdefault(entry["digest"], entry)
    return [baseline.pairs.get(row["pair_id"]) or by_digest.get(digest) for row, digest in zip(rows, digests,
                                                                                               strict=True)]


def default_decisions_path(baseline_path: str | os.PathLike) -> Path | None:
    """``decisions.json`` next to the baseline, when there is one: what gate and baseline read by default."""
    path = Path(baseline_path).parent / "decisions.json"
    return path if path.is_file() else None


def run_gate(sources: list[str], baseline_path: str | os.PathLike, *, fail_on: tuple[str, ...] = DEFAULT_FAIL_ON,
             max_new: int = 0, cache_dir: Path | None = None, device: str = "auto",
             steps=no_progress, decisions: dict | None = None, decisions_path: str | None = None) -> GateResult:
    """Score the pairs of ``sources`` that the baseline does not hold, with its frozen reference.

    ``decisions`` (digest -> decisions.Decision): a new suspect marked ok is listed, not failed.
    """
    unknown = [c for c in fail_on if c not in FAIL_ON_CHOICES]
    if unknown:
        raise ConfigError(f"cannot fail on {unknown[0]!r}; choose from {', '.join(FAIL_ON_CHOICES)}")
    ctx = RunContext(ScanConfig(), steps)
    with ctx.timed("load"):
        baseline = read_baseline(baseline_path)
        check_reference(baseline)
        changes = compare(read_sources(sources, baseline.read), baseline)
    known = changes.known_entry
    result = GateResult(baseline, list(sources), len(changes.rows), len(changes.new_rows),
                        sum(1 for i in changes.new_rows if known[i] is not None), [], tuple(fail_on), max_new,
                        current_ids=[row["pair_id"] for row in changes.rows], timings=ctx.timings,
                        removed=[RemovedPair(pid, entry["category"], entry["score_safe"])
                                 for pid, entry in sorted(changes.removed.items())],
                        decisions=decisions_path)
    if not changes.new_rows:
        return result
    from ..model.activations import executor_for, load_backend
    from ..pipeline import stages

    with ctx.timed("quality"):
        quality = _quality(changes)
    with ctx.timed("model"):
        sae = lookup("sae", baseline.sae_backend).load(baseline.resolve(baseline.header["sae"]["path"]))
        config = ScanConfig(activations=baseline.activation_config(cache_dir, device))
        ctx = replace(ctx, config=config, executor=executor_for(config.activations))  # the same clock
        model = stages.model(ctx, load_backend(config.activations))
        _check_model(baseline, model.backend, sae)
    signals = score_frozen(changes.pairs[changes.new_rows], baseline, model.backend, sae, config.activations, ctx=ctx)
    with ctx.timed("score"):
        _judge_new(result, baseline, changes, quality, signals, decisions or {})
    return result


@dataclass
class Changes:
    """What of the data is new or changed since the baseline, row by row in the data's order."""

    pairs: pl.DataFrame
    rows: list[dict]
    digests: list[str]  # each row's content digest (row_digest)
    known_entry: list[dict | None]  # each row's baseline entry: its id's, or the pair it was swapped from
    new_rows: list[int]  # rows whose id is new or whose content changed
    swapped_from: dict[int, str]  # row -> the removed pair id whose responses it holds swapped
    removed: dict[str, dict]  # baseline pairs no longer in the data (and not swapped in place), by id


def compare(pairs: pl.DataFrame, baseline: Baseline) -> Changes:
    """The data against the baseline: new and changed rows, removed pairs, pairs swapped in place."""
    rows = list(pairs.iter_rows(named=True))
    digests = [row_digest(row) for row in rows]
    known_entry = [baseline.pairs.get(row["pair_id"]) for row in rows]
    new_rows = [i for i, (e, d) in enumerate(zip(known_entry, digests, strict=True)) if e is None or e["digest"] != d]
    current = {row["pair_id"] for row in rows}
    gone = {pid: entry for pid, entry in baseline.pairs.items() if pid not in current}
    # a new id whose responses, swapped back, are a removed pair: that pair swapped in place
    gone_by_digest = {entry["digest"]: pid for pid, entry in gone.items()}
    swapped_from: dict[int, str] = {}
    for i in new_rows:
        if known_entry[i] is None:
            back = pair_digest(rows[i]["context"], rows[i]["rejected"], rows[i]["chosen"])
            if back in gone_by_digest:
                swapped_from[i] = gone_by_digest.pop(back)
                known_entry[i] = gone[swapped_from[i]]
    removed = {pid: gone[pid] for pid in gone_by_digest.values()}
    return Changes(pairs, rows, digests, known_entry, new_rows, swapped_from, removed)


def _quality(changes: Changes) -> dict[int, list[tuple[str, str]]]:
    """Row -> (kind, detail) of its quality findings; known pairs are read first, so a duplicate or a
    contradiction lands on the new pair of the two."""
    new = set(changes.new_rows)
    order = [i for i in range(len(changes.rows)) if i not in new] + changes.new_rows
    position_of = {row["pair_id"]: i for i, row in enumerate(changes.rows)}
    quality: dict[int, list[tuple[str, str]]] = {}
    for issue in find_quality_issues(changes.rows[i] for i in order):
        quality.setdefault(position_of[issue.pair_id], []).append((issue.kind, issue.detail))
    return quality


def _judge_new(result: GateResult, baseline: Baseline, changes: Changes, quality, signals, decisions) -> None:
    """The new and changed pairs' categories against the baseline's cut-offs, into ``result``."""
    from ..scoring.categories import categorise_pair
    from ..scoring.ranks import ranked_signals

    rows, digests, known_entry, swapped_from = changes.rows, changes.digests, changes.known_entry, changes.swapped_from
    # the 6-digit values the baseline holds and compares with
    values = {name: [_round(v) for v in signals[name].tolist()] for name in SIGNALS}
    suspicion = suspicion_against(values, baseline, _own_entries(baseline, [rows[i] for i in changes.new_rows],
                                                                 [digests[i] for i in changes.new_rows]))
    weights, cutoffs = baseline.header["ranking"], baseline.cutoffs
    for n, i in enumerate(changes.new_rows):
        row = rows[i]
        pair_values = {name: values[name][n] for name in SIGNALS}
        kinds = [kind for kind, _ in quality.get(i, [])]
        category = categorise_pair(float(suspicion[n]), ranked_signals(pair_values, weights), kinds, cutoffs)
        result.new_entries[row["pair_id"]] = {"category": str(category), "digest": digests[i], **pair_values}
        if known_entry[i] is not None:
            result.changed_pairs.append(ChangedPair(row["source"], row["line"], row["pair_id"], swapped_from.get(i),
                                                    dict(known_entry[i]), dict(result.new_entries[row["pair_id"]])))
        if category != Category.CLEAN:
            decision = decisions.get(digests[i])
            result.findings.append(GateFinding(
                row["source"], row["line"], row["pair_id"], category, known_entry[i] is not None,
                round(float(suspicion[n]), 6), **pair_values,
                quality=[f"{kind}: {detail}" for kind, detail in quality.get(i, [])],
                verdict=decision.verdict if decision is not None else None,
                previous=dict(known_entry[i]) if known_entry[i] is not None else None,
                previous_id=swapped_from.get(i)))
    result.findings.sort(key=lambda f: (-f.suspicion, f.source, f.line))


def accept(result: GateResult) -> Baseline:
    """Make the gated data the baseline: its pairs, the new ones with their frozen scores.

    Pairs the baseline holds but the data given does not are dropped, so give every data
    file. The reference (model, SAE, features, heads, cut-offs) stays as it is.
    """
    entries = {pid: result.new_entries.get(pid) or result.baseline.pairs[pid] for pid in result.current_ids}
    updated = Baseline(result.baseline.path, result.baseline.header, entries)
    updated.write(protect=result.sources)
    return updated
