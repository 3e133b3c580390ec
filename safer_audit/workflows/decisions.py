"""Review decisions: what a person concluded about a pair, kept in a small diff-friendly file.

The terminal review loop (``safer-audit review``) and the HTML report's decision buttons both
write this format; ``clean --decisions`` acts on it and ``gate`` / ``baseline`` never fail on
a pair marked ``ok``. Like detect-secrets' audited baseline, the file is meant to be committed.

Format (version 1)::

    {
     "decisions": {
      "<digest>": {"at": "2026-11-24T14:00:00Z", "note": "", "pair_id": "abc", "reviewer": "Ann <ann@x.org>",
                   "verdict": "flipped", "where": "data.jsonl:17"}
     },
     "format": "safer-audit-decisions",
     "version": 1
    }

- ``<digest>`` is ``data.pair_digest(context, chosen, rejected)`` (``report.Finding.digest``):
  the key survives reordering the data and edits to other records; an edit to the pair itself
  makes it a new, undecided pair.
- ``verdict``: ``flipped`` (labels swapped: flip back), ``noisy`` (a doubtful preference: drop)
  or ``ok`` (looked at, fine: keep, never fail on it).
- ``at`` (ISO 8601 UTC, ``Z``) and ``reviewer`` are required; ``note``, ``pair_id`` and ``where``
  are optional strings (``pair_id`` and ``where`` are informational only).
- Keys sorted and one decision per line (gate.render_json), written atomically. A later
  decision for the same digest replaces the earlier one (``merge``: the later ``at`` wins;
  equal times, the later argument).
- Several writers at once (two reviewers on one file) lose nothing: ``update_decisions`` takes
  a lock (``.NAME.lock`` beside the file), reads the file again and merges its decisions in
  before writing. The tool's own folder, ``.safer-audit/``, gets a ``.gitignore`` that keeps
  lock files and a killed writer's temporaries out of ``git add``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Iterable, Mapping

from ..common.files import read_bounded, remove_stale_temporaries, render_json, write_atomic
from ..config import MAX_DECISIONS_BYTES
from ..errors import DecisionsError

FORMAT = "safer-audit-decisions"
VERSION = 1
_DIGEST = re.compile(r"[0-9a-f]{32}")
_REQUIRED = ("verdict", "at", "reviewer")
_OPTIONAL = ("note", "pair_id", "where")


class Verdict(str, Enum):
    """What a reviewer concluded about a pair."""

    FLIPPED = "flipped"  # the labels are swapped: clean flips it back
    NOISY = "noisy"  # a weak or doubtful preference: clean drops it
    OK = "ok"  # looked at, it is fine: clean keeps it, the gate never fails on it

    def __str__(self) -> str:
        return self.value


VERDICTS = tuple(v.value for v in Verdict)


@dataclass(frozen=True)
class Decision:
    """One reviewed pair."""

    verdict: str
    at: str
    reviewer: str
    note: str = ""
    pair_id: str = ""
    where: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


Decisions = dict[str, Decision]  # digest -> decision


def now() -> str:
    """The current UTC time as the file writes it: ``2026-11-24T14:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_reviewer(timeout: float = 5.0) -> str:
    """``Name <email>`` from git config, or ``unknown`` without git (or a git that hangs)."""
    parts = []
    for key in ("user.name", "user.email"):
        try:
            out = subprocess.run(["git", "config", key], capture_output=True, text=True, timeout=timeout,
                                 check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        parts.append(out.stdout.strip() if out.returncode == 0 else "")
    name, email = parts
    if name and email:
        return f"{name} <{email}>"
    return name or email or "unknown"


def _fail(path, field: str | None, message: str):
    where = f'field "{field}" ' if field else ""
    raise DecisionsError(f"{path}: {where}{message}")


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, int, float, bool)) or value is None \
        else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def check_decision(path, digest, entry) -> Decision:
    """One entry of a decisions file, checked field by field; a problem names file and field."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        _fail(path, f"decisions.{digest}", "is not a pair digest (32 lowercase hex digits)")
    name = f"decisions.{digest}"
    if not isinstance(entry, dict):
        _fail(path, name, f"must be an object, not {_shown(entry)}")
    for key in _REQUIRED:
        if key not in entry:
            _fail(path, f"{name}.{key}", "is missing")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        _fail(path, f"{name}.{unknown[0]}", "is not a decision field")
    for key in (*_REQUIRED, *_OPTIONAL):
        if key in entry and not isinstance(entry[key], str):
            _fail(path, f"{name}.{key}", f"must be a string, not {_shown(entry[key])}")
    if entry["verdict"] not in VERDICTS:
        _fail(path, f"{name}.verdict", f"is {_shown(entry['verdict'])}; expected one of {', '.join(VERDICTS)}")
    try:
        datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))
    except ValueError:
        _fail(path, f"{name}.at", f"is {_shown(entry['at'])}, not an ISO 8601 time such as 2026-11-24T14:00:00Z")
    return Decision(**entry)


def parse_decisions(text: str, path: str | os.PathLike = "decisions") -> Decisions:
    """Decisions from the text of a decisions file (``path`` only names it in errors)."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise DecisionsError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except _Repeated as exc:
        raise DecisionsError(f"{path}: {exc}") from None
    except RecursionError:
        raise DecisionsError(f"{path}: not a decisions file (nested too deeply)") from None
    if not isinstance(data, dict):
        _fail(path, None, f"expected an object with \"format\": \"{FORMAT}\", not {_shown(data)}")
    if data.get("format") != FORMAT:
        _fail(path, "format", f"must be \"{FORMAT}\", not {_shown(data.get('format'))}")
    version = data.get("version")
    if isinstance(version, bool) or version != VERSION:
        _fail(path, "version", f"{_shown(version)} is not supported (this safer-audit reads version {VERSION})")
    unknown = sorted(set(data) - {"format", "version", "decisions"})
    if unknown:
        _fail(path, unknown[0], "is not a decisions-file field")
    entries = data.get("decisions")
    if not isinstance(entries, dict):
        _fail(path, "decisions", f"must be an object, not {_shown(entries)}")
    return {digest: check_decision(path, digest, entry) for digest, entry in entries.items()}


