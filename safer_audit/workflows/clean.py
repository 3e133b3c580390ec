"""Clean a dataset: write a copy with the suspicious pairs dropped or flipped back, and
a manifest of what changed and why.

Selection (``select_pairs``), from a scan report:

- the report's categories: every pair that is not ``clean`` when dropping; only the
  ``flipped`` ones when flipping, since only they are claimed to have swapped labels;
- ``drop_fraction`` F: the pairs of rank <= F x n (the rule scan's categories use);
- ``threshold`` T: the pairs with ``suspicion`` >= T;
- ``min_flip_probability`` P: the pairs whose flip probability (the posterior of the mixture
  fitted to the stacked judges' margins, every model's judges with ``--profile thorough``;
  scoring.posterior.flip_posterior) is >= P: an absolute rule, where the others are relative to the data;
- review decisions (decisions.py): the pairs marked ``flipped`` are flipped back, those marked
  ``noisy`` dropped, those marked ``ok`` kept, matched by content digest (so they hold after
  the data is reordered); ``only`` limits this to some verdicts. No report is needed.

Both rank by the report's combined suspicion, not by score_safe alone as the paper's
denoising does: it is the ranking the scan reports and explains, and it also catches
pairs whose reward margin, not only their safety features, prefers the rejected response.

Writing keeps the input's format and schema. Records not selected are copied
byte-for-byte in ``.jsonl``, ``.jsonl.gz`` (decompressed content; the output is
recompressed), ``.json`` (JSON Lines or an array; blank lines, separators and
indentation kept) and ``.csv``; in Parquet they are equal rows under the same schema.
A flipped record has chosen and rejected swapped (PKU: the preference index used,
``better_response_id`` or ``safer_response_id``, becomes 1 - it); a JSON record is then
re-serialised on one line with ``json.dumps(ensure_ascii=False)``, a CSV row with the
csv module's default dialect and the row's own line ending. Invalid records skipped with
``skip_invalid`` are kept as they are. JSON Lines, gzip and CSV stream; a JSON array and
a Parquet file are read whole. Datasets directories and hub ids are not supported.

Output and manifest are each written to a temporary file and renamed (the output first:
the manifest holds its sha256), so an interrupted run leaves the old files, or none, in
place, never a partial one; only SIGKILL can leave the hidden temporary file behind.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Mapping

from ..common.digests import sha256_file
from ..common.files import (
    read_bounded,
    refuse_inputs,
    remove_stale_temporaries,
    same_file,
    writable_target,
    write_atomic,
)
from ..config import MAX_REPORT_BYTES, ReadOptions
from ..data import PairReader, pair_digest
from ..errors import CleanError
from ..report.types import Finding, Report
from ..version import __version__

MODES = ("drop", "flip")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")

Key = tuple[int, int]  # (line, index among the records that start on that line)


@dataclass
class Selection:
    """The pairs a rule picked from a report, most suspicious first, each with why."""

    rule: str  # "report categories", "drop fraction", "threshold" or "flip probability"
    parameters: dict[str, Any]
    picked: list[tuple[Finding, str]]


@dataclass
class Change:
    """One changed pair, as listed in the manifest."""

    pair_id: str
    line: int
    rank: int | None  # None: selected by a decision, without a report
    action: str  # "drop" or "flip"
    suspicion: float | None
    score_safe: float | None
    category: str  # the report's category, or the decision's verdict
    reason: str
    flip_probability: float | None = None  # the report's, when it has one


@dataclass
class CleanResult:
    """What ``clean_dataset`` changed (or, on a dry run, would change)."""

    source: str
    out: Path
    manifest_path: Path
    mode: str  # "drop", "flip", or "decisions" (each pair's own action)
    selection: Selection
    changes: list[Change]
    pairs: int  # pairs read from the source
    dry_run: bool
    manifest: dict[str, Any] | None  # None on a dry run


def select_pairs(report: Report, *, drop_fraction: float | None = None, threshold: float | None = None,
                 mode: str = "drop", min_flip_probability: float | None = None) -> Selection:
    """Pick pairs from ``report`` by fraction, threshold, flip probability or (none given) its categories."""
    rules = {"a drop fraction": drop_fraction, "a threshold": threshold,
             "a minimum flip probability": min_flip_probability}
    given = [name for name, value in rules.items() if value is not None]
    if len(given) > 1:
        raise CleanError(f"give one rule, not both {' and '.join(given)}")
    findings = sorted(report.findings, key=lambda f: f.rank)
    n = len(findings)
    if drop_fraction is not None:
        if not 0 < drop_fraction <= 1:
            raise CleanError(f"the drop fraction must be in (0, 1], not {drop_fraction}")
        picked = [(f, f"rank {f.rank} of {n}, within the most suspicious {drop_fraction * 100:.4g}%")
                  for f in findings if f.rank <= drop_fraction * n]
        return Selection("drop fraction", {"drop_fraction": drop_fraction}, picked)
    if threshold is not None:
        if not math.isfinite(threshold):
            raise CleanError(f"the threshold must be a finite number, not {threshold}")
        picked = [(f, f"suspicion {f.suspicion:.4g} >= {threshold:g}") for f in findings if f.suspicion >= threshold]
        return Selection("threshold", {"threshold": threshold}, picked)
    if min_flip_probability is not None:
        if not 0 <= min_flip_probability <= 1:
            raise CleanError(f"the minimum flip probability must be in [0, 1], not {min_flip_probability}")
        if report.run.flip_probability_note:  # the judges could not identify the mixture: no pair has one
            raise CleanError(f"--min-flip-probability: {report.run.flip_probability_note}; select by "
                             "--drop-fraction or --threshold instead")
        missing = sum(f.flip_probability is None for f in findings)
        if missing:
            raise CleanError(f"{missing} of the report's {n} pairs have no flip probability (a report written "
                             "before it was recorded): scan again, or select by --drop-fraction or --threshold")
        picked = [(f, f"flip probability {f.flip_probability:.4g} >= {min_flip_probability:g} (rank {f.rank} of {n})")
                  for f in findings if f.flip_probability >= min_flip_probability]
        return Selection("flip probability", {"min_flip_probability": min_flip_probability}, picked)
    categories = ["flipped"] if mode == "flip" else ["flipped", "noisy", "quality"]
    picked = [(f, f"category {f.category} in the report (rank {f.rank} of {n})")
              for f in findings if f.category in categories]
    return Selection("report categories", {"categories": categories}, picked)


DECISION_ACTIONS = {"flipped": "flip", "noisy": "drop"}  # "ok": keep


def decision_changes(pairs: dict[str, int], digests: dict[str, str], decisions: Mapping[str, Any],
                     only: Iterable[str] = tuple(DECISION_ACTIONS), report: Report | None = None) -> list[Change]:
    """The pairs the decisions flip back (``flipped``) or drop (``noisy``), in file order;
    ``only`` limits the verdicts acted on. Pairs are matched by content digest."""
    only = tuple(only)
    unknown = [v for v in only if v not in DECISION_ACTIONS]
    if unknown:
        raise CleanError(f"cannot act on verdict {unknown[0]!r}; choose from {', '.join(DECISION_ACTIONS)}")
    findings = {f.digest: f for f in report.findings} if report is not None else {}
    changes = []
    for pair_id, line in pairs.items():
        decision = decisions.get(digests[pair_id])
        if decision is None or decision.verdict not in only:
            continue
        finding = findings.get(digests[pair_id])
        reason = f"marked {decision.verdict} by {decision.reviewer} at {decision.at}" + (
            f": {decision.note}" if decision.note else "")
        changes.append(Change(pair_id, line, finding.rank if finding else None, DECISION_ACTIONS[decision.verdict],
                              finding.suspicion if finding else None, finding.score_safe if finding else None,
                              decision.verdict, reason, finding.flip_probability if finding else None))
    return changes


def load_report(path: str | Path) -> Report:
    """A scan report from its JSON file; an unreadable one is a CleanError naming the file."""
    raw = read_bounded(path, MAX_REPORT_BYTES, lambda message: CleanError(f"{path}: {message}"))
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CleanError(f"{path}: not a JSON report ({exc})") from None
    try:
        return Report.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CleanError(f"{path}: not a scan report: {exc}") from None


def clean_dataset(source: str | Path, out: str | Path, report: Report | None, *, mode: str = "drop",
                  drop_fraction: float | None = None, threshold: float | None = None,
                  min_flip_probability: float | None = None, manifest: str | Path | None = None, report_path: str | Path | None = None,
                  force: bool = False, dry_run: bool = False, read: ReadOptions | None = None,
                  decisions: Mapping[str, Any] | None = None, decisions_path: str | Path | None = None,
                  only: Iterable[str] = tuple(DECISION_ACTIONS), **read_keywords) -> CleanResult:
    """Write ``source`` to ``out`` with the pairs ``select_pairs`` picks dropped or flipped,
    and a manifest to ``manifest`` (default: ``out`` + ``.manifest.json``).

    ``report`` must be a scan of ``source`` read with the same ``read`` options (``read_keywords``,
    ReadOptions field names, replace its values); ``report_path``
    is the file it came from (None: a scan run just now). Refuses to write over the input
    or the report, or over an existing output or manifest unless ``force``. ``dry_run``
    checks everything and returns the changes without writing.

    With ``decisions`` (digest -> decisions.Decision, from ``decisions_path``) each decided pair
    gets its verdict's action and ``report`` may be None; ``mode`` and the rules are not used.
    """
    if decisions is not None:
        mode = "decisions"
    elif report is None:
        raise CleanError("clean needs a scan report or review decisions to select pairs")
    elif mode not in MODES:
        raise CleanError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    source, out = str(source), Path(out)
    manifest_path = Path(manifest) if manifest is not None else out.with_name(out.name + ".manifest.json")
    kind = _source_kind(source)
    _check_outputs(source, kind, out, manifest_path, report_path, force, dry_run)
    if decisions_path is not None:
        for path in (out, manifest_path):
            refuse_inputs(path, [decisions_path])
    read = ReadOptions.of(read, **read_keywords)
    reader = PairReader(source, read)
    digests = {}
    pairs = {}
    for pair in reader:
        pairs[pair["pair_id"]] = pair["line"]
        digests[pair["pair_id"]] = pair_digest(pair["context"], pair["chosen"], pair["rejected"])
    keys = _pair_keys(source, pairs, reader.skipped)
    origin = str(report_path) if report_path is not None else "the scan"
    if report is not None:
        _check_report(report, origin, source, pairs, digests)
    if decisions is not None:
        changes = decision_changes(pairs, digests, decisions, only, report)
        in_data = set(digests.values())
        selection = Selection("review decisions", {
            "decisions": str(decisions_path) if decisions_path is not None else None, "only": list(only),
            "decided": len(decisions), "not_in_data": sum(1 for d in decisions if d not in in_data)}, [])
    else:
        selection = select_pairs(report, drop_fraction=drop_fraction, threshold=threshold, mode=mode,
                                 min_flip_probability=min_flip_probability)
        changes = [Change(f.pair_id, f.line, f.rank, mode, f.suspicion, f.score_safe, f.category, reason,
                          f.flip_probability) for f, reason in selection.picked]
    if changes and sum(c.action == "drop" for c in changes) == len(pairs):
        raise CleanError(f"{source}: the selection holds every pair, so nothing would be left")
    result = CleanResult(source, out, manifest_path, mode, selection, changes, len(pairs), dry_run, None)
    if dry_run:
        return result
    actions = {keys[change.pair_id]: change.action for change in changes}
    fields = _flip_fields(reader.schema, read.preference)
    protect = [source] + [p for p in (report_path, decisions_path) if p is not None]
    for path in (out, manifest_path):  # a killed earlier clean's temporaries would otherwise stay forever
        remove_stale_temporaries(path.parent, path.name)
    write_atomic(out, lambda tmp: _WRITERS[kind](Path(source), tmp, actions, fields), protect=protect)
    result.manifest = {
        "tool": "safer-audit",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": source, "sha256": sha256_file(source), "pairs": len(pairs), "schema": reader.schema},
        "output": {"path": str(out), "sha256": sha256_file(out)},
        "mode": mode,
        "selection": {"rule": selection.rule, **selection.parameters,
                      **({"report": origin, "ranking": report.run.ranking, "scanned": report.run.created}
                         if report is not None else {})},
        "changes": [asdict(change) for change in changes],
    }
    write_atomic(manifest_path, json.dumps(result.manifest, indent=2, ensure_ascii=False) + "\n", protect=protect)
    return result


# -- checks ------------------------------------------------------------------------------


def _source_kind(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        raise CleanError(f"{source}: cleaning a datasets directory is not supported; "
                         "export it to .jsonl or .parquet (Dataset.to_json / to_parquet) first")
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl", ".json", ".csv", ".parquet"):
        if name.endswith(suffix):
            return suffix
    raise CleanError(f"{source}: clean supports .jsonl, .jsonl.gz, .json, .csv and .parquet files")


def _check_outputs(source: str, kind: str, out: Path, manifest: Path, report_path: str | Path | None,
                   force: bool, dry_run: bool = False) -> None:
    protect = [source] + ([report_path] if report_path is not None else [])
    if not out.name.lower().endswith(kind):
        raise CleanError(f"{out}: the output is written in the input's format, so it must end in {kind}")
    for path in (out, manifest):
        refuse_inputs(path, protect)
        if not path.parent.is_dir():
            raise CleanError(f"{path}: the directory {path.parent} does not exist")
        writable_target(path)
        if path.exists() and not force and not dry_run:  # a dry run writes nothing, so replaces nothing
            raise CleanError(f"{path}: already exists (use --force to replace it)")
    refuse_inputs(manifest, [out])


def _pair_keys(source: str, pairs: dict[str, int], skipped: list) -> dict[str, Key]:
    """Each pair's (line, index on that line): JSON arrays can hold several records a line."""
    skipped_lines = {error.line for error in skipped}
    on_line: Counter[int] = Counter()
    keys = {}
    for pair_id, line in pairs.items():
        if line in skipped_lines:
            raise CleanError(f"{source}:{line}: holds both a skipped invalid record and a pair, so they cannot "
                             "be told apart; fix the invalid record first")
        keys[pair_id] = (line, on_line[line])
        on_line[line] += 1
    return keys


