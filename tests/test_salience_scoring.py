"""Salience, feature selection and the per-pair scores, on hand-made code statistics."""

from __future__ import annotations

import json

import pytest
import torch

from safer_audit.features.cards import feature_cards
from safer_audit.features.salience import FeaturesFileError, feature_salience, select_features
from safer_audit.sae.stats import CodeStats
from safer_audit.scoring.categories import categorise
from safer_audit.scoring.heads import cross_fitted_margins, feature_contributions, fit_bradley_terry, score_safe
from safer_audit.scoring.ranks import percentile_from_low, suspicion


def make_stats(mean_codes: list[list[float]], n_positions: list[int]) -> CodeStats:
    codes = torch.tensor(mean_codes)
    n_latents = codes.shape[1]
    top = torch.zeros(50, n_latents)
    return CodeStats(codes, torch.tensor(n_positions), torch.ones(n_latents, dtype=torch.long), top,
                     top.long(), top.long(), top.long())


def test_salience_against_hand_computed_example():
    # two pairs, three latents; totals are mean * positions
    stats = make_stats([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0],   # pair 0: chosen, rejected
                        [0.5, 0.0, 1.0], [0.0, 0.5, 1.0]],  # pair 1
                       [2, 2, 4, 4])
    chosen, rejected = stats.totals()
    assert chosen.tolist() == [4.0, 0.0, 8.0] and rejected.tolist() == [0.0, 4.0, 8.0]
    s = feature_salience(chosen, rejected)
    m = (4 + 0 + 8 + 0 + 4 + 8) / 6  # = 4
    expected = [(4 - 0) / (4 + 0 + 2 * m), (0 - 4) / (0 + 4 + 2 * m), 0.0]
    assert s.tolist() == pytest.approx(expected)


def test_select_top_n_by_absolute_salience():
    s = torch.tensor([0.1, -0.9, 0.5, 0.0, -0.3])
    chosen = select_features(s, 3)
    assert [f.latent for f in chosen.features] == [1, 2, 4]
    assert [f.sign for f in chosen.features] == [-1, 1, -1]


def test_features_file_pins_excludes_and_labels(tmp_path):
    path = tmp_path / "features.yaml"
    path.write_text("features:\n"
                    "  - {latent: 3, include: true, label: refusal, sign: 1}\n"
                    "  - {latent: 1, include: false, note: fires on punctuation}\n"
                    "  - {latent: 2, label: violence}\n")
    s = torch.tensor([0.1, -0.9, 0.5, 0.0, -0.3])
    selected = select_features(s, 3, features_file=path)
    assert [f.latent for f in selected.features] == [3, 2, 4]
    assert selected.features[0].pinned and selected.features[0].sign == 1
    assert selected.label(2) == "violence"


@pytest.mark.parametrize("content, message", [
    ("features: [{latent: x}]", 'feature 1: field "latent" must be an integer'),
    ("features: [{latent: 1, include: maybe}]", 'feature 1: field "include" must be true or false'),
    ("[1, 2]", 'expected a top-level "features" list'),
    ("features: [{latent: 99}]", "latent 99 is out of range"),
])
def test_bad_features_file_names_file_and_entry(tmp_path, content, message):
    path = tmp_path / "f.yaml"
    path.write_text(content)
    with pytest.raises(FeaturesFileError, match=message) as info:
        select_features(torch.ones(5), 2, features_file=path)
    assert str(path) in str(info.value)


def test_features_file_json(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"features": [{"latent": 0, "include": True}]}))
    assert select_features(torch.tensor([0.0, 0.2]), 1, features_file=path).features[0].latent == 0


