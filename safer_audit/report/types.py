"""The report of a scan: run metadata, feature cards and one finding per pair.

These types are the one source of truth for what a scan found: (de)serialisation and the
exporter lookup are here too. The exporters (backends/exporters.py) and the terminal view
(report/view.py) render them; none of them recomputes a score.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, MutableSequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import polars as pl

from ..common.domain import MARGIN_SIGNALS, SIGNALS, Category
from ..common.files import refuse_inputs
from ..data import pair_digest
from ..errors import ConfigError
from ..features.types import SIDES, EvidenceSpan, FeatureCard, FeatureContext
from ..plugins import Exporter, exporters
from ..scoring.types import JUDGE_EVIDENCE_KINDS, JudgeEvidence

REPORT_SCHEMA_VERSION = 1

CATEGORY_DESCRIPTIONS = {
    Category.FLIPPED: "among the most suspicious pairs and every ranked signal prefers the rejected response: "
                      "labels likely swapped",
    Category.NOISY: "among the most suspicious pairs, but the signals disagree: a weak or doubtful preference",
    Category.QUALITY: "a data problem (identical or empty responses, a contradiction, different contexts) makes it "
                      "unusable",
    Category.CLEAN: "not among the most suspicious pairs",
}


# Below this many pairs a scan warns (the refusal below scan.min_pairs is the scan's):
# measured with benchmarks/bench_min_pairs.py (BENCHMARKS.md "How few pairs"), the combined
# ranking found pairs flipped on purpose no better than chance on 100 HH pairs (AUROC 0.48)
# and clearly better on 200 (0.63; 0.70 on all 2,312).
FEW_PAIRS = 200


def few_pairs_warning(pairs: int) -> str | None:
    """The warning a scan of ``pairs`` pairs carries, or None when there are enough."""
    if pairs >= FEW_PAIRS:
        return None
    return (f"only {pairs:,} pairs: too few to train the SAE and fit the cross-fitted heads well; on fewer than "
            f"{FEW_PAIRS} pairs the ranking was measured no better than chance, so read it as a rough guess")


@dataclass
class FeatureContribution:
    """One latent's share of V(chosen) and V(rejected), signed as in docs/method.md section 5."""

    latent: int
    label: str | None  # a features file's label, else the labeller's
    chosen: float
    rejected: float
    relevance: float | None = None  # the labeller's safety relevance in [0, 1]
    category: str | None = None  # the labeller's safety category

    @property
    def net(self) -> float:
        """Its share of score_safe."""
        return self.chosen - self.rejected


@dataclass
class Finding:
    """One pair: its scores, its place in the ranking and the texts that differ."""

    pair_id: str
    source: str  # the file the pair came from
    line: int  # 1-based line (or row) of the pair in ``source``; in a table given in memory, its index from 0
    rank: int  # 1 = most suspicious
    category: Category  # a plain string is taken and checked
    suspicion: float  # the ranking score: higher is more suspicious
    score_safe: float
    reward_margin: float | None  # None (never NaN) when it could not be computed
    sae_margin: float | None
    quality: list[str]  # data-quality problem kinds, from the data layer
    chosen: str  # the final chosen response
    rejected: str  # the final rejected response
    context: str  # the conversation both responses answer
    top_features: list[FeatureContribution]
    # the posterior probability that the pair is flipped: a symmetric mixture fitted without labels to the stacked
    # judges' cross-fitted margins (scoring.posterior.flip_posterior)
    flip_probability: float | None = None
    # the spans of each response that drive score_safe, strongest first (features.evidence; flipped and noisy pairs)
    evidence: list[EvidenceSpan] = field(default_factory=list)
    # what a judge that explains itself read its verdict from (the harm judge's nearest written examples)
    judge_evidence: list[JudgeEvidence] = field(default_factory=list)
    why: str | None = None  # one plain line: which judges prefer the rejected response, and the strongest evidence

    def __post_init__(self):
        if self.category not in tuple(Category):
            raise ConfigError(f"category must be one of {', '.join(Category)}, not {self.category!r}")
        self.category = Category(self.category)
        # JSON has no NaN: a margin that could not be computed is stored as missing.
        for name in MARGIN_SIGNALS:
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                setattr(self, name, None)

    @property
    def digest(self) -> str:
        """The pair's content digest (data.pair_digest): how decisions and clean recognise it."""
        return pair_digest(self.context, self.chosen, self.rejected)






