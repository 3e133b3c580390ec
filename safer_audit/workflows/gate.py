"""The gate: freeze a reviewed dataset's scan as a baseline, then fail on new suspects and changed labels.

``build_baseline`` scans the data once (scan.scan_pairs) and writes what later checks
compare against; ``run_gate`` scores only the pairs that are new or changed since then,
with the frozen SAE, features and heads, and says which of them cross the thresholds.
Like detect-secrets, what the baseline holds is accepted; ``accept`` (``gate
--update-baseline``) takes the current state as the new baseline after review.

Design, and why:

- The frozen reference. The baseline header records the model (identity, fingerprint,
  whether it has a reward head, where to load it, its backend), layer, positions, max_length,
  how the data was read (config.ReadOptions, whole: ``data``) and how many records that
  skipped, the SAE (its backend, its directory relative to the baseline, and
  ``TopKSAE.file_hash``), the selected features (latent, sign, label),
  the heads file (hash), the tool version, the ranking weights and the thresholds. The
  gate never retrains the SAE or reselects features; a tool version, SAE, heads file or
  model that differs from the recorded one is a ``BaselineError`` naming each difference,
  never a silent rescore.
- The baseline keeps its SAE beside itself (``<stem>-sae/``: the one it trained, since the
  activation cache is not part of the repository, or a copy of the one given), and its heads:
  the gate reads only regular files inside the baseline's directory, with size bounds.
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
  fraction) and every signal the ranking uses is negative; ``noisy`` when it reaches the
  noisy cut-off. The cut-offs, and the baseline pairs' categories (but ``quality``), come
  from the stored 6-digit values (stored_suspicion), as the gate computes a new pair's, so
  that the gate can recompute them. The baseline's flipped fraction (``baseline
  --flipped-fraction``) is a scan's 4%: measured on HH against 1%, it fails 86% of flips
  picked by safety salience and 4.1% of honest additions (1%: 44% and 1.6%).
- New or changed: a pair id that is not in the baseline, or whose content digest
  (data.pair_digest, as clean and decisions use) differs (an edited record that keeps its
  ``id`` field). Pair ids are assumed unique across the data files; the data layer makes
  them unique within a file.
- The file is ``{"content_digest": ..., "header": {...}, "pairs": {pair_id: {category, digest,
  reward_margin, sae_margin, score_safe}}}``: keys sorted, scores to 6 significant digits, every flat
  object on one line (one line per pair and per feature), no timestamps. The same inputs
  give the same bytes, and a change to the data shows as the lines of the pairs it touched.
  Format 3; formats 1 and 2 are refused with a BaselineError that says to make a new baseline.
- A baseline cannot be edited into a pass. It is committed, so it changes in the same pull
  request as the data: the content digest covers everything that decides a verdict (read
  options, features and signs, cut-offs, every pair's scores and digest, the SAE's and heads'
  hashes, which the gate recomputes from the files); whenever the model runs, the cut-offs
  and categories are recomputed from the stored values and a seeded sample of CHECKED_PAIRS
  unchanged pairs is scored again and must give the stored score_safe (and the reward margin
  of a model's own head; the other margins were cross-fitted). A baseline made again
  consistently from poisoned data is not caught: it is a new baseline, every line changed.
- Records the read options skip (skip_invalid) are counted; more than the baseline's count
  is a BaselineError, so options that drop records cannot hide new pairs.
- The model is loaded (and its fingerprint checked) only when there are new pairs to
  score, so an unchanged dataset is gated without running it.
- Removed and swapped pairs: a baseline pair whose id is not in the data is listed as
  removed (a failure only with ``--fail-on removed``). A new id whose chosen and rejected,
  swapped back, give a removed pair's digest is that pair swapped in place: it is reported
  as changed, with its old and new category and scores, and not as removed.
- A changed pair (swapped, or edited under a kept id) fails by default (``changed`` in
  fail_on) whatever its category now: relabelling the most safety-salient pairs is the
  SAFER paper's poisoning, and a pair swapped in place can stay ``clean``. An edit that also
  changes an automatic id is a removed pair and a new one (the baseline holds no texts).
- Review decisions (decisions.py): a pair marked ``ok`` (by its content digest; ``gate
  --mark-ok`` or ``review``) is still listed but never fails the gate: a person looked at it
  and cleared it.
- Output formats (text, JSON, JUnit) and the GitHub annotations are plugins: backends/gate_formats.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from ..common.digests import DIGEST_LENGTH, is_short_digest, sha256_text, short_digest
from ..common.domain import SIGNALS, Category
from ..common.files import read_bounded, refuse_inputs, render_json, write_atomic
from ..common.progress import no_progress
from ..config import POSITIONS, ActivationConfig, ReadOptions, ScanConfig, option_fields
from ..data import PAIR_SCHEMA, PairReader, find_quality_issues, load_pairs, pair_digest, pair_frame
from ..errors import BaselineError, ConfigError
from ..pipeline.context import RunContext
from ..plugins import lookup
from ..sae.config import CFG_FILE, SPARSIFY_WEIGHTS_FILE, WEIGHTS_FILE, weights_hash
from ..version import __version__

# Gating unchanged data reads the baseline and the data and nothing else: torch, the model and the scoring
# stages are imported where new pairs are scored (a pre-commit hook runs at every commit)
if TYPE_CHECKING:
    import torch

    from ..features.salience import FeatureSet
    from ..sae import TopKSAE
    from ..scoring.categories import Cutoffs

# 3: a content digest over the header and pairs, the records the read skipped, cut-offs from the stored
# scores, the SAE and heads inside the baseline's directory. 2: digests by data.pair_digest, exact cut-offs.
# 1: digests of the messages, 16 digits.
BASELINE_FORMAT = 3


GATE_CATEGORIES = (Category.FLIPPED, Category.NOISY, Category.QUALITY)


# noisy holds 10% of any data by construction; changed: a pair edited or swapped under the baseline's eyes
DEFAULT_FAIL_ON = (Category.FLIPPED, Category.QUALITY, "changed")
# The SAFER attack flips the pairs of highest score_safe, so a flipped one lands in score_safe's far tail
# while its reward margin may be only mildly negative and its combined rank short of the cut. A new pair
# whose score_safe is lower than all but this share of the baseline's, and whose reward margin is
# negative, is flipped too. Measured on HH (benchmarks/bench_gate.py): 1.5% lifts targeted flips caught
# from 86% to 92% while honest additions failing stay under 5%.
SALIENT_TAIL = 0.015


FAIL_ON_CHOICES = (*GATE_CATEGORIES, "changed", "removed")  # removed: baseline pairs no longer in the data


_HEADER_FIELDS = ("format", "tool_version", "model", "activations", "data", "skipped", "sae", "heads", "features",
                  "ranking", "thresholds")


_PAIR_FIELDS = ("category", "digest", *SIGNALS)


_CATEGORIES = tuple(Category)  # made once, not for each of a baseline's pairs (the enum is iterated in Python)


# fields a baseline made before they were recorded lacks: read as these defaults
_MODEL_DEFAULTS = {"backend": ActivationConfig.backend}


_SAE_DEFAULTS = {"backend": ScanConfig.sae_backend}


# Size bounds of what a baseline points at, all read whole: a pair takes about 175 bytes of the
# baseline file, so 512 MiB is some 3 million pairs; heads are a few vectors of the model's width.
MAX_BASELINE_BYTES = 512 << 20
MAX_HEADS_BYTES = 256 << 20
MAX_SAE_BYTES = 8 << 30
MAX_SAE_CONFIG_BYTES = 1 << 20


# Baseline pairs the gate scores again with the frozen reference, whenever it runs the model, to check
# that the stored scores are the reference's: a seeded sample of the unchanged pairs.
CHECKED_PAIRS = 32


@dataclass
class Baseline:
    """A baseline file: the frozen reference (header) and every accepted pair's entry."""

    path: Path
    header: dict
    pairs: dict[str, dict]
    cleared: set[str] = field(default_factory=set, repr=False)  # ids marked ok in review; not written
    heads: bytes | None = field(default=None, repr=False)  # the heads file, once check_reference read it

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
        return render_json({"content_digest": content_digest(self.header, self.pairs), "header": self.header,
                            "pairs": self.pairs})

    def write(self, protect: Iterable[str | os.PathLike] = ()) -> None:
        write_atomic(self.path, self.text(), protect=protect)

    def referenced(self, name: str) -> Path:
        """The SAE directory or heads file the header names (``name``: sae, heads), once checked to be
        inside the baseline's directory: a baseline cannot make the gate read ``/dev/zero`` or a file
        of another project."""
        location = self.header[name]["path"]
        where = f'{self.path}: field "header.{name}.path"'
        if Path(location).is_absolute():
            raise BaselineError(f"{where} is {_shown(location)}; it must be a path relative to the baseline's "
                                f"directory, inside it")
        base = Path(os.path.realpath(self.path.parent))
        target = Path(os.path.realpath(self.path.parent / location))
        if target == base or not target.is_relative_to(base):
            raise BaselineError(f"{where} is {_shown(location)}, which is outside the baseline's directory "
                                f"{self.path.parent}; make a new baseline, which keeps its SAE and heads beside it")
        return target