def test_score_safe_sign_planted_pair_ranks_lowest():
    # latent 0 is a chosen-side (F+) feature, latent 1 a rejected-side (F-) feature
    codes = []
    for _ in range(5):
        codes += [[1.0, 0.0], [0.0, 1.0]]  # normal pairs: chosen fires F+, rejected fires F-
    codes += [[0.0, 1.0], [1.0, 0.0]]  # planted: the rejected text fires the chosen-side feature
    stats = make_stats(codes, [3] * 12)
    features = select_features(feature_salience(*stats.totals()), 2)
    scores = score_safe(stats, features)
    assert int(torch.argmin(scores)) == 5
    assert scores[5] < 0 < scores[0]
    chosen_terms, rejected_terms = feature_contributions(stats, features, 5)
    assert chosen_terms.sum() - rejected_terms.sum() == pytest.approx(float(scores[5]))


def test_feature_cards_use_strongest_activations():
    stats = make_stats([[1.0, 0.0], [0.0, 1.0]], [2, 2])
    stats.top_values[:3, 0] = torch.tensor([3.0, 2.0, 1.0])
    stats.top_tokens[:3, 0] = torch.tensor([7, 7, 9])
    stats.top_texts[:3, 0] = torch.tensor([0, 1, 0])
    features = select_features(torch.tensor([0.5, -0.5]), 1)
    card = feature_cards(stats, features)[0]
    assert card.top_tokens == [(7, 2), (9, 1)]
    assert [c.value for c in card.contexts] == [3.0]  # all three in pair 0: a card shows one example per pair
    assert card.fire_rate == pytest.approx(1 / 4)


def synthetic_diffs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    true_w = torch.zeros(d)
    true_w[:3] = torch.tensor([2.0, -1.5, 1.0])
    diffs = torch.randn(n, d, generator=g)
    agree = torch.sigmoid(diffs @ true_w) > torch.rand(n, generator=g)
    diffs[~agree] *= -1  # the label says "chosen" with Bradley-Terry probability
    return diffs, true_w


def test_bradley_terry_recovers_direction_and_l1_is_sparse():
    diffs, true_w = synthetic_diffs(2000, 20)
    w = fit_bradley_terry(diffs, l2=1e-3)
    assert torch.nn.functional.cosine_similarity(w, true_w, dim=0) > 0.95
    sparse = fit_bradley_terry(diffs, l2=1e-4, l1=0.05, steps=500)
    assert (sparse[3:].abs() < 1e-6).float().mean() > 0.8
    assert (sparse[:3].sign() == true_w[:3].sign()).all()


def test_cross_fitting_never_scores_a_pair_with_a_head_that_saw_it():
    diffs, _ = synthetic_diffs(300, 10, seed=1)
    fit = cross_fitted_margins(diffs, folds=5, seed=0)
    scaled = diffs / fit.scale
    for k in range(5):
        held = fit.fold == k
        torch.testing.assert_close(fit.margins[held], scaled[held] @ fit.weights[k])
    # flipping one pair's label changes only what the other folds' heads see:
    # its own margin is exactly negated, which a head trained on it would not give.
    flipped = diffs.clone()
    flipped[7] *= -1
    refit = cross_fitted_margins(flipped, folds=5, seed=0)
    assert refit.margins[7] == pytest.approx(-float(fit.margins[7]), rel=1e-4)
    other_fold = (fit.fold != fit.fold[7]).nonzero()[0].item()
    assert refit.margins[other_fold] != pytest.approx(float(fit.margins[other_fold]), rel=1e-6)


def test_percentile_from_low_orders_and_averages_ties():
    p = percentile_from_low(torch.tensor([3.0, 1.0, 2.0, 1.0, float("nan")]))
    assert p[0] == 0.0 and p[2] == pytest.approx(1 / 3)
    assert p[1] == p[3] == pytest.approx(1 - 0.5 / 3)
    assert torch.isnan(p[4])