@dataclass
class RunInfo:
    """What was scanned, with what, and how long it took."""

    tool_version: str
    model: str
    model_hash: str | None
    layer: int
    positions: str
    max_length: int
    sae_path: str
    sae_hash: str | None
    sae_fvu: float | None
    n_features: int
    ranking: str  # the name of the ranking formula
    thresholds: dict[str, float]
    timings: dict[str, float]  # seconds per stage
    pairs: int
    counts: dict[str, int]  # pairs per category
    data_source: str
    created: str  # ISO 8601
    profile: str = "fast"  # safer_audit.pipeline.profiles: which models the scan read (the ranking line names them)
    # why no finding carries a flip probability (the judges cannot identify the flip mixture); None when they do
    flip_probability_note: str | None = None
    # what made a pair flipped (config.flipped_rule; scoring.categories): None in reports written before the choice
    flipped_rule: str | None = None



def display_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """How a report names a local file: no absolute path of this machine leaks into it.

    Under the working directory: relative to it. In the cache: ``~/...`` when the cache is
    in the home directory, else ``<cache>/...``. Elsewhere in the home directory: ``~/...``.
    Anything else: relative to the working directory (``../...``), so commands run from the
    same directory still find it. Text that is not a local path (a hub id) is kept as it is.
    """
    text = os.fspath(path)
    if not text or not os.path.exists(text):
        return text
    full = os.path.abspath(text)

    def inside(base: str) -> str | None:
        base = os.path.abspath(base)
        try:
            if os.path.commonpath([full, base]) != base:
                return None
        except ValueError:  # another drive
            return None
        rest = os.path.relpath(full, base)
        return "" if rest == "." else Path(rest).as_posix()

    home = os.path.expanduser("~")
    rest = inside(os.getcwd())
    if rest is not None:
        return rest or "."
    if cache_dir is not None and (rest := inside(cache_dir)) is not None:
        in_home = inside(home) if os.path.abspath(home) != os.sep else None
        return f"~/{in_home}" if in_home else "<cache>/" + rest if rest else "<cache>"
    if os.path.abspath(home) != os.sep and (rest := inside(home)) is not None:
        return f"~/{rest}" if rest else "~"
    try:
        return Path(os.path.relpath(full)).as_posix()
    except ValueError:  # another drive: nothing relative names it
        return Path(full).name


# The table layout of a report: one row per pair. ``quality`` is a list of strings and
# ``top_features`` a list of structs; ``to_frame(nested=False)`` turns both into JSON strings.
FEATURE_STRUCT = pl.Struct(
    {"latent": pl.Int64, "label": pl.String, "chosen": pl.Float64, "rejected": pl.Float64,
     "relevance": pl.Float64, "category": pl.String}
)
EVIDENCE_STRUCT = pl.Struct({"side": pl.String, "start": pl.Int64, "end": pl.Int64, "text": pl.String,
                             "weight": pl.Float64, "latents": pl.List(pl.Int64)})
JUDGE_EVIDENCE_STRUCT = pl.Struct({"judge": pl.String, "side": pl.String, "start": pl.Int64, "end": pl.Int64,
                                   "text": pl.String, "kind": pl.String, "example": pl.String,
                                   "similarity": pl.Float64})