def _check_report(report: Report, origin: str, source: str, pairs: dict[str, int],
                  digests: dict[str, str]) -> None:
    """The report must be of this data: same file (when it still exists) and the same pairs
    with the same texts (an ``id`` field keeps a pair's id when its text changes)."""
    scanned = Path(report.run.data_source)
    if scanned.exists() and not same_file(scanned, Path(source)):
        raise CleanError(f"{origin}: is a report of {report.run.data_source}, not of {source}")
    seen = set()
    for finding in report.findings:
        line = pairs.get(finding.pair_id)
        if line is None:
            raise CleanError(f"{origin}: pair {finding.pair_id} (line {finding.line}) is not in {source}; "
                             "the data changed since the scan, or was read with other options")
        if line != finding.line:
            raise CleanError(f"{origin}: pair {finding.pair_id} is at line {finding.line} in the report "
                             f"but at line {line} in {source}")
        if pair_digest(finding.context, finding.chosen, finding.rejected) != digests[finding.pair_id]:
            raise CleanError(f"{origin}: pair {finding.pair_id} (line {line}) has other texts than in {source}; "
                             "the data changed since the scan")
        seen.add(finding.pair_id)
    missing = next((pair_id for pair_id in pairs if pair_id not in seen), None)
    if missing is not None:
        raise CleanError(f"{source}:{pairs[missing]}: pair {missing} is not in {origin}; "
                         "the data changed since the scan, or was read with other options")


