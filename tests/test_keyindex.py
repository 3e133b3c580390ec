"""The caches' text index (keyindex.KeyIndex) in sorted numpy arrays, not a dict a text.

It must answer as the dict did: the first shard to add a key keeps it, a dropped (corrupt)
shard's keys are forgotten, and bulk lookups agree with one-at-a-time ones; and it must
hold a text in tens of bytes, not the ~200 of a dict entry with its tuple.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import pytest

from safer_audit.common.keyindex import KeyIndex


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()[:32]  # activations.text_key's shape


def test_it_answers_as_the_dict_with_setdefault_did():
    index, reference = KeyIndex(), {}
    shards = [(Path("a"), [key(1), key(2), key(3)]), (Path("b"), [key(3), key(4), key(1)]), (Path("c"), []),
              (Path("d"), [key(5), "short", key(4)])]
    for path, keys in shards:
        index.add(path, keys)
        for row, k in enumerate(keys):
            reference.setdefault(k, (path, row))
        assert dict(index.items()) == reference  # a lookup between additions merges what was added
    assert len(index) == 6 and set(index) == set(reference)
    assert index[key(3)] == (Path("a"), 2) and index[key(4)] == (Path("b"), 1) and index["short"] == (Path("d"), 1)
    assert key(9) not in index and index.get(key(9)) is None and 7 not in index
    with pytest.raises(KeyError):
        index[key(9)]
    asked = [key(4), key(9), key(1), "short", key(9)]
    paths, shards_of, rows = index.locate(asked)
    got = [(paths[s], r) if s >= 0 else None for s, r in zip(shards_of.tolist(), rows.tolist(), strict=True)]
    assert got == [reference.get(k) for k in asked]
    assert index.missing(asked) == [key(9), key(9)]
    assert index.shards_of(list(index)) == {Path("a"), Path("b"), Path("d")}
    assert index.shards_of([key(4), key(9), "short"]) == {Path("b"), Path("d")}


def test_a_dropped_shard_is_forgotten():
    index = KeyIndex()
    index.add(Path("a"), [key(1), key(2)])
    index.add(Path("b"), [key(2), key(3)])
    index.drop(Path("a"))
    assert key(1) not in index and key(2) not in index  # as the dict filtered by shard did
    assert index[key(3)] == (Path("b"), 1)
    index.add(Path("c"), [key(2)])
    assert index[key(2)] == (Path("c"), 0)
    index.drop(Path("nowhere"))
    assert len(index) == 2


def test_empty():
    index = KeyIndex()
    assert len(index) == 0 and key(1) not in index and index.missing([key(1)]) == [key(1)]
    paths, shards, rows = index.locate([key(1)])
    assert shards.tolist() == [-1] and rows.tolist() == [-1]


def test_a_text_costs_tens_of_bytes():
    keys = [key(n) for n in range(100_000)]
    paths = [Path(f"shard-{n}.safetensors") for n in range(100)]
    tracemalloc.start()
    try:
        index = KeyIndex()
        for n, path in enumerate(paths):
            index.add(path, keys[n * 1000:(n + 1) * 1000])
        assert len(index) == 100_000
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / len(keys) < 60  # a dict of key -> (path, row): ~120 bytes a key before the tuples