FRAME_SCHEMA = {
    "rank": pl.Int64,
    "pair_id": pl.String,
    "source": pl.String,
    "line": pl.Int64,
    "category": pl.String,
    "suspicion": pl.Float64,
    **{name: pl.Float64 for name in SIGNALS},
    "flip_probability": pl.Float64,
    "why": pl.String,
    "evidence": pl.List(EVIDENCE_STRUCT),
    "judge_evidence": pl.List(JUDGE_EVIDENCE_STRUCT),
    "quality": pl.List(pl.String),
    "top_features": pl.List(FEATURE_STRUCT),
    "chosen": pl.String,
    "rejected": pl.String,
    "context": pl.String,
}
_NESTED = ("quality", "top_features", "evidence", "judge_evidence")


class LazyFindings(MutableSequence):
    """A scan's findings, most suspicious first, each made when it is read.

    A scan of 100k pairs would otherwise hold 100k ``Finding`` objects with their texts until
    the report is written; this holds the scan's compact per-pair arrays (through ``make``) and
    makes ``BATCH`` findings at a time while it is iterated. A finding read by index is kept, so
    changing it changes the report; any change to the sequence itself (setting, deleting,
    inserting, sorting) first turns it into a plain list of every finding.
    """

    BATCH = 1024

    def __init__(self, length: int, make: Callable[[int, int], list[Finding]]):
        self._length, self._make = length, make  # make(start, stop): the findings at rank positions start..stop-1
        self._items: list[Finding] | None = None
        self._read: dict[int, Finding] = {}

    def __len__(self) -> int:
        return self._length if self._items is None else len(self._items)

    def __getitem__(self, index):
        if self._items is not None:
            return self._items[index]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        i = index.__index__()
        i += self._length if i < 0 else 0
        if not 0 <= i < self._length:
            raise IndexError("finding index out of range")
        if i not in self._read:
            self._read[i] = self._make(i, i + 1)[0]
        return self._read[i]

    def __iter__(self):
        if self._items is not None:
            yield from self._items
            return
        for start in range(0, self._length, self.BATCH):
            for i, finding in enumerate(self._make(start, min(start + self.BATCH, self._length)), start):
                yield self._read.get(i, finding)

    def update(self, change: Callable[[Finding], None]) -> None:
        """Apply ``change`` to every finding, now (those read or held) and as each is made (the rest): the
        sequence stays lazy."""
        for finding in self._items if self._items is not None else self._read.values():
            change(finding)
        if self._items is None:
            make = self._make

            def changed(start: int, stop: int) -> list[Finding]:
                findings = make(start, stop)
                for finding in findings:
                    change(finding)
                return findings

            self._make = changed

    def materialise(self) -> list[Finding]:
        """Every finding, as the list this sequence now is."""
        if self._items is None:
            self._items = list(self)
            self._read = {}
        return self._items

    def __setitem__(self, index, value):
        self.materialise()[index] = value

    def __delitem__(self, index):
        del self.materialise()[index]

    def insert(self, index, value):
        self.materialise().insert(index, value)

    def sort(self, *, key=None, reverse: bool = False) -> None:
        self.materialise().sort(key=key, reverse=reverse)

    def __eq__(self, other):
        if isinstance(other, (list, tuple, LazyFindings)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"LazyFindings({len(self)} findings)"

    @property
    def ranked(self) -> bool:
        """Still in the order it was made in (by rank)."""
        return self._items is None


def _by_rank(findings) -> Iterable[Finding]:
    """``findings`` by rank: a scan's lazy findings as they come (made in rank order), others sorted."""
    if isinstance(findings, LazyFindings) and findings.ranked:
        return findings
    return sorted(findings, key=lambda f: f.rank)


@dataclass
class Report:
    """Everything a scan found, in the form every exporter renders."""

    run: RunInfo
    features: list[FeatureCard]
    findings: list[Finding]  # a scan's are a LazyFindings (made as they are read)

    def to_dict(self, include_findings: bool = True) -> dict:
        """Plain JSON-ready data, tagged with the schema version."""
        # field by field, as asdict(self) would: asdict deep-copies a sequence that is not a list
        data = {"schema_version": REPORT_SCHEMA_VERSION, "run": asdict(self.run),
                "features": [asdict(card) for card in self.features]}
        if include_findings:
            data["findings"] = [asdict(finding) for finding in self.findings]
        for card in data["features"]:
            card["top_tokens"] = [list(pair) for pair in card["top_tokens"]]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """The inverse of ``to_dict``; a missing or unknown field is a ValueError naming it."""
        _require_keys(data, ("schema_version", "run", "features", "findings"), "report")
        version = data["schema_version"]
        if version != REPORT_SCHEMA_VERSION:
            raise ConfigError(
                f"report schema version {version!r} is not supported (this is version {REPORT_SCHEMA_VERSION})"
            )
        return cls(
            run=_build(RunInfo, data["run"], "run"),
            features=[_card(card, f"features[{i}]") for i, card in enumerate(data["features"])],
            findings=[finding_from_dict(row, f"findings[{i}]") for i, row in enumerate(data["findings"])],
        )

    def to_frame(self, nested: bool = True) -> pl.DataFrame:
        """One row per pair, by rank, in the layout of FRAME_SCHEMA.

        ``quality`` and ``top_features`` are list columns; ``nested=False`` gives them as JSON text
        instead (for CSV, or a tool without nested columns) and changes nothing else."""
        frames, rows = [], []
        for finding in _by_rank(self.findings):  # a batch of rows at a time: never every finding's dict at once
            rows.append(asdict(finding))
            if len(rows) == FRAME_BATCH:
                frames.append(_rows_frame(rows, nested))
                rows = []
        if rows or not frames:
            frames.append(_rows_frame(rows, nested))
        return frames[0] if len(frames) == 1 else pl.concat(frames, rechunk=True)

    def suspects(self, top: int | None = None) -> list[Finding]:
        """The findings that are not clean, most suspicious first, at most ``top`` of them."""
        ranked = [f for f in _by_rank(self.findings) if f.category != "clean"]
        return ranked if top is None else ranked[:top]


FRAME_BATCH = 4096  # findings turned into table rows at a time by Report.to_frame


def _rows_frame(rows: list[dict], nested: bool) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=FRAME_SCHEMA, orient="row")
    if nested:
        return frame
    # CSV has no lists: keep them readable and loss-free as JSON text.
    encoded = {name: [json.dumps(row[name], ensure_ascii=False) for row in rows] for name in _NESTED}
    return frame.with_columns(pl.Series(name, values, dtype=pl.String) for name, values in encoded.items())


