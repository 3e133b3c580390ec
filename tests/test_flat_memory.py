"""Driver memory that stays flat with the number of pairs: per-text code means are read a
range of pairs at a time, and the cross-fitted heads are fitted on a bounded, seeded sample."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from safer_audit.pipeline.scan import run_scan
from safer_audit.sae import stats
from safer_audit.sae.stats import TextRows
from safer_audit.scoring import heads as scoring
from safer_audit.scoring.heads import HeadFit, PairDiffs, cross_fitted_head, cross_fitted_margins

from .test_codes import assert_same_report, config, write_pairs


def _no_dense(self):
    raise AssertionError("a pass over the pairs loaded the whole [texts, width] matrix")


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])  # a reward head, and pooled means
def test_a_scan_streamed_in_small_ranges_reports_what_one_range_gives(model, request, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(model)
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    whole = run_scan(str(data), config(model_dir, tmp_path / "cache"))
    monkeypatch.setattr(stats, "STREAM_PAIRS", 4)  # 8 ranges of pairs, the last one short
    monkeypatch.setattr(TextRows, "dense", _no_dense)
    streamed = run_scan(str(data), config(model_dir, tmp_path / "cache"))
    assert streamed.stats.codes._file is not None  # the code means are in a file, not in memory
    assert_same_report(whole.report, streamed.report)
    for name in ("reward_margin", "sae_margin"):
        assert [getattr(f, name) for f in whole.report.findings] == pytest.approx(
            [getattr(f, name) for f in streamed.report.findings], abs=1e-5)
    a, b = ([dataclasses.asdict(c) for c in r.report.features] for r in (whole, streamed))
    for name in ("histogram", "chosen_fires", "rejected_fires", "fire_rate"):
        assert [c[name] for c in a] == [c[name] for c in b], name
    assert [c["length_correlation"] for c in a] == pytest.approx([c["length_correlation"] for c in b], abs=1e-5)
    assert [c["chosen_total"] for c in a] == pytest.approx([c["chosen_total"] for c in b], rel=1e-5)
    tops = [[(t.latent, t.chosen, t.rejected) for f in r.report.findings for t in f.top_features]
            for r in (whole, streamed)]
    assert [t[0] for t in tops[0]] == [t[0] for t in tops[1]]
    assert [t[1:] for t in tops[0]] == [t[1:] for t in tops[1]]  # elementwise: the same bits


def _pairs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """[2n, width] rows, chosen then rejected, whose difference leans on the first columns."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(2 * n, width, generator=generator)
    rows[0::2, :3] += 1.0
    return rows


def test_heads_fit_on_the_bounded_sample_and_score_every_pair_with_an_unseen_head(monkeypatch):
    n, bound = 40, 9
    rows = _pairs(n, 6)
    fitted_rows = []
    fit_bradley_terry = scoring.fit_bradley_terry

    def counting(diffs, **kwargs):
        fitted_rows.append(len(diffs))
        return fit_bradley_terry(diffs, **kwargs)

    monkeypatch.setattr(scoring, "fit_bradley_terry", counting)
    monkeypatch.setattr(stats, "STREAM_PAIRS", 7)
    fit = HeadFit(folds=3, seed=1, max_pairs=bound)
    taken = []
    take = PairDiffs.take
    monkeypatch.setattr(PairDiffs, "take", lambda self, pairs: taken.append(len(pairs)) or take(self, pairs))
    result = cross_fitted_head("sae_margin", PairDiffs(rows), fit)
    assert taken == [bound] and len(fitted_rows) == 3 and max(fitted_rows) <= bound  # never more than the bound
    assert len(result.sample) == bound and len(result.margins) == n and torch.isfinite(result.margins).all()
    outside = [p for p in range(n) if p not in set(result.sample.tolist())]
    assert outside
    diffs = rows[0::2] - rows[1::2]
    for p in outside:  # scored by the head of its own fold, which was fitted without its fold
        expected = (diffs[p] / result.scale) @ result.weights[result.fold[p]]
        assert float(result.margins[p]) == pytest.approx(float(expected), abs=1e-5)
    # flipping a pair outside the sample changes no head: its margin is negated, every other one stays
    p = outside[0]
    flipped = rows.clone()
    flipped[[2 * p, 2 * p + 1]] = rows[[2 * p + 1, 2 * p]]
    again = cross_fitted_head("sae_margin", PairDiffs(flipped), fit)
    assert torch.equal(again.weights, result.weights)
    assert float(again.margins[p]) == pytest.approx(-float(result.margins[p]), abs=1e-6)
    others = torch.arange(n) != p
    assert torch.equal(again.margins[others], result.margins[others])