# -- flipping ----------------------------------------------------------------------------


def _flip_fields(schema: str | None, preference: str) -> tuple[str, ...]:
    """The fields whose values a flip changes: two to swap, or one preference index."""
    return (f"{preference}_response_id",) if schema == "pku" else ("chosen", "rejected")


def _flip_in_place(values: dict | list, fields: tuple) -> None:
    """Swap the two fields, or turn the preference index i into 1 - i (CSV holds it as text)."""
    if len(fields) == 2:
        a, b = fields
        values[a], values[b] = values[b], values[a]
    else:
        index = values[fields[0]]
        values[fields[0]] = str(1 - int(index)) if isinstance(index, str) else 1 - index


def _flip_json(raw: str, fields: tuple) -> str:
    record = json.loads(raw)
    _flip_in_place(record, fields)
    return json.dumps(record, ensure_ascii=False)


# -- writers: (source, temporary output, {key: action}, flip fields) ----------------------


def _line_ending(raw: bytes) -> bytes:
    return raw[len(raw.rstrip(b"\r\n")):]


def _copy_lines(lines: Iterable[bytes], out: IO[bytes], actions: dict[Key, str], fields: tuple) -> None:
    """JSON Lines: one record a line, numbered as data/sources.py does (blank lines count, hold none)."""
    for number, raw in enumerate(lines, 1):
        action = actions.get((number, 0)) if raw.strip() else None
        if action is None:
            out.write(raw)
        elif action == "flip":
            bom = codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""
            text = raw[len(bom):].decode("utf-8")
            out.write(bom + _flip_json(text, fields).encode("utf-8") + _line_ending(raw))