def finding_from_dict(data: dict, where: str = "finding") -> Finding:
    """A Finding from plain data, as written by ``Report.to_dict``."""
    finding = _build(Finding, data, where)
    finding.top_features = [
        _build(FeatureContribution, item, f"{where}.top_features[{i}]")
        for i, item in enumerate(finding.top_features)
    ]
    finding.quality = list(finding.quality)
    finding.evidence = [_span(finding, item, f"{where}.evidence[{i}]") for i, item in enumerate(finding.evidence)]
    finding.judge_evidence = [_judge_span(finding, item, f"{where}.judge_evidence[{i}]")
                              for i, item in enumerate(finding.judge_evidence)]
    return finding


def _span(finding: Finding, data, where: str) -> EvidenceSpan:
    """An evidence span from plain data: its side, offsets and text must agree with the finding's response."""
    span = _build(EvidenceSpan, data, where)
    _check_slice(finding, span, where)
    return span


def _check_slice(finding: Finding, span, where: str) -> None:
    """A span's side, offsets and text must agree with the finding's response."""
    if span.side not in SIDES:
        raise ConfigError(f'{where}: side must be one of {", ".join(SIDES)}, not {span.side!r}')
    response = getattr(finding, span.side)
    if not (isinstance(span.start, int) and isinstance(span.end, int) and 0 <= span.start <= span.end <= len(response)
            and response[span.start:span.end] == span.text):
        raise ConfigError(f"{where}: text is not the {span.side} response's characters {span.start}..{span.end}")