def test_below_the_bound_the_heads_are_those_of_a_fit_on_every_pair(monkeypatch):
    rows = _pairs(30, 5, seed=2)
    monkeypatch.setattr(stats, "STREAM_PAIRS", 4)
    fit = HeadFit(folds=5, seed=0, max_pairs=30)
    for name in ("sae_margin", "reward_margin"):
        l2, l1 = fit.penalties(name)
        expected = cross_fitted_margins(rows[0::2] - rows[1::2], folds=5, seed=0, l2=l2, l1=l1)
        got = cross_fitted_head(name, PairDiffs(rows), fit)
        assert torch.equal(got.weights, expected.weights) and torch.equal(got.fold, expected.fold)
        torch.testing.assert_close(got.margins, expected.margins, rtol=0, atol=1e-6)


def test_a_scan_with_a_small_head_bound_scores_every_pair(tiny_bert_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    result = run_scan(str(data), config(tiny_bert_dir, tmp_path / "cache", head_pairs=10))
    assert len(result.report.findings) == 30
    for name in ("reward_margin", "sae_margin"):
        values = torch.tensor([getattr(f, name) for f in result.report.findings])
        assert torch.isfinite(values).all() and len(values.unique()) > 20, name


def test_text_rows_on_disk_read_back_what_was_written(tmp_path):
    rows = TextRows(7, 3, tmp_path)
    values = torch.arange(12, dtype=torch.float32).view(4, 3)
    rows.write(torch.tensor([5, 0, 3, 6]), values)
    assert torch.equal(rows.read(0, 7)[[5, 0, 3, 6]], values)
    assert torch.equal(rows.read(1, 3), torch.zeros(2, 3))  # unwritten rows are zeros
    assert torch.equal(rows.take(torch.tensor([6, 5, 6])), values[[3, 0, 3]])
    assert list(tmp_path.iterdir()) == []  # an unnamed file: nothing left behind
    rows.close()


def test_cached_bounded_heads_score_a_changed_pair_outside_the_sample_from_its_current_rows(tmp_path, monkeypatch):
    from safer_audit.scoring.heads import HeadCache

    n, bound = 40, 9
    rows = _pairs(n, 6)
    fit = HeadFit(folds=3, seed=1, max_pairs=bound)
    cache = HeadCache(tmp_path / "heads")
    first = cross_fitted_head("sae_margin", PairDiffs(rows), fit, cache=cache)
    outside = [p for p in range(n) if p not in set(first.sample.tolist())]
    p = outside[0]
    flipped = rows.clone()
    flipped[[2 * p, 2 * p + 1]] = rows[[2 * p + 1, 2 * p]]
    fits = []
    fit_bradley_terry = scoring.fit_bradley_terry
    monkeypatch.setattr(scoring, "fit_bradley_terry", lambda d, **kw: fits.append(len(d)) or fit_bradley_terry(d, **kw))
    again = cross_fitted_head("sae_margin", PairDiffs(flipped), fit, cache=cache)
    assert fits == []  # the sample did not change: the heads come from the cache
    plain = cross_fitted_head("sae_margin", PairDiffs(flipped), fit)
    assert torch.equal(again.weights, plain.weights) and torch.equal(again.margins, plain.margins)
    assert float(again.margins[p]) == pytest.approx(-float(first.margins[p]), abs=1e-6)  # not a stale margin
    changed = rows.clone()
    changed[2 * int(first.sample[0])] += 1.0  # a pair inside the sample: fitted again
    fits.clear()
    cross_fitted_head("sae_margin", PairDiffs(changed), fit, cache=cache)
    assert len(fits) == 3