def _write_jsonl(source: Path, tmp: Path, actions: dict[Key, str], fields: tuple) -> None:
    with open(source, "rb") as lines, open(tmp, "wb") as out:
        _copy_lines(lines, out, actions, fields)


def _write_jsonl_gz(source: Path, tmp: Path, actions: dict[Key, str], fields: tuple) -> None:
    # mtime=0 and no file name in the header: the same content gives the same bytes.
    with gzip.open(source, "rb") as lines, open(tmp, "wb") as raw_out, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw_out, mtime=0) as out:
        _copy_lines(lines, out, actions, fields)


def _write_json(source: Path, tmp: Path, actions: dict[Key, str], fields: tuple) -> None:
    with open(source, "rb") as handle:
        head = handle.peek(1 << 20).removeprefix(codecs.BOM_UTF8).lstrip()
        if not head.startswith(b"["):  # JSON Lines under a .json name, as data/sources.py reads it
            with open(tmp, "wb") as out:
                _copy_lines(handle, out, actions, fields)
            return
        text = handle.read().decode("utf-8")
    head_end = text.index("[") + 1
    first_gap = text[head_end:_JSON_SPACE.match(text, head_end).end()]
    parts, kept, tail_start = [text[:head_end]], 0, head_end + len(first_gap)
    for key, gap, element, end in _array_elements(text, tail_start):
        tail_start = end
        action = actions.get(key)
        if action == "drop":
            continue
        if action == "flip":
            element = _flip_json(element, fields)
        # The first element kept takes the gap after "[" (no comma); the others their own.
        parts += [gap if kept else first_gap, element]
        kept += 1
    parts.append(text[tail_start:])
    tmp.write_bytes("".join(parts).encode("utf-8"))


