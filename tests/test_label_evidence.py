"""The offline labeller names a category only on evidence that is right at least 80% of the time on windows a
person labelled (fixtures/labelled-windows.jsonl); below its threshold the label is the pattern and the category
"none"."""

from __future__ import annotations

import json

import pytest

from safer_audit.backends.labellers import CATEGORY_EVIDENCE, load_taxonomy
from safer_audit.features.labels import NO_CATEGORY, NOT_SAFETY, LabelContext, LabelRequest, make_labeller

from .conftest import FIXTURES

WINDOWS = FIXTURES / "labelled-windows.jsonl"


@pytest.fixture(scope="module")
def labelled():
    rows = [json.loads(line) for line in WINDOWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    requests = [LabelRequest(i, 1.0, (LabelContext("chosen", r["before"], r["token"], r["after"], 1.0, f"w{i}"),),
                             ((r["token"], 1.0),)) for i, r in enumerate(rows)]
    labels = make_labeller("offline").label(requests)
    return rows, [labels[i] for i in range(len(rows))]


def test_the_labelled_windows_cover_the_taxonomy():
    rows = [json.loads(line) for line in WINDOWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    categories = set(load_taxonomy().categories)
    assert len(rows) >= 150
    assert {r["category"] for r in rows} == categories
    assert all(set(r.get("also", ())) <= categories - {NOT_SAFETY} for r in rows)
    assert all(sum(r["category"] == c for r in rows) >= 10 for c in categories)


def test_categories_shown_are_right_at_least_80_percent_of_the_time(labelled):
    rows, labels = labelled
    shown = [(r, label.category) for r, label in zip(rows, labels, strict=True) if label.category != NO_CATEGORY]
    right = sum(c == r["category"] or c in r.get("also", ()) for r, c in shown)
    assert right / len(shown) >= 0.8
    # and the threshold still lets the labeller say something: most windows with a safety category get theirs
    safety = sum(r["category"] != NOT_SAFETY for r in rows)
    assert right / safety >= 0.5


def test_below_the_threshold_the_label_is_the_pattern_alone(labelled):
    rows, labels = labelled
    assert {label.category for label in labels} <= set(load_taxonomy().categories) - {NOT_SAFETY} | {NO_CATEGORY}
    weak = [label for label in labels if label.category == NO_CATEGORY]
    strong = [label for label in labels if label.category != NO_CATEGORY]
    assert weak and strong
    assert all(label.relevance >= CATEGORY_EVIDENCE and label.label.startswith(f"{label.category}: ")
               for label in strong)
    # a window close to a category but short of the evidence: the closest category is kept as provenance only
    near = [label for label in weak if label.extra["closest"] not in (None, NOT_SAFETY)]
    assert near and all(label.relevance < CATEGORY_EVIDENCE and not label.label.startswith(label.extra["closest"])
                        for label in near)
