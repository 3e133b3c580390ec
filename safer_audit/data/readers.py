"""The reader: a source's records, through their schema, as canonical pairs (``PAIR_SCHEMA``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from ..config import ReadOptions
from ..errors import ConfigError, DataError, DataErrors
from .schemas import (
    PAIR_ID_LENGTH,
    PAIR_SCHEMA,
    SCHEMA_PARSERS,
    Invalid,
    check_text,
    content_digest,
    detect_schema,
    json_type,
    record_id,
)
from .sources import STDIN, TABLE, is_table, source_records, table_records
from .table import PairTable, pair_frame
from .transcripts import render_transcript


class PairReader:
    """Stream the pairs of a source as dicts with the ``PAIR_SCHEMA`` columns.

    The source is a path (see ``sources``) or a table in memory: a polars or pandas DataFrame, a
    list of records (dicts in any of the schemas) or a ``datasets.Dataset``, read with the same
    checks, a record named by its index from 0 (``<table>:3``).

    While and after iterating: ``schema`` (detected or forced; None until known),
    ``records`` (records read, valid or not), ``skipped`` (the errors of skipped records,
    the first ``keep_skipped`` of them; all when None) and ``skipped_count``.
    Without ``skip_invalid`` the first invalid record stops the pairs; reading goes on to
    collect up to ``max_errors`` errors, then raises ``DataErrors``. Problems with the
    source as a whole (missing, empty, corrupt) raise at once.
    """

    def __init__(self, source: str | os.PathLike | Any, options: ReadOptions | None = None, *, max_errors: int = 10,
                 keep_skipped: int | None = None, **keywords):
        options = ReadOptions.of(options, **keywords)  # keywords: ReadOptions fields, schema="hh"
        if max_errors < 1:
            raise ConfigError("max_errors must be at least 1")
        self.options = options
        self.table = source if is_table(source) else None
        self.path = TABLE if self.table is not None else os.fspath(source)
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
        if isinstance(record, Invalid):
            raise record
        if not isinstance(record, dict):
            raise Invalid(None, f"a record must be an object, not {json_type(record)}")
        if self.schema is None:
            self.schema = detect_schema(record)
        elif not self.schema_forced and (own := detect_schema(record)) != self.schema:
            # read with the file's schema, such a record would silently lose fields (an "hh" reading
            # drops a "prompt"): a file holds one schema
            raise Invalid(None, f'is a "{own}" record in a file whose first record is "{self.schema}"; '
                                "give every record one schema (or force one with --schema)")
        chosen, rejected = SCHEMA_PARSERS[self.schema](record, self.preference)
        check_text(record)
        context = render_transcript(chosen[:-1])[0]
        rejected_context = render_transcript(rejected[:-1])[0]
        pair_id = record_id(record)
        if pair_id is None:
            digest = content_digest(context, chosen[-1]["content"], rejected_context, rejected[-1]["content"])
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
            records = (table_records(self.table, self.split, self.max_record_bytes) if self.table is not None
                       else source_records(self.path, self.split, self.max_record_bytes))
            for line, record in records:
                self.records += 1
                try:
                    pair = self._pair(line, record)
                except Invalid as invalid:
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


def iter_pairs(source: str | os.PathLike | Any, options: ReadOptions | None = None, *, max_errors: int = 10,
               **keywords) -> Iterator[dict[str, Any]]:
    """Stream the pairs of ``source`` as dicts with the ``PAIR_SCHEMA`` columns, in file order.

    ``keywords``: ReadOptions fields, replacing those of ``options``."""
    yield from PairReader(source, options, max_errors=max_errors, **keywords)


@dataclass
class LoadResult:
    """A loaded source: the pairs table and what reading it found."""

    pairs: pl.DataFrame  # a PairTable from spool_pairs
    schema: str | None  # None only when every record was skipped before one was understood
    records: int
    skipped: list[DataError]
    source: str


def load_pairs(source: str | os.PathLike | Any, options: ReadOptions | None = None, *, max_errors: int = 10,
               **keywords) -> LoadResult:
    """Load ``source`` (a path, or a table in memory: see ``PairReader``) into one polars table with the
    ``PAIR_SCHEMA`` columns, in file order.

    ``options`` (ReadOptions; ``keywords``, its field names, replace its values): ``preference``
    picks ``better_response_id`` or ``safer_response_id`` (pku schema); raises ``DataErrors``
    with the first ``max_errors`` errors unless ``skip_invalid``; a record over
    ``max_record_bytes`` is an invalid record (see ``MAX_RECORD_BYTES``).
    """
    reader = PairReader(source, options, max_errors=max_errors, **keywords)
    frames = []
    for columns in _batches(reader):
        frames.append(pair_frame(columns))
        del columns  # not held while the next batch is read
    pairs = frames[0] if len(frames) == 1 else pl.concat(frames, rechunk=True)
    return LoadResult(pairs, reader.schema, reader.records, reader.skipped, reader.source)


def spool_pairs(source: str | os.PathLike | Any, directory: str | os.PathLike | None, options: ReadOptions | None = None, *,
                max_errors: int = 10, **keywords) -> LoadResult:
    """``load_pairs`` into a ``PairTable``: the pairs' texts in a temporary file in ``directory``, only ids,
    sources, lines and lengths in memory (a scan's driver)."""

    reader = PairReader(source, options, max_errors=max_errors, **keywords)
    pairs = PairTable(directory)
    for columns in _batches(reader):
        pairs.extend(columns)
        del columns  # not held while the next batch is read
    return LoadResult(pairs, reader.schema, reader.records, reader.skipped, reader.source)


def _batches(reader: PairReader) -> Iterator[dict[str, list]]:
    """The reader's pairs as ``PAIR_SCHEMA`` columns, LOAD_BATCH pairs at a time (one, maybe empty, at least)."""
    columns: dict[str, list] = {name: [] for name in PAIR_SCHEMA}
    sent = False
    for pair in reader:
        for name, values in columns.items():
            values.append(pair[name])
        if len(columns["pair_id"]) >= LOAD_BATCH:
            yield columns
            sent = True
            columns = {name: [] for name in PAIR_SCHEMA}
    if columns["pair_id"] or not sent:
        yield columns


# Pairs turned into table columns at a time by load_pairs. Measured: building the table from
# every pair's Python objects at once left ~12 KB per pair of RSS behind (polars' conversion of the
# message lists), 2 GB at 100k pairs for a 0.23 GB table; a batch at a time through Arrow, ~3 KB.
LOAD_BATCH = 4096




