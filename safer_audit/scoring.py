"""Per-pair scores and the suspicion ranking (METHOD.md section 5, and our additions).

- ``score_safe``: V(chosen) - V(rejected) over the selected features.
- ``reward_margin``: the reward model's own r(chosen) - r(rejected), or, for a model with
  no reward head, a Bradley-Terry linear head on pooled activations, cross-fitted: the
  pairs are split into folds and each pair is scored by a head fitted on the other folds.
- ``sae_margin``: the same cross-fitted Bradley-Terry fit, sparse (L1), on the difference
  of the pooled SAE codes: its weights are a learned salience, and the per-feature terms
  of its margin explain a pair.
- ``suspicion``: the mean over the signals of each pair's percentile rank from the low
  end: 1 is the most suspicious pair, 0 the least. Low scores mean "rejected looks
  better", so every signal ranks the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .salience import CodeStats, FeatureSet


def text_values(stats: CodeStats, features: FeatureSet) -> torch.Tensor:
    """V(t) for every text: mean over read positions of sum F+ z minus sum F- z."""
    return stats.mean_codes[:, features.latents] @ features.signs


def score_safe(stats: CodeStats, features: FeatureSet) -> torch.Tensor:
    """score_safe per pair = V(chosen) - V(rejected)."""
    values = text_values(stats, features)
    return values[0::2] - values[1::2]


def feature_contributions(stats: CodeStats, features: FeatureSet, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each selected feature's signed term in V(chosen) and in V(rejected) of one pair."""
    codes = stats.mean_codes[[2 * pair, 2 * pair + 1]][:, features.latents] * features.signs
    return codes[0], codes[1]


def fold_ids(n_pairs: int, folds: int, seed: int) -> torch.Tensor:
    """A seeded assignment of pairs to ``folds`` folds of near-equal size."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_pairs, generator=generator)
    ids = torch.empty(n_pairs, dtype=torch.long)
    ids[order] = torch.arange(n_pairs) % folds
    return ids


def fit_bradley_terry(diffs: torch.Tensor, *, l2: float = 1e-2, l1: float = 0.0, steps: int = 200) -> torch.Tensor:
    """Weights w minimising mean -log sigmoid(w . d) + l2 |w|^2 / 2 + l1 |w|_1 over rows d.

    No intercept: swapping chosen and rejected negates d, so the model stays symmetric.
    Smooth problems use L-BFGS; with ``l1`` it is proximal gradient (ISTA with momentum).
    """
    diffs = diffs.double()
    w = torch.zeros(diffs.shape[1], dtype=torch.float64)
    if l1 == 0.0:
        w.requires_grad_(True)
        optimiser = torch.optim.LBFGS([w], lr=1, max_iter=steps, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            optimiser.zero_grad()
            loss = torch.nn.functional.softplus(-(diffs @ w)).mean() + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
        return w.detach().float()
    # step size from the Lipschitz constant of the smooth part: |D|_2^2 / (4n) + l2
    lipschitz = _spectral_norm(diffs) ** 2 / (4 * len(diffs)) + l2
    step = 1.0 / lipschitz
    previous, momentum = w.clone(), w.clone()
    for t in range(1, steps + 1):
        margin = diffs @ momentum
        grad = -(diffs.T @ torch.sigmoid(-margin)) / len(diffs) + l2 * momentum
        candidate = momentum - step * grad
        w = torch.sign(candidate) * (candidate.abs() - step * l1).clamp(min=0)
        momentum = w + (t - 1) / (t + 2) * (w - previous)
        previous = w
    return w.float()


def _spectral_norm(matrix: torch.Tensor, iterations: int = 50) -> float:
    """Largest singular value by power iteration (an SVD of a wide matrix costs seconds),
    padded by 1% so the step size stays safely below 1/L."""
    v = torch.ones(matrix.shape[1], dtype=matrix.dtype) / matrix.shape[1] ** 0.5
    sigma = 0.0
    for _ in range(iterations):
        u = matrix @ v
        v = matrix.T @ u
        norm = float(v.norm())
        if norm == 0.0:
            return 1e-12
        v = v / norm
        sigma = norm ** 0.5
    return sigma * 1.01


def column_scale(diffs: torch.Tensor) -> torch.Tensor:
    """Per-column root mean square: heads fit on ``diffs / column_scale(diffs)`` (no centring,
    since a difference of two texts has no offset to remove)."""
    return diffs.pow(2).mean(0).sqrt().clamp(min=1e-8)


@dataclass
class CrossFit:
    margins: torch.Tensor  # [n_pairs] each from a head that did not see that pair
    fold: torch.Tensor  # [n_pairs] fold of each pair
    weights: torch.Tensor  # [folds, n_features] the head of each fold
    scale: torch.Tensor  # [n_features] the column scale the weights apply to


def cross_fitted_margins(diffs: torch.Tensor, *, folds: int = 5, seed: int = 0, l2: float = 1e-2,
                         l1: float = 0.0) -> CrossFit:
    """Bradley-Terry margins w_k . d for the pairs of fold k, w_k fitted on the other folds."""
    n = len(diffs)
    folds = max(2, min(folds, n))
    ids = fold_ids(n, folds, seed)
    scale = column_scale(diffs)
    scaled = diffs / scale
    margins = torch.zeros(n)
    weights = torch.zeros(folds, diffs.shape[1])
    for k in range(folds):
        held = ids == k
        w = fit_bradley_terry(scaled[~held], l2=l2, l1=l1)
        weights[k] = w
        margins[held] = scaled[held] @ w
    return CrossFit(margins, ids, weights, scale)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks of ``values`` (float64), ties sharing their mean rank, so the result
    does not depend on input order."""
    v = values.double()
    order = torch.argsort(v, stable=True)
    ranks = torch.empty(len(v), dtype=torch.float64)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    unique, inverse = torch.unique(v, return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(unique)).double()
    return mean_rank[inverse]