def _judge_span(finding: Finding, data, where: str) -> JudgeEvidence:
    """A judge's evidence from plain data: checked like an evidence span, and its kind and similarity."""
    span = _build(JudgeEvidence, data, where)
    _check_slice(finding, span, where)
    if span.kind not in JUDGE_EVIDENCE_KINDS:
        raise ConfigError(f'{where}: kind must be one of {", ".join(JUDGE_EVIDENCE_KINDS)}, not {span.kind!r}')
    if not isinstance(span.judge, str) or not isinstance(span.example, str):
        raise ConfigError(f"{where}: judge and example must be text")
    if not isinstance(span.similarity, (int, float)) or not -1.0 <= span.similarity <= 1.0:
        raise ConfigError(f"{where}: similarity must be a number in [-1, 1]")
    return span


def findings_from_frame(frame: pl.DataFrame) -> list[Finding]:
    """Findings back from a ``to_frame`` table, nested or with JSON-text list columns (CSV)."""
    findings = []
    for i, row in enumerate(frame.iter_rows(named=True)):
        for name in _NESTED:
            if isinstance(row.get(name), str):  # a table written before a column was added lacks it
                row[name] = json.loads(row[name])
        findings.append(finding_from_dict(row, f"row {i + 1}"))
    return findings


def _require_keys(data, names: Iterable[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    for name in names:
        if name not in data:
            raise ConfigError(f'{where}: field "{name}" is missing')


def _build(cls, data, where: str):
    names = [f.name for f in fields(cls)]
    # fields with a default were added later: reports written before them still load
    _require_keys(data, [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING],
                  where)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f'{where}: unknown field "{unknown[0]}"')
    return cls(**data)


def _card(data, where: str) -> FeatureCard:
    card = _build(FeatureCard, data, where)
    card.top_tokens = [(str(token), int(count)) for token, count in card.top_tokens]
    card.contexts = [_build(FeatureContext, c, f"{where}.contexts[{i}]") for i, c in enumerate(card.contexts)]
    return card


# -- writing ---------------------------------------------------------------------------


def _input_paths(report: Report) -> set[str]:
    return {report.run.data_source} | {finding.source for finding in report.findings}


def find_exporter(path: str | Path, format: str | None = None) -> Exporter:
    """The exporter for ``format`` if given, else for the extension of ``path``."""
    known = exporters()
    listing = ", ".join(f"{name} ({' '.join(e.extensions)})" for name, e in sorted(known.items()))
    if format is not None:
        if format not in known:
            raise ConfigError(f"unknown format {format!r}; known formats: {listing}")
        return known[format]
    suffix = Path(path).suffix.lower()
    for exporter in known.values():
        if suffix in exporter.extensions:
            return exporter
    raise ConfigError(f"{path}: cannot tell the format from the extension {suffix!r}; known formats: {listing}")


def export_report(report: Report, path: str | Path, format: str | None = None) -> Exporter:
    """Write ``report`` to ``path`` with the exporter for ``format`` or the path's extension.

    Refuses to write over the scanned data. Returns the exporter used.
    """
    if str(path) == STDOUT:
        return _export_to_stdout(report, format)
    exporter = find_exporter(path, format)
    refuse_inputs(path, _input_paths(report))
    exporter.export(report, Path(path))
    return exporter


STDOUT = "-"


def _export_to_stdout(report: Report, format: str | None) -> Exporter:
    """``-o -``: the exporter writes a file as always (so a plugin needs nothing more), which is then
    copied to standard output; JSON when no format is named, as ``-`` has no extension to tell."""
    import shutil
    import sys
    import tempfile

    exporter = find_exporter(STDOUT, format or "json")
    with tempfile.TemporaryDirectory(prefix="safer-audit-out-") as scratch:
        path = Path(scratch) / f"report{exporter.extensions[0] if exporter.extensions else ''}"
        exporter.export(report, path)
        with open(path, "rb") as source:
            sys.stdout.flush()
            shutil.copyfileobj(source, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return exporter