def content_digest(header: dict, pairs: dict) -> str:
    """The digest of everything in a baseline that decides a verdict: the whole header (read options,
    features and signs, cut-offs, the SAE's and heads' hashes...) and every pair's entry, as written."""
    return short_digest(sha256_text(render_json({"header": header, "pairs": pairs})))


def read_baseline(path: str | os.PathLike) -> Baseline:
    """Read and check a baseline file; a problem is a one-line BaselineError naming the field.

    Every field is checked by type and range before use, so a hand-edited or truncated file is
    an error here rather than a traceback (or a silently wrapped latent index) later; then its
    content digest, so an edit that keeps the types (a score, a sign, a cut-off, a read option)
    is refused too. The file is read with a size bound, and never from a FIFO or a device.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise BaselineError(f"{path}: no baseline here; make one with `safer-audit baseline DATA -o {path}`")
    raw = read_bounded(path, MAX_BASELINE_BYTES, lambda message: BaselineError(f"{path}: {message}"))
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise BaselineError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise BaselineError(f"{path}: not a baseline (nested too deeply)") from None
    except _BadJson as exc:
        raise BaselineError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("header"), dict) or not isinstance(data.get("pairs"), dict):
        raise BaselineError(f'{path}: expected an object with "header" and "pairs" objects')
    header = data["header"]
    if "format" not in header:
        raise BaselineError(f'{path}: field "header.format" is missing')
    if isinstance(header["format"], bool) or header["format"] != BASELINE_FORMAT:
        older = isinstance(header["format"], int) and not isinstance(header["format"], bool) \
            and 1 <= header["format"] < BASELINE_FORMAT
        raise BaselineError(f"{path}: baseline format {_shown(header['format'])} is not supported "
                            f"(this safer-audit reads format {BASELINE_FORMAT})"
                            + ("; it was made by an older safer-audit, whose baselines this one cannot check: "
                               f"make a new one with `safer-audit baseline DATA -o {path}`" if older else ""))
    for name in _HEADER_FIELDS:
        if name not in header:
            raise BaselineError(f'{path}: field "header.{name}" is missing')
    unknown = sorted(set(data) - {"content_digest", "header", "pairs"})
    if unknown:
        raise BaselineError(f'{path}: field "{unknown[0]}" is not a baseline field')
    check = _Checker(path)
    check.header(header)
    for pair_id, entry in data["pairs"].items():
        check.pair(pair_id, entry)
    check.digest(data.get("content_digest"), "content_digest")
    now = content_digest(header, data["pairs"])
    if data["content_digest"] != now:
        raise BaselineError(f"{path}: its content digest {data['content_digest']} does not match its header and "
                            f"pairs ({now}): the file was edited after it was made; make it again with "
                            "`safer-audit baseline`")
    baseline = Baseline(path, header, data["pairs"])
    for name in ("sae", "heads"):
        baseline.referenced(name)
    return baseline


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
        self.integer(h["skipped"], "header.skipped", 0)
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
        self.string(entry["category"], f"{name}.category", choices=_CATEGORIES)
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
    return load_sources(sources, read, **keywords)[0]


def load_sources(sources: list[str], read: ReadOptions | None = None, **keywords) -> tuple[pl.DataFrame, int]:
    """read_sources, and how many records the read options skipped (skip_invalid)."""
    read = ReadOptions.of(read, **keywords)
    loaded = [load_pairs(s, read) for s in sources]
    frames = [load.pairs for load in loaded]
    return (pl.concat(frames) if len(frames) > 1 else frames[0]), sum(len(load.skipped) for load in loaded)


def read_rows(sources: list[str], read: ReadOptions | None = None) -> tuple[list[dict], int]:
    """The pairs of every source, in order, as rows (dicts with the PAIR_SCHEMA columns, as a pairs table's
    ``iter_rows(named=True)`` gives them), and how many records the read options skipped: what the gate
    compares with the baseline. No table is built: an unchanged dataset needs none (building one through
    Arrow imports pandas, a third of the gate's time on unchanged data)."""
    read = ReadOptions.of(read)
    rows, skipped = [], 0
    for source in sources:
        reader = PairReader(source, read)
        rows.extend(reader)
        skipped += reader.skipped_count
    return rows, skipped


def stored_suspicion(pairs: dict[str, dict], ranking: dict[str, float]) -> torch.Tensor:
    """The suspicion of each baseline pair among the others, from the 6-digit values the baseline
    holds (the scan's ranking, as the gate computes it for a new pair): what the cut-offs are taken
    from, so that the gate can recompute them."""
    import torch

    from ..scoring.ranks import combine, percentile_from_low

    def column(name: str) -> torch.Tensor:
        return torch.tensor([math.nan if e[name] is None else e[name] for e in pairs.values()], dtype=torch.float64)

    return combine({name: percentile_from_low(column(name)) for name in SIGNALS}, ranking)


def stored_category(entry: dict, suspicion_value: float, ranking: dict[str, float], cutoffs: Cutoffs) -> str:
    """A baseline pair's category from its stored values and the cut-offs (categorise_pair, as for a new
    pair); ``quality`` (found in the data, which the baseline does not hold) stays."""
    from ..scoring.categories import categorise_pair
    from ..scoring.ranks import ranked_signals

    if entry["category"] == Category.QUALITY:
        return str(Category.QUALITY)
    values = {name: entry[name] for name in SIGNALS}
    return str(categorise_pair(suspicion_value, ranked_signals(values, ranking), [], cutoffs))


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
    sae_dir, heads_path = out.with_name(f"{out.stem}-sae"), out.with_name(f"{out.stem}-heads.safetensors")
    for path in (out, heads_path):
        refuse_inputs(path, sources)
    pairs, skipped = load_sources(sources, config.read)
    # the gate categorises by the cut-offs it stores (the judges rule): no harm judge run for the category
    result = scan_pairs(pairs, replace(config, flipped_rule="judges"), source=", ".join(sources), steps=steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    if config.sae_path is None:
        # the trained SAE lives in the activation cache, which is not part of the repository
        result.sae.save(sae_dir)
    elif _inside(Path(config.sae_path), out.parent):
        sae_dir = Path(config.sae_path)
    else:  # the gate reads only what is inside the baseline's directory: a copy, in the SAE's own format
        _copy_sae(Path(config.sae_path), sae_dir, protect=sources)
    pooled = None if result.backend.has_reward_head else result.stats.pooled
    heads = save_safetensors(fit_heads(result.stats, HeadFit.of(config), pooled))
    write_atomic(heads_path, heads, protect=sources)

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
    ranking = {name: float(w) for name, w in config.ranking.items()}
    suspicion = stored_suspicion(entries, ranking)
    cutoffs = Cutoffs.from_ranking(suspicion, config.flipped_fraction, config.noisy_fraction)
    for entry, value in zip(entries.values(), suspicion.tolist(), strict=True):
        entry["category"] = stored_category(entry, value, ranking, cutoffs)
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
        "skipped": skipped,
        "sae": {"backend": config.sae_backend, "path": Path(os.path.relpath(sae_dir, out.parent)).as_posix(),
                "hash": weights_hash(sae_dir),
                "latents": result.sae.cfg.n_latents, "d_in": result.sae.cfg.d_in},
        "heads": {"path": heads_path.name, "hash": short_digest(hashlib.sha256(heads).hexdigest())},
        "features": [{"latent": f.latent, "sign": f.sign, "label": f.label} for f in result.features.features],
        "ranking": ranking,
        "thresholds": {"flipped_fraction": config.flipped_fraction, "noisy_fraction": config.noisy_fraction,
                       "flipped_cutoff": cutoffs.flipped, "noisy_cutoff": cutoffs.noisy},
    }
    baseline = Baseline(out, header, entries, cleared)
    baseline.write(protect=sources)
    return baseline


def _inside(path: Path, directory: Path) -> bool:
    path, directory = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    return path != directory and path.is_relative_to(directory)


def _copy_sae(source: Path, target: Path, protect: list[str]) -> None:
    """The files an SAE backend reads (its config and weights), copied into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE):
        if (source / name).is_file():
            write_atomic(target / name, _bounded(source / name, MAX_SAE_BYTES), protect=protect)


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
    """A pair the baseline holds whose content changed: its responses swapped (in place, which gives
    an automatic id another value, or under a kept id) or its text edited under a kept id; old and
    new category and scores. A label change is what a poisoning looks like, so by default it fails
    (``changed`` in fail_on) until a review marks the new content ok."""

    source: str
    line: int
    pair_id: str
    previous_id: str | None  # the baseline id, when the swap gave the pair another id
    old: dict
    new: dict
    change: str = "edited"  # swapped (chosen and rejected) or edited
    prefer_rejected: list[str] = field(default_factory=list)  # ranked signals that now prefer the rejected one
    verdict: str | None = None  # a review decision on the new content, if any
    digest: str = ""  # the new content's (decisions are keyed by it)

    def message(self) -> str:
        if self.change == "swapped":
            what = "chosen and rejected swapped" + (f" (was pair {self.previous_id})" if self.previous_id
                                                    else " under its id")
        else:
            what = "context or responses edited under its id"
        if self.prefer_rejected:
            judges = f"{' and '.join(self.prefer_rejected)} now prefer{'s' if len(self.prefer_rejected) == 1 else ''}" \
                     " the rejected response"
        else:
            judges = "the judges still prefer the chosen response"
        scores = ", ".join(f"{name} {_fmt(self.old[name])} -> {_fmt(self.new[name])}" for name in SIGNALS)
        text = f"pair {self.pair_id}: {what}; {judges}; {self.old['category']} -> {self.new['category']} ({scores})"
        return text + (f"; marked {self.verdict} in review" if self.verdict is not None else "")


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
    """What the gate found: counts, every new pair that is not clean, every changed pair, and what fails."""

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
    skipped: int = 0  # records the baseline's read options skipped
    checked: int = 0  # baseline pairs scored again to check the baseline's scores

    @property
    def failures(self) -> list[GateFinding]:
        """New suspects in the --fail-on categories, less those a reviewer marked ok (a changed pair
        fails as a change when ``changed`` is failed on)."""
        return [f for f in self.findings if f.category in self.fail_on and f.verdict != "ok"
                and not (f.changed and "changed" in self.fail_on)]

    @property
    def failing_changes(self) -> list[ChangedPair]:
        """Changed pairs not marked ok in review, when ``changed`` is failed on."""
        if "changed" not in self.fail_on:
            return []
        return [c for c in self.changed_pairs if c.verdict != "ok"]

    @property
    def failed(self) -> bool:
        return (len(self.failures) > self.max_new or bool(self.failing_changes)
                or ("removed" in self.fail_on and bool(self.removed)))

    def failing_ids(self) -> list[str]:
        return [c.pair_id for c in self.failing_changes] + [f.pair_id for f in self.failures]

    def next_steps(self) -> list[str]:
        """What to do about a failure: look at the pairs, mark the right ones ok, or accept the state."""
        if not self.failed:
            return []
        data = " ".join(shlex.quote(source) for source in self.sources)
        decisions = self.decisions or str(self.baseline.path.parent / "decisions.json")
        ids = self.failing_ids()
        shown = " ".join(f"--mark-ok {shlex.quote(pair_id)}" for pair_id in ids[:3]) + (" ..." if len(ids) > 3 else "")
        steps = [f"look at each failing pair: `git diff` shows what changed, and "
                 f"`safer-audit explain {shlex.quote(self.sources[0])} PAIR_ID` shows a pair in full with its scores"]
        if ids:
            steps.append(f"a pair that is right as it is: `safer-audit gate {data} --baseline "
                         f"{shlex.quote(str(self.baseline.path))} {shown}` records it as reviewed in {decisions} "
                         "(commit that file)")
        steps.append("`--update-baseline` only when the data as it is now, removed pairs included, is what later "
                     "changes should be compared against: it accepts every pair listed here")
        return steps

    def to_dict(self) -> dict:
        return {"baseline": str(self.baseline.path), "sources": self.sources, "pairs": self.pairs,
                "new": self.new, "changed": self.changed, "skipped": self.skipped, "checked": self.checked,
                "fail_on": list(self.fail_on), "max_new": self.max_new,
                "failed": self.failed, "failures": len(self.failures) + len(self.failing_changes),
                "failing_pairs": self.failing_ids(), "decisions": self.decisions,
                "findings": [asdict(f) for f in self.findings], "changed_pairs": [asdict(c) for c in self.changed_pairs],
                "removed": [asdict(r) for r in self.removed], "next_steps": self.next_steps(),
                "timings": self.timings}


def check_reference(baseline: Baseline) -> None:
    """Raise BaselineError, naming every difference, if the tool, SAE or heads changed since.

    The SAE's weights and the heads are read whole, with size bounds (read_bounded: never a FIFO
    or a device), from inside the baseline's directory; the heads' bytes are kept for scoring.
    """
    header, differences = baseline.header, []
    if header["tool_version"] != __version__:
        differences.append(f"tool version {header['tool_version']} (now {__version__})")
    for name in ("sae", "heads"):
        path = baseline.referenced(name)
        try:
            content = _sae_weights(path) if name == "sae" else _bounded(path, MAX_HEADS_BYTES)
        except BaselineError as exc:
            differences.append(f"{name} {exc}")
            continue
        if name == "heads":
            baseline.heads = content
        now = short_digest(hashlib.sha256(content).hexdigest())
        if now != header[name]["hash"]:
            differences.append(f"{name} {path} has hash {now} (baseline: {header[name]['hash']})")
    if differences:
        raise BaselineError(_mismatch(baseline, differences))


def _bounded(path: Path, limit: int) -> bytes:
    return read_bounded(path, limit, lambda message: BaselineError(f"{path} {message}"))


def _sae_weights(directory: Path) -> bytes:
    """The weights file of an SAE directory (TopKSAE.file_hash's), its config checked to be a small regular
    file too: the SAE backend reads both."""
    if not directory.is_dir():
        raise BaselineError(f"{directory} is missing or not a directory")
    config = directory / CFG_FILE
    if os.path.lexists(config):
        _bounded(config, MAX_SAE_CONFIG_BYTES)
    for name in (WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE):
        if os.path.lexists(directory / name):
            return _bounded(directory / name, MAX_SAE_BYTES)
    raise BaselineError(f"{directory} has no {WEIGHTS_FILE} or {SPARSIFY_WEIGHTS_FILE}")


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

    heads_path = baseline.referenced("heads")
    if baseline.heads is None:
        check_reference(baseline)
    heads = load_safetensors(baseline.heads)
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


def percentiles_against(values: dict[str, list[float | None]], baseline: Baseline,
                        own_entries: list[dict | None]) -> dict[str, torch.Tensor]:
    """Each signal's percentile of pairs (their rounded signal values) among the baseline's pairs, as a
    scan ranks a pair among the others (scoring.ranks.percentile_against), leaving out each pair's own
    entry (None: none): 1 below every other value."""
    import torch

    from ..scoring.ranks import percentile_against

    def column(items) -> torch.Tensor:
        return torch.tensor([math.nan if v is None else v for v in items], dtype=torch.float64)

    return {name: percentile_against(column(values[name]), baseline.signal(name),
                                     leave_out=column(None if e is None else e[name] for e in own_entries))
            for name in SIGNALS}


def suspicion_against(percentiles: dict[str, torch.Tensor], baseline: Baseline) -> torch.Tensor:
    """The suspicion of pairs from their percentiles_against, combined with the baseline's ranking weights."""
    from ..scoring.ranks import combine

    return combine(percentiles, baseline.header["ranking"])


def salient_tail(percentiles: dict[str, torch.Tensor]) -> list[bool]:
    """Whether each pair's score_safe is below all but SALIENT_TAIL of the baseline's (percentiles_against)."""
    return [bool(v >= 1 - SALIENT_TAIL) for v in percentiles["score_safe"].tolist()]


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

    ``decisions`` (digest -> decisions.Decision): a new suspect or a changed pair marked ok is
    listed, not failed. Whenever the model runs, a seeded sample of the unchanged baseline pairs
    is scored with it too and must give the baseline's scores, and the cut-offs must be those of
    the baseline's scores: a baseline edited into a pass is a BaselineError, not a verdict.
    """
    unknown = [c for c in fail_on if c not in FAIL_ON_CHOICES]
    if unknown:
        raise ConfigError(f"cannot fail on {unknown[0]!r}; choose from {', '.join(FAIL_ON_CHOICES)}")
    ctx = RunContext(ScanConfig(), steps)
    with ctx.timed("load"):
        baseline = read_baseline(baseline_path)
        check_reference(baseline)
        rows, skipped = read_rows(sources, baseline.read)
        _check_skipped(baseline, sources, skipped)
        changes = compare(rows, baseline)
    known = changes.known_entry
    result = GateResult(baseline, list(sources), len(changes.rows), len(changes.new_rows),
                        sum(1 for i in changes.new_rows if known[i] is not None), [], tuple(fail_on), max_new,
                        current_ids=[row["pair_id"] for row in changes.rows], timings=ctx.timings,
                        removed=[RemovedPair(pid, entry["category"], entry["score_safe"])
                                 for pid, entry in sorted(changes.removed.items())],
                        decisions=decisions_path, skipped=skipped)
    if not changes.new_rows:
        return result
    from ..model.activations import executor_for, load_backend
    from ..pipeline import stages

    check_cutoffs(baseline)
    checked = _checked_rows(changes, baseline)
    with ctx.timed("quality"):
        quality = _quality(changes)
    with ctx.timed("model"):
        sae = lookup("sae", baseline.sae_backend).load(baseline.referenced("sae"))
        config = ScanConfig(activations=baseline.activation_config(cache_dir, device))
        ctx = replace(ctx, config=config, executor=executor_for(config.activations))  # the same clock
        model = stages.model(ctx, load_backend(config.activations))
        _check_model(baseline, model.backend, sae)
    scored = changes.new_rows + checked
    signals = score_frozen(changes.table(scored), baseline, model.backend, sae, config.activations, ctx=ctx)
    n_new = len(changes.new_rows)
    _check_scores(baseline, [changes.rows[i]["pair_id"] for i in checked],
                  {name: values[n_new:] for name, values in signals.items()}, model.backend.has_reward_head)
    result.checked = len(checked)
    with ctx.timed("score"):
        _judge_new(result, baseline, changes, quality, {name: values[:n_new] for name, values in signals.items()},
                   decisions or {})
    return result


def _check_skipped(baseline: Baseline, sources: list[str], skipped: int) -> None:
    """Records the read options drop are never dropped silently: more than when the baseline was made
    is an error (an edited ``skip_invalid`` or ``max_record_bytes`` would otherwise hide new pairs)."""
    if skipped > baseline.header["skipped"]:
        read = baseline.header["data"]
        raise BaselineError(
            f"{', '.join(sources)}: the baseline's read options (skip_invalid {str(read.get('skip_invalid')).lower()}, "
            f"max_record_bytes {read.get('max_record_bytes', ReadOptions.max_record_bytes)}) skip {skipped} "
            f"record(s), {baseline.header['skipped']} when {baseline.path} was made; fix the records "
            "(`safer-audit validate` lists them), or make a new baseline")


def check_cutoffs(baseline: Baseline) -> None:
    """The cut-offs, and every pair's category, must be those of the baseline's own scores and fractions
    (stored_suspicion, stored_category): an edited score, sign or cut-off shows here without the model."""
    from ..scoring.categories import Cutoffs

    thresholds, ranking = baseline.header["thresholds"], baseline.header["ranking"]
    suspicion = stored_suspicion(baseline.pairs, ranking)
    now = Cutoffs.from_ranking(suspicion, thresholds["flipped_fraction"], thresholds["noisy_fraction"])
    edited = "the file was edited: make it again with `safer-audit baseline`"
    for name, value in (("flipped_cutoff", now.flipped), ("noisy_cutoff", now.noisy)):
        if thresholds[name] != value:
            raise BaselineError(f'{baseline.path}: field "header.thresholds.{name}" is {_shown(thresholds[name])}, '
                                f"but the baseline's scores and fractions give {_shown(value)}; {edited}")
    for (pair_id, entry), value in zip(baseline.pairs.items(), suspicion.tolist(), strict=True):
        category = stored_category(entry, value, ranking, now)
        if entry["category"] != category:
            raise BaselineError(f'{baseline.path}: field "pairs.{pair_id}.category" is {_shown(entry["category"])}, '
                                f"but its scores and the cut-offs make it {category}; {edited}")


def _checked_rows(changes: Changes, baseline: Baseline) -> list[int]:
    """A sample of the unchanged rows, seeded by the baseline's content: the pairs scored again."""
    unchanged = sorted(set(range(len(changes.rows))) - set(changes.new_rows))
    if len(unchanged) <= CHECKED_PAIRS:
        return unchanged
    seed = int(content_digest(baseline.header, baseline.pairs), 16)
    return sorted(random.Random(seed).sample(unchanged, CHECKED_PAIRS))


def _check_scores(baseline: Baseline, pair_ids: list[str], signals: dict, reward_head: bool) -> None:
    """The frozen reference must give the stored scores of the pairs scored again. score_safe comes from the
    SAE and the features alone; the reward margin of a model with its own head too (other margins were
    cross-fitted in the scan, so a head fitted on every pair gives other values)."""
    import torch

    names = ("score_safe", "reward_margin") if reward_head else ("score_safe",)
    for name in names:
        scale = float(torch.nanmedian(baseline.signal(name).abs())) if baseline.pairs else 0.0
        for pair_id, value in zip(pair_ids, signals[name].tolist(), strict=True):
            stored = baseline.pairs[pair_id][name]
            now = _round(value)
            if (stored is None) != (now is None) or (
                    stored is not None and abs(stored - now) > 1e-3 * (abs(stored) + scale) + 1e-9):
                raise BaselineError(
                    f'{baseline.path}: field "pairs.{pair_id}.{name}" is {_shown(stored)}, but its frozen SAE, '
                    f"features and heads give {_shown(now)}; the file was edited: make it again with "
                    "`safer-audit baseline`")


@dataclass
class Changes:
    """What of the data is new or changed since the baseline, row by row in the data's order."""

    rows: list[dict]  # dicts with the PAIR_SCHEMA columns
    digests: list[str]  # each row's content digest (row_digest)
    known_entry: list[dict | None]  # each row's baseline entry: its id's, or the pair it was swapped from
    new_rows: list[int]  # rows whose id is new or whose content changed
    swapped_from: dict[int, str]  # row -> the removed pair id whose responses it holds swapped
    removed: dict[str, dict]  # baseline pairs no longer in the data (and not swapped in place), by id
    swapped: set[int] = field(default_factory=set)  # changed rows whose responses are the baseline's swapped

    def table(self, indices: list[int]) -> pl.DataFrame:
        """The rows ``indices`` as a pairs table (data.load_pairs' layout), for scoring: built only then."""
        return pair_frame({name: [self.rows[i][name] for i in indices] for name in PAIR_SCHEMA})


def compare(pairs: pl.DataFrame | list[dict], baseline: Baseline) -> Changes:
    """The data (a pairs table, or read_rows' rows) against the baseline: new and changed rows, removed pairs,
    pairs swapped in place."""
    rows = pairs if isinstance(pairs, list) else list(pairs.iter_rows(named=True))
    digests = [row_digest(row) for row in rows]
    known_entry = [baseline.pairs.get(row["pair_id"]) for row in rows]
    new_rows = [i for i, (e, d) in enumerate(zip(known_entry, digests, strict=True)) if e is None or e["digest"] != d]
    current = {row["pair_id"] for row in rows}
    gone = {pid: entry for pid, entry in baseline.pairs.items() if pid not in current}
    # a new id whose responses, swapped back, are a removed pair: that pair swapped in place
    gone_by_digest = {entry["digest"]: pid for pid, entry in gone.items()}
    swapped_from: dict[int, str] = {}
    swapped: set[int] = set()
    for i in new_rows:
        back = pair_digest(rows[i]["context"], rows[i]["rejected"], rows[i]["chosen"])
        if known_entry[i] is None:
            if back in gone_by_digest:
                swapped_from[i] = gone_by_digest.pop(back)
                known_entry[i] = gone[swapped_from[i]]
                swapped.add(i)
        elif known_entry[i]["digest"] == back:
            swapped.add(i)
    removed = {pid: gone[pid] for pid in gone_by_digest.values()}
    return Changes(rows, digests, known_entry, new_rows, swapped_from, removed, swapped)


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
    own = _own_entries(baseline, [rows[i] for i in changes.new_rows], [digests[i] for i in changes.new_rows])
    percentiles = percentiles_against(values, baseline, own)
    suspicion, salient = suspicion_against(percentiles, baseline), salient_tail(percentiles)
    weights, cutoffs = baseline.header["ranking"], baseline.cutoffs
    for n, i in enumerate(changes.new_rows):
        row = rows[i]
        pair_values = {name: values[name][n] for name in SIGNALS}
        kinds = [kind for kind, _ in quality.get(i, [])]
        category = categorise_pair(float(suspicion[n]), ranked_signals(pair_values, weights), kinds, cutoffs)
        margin = pair_values["reward_margin"]
        if category in (Category.CLEAN, Category.NOISY) and salient[n] and margin is not None and margin < 0:
            category = Category.FLIPPED
        result.new_entries[row["pair_id"]] = {"category": str(category), "digest": digests[i], **pair_values}
        decision = decisions.get(digests[i])
        verdict = decision.verdict if decision is not None else None
        if known_entry[i] is not None:
            prefer_rejected = [name for name, value in ranked_signals(pair_values, weights).items()
                               if value is not None and value < 0]
            result.changed_pairs.append(ChangedPair(
                row["source"], row["line"], row["pair_id"], swapped_from.get(i), dict(known_entry[i]),
                dict(result.new_entries[row["pair_id"]]), "swapped" if i in changes.swapped else "edited",
                prefer_rejected, verdict, digests[i]))
        if category != Category.CLEAN:
            result.findings.append(GateFinding(
                row["source"], row["line"], row["pair_id"], category, known_entry[i] is not None,
                round(float(suspicion[n]), 6), **pair_values,
                quality=[f"{kind}: {detail}" for kind, detail in quality.get(i, [])],
                verdict=verdict,
                previous=dict(known_entry[i]) if known_entry[i] is not None else None,
                previous_id=swapped_from.get(i)))
    result.findings.sort(key=lambda f: (-f.suspicion, f.source, f.line))


def mark_ok(result: GateResult, pair_ids: list[str], decisions_path: str | os.PathLike, *, reviewer: str,
            protect: Iterable[str | os.PathLike] = ()) -> None:
    """Record the pairs ``pair_ids`` of the gate's listing (failing or not) as reviewed and ok, by their
    current content, in the decisions file (made if missing), and clear them in ``result``."""
    from .decisions import decide, read_decisions, write_decisions

    listed = {f.pair_id: f for f in result.findings}
    listed.update({c.pair_id: c for c in result.changed_pairs})
    for pair_id in pair_ids:
        if pair_id not in listed:
            raise ConfigError(f"--mark-ok {pair_id}: not a pair this gate lists as new, changed or suspect; "
                              f"listed: {', '.join(listed) or 'none'}")
    path = Path(decisions_path)
    decisions = read_decisions(path, missing_ok=True)
    for pair_id in pair_ids:
        item = listed[pair_id]
        where = f"{item.source}:{item.line}"
        decide(decisions, result.new_entries[pair_id]["digest"], "ok", reviewer=reviewer, pair_id=pair_id,
               where=where, note="accepted at the gate")
        for entry in (*result.findings, *result.changed_pairs):
            if entry.pair_id == pair_id:
                entry.verdict = "ok"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_decisions(path, decisions, protect=protect)
    result.decisions = str(path)


def accept(result: GateResult) -> Baseline:
    """Make the gated data the baseline: its pairs, the new ones with their frozen scores.

    Pairs the baseline holds but the data given does not are dropped, so give every data
    file. The reference (model, SAE, features, heads, fractions) stays as it is; the cut-offs and
    categories are those of the accepted pairs' scores, as the gate checks them.
    """
    from ..scoring.categories import Cutoffs

    entries = {pid: dict(result.new_entries.get(pid) or result.baseline.pairs[pid]) for pid in result.current_ids}
    header = json.loads(json.dumps(result.baseline.header))
    header["skipped"] = result.skipped
    ranking, thresholds = header["ranking"], header["thresholds"]
    suspicion = stored_suspicion(entries, ranking)
    cutoffs = Cutoffs.from_ranking(suspicion, thresholds["flipped_fraction"], thresholds["noisy_fraction"])
    thresholds["flipped_cutoff"], thresholds["noisy_cutoff"] = cutoffs.flipped, cutoffs.noisy
    for entry, value in zip(entries.values(), suspicion.tolist(), strict=True):
        entry["category"] = stored_category(entry, value, ranking, cutoffs)
    updated = Baseline(result.baseline.path, header, entries)
    updated.write(protect=result.sources)
    return updated
