"""A fresh clone passes on its own: the real data the tests read is committed under fixtures/."""

from __future__ import annotations

import json

import pytest

from .conftest import FIXTURES, HH_SAMPLE, hh_records


def test_real_pairs_come_from_the_committed_sample():
    with open(HH_SAMPLE, encoding="utf-8") as handle:
        sample = [json.loads(line) for line in handle]
    assert len(sample) == 300 and HH_SAMPLE.parent == FIXTURES
    assert hh_records(40) == sample[:40]
    assert hh_records(300) == sample
    with pytest.raises(pytest.skip.Exception, match="needs 301 HH pairs"):
        hh_records(301)

