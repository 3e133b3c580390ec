"""The development set a person labelled (fixtures/hh-dev-labels.jsonl): well formed, each pair named as a scan
names it, so the benchmarks that count its labels read every line."""

from __future__ import annotations

import json

from safer_audit.data import load_pairs

from .conftest import FIXTURES

GROUPS = {"top", "random", "flipped60", "harm30", "random2", "flipped-rest"}  # fixtures/hh-dev-labels.md


def test_every_label_is_one_of_three_with_a_reason_and_its_groups():
    rows = [json.loads(line) for line in (FIXTURES / "hh-dev-labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 200 and len({row["pair_id"] for row in rows}) == len(rows)
    assert [row["line"] for row in rows] == sorted(row["line"] for row in rows)
    for row in rows:
        assert set(row) == {"pair_id", "line", "label", "reason", "drawn_from"}, row
        assert row["label"] in ("wrong", "doubtful", "right") and row["reason"].strip(), row
        assert row["drawn_from"] and set(row["drawn_from"]) <= GROUPS, row
    # the committed sample is the HH file's first 300 lines: the labelled pairs among them carry its ids
    sample = load_pairs(FIXTURES / "hh-harmless-300.jsonl").pairs
    ids = dict(zip(sample["line"].to_list(), sample["pair_id"].to_list(), strict=True))
    early = [row for row in rows if row["line"] <= len(ids)]
    assert early and all(ids[row["line"]] == row["pair_id"] for row in early)
