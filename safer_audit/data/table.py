"""A scan's pairs out of memory: a slim table in memory, each pair's texts in an unnamed temporary file.

A pairs table (``PAIR_SCHEMA``) holds both conversations of every pair: ~2.3 KB a pair in polars, 60% of it
the two messages columns, which only rendering and the quality checks read. Held for a whole scan it was the
one part of the driver's memory that still grew with the number of pairs (230 MB at 100k pairs).
``PairTable`` keeps in memory what every stage reads (id, source, line and the final responses' lengths, ~50
bytes a pair) and writes the rest, one JSON record a pair, to a temporary file in the cache directory that is
deleted when the table is closed or collected; rows are read back by range or by index with ``pread``.

It reads like the table it replaces where a scan reads it: ``len``, ``table["pair_id"]`` (any column; a
column that is not in memory is read whole from the file), ``iter_rows(named=True)`` and iteration (rows as
dicts, streamed), ``take(indices)`` (rows in that order) and ``to_frame()`` (the whole ``PAIR_SCHEMA`` table).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from ..common.files import SpooledRecords
from .schemas import (
    PAIR_SCHEMA,
)


def pair_frame(columns: dict[str, list]) -> pl.DataFrame:
    """One batch of pairs as a table with the PAIR_SCHEMA columns, converted by Arrow (system allocator:
    Arrow's own pool keeps freed batches' memory)."""
    import pyarrow as pa

    types = _arrow_types()
    pool = pa.system_memory_pool()
    table = pa.table({name: pa.array(values, type=types[name], memory_pool=pool) for name, values in columns.items()})
    return pl.from_arrow(table)


IN_MEMORY = ("pair_id", "source", "line")  # PAIR_SCHEMA columns kept in memory


ON_DISK = tuple(name for name in PAIR_SCHEMA if name not in IN_MEMORY)  # one JSON array a pair, in this order


LENGTHS = {"chosen_chars": pl.Int64, "rejected_chars": pl.Int64}  # the final responses' lengths in characters


TABLE_SCHEMA = {**{name: PAIR_SCHEMA[name] for name in IN_MEMORY}, **LENGTHS}  # what is kept in memory


READ_ROWS = 4096  # rows read back in one pread when the table is iterated


def _messages(messages) -> list[dict[str, Any]]:
    # the messages columns' struct: role and content only, in that order (what a polars table gives back)
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages]


class PairTable:
    """Pairs (``PAIR_SCHEMA``): ids, sources, lines and lengths in memory, the texts in a temporary file."""

    def __init__(self, directory: Path | str | None = None):
        self._records = SpooledRecords(directory, prefix="pairs-")  # one JSON array a pair, ON_DISK's columns
        self._frames: list[pl.DataFrame] = []
        self._table: pl.DataFrame | None = None

    @classmethod
    def of(cls, pairs, directory: Path | str | None = None) -> PairTable:
        """``pairs`` itself when it is a PairTable, else a PairTable of the rows of a pairs table."""
        if isinstance(pairs, PairTable):
            return pairs
        table = cls(directory)
        for start in range(0, len(pairs), READ_ROWS):
            batch = pairs.slice(start, READ_ROWS)
            table.extend({name: batch[name].to_list() for name in PAIR_SCHEMA})
        return table

    def extend(self, columns: dict[str, list]) -> None:
        """Add pairs given as ``PAIR_SCHEMA`` columns of equal length (a batch of data.load_pairs' rows)."""
        rows = zip(*(columns[name] for name in ON_DISK), strict=True)
        self._records.extend(json.dumps([context, chosen, rejected, _messages(chosen_messages),
                                         _messages(rejected_messages)]).encode("ascii")
                             for context, chosen, rejected, chosen_messages, rejected_messages in rows)
        frame = {name: columns[name] for name in IN_MEMORY}
        frame["chosen_chars"] = [len(text) for text in columns["chosen"]]
        frame["rejected_chars"] = [len(text) for text in columns["rejected"]]
        self._frames.append(pl.DataFrame(frame, schema=TABLE_SCHEMA))
        self._table = None

    @property
    def table(self) -> pl.DataFrame:
        """What is kept in memory: pair_id, source, line, chosen_chars and rejected_chars."""
        if self._table is None:
            self._table = pl.concat(self._frames, rechunk=True) if self._frames else pl.DataFrame(schema=TABLE_SCHEMA)
            self._frames = [self._table]
        return self._table

    def __len__(self) -> int:
        return len(self._records)

    @property
    def disk_bytes(self) -> int:
        """The size of the texts' file."""
        return self._records.size

    def __getitem__(self, name: str) -> pl.Series:
        """A column: from memory, or (a texts column) read whole from the file."""
        if not isinstance(name, str):
            raise TypeError("a PairTable is indexed by column name; use take() or iter_rows() for rows")
        if name in self.table.columns:
            return self.table[name]
        if name not in ON_DISK:
            raise KeyError(name)
        return pl.Series(name, [row[name] for row in self.iter_rows()], dtype=PAIR_SCHEMA[name])

    def _texts(self, start: int, stop: int) -> list[list]:
        return [json.loads(record) for record in self._records.read(start, stop)]

    def _rows(self, slim: pl.DataFrame, records: Iterable[list]) -> list[dict[str, Any]]:
        out = []
        for (pair_id, source, line), record in zip(slim.select(IN_MEMORY).iter_rows(), records, strict=True):
            row = {"pair_id": pair_id, "source": source, "line": line}
            row.update(zip(ON_DISK, record, strict=True))
            out.append(row)
        return out

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The rows ``start`` .. ``stop - 1`` as dicts with the ``PAIR_SCHEMA`` columns (one read)."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            return []
        return self._rows(self.table.slice(start, stop - start), self._texts(start, stop))

    def take(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The rows ``indices``, in that order (a read a row)."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(i)
        return self._rows(self.table[indices], (self._texts(i, i + 1)[0] for i in indices))

    def iter_rows(self, *, named: bool = True) -> Iterator[dict[str, Any]]:
        """Every row as a dict, in order, READ_ROWS at a time (polars' ``iter_rows(named=True)``)."""
        if not named:
            raise ValueError("PairTable rows are dicts: iter_rows(named=True)")
        for start in range(0, len(self), READ_ROWS):
            yield from self.rows(start, start + READ_ROWS)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_rows()

    def slices(self, size: int = READ_ROWS) -> Iterator[list[dict[str, Any]]]:
        """The rows ``size`` at a time."""
        for start in range(0, len(self), size):
            yield self.rows(start, start + size)

    def to_frame(self) -> pl.DataFrame:
        """Every pair as a ``PAIR_SCHEMA`` table in memory (what this class exists to avoid: for small uses)."""
        

        frames = []
        for rows in self.slices():
            frames.append(pair_frame({name: [row[name] for row in rows] for name in PAIR_SCHEMA}))
        return pl.concat(frames, rechunk=True) if frames else pl.DataFrame(schema=PAIR_SCHEMA)

    def close(self) -> None:
        self._records.close()


def response_lengths(pairs) -> tuple[list[int], list[int]]:
    """Characters of each pair's final chosen and rejected responses (a PairTable or a pairs table)."""
    if isinstance(pairs, PairTable):
        return pairs["chosen_chars"].to_list(), pairs["rejected_chars"].to_list()
    return (pairs["chosen"].str.len_chars().cast(pl.Int64).to_list(),
            pairs["rejected"].str.len_chars().cast(pl.Int64).to_list())


_ARROW_TYPES: dict = {}


def _arrow_types() -> dict:
    if not _ARROW_TYPES:
        schema = pl.DataFrame(schema=PAIR_SCHEMA).to_arrow().schema
        _ARROW_TYPES.update({name: schema.field(name).type for name in PAIR_SCHEMA})
    return _ARROW_TYPES