def percentile_from_low(values: torch.Tensor) -> torch.Tensor:
    """1 for the lowest value, 0 for the highest; ties share their mean rank; NaN stays NaN."""
    out = torch.full_like(values, float("nan"), dtype=torch.float32)
    finite = torch.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return out
    out[finite] = (1.0 - average_ranks(values[finite]) / max(n - 1, 1)).float()
    return out


def suspicion(signals: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted mean of the signals' percentile ranks from the low end (the combined ranking)."""
    weights = weights or {name: 1.0 for name in signals}
    total = torch.zeros(len(next(iter(signals.values()))))
    weight_sum = 0.0
    for name, values in signals.items():
        w = weights.get(name, 0.0)
        if w:
            total += w * percentile_from_low(values).nan_to_num(0.5)
            weight_sum += w
    return total / weight_sum


QUALITY_KINDS_THAT_CATEGORISE = ("identical", "empty_response", "contradiction", "context_mismatch")


def categorise(suspicion_values: torch.Tensor, signals: dict[str, torch.Tensor], quality: list[list[str]], *,
               flipped_fraction: float, noisy_fraction: float) -> list[str]:
    """A category per pair, from its place in the ranking.

    quality: a data-quality finding that makes the pair unusable as it is (identical
    responses, an empty one, a contradiction, different contexts); flipped: among the
    ``flipped_fraction`` most suspicious pairs and every signal given (those the ranking uses) says rejected is better;
    noisy: among the ``noisy_fraction`` most suspicious otherwise; clean: the rest.
    """
    n = len(suspicion_values)
    order = torch.argsort(-suspicion_values, stable=True)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    stacked = torch.stack([v.nan_to_num(0.0) for v in signals.values()])
    all_negative = (stacked < 0).all(0)
    out = []
    for i in range(n):
        rank_fraction = (int(position[i]) + 1) / n
        if any(kind in QUALITY_KINDS_THAT_CATEGORISE for kind in quality[i]):
            out.append("quality")
        elif rank_fraction <= flipped_fraction and bool(all_negative[i]):
            out.append("flipped")
        elif rank_fraction <= noisy_fraction:
            out.append("noisy")
        else:
            out.append("clean")
    return out