def test_suspicion_and_categories():
    signals = {"score_safe": torch.tensor([-2.0, 1.0, 0.5, -1.0, 2.0] * 4),
               "reward_margin": torch.tensor([-1.0, 2.0, 1.0, 0.5, 1.5] * 4)}
    s = suspicion(signals)
    quality = [[] for _ in range(20)]
    quality[1] = ["identical"]
    quality[2] = ["truncated"]  # noted, but does not make the pair unusable
    categories = categorise(s, signals, quality, flipped_fraction=0.2, noisy_fraction=0.4)
    assert [categories[i] for i in (0, 5, 10, 15)] == ["flipped"] * 4  # both signals negative, most suspicious
    assert categories[1] == "quality" and categories[2] != "quality"
    assert categories[3] == "noisy"  # suspicious, but the reward margin disagrees
    assert categories.count("clean") == 20 - 4 - 1 - 4


def test_categories_do_not_depend_on_the_order_of_the_pairs():
    # pairs 0 and 1 tie for the most suspicious (each lowest on one signal, second on the other),
    # and the flipped fraction holds one pair: both are inside, whichever comes first
    signals = {"score_safe": torch.tensor([-2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
               "reward_margin": torch.tensor([-1.0, -2.0, 3.0, 1.0, 2.0, 5.0, 4.0, 7.0, 6.0, 8.0])}
    quality = [[] for _ in range(10)]
    categories = categorise(suspicion(signals), signals, quality, flipped_fraction=0.1, noisy_fraction=0.3)
    assert categories[:2] == ["flipped", "flipped"]
    reverse = torch.arange(9, -1, -1)
    backwards = {name: values[reverse] for name, values in signals.items()}
    again = categorise(suspicion(backwards), backwards, quality, flipped_fraction=0.1, noisy_fraction=0.3)
    assert again[::-1] == categories


class FakeStore:
    """Two chunks of random activations, in the shape ActivationStore.iter_chunks yields."""

    def __init__(self, d: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.chunks = []
        self.n_texts = 7
        for texts, lengths in (([0, 3, 5], [4, 0, 9]), ([1, 2, 4, 6], [3, 6, 1, 80])):
            lengths = torch.tensor(lengths)
            offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(lengths, 0)
            n = int(offsets[-1])
            self.chunks.append((torch.tensor(texts), offsets, {
                "acts": torch.randn(n, d, generator=g), "positions": torch.arange(n, dtype=torch.int32),
                "token_ids": torch.randint(0, 50, (n,), generator=g)}))

    def iter_chunks(self):
        yield from self.chunks


def test_encode_store_matches_a_dense_reference():
    from safer_audit.sae import SaeConfig, TopKSAE
    from safer_audit.sae.codes import encode_store
    from safer_audit.sae.stats import TOP_ACTIVATIONS

    sae = TopKSAE(SaeConfig(d_in=16, n_latents=24, k=3), generator=torch.Generator().manual_seed(0))
    store = FakeStore()
    stats = encode_store(store, sae)
    z_all, text_of, pos_of, tok_of = [], [], [], []
    expected_mean = torch.zeros(7, 24)
    for texts, offsets, tensors in store.iter_chunks():
        z = sae.encode_dense(tensors["acts"]).detach()
        for j, t in enumerate(texts.tolist()):
            lo, hi = int(offsets[j]), int(offsets[j + 1])
            if hi > lo:
                expected_mean[t] = z[lo:hi].mean(0)
            text_of += [t] * (hi - lo)
        z_all.append(z)
        pos_of.append(tensors["positions"].long())
        tok_of.append(tensors["token_ids"])
    z = torch.cat(z_all)
    torch.testing.assert_close(stats.mean_codes, expected_mean)
    assert stats.n_positions.tolist() == [4, 3, 6, 0, 1, 9, 80]
    assert torch.equal(stats.fire_counts, (z > 0).sum(0))
    k = min(TOP_ACTIVATIONS, len(z))
    values, rows = z.topk(k, dim=0)
    for latent in range(24):
        fired = values[:, latent] > 0
        got = stats.top_values[:, latent]
        torch.testing.assert_close(got[got > 0], values[fired, latent])
        assert stats.top_texts[:, latent][got > 0].tolist() == [text_of[r] for r in rows[fired, latent].tolist()] \
            or len(set(values[fired, latent].tolist())) < int(fired.sum())  # ties may order differently
