"""The pure helpers of benchmarks/bench_denoise.py: split, selection, the fitted head's accuracy, the table."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from .conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports benchmarks/_common.py, as when run
    try:
        spec = importlib.util.spec_from_file_location("bench_denoise", ROOT / "benchmarks" / "bench_denoise.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_split_is_a_seeded_partition(bench):
    train, heldout = bench.split_indices(101, 0.2, seed=3)
    assert len(heldout) == 20 and len(train) == 81
    assert sorted(torch.cat([train, heldout]).tolist()) == list(range(101))
    again = bench.split_indices(101, 0.2, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(heldout, again[1])
    assert not torch.equal(heldout, bench.split_indices(101, 0.2, seed=4)[1])


def test_selection_takes_the_extreme_values_first_and_keeps_ties_in_order(bench):
    values = torch.tensor([0.5, -2.0, 3.0, -2.0, 1.0])
    lowest = bench.selection_order(values, highest=False)
    assert lowest.tolist() == [1, 3, 0, 4, 2]
    assert bench.selection_order(values, highest=True).tolist()[:2] == [2, 4]
    assert bench.take(lowest, 0.4).tolist() == [1, 3]
    assert bench.take(lowest, 0.0).tolist() == []
    # round(0.1 * 5) = 0 (banker's rounding of 0.5), round(0.3 * 5) = 2 (1.5 rounds to 2)
    assert len(bench.take(lowest, 0.1)) == 0 and len(bench.take(lowest, 0.3)) == 2


def test_without_and_flipped_leave_the_input_alone(bench):
    diffs = torch.arange(12.0).reshape(4, 3)
    original = diffs.clone()
    selected = torch.tensor([1, 3])
    assert torch.equal(bench.without(diffs, selected), original[[0, 2]])
    out = bench.flipped(diffs, selected)
    assert torch.equal(out[[1, 3]], -original[[1, 3]]) and torch.equal(out[[0, 2]], original[[0, 2]])
    assert torch.equal(diffs, original)


def test_heldout_accuracy_follows_the_training_labels(bench):
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=generator)

    def pairs(n):
        # chosen - rejected rows that mostly point along ``direction``
        x = torch.randn(n, 8, generator=generator)
        return x * torch.sign(x @ direction).unsqueeze(1)

    train, heldout = pairs(400), pairs(200)
    assert bench.heldout_accuracy(train, heldout, l2=1e-2) > 0.9
    # every train pair flipped: the head learns the opposite preference
    assert bench.heldout_accuracy(-train, heldout, l2=1e-2) < 0.1


def test_markdown_table_reports_mean_and_sample_sd(bench):
    per_seed = [{"random": {"0.02": 0.6, "0.04": 0.5}}, {"random": {"0.02": 0.8, "0.04": 0.5}}]
    table = bench.markdown_table(per_seed, [0.7, 0.7], (0.02, 0.04)).splitlines()
    assert table[0] == "| selector | 0 (baseline) | 2% | 4% |"
    assert table[2] == "| random | 0.7000 ± 0.0000 | 0.7000 ± 0.1414 | 0.5000 ± 0.0000 |"
    assert bench.mean_sd([1.0]) == (1.0, 0.0)