class _Repeated(ValueError):
    pass


def _unique_keys(items):
    out = {}
    for key, value in items:
        if key in out:  # two decisions for one digest in one file: which one holds is not clear
            raise _Repeated(f"key {_shown(key)} appears twice in one object")
        out[key] = value
    return out


def read_decisions(path: str | os.PathLike, *, missing_ok: bool = False) -> Decisions:
    """The decisions of a file; a missing file is empty with ``missing_ok``, else an error."""
    path = Path(path)
    if not os.path.lexists(path):
        if missing_ok:
            return {}
        raise DecisionsError(f"{path}: no decisions file here; make one with `safer-audit review`")
    raw = read_bounded(path, MAX_DECISIONS_BYTES, lambda message: DecisionsError(f"{path}: {message}"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecisionsError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return parse_decisions(text, path)


def decisions_text(decisions: Mapping[str, Decision]) -> str:
    """The file's text: keys sorted, one decision per line."""

    return render_json({"decisions": {d: decisions[d].to_dict() for d in sorted(decisions)},
                        "format": FORMAT, "version": VERSION})


def write_decisions(path: str | os.PathLike, decisions: Mapping[str, Decision],
                    protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``decisions`` to ``path`` atomically (never over a file in ``protect``)."""
    for digest, decision in decisions.items():  # never write a file we would refuse to read
        check_decision(path, digest, decision.to_dict())
    return write_atomic(path, decisions_text(decisions), protect=protect)


def update_decisions(path: str | os.PathLike, changes: Mapping[str, Decision],
                     protect: Iterable[str | os.PathLike] = ()) -> Decisions:
    """Add ``changes`` to the decisions file at ``path`` and return all its decisions.

    Under the file's lock (``locked``) the file is read again, so decisions another session
    wrote since are kept; ``changes`` are merged over them (``merge``: a later decision of the
    same pair, from either, wins) and the result is written atomically. A dead writer's
    temporary files beside it are removed.
    """
    path = Path(path)
    with locked(path):
        remove_stale_temporaries(path.parent, path.name)
        merged = merge(read_decisions(path, missing_ok=True), changes)
        write_decisions(path, merged, protect=protect)
    return merged


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a decisions file: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the decisions file ``path`` (fcntl.flock on ``lock_path``) for the block.

    The lock file is removed on leaving, so none is left behind. A process that locked a lock
    file just removed holds a lock no one else sees: it checks that its file is still the one at
    the path, and locks again if not.
    """
    import fcntl

    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:  # removed by the holder before us: lock the new one
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)  # closing releases the lock


STATE_DIRECTORY = ".safer-audit"  # the tool's folder in a repository: decisions, the baseline
GITIGNORE = ("# written by safer-audit: a killed writer's temporary files and lock files are not to be committed\n"
             ".*.tmp\n.*.lock\n")


def prepare_directory(path: str | os.PathLike) -> None:
    """Make the directory of the file ``path`` (and its parents); in the tool's own folder
    (``.safer-audit``) also write a ``.gitignore`` for temporaries and locks, unless it has one."""
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True)
    ignore = directory / ".gitignore"
    if directory.name == STATE_DIRECTORY and not os.path.lexists(ignore):
        write_atomic(ignore, GITIGNORE)


def merge(*sources: Mapping[str, Decision]) -> Decisions:
    """One set of decisions from several: for a digest decided twice, the later ``at`` wins
    (equal times: the later source)."""
    out: Decisions = {}
    for source in sources:
        for digest, decision in source.items():
            known = out.get(digest)
            if known is None or _time(decision.at) >= _time(known.at):
                out[digest] = decision
    return out


def _time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def decide(decisions: Decisions, digest: str, verdict: str | Verdict, *, reviewer: str, note: str = "",
           pair_id: str = "", where: str = "", at: str | None = None) -> Decision:
    """Record a decision in ``decisions`` (replacing an earlier one for the pair) and return it."""
    verdict = Verdict(verdict).value
    decision = Decision(verdict, at or now(), reviewer, note, pair_id, where)
    check_decision("decision", digest, decision.to_dict())
    decisions[digest] = decision
    return decision


def ok_digests(decisions: Mapping[str, Decision]) -> set[str]:
    """The pairs marked ok: the gate and the baseline never fail on them."""
    return {digest for digest, d in decisions.items() if d.verdict == Verdict.OK.value}
