"""Record sources: a file, a directory, standard input or a hub dataset -> ``(line, record)``.

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

A record that cannot be decoded (invalid JSON or UTF-8, over the size limit) is yielded as
an ``Invalid`` in its place; a problem with the source as a whole raises ``DataError``.
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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from ..config import MAX_RECORD_BYTES
from ..errors import DataError
from .schemas import Invalid

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")
_CHUNK = 1 << 20
STDIN = "-"
HUB_PREFIX = "hf://"
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _size(count: int) -> str:
    if count >= 1 << 20:
        return f"{count / 2**20:.1f}".removesuffix(".0") + " MiB"
    if count >= 1 << 10:
        return f"{count / 2**10:.1f}".removesuffix(".0") + " KiB"
    return f"{count} bytes"


def _limit(limit: int) -> str:
    """The limit as given: exact, in the unit it is a whole number of."""
    return _size(limit) if limit % 1024 == 0 or limit < 1024 else f"{limit:,} bytes"


def _too_large(size: int, limit: int, *, at_least: bool = False) -> Invalid:
    what = f"more than {_limit(limit)}" if at_least else _size(size)
    return Invalid(None, f"record is {what}, over the --max-record-bytes limit ({_limit(limit)})")


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



_LONG_INTEGER = f"invalid JSON: a number of more than {sys.get_int_max_str_digits()} digits"


def _loads(text: str) -> Any:
    """``json.loads`` with every way it can fail on data as an ``Invalid``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Invalid(None, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise Invalid(None, "invalid JSON: nested too deeply") from None
    except ValueError:  # Python refuses to convert integers this long (CVE-2020-10735)
        raise Invalid(None, _LONG_INTEGER) from None


# --- sources: (line, record or Invalid) ------------------------------------------------


def _bounded_lines(stream: Any, limit: int) -> Iterator[bytes | Invalid]:
    """The lines of ``stream``; a line over ``limit`` bytes is never held whole: it is read
    through in chunks to measure it, and yields an ``Invalid`` in its place."""
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


def _jsonl_records(lines: Iterable[bytes | Invalid]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines, 1):
        if isinstance(raw, Invalid):
            yield number, raw
            continue
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, Invalid(None, f"invalid UTF-8 at byte {exc.start + 1}")
            continue
        if not text.strip():
            continue
        try:
            yield number, _loads(text)
        except Invalid as invalid:
            yield number, invalid


def _gzip_lines(path: str, stream: io.BufferedReader, limit: int) -> Iterator[bytes | Invalid]:
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
                yield row, Invalid(undecodable, "is not valid UTF-8")
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
    """Rows of columnar sources, with a row over ``limit`` as an ``Invalid``. Arrow has
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


TABLE = "<table>"  # how errors and reports name a table given in memory: <table>:3 is its record 3


def _library(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def is_table(source: Any) -> bool:
    """Whether ``source`` is a table held in memory (a polars or pandas DataFrame, a list of records, a
    Hugging Face ``datasets.Dataset`` or ``DatasetDict``) rather than a path."""
    kind = (_library(source), type(source).__name__)
    return isinstance(source, (list, tuple, pl.DataFrame)) or kind in (
        ("pandas", "DataFrame"), ("datasets", "Dataset"), ("datasets", "DatasetDict"))


def source_name(source: Any) -> str:
    """How errors and reports name ``source``: its path, or TABLE for a table in memory."""
    return TABLE if is_table(source) else os.fspath(source)


def table_records(table: Any, split: str | None, limit: int) -> Iterator[tuple[int, Any]]:
    """The records of an in-memory table as ``(index, record)``, the index from 0 (``<table>:3`` is
    ``table[3]``, ``df.row(3)``, ``df.iloc[3]``), each checked against ``limit`` like a file's."""
    if _library(table) == "datasets":
        rows: Iterable[Any] = _choose_split(TABLE, table, split)
    elif split is not None:
        raise DataError(TABLE, None, None, f'is a table: only datasets and hub datasets have splits ("{split}")')
    elif isinstance(table, pl.DataFrame):
        rows = table.iter_rows(named=True)
    elif _library(table) == "pandas":
        rows = (_plain_row(row) for row in table.to_dict("records"))
    else:
        rows = table
    yield from enumerate(_sized(rows, limit))


def _plain_row(row: dict) -> dict:
    """A pandas row as JSON would give it: numpy arrays and scalars as lists and numbers, a missing
    value (NaN, None: a column other records have) left out, as CSV's empty cells are."""
    return {key: _plain(value) for key, value in row.items() if not _missing(value)}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays (a list column read from Parquet) and scalars
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


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


def source_records(source: str, split: str | None, limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
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
