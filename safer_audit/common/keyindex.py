"""Where each cached text is: text key -> (shard file, row), for caches of millions of texts.

The activation and code caches index every text of every shard in their directory when they open. As a dict
of ``key -> (path, row)`` that was ~200 bytes a text (a dict entry, a tuple, an int and the 32-character key),
~80 MB at 100k pairs for the two caches, and the part of a scan's driver memory that still grew with the number
of pairs before the SAE pass. ``KeyIndex`` keeps the keys as bytes in one sorted numpy array beside
a shard number and a row per key: 40 bytes a text with 32-character keys, looked up with ``searchsorted``.
It reads like the dict it replaces (``in``, ``[]``, ``get``, ``len``, iteration, ``items``) and adds bulk
lookups (``locate``, ``missing``) for a scan's whole list of keys.

Rules kept from the dict: the first shard to add a key keeps it (``dict.setdefault``), and dropping a shard
(``drop``, for a corrupt one) forgets its keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np


def _as_bytes(keys: Sequence[str]) -> np.ndarray:
    if not len(keys):
        return np.zeros(0, dtype="S1")
    array = np.asarray(keys)
    if array.dtype.kind != "U":
        raise TypeError("cache keys are strings")
    return array.astype(np.bytes_)  # ASCII (a non-ASCII key raises), no Python object a key


class KeyIndex(Mapping):
    """text key (ASCII, no NUL) -> (shard path, row): sorted numpy arrays, the first shard to add a key keeps it."""

    def __init__(self):
        self._paths: list[Path] = []
        self._numbers: dict[Path, int] = {}
        self._keys = np.zeros(0, dtype="S1")
        self._shards = np.zeros(0, dtype=np.int32)
        self._rows = np.zeros(0, dtype=np.int32)
        self._pending: list[tuple[np.ndarray, int]] = []  # (keys, shard number) added since the last merge

    def add(self, path: Path, keys: Sequence[str]) -> None:
        """Index the shard ``path`` whose rows hold ``keys``, in order; keys already indexed keep their place."""
        if path not in self._numbers:
            self._numbers[path] = len(self._paths)
            self._paths.append(path)
        if len(keys):
            self._pending.append((_as_bytes(keys), self._numbers[path]))

    def drop(self, path: Path) -> None:
        """Forget the keys of the shard ``path`` (a key another shard also holds is not taken up again)."""
        number = self._numbers.get(path)
        if number is None:
            return
        self._merge()
        keep = self._shards != number
        self._keys, self._shards, self._rows = self._keys[keep], self._shards[keep], self._rows[keep]

    def _merge(self) -> None:
        if not self._pending:
            return
        width = max([self._keys.dtype.itemsize] + [keys.dtype.itemsize for keys, _ in self._pending])
        keys = np.concatenate([self._keys.astype(f"S{width}")] + [k.astype(f"S{width}") for k, _ in self._pending])
        shards = np.concatenate([self._shards] + [np.full(len(k), n, dtype=np.int32) for k, n in self._pending])
        rows = np.concatenate([self._rows] + [np.arange(len(k), dtype=np.int32) for k, _ in self._pending])
        self._pending = []
        order = np.argsort(keys, kind="stable")  # the indexed first, then shards in the order added: first wins
        keys, shards, rows = keys[order], shards[order], rows[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        self._keys, self._shards, self._rows = keys[first], shards[first], rows[first]

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's position in the sorted arrays, -1 where it is not indexed."""
        self._merge()
        if not len(self._keys):
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.searchsorted(self._keys, keys)
        found = at < len(self._keys)
        found[found] = self._keys[at[found]] == keys[found]
        return np.where(found, at, -1)

    def locate(self, keys: Sequence[str]) -> tuple[list[Path], np.ndarray, np.ndarray]:
        """Every key's (shard number, row), -1 for a key not indexed, and the paths shard numbers refer to."""
        at = self._find(_as_bytes(keys))
        found = at >= 0
        shards, rows = np.full(len(at), -1, dtype=np.int64), np.full(len(at), -1, dtype=np.int64)
        shards[found], rows[found] = self._shards[at[found]], self._rows[at[found]]
        return self._paths, shards, rows

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys not indexed, in order."""
        at = self._find(_as_bytes(keys))
        return [key for key, position in zip(keys, at.tolist(), strict=True) if position < 0]

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and bool(self._find(_as_bytes([key]))[0] >= 0)

    def __getitem__(self, key: str) -> tuple[Path, int]:
        position = int(self._find(_as_bytes([key]))[0]) if isinstance(key, str) else -1
        if position < 0:
            raise KeyError(key)
        return self._paths[int(self._shards[position])], int(self._rows[position])

    def __len__(self) -> int:
        self._merge()
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        self._merge()
        return (key.decode("ascii") for key in self._keys.tolist())

    def shards_of(self, keys: Sequence[str]) -> set[Path]:
        """The shards that hold the indexed ones of ``keys``."""
        paths, shards, _rows = self.locate(keys)
        return {paths[n] for n in np.unique(shards[shards >= 0]).tolist()}