def _array_elements(text: str, pos: int) -> Iterator[tuple[Key, str, str, int]]:
    """Each element of the JSON array whose first element starts at ``pos``: its key, the
    separator text before it, its raw text, and where it ends."""
    decoder = json.JSONDecoder()
    on_line: Counter[int] = Counter()
    previous_end, line, counted = pos, 1, 0
    while text[pos] != "]":
        _, end = decoder.raw_decode(text, pos)
        line, counted = line + text.count("\n", counted, pos), pos
        yield (line, on_line[line]), text[previous_end:pos], text[pos:end], end
        on_line[line] += 1
        after = _JSON_SPACE.match(text, end).end()
        if text[after] == ",":
            after = _JSON_SPACE.match(text, after + 1).end()
        previous_end, pos = end, after


def _write_csv(source: Path, tmp: Path, actions: dict[Key, str], fields: tuple) -> None:
    # surrogateescape round-trips any byte; a BOM stays a "\ufeff" in the first header cell.
    with open(source, encoding="utf-8", errors="surrogateescape", newline="") as text, \
            open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as out:
        tap = _LineTap(text)
        rows = csv.reader(tap, strict=True)
        header = next(rows)
        out.write(tap.take())
        columns = [name.removeprefix("\ufeff") if i == 0 else name for i, name in enumerate(header)]
        indices = tuple(columns.index(name) for name in fields)
        number = 0
        for cells in rows:
            raw = tap.take()
            if cells == []:  # a blank line: csv.DictReader, and so data/sources.py, skip it uncounted
                out.write(raw)
                continue
            number += 1
            action = actions.get((number, 0))
            if action is None:
                out.write(raw)
            elif action == "flip":
                _flip_in_place(cells, indices)
                ending = raw[len(raw.rstrip("\r\n")):]
                csv.writer(out, lineterminator=ending).writerow(cells)


class _LineTap:
    """Feed lines to csv.reader and keep the raw text of each row (quoted cells span lines)."""

    def __init__(self, lines: Iterable[str]):
        self.lines, self.taken = iter(lines), []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.taken.append(line)
        return line

    def take(self) -> str:
        raw, self.taken = "".join(self.taken), []
        return raw


def _write_parquet(source: Path, tmp: Path, actions: dict[Key, str], fields: tuple) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    rows = range(1, table.num_rows + 1)
    flip = pa.array([actions.get((row, 0)) == "flip" for row in rows])
    if len(fields) == 2:
        a, b = (table.column(name) for name in fields)
        columns = {fields[0]: pc.if_else(flip, b, a), fields[1]: pc.if_else(flip, a, b)}
    else:
        index = table.column(fields[0])
        columns = {fields[0]: pc.if_else(flip, pc.subtract(pa.scalar(1, index.type), index), index)}
    for name, column in columns.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)
    table = table.filter(pa.array([actions.get((row, 0)) != "drop" for row in rows]))
    pq.write_table(table, tmp)


_WRITERS: dict[str, Callable[[Path, Path, dict[Key, str], tuple], None]] = {
    ".jsonl": _write_jsonl, ".jsonl.gz": _write_jsonl_gz, ".json": _write_json,
    ".csv": _write_csv, ".parquet": _write_parquet,
}
