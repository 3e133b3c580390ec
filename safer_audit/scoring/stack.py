"""Aggregation over judges: the cross-fitted stack and the flip posterior."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import AGGREGATIONS, ScanConfig
from .heads import HeadCache, cross_fitted_margins
from .posterior import FlipMixture, flip_posterior
from .ranks import signed_ranks, suspicion


@dataclass
class Stack:
    """The stacked aggregation of a scan's judges.

    ``margin``: per pair, a Bradley-Terry combination of the judges' signed ranks, each pair
    scored by weights fitted on the other folds; ``weights``: the fold-mean weight of each
    judge (how much the stack trusts it); ``rejected_probability``: sigmoid(-margin), the
    stack's probability that the rejected response is the better one (what ``stacked`` ranks
    by; it counts every judge error as a flip, so it is not a flip probability);
    ``flip_probability``: the posterior probability that the pair is flipped, from the mixture
    ``flip_posterior`` fits to the margins; ``mixture``: that fit (its ``rate`` is the estimated
    share of flipped pairs).
    """

    margin: torch.Tensor
    weights: dict[str, float]
    flip_probability: torch.Tensor
    rejected_probability: torch.Tensor
    mixture: FlipMixture


def stack_judges(signals: Mapping[str, torch.Tensor], *, folds: int = 5, seed: int = 0, l2: float = 1e-2,
                 cache: HeadCache | None = None) -> Stack:
    """Combine judges with a cross-fitted Bradley-Terry model over their signed ranks.

    The supervision: a scan has no flip labels, only the preference itself. We fit the stack on
    synthetic flips of the scanned data: swap a random half of the pairs and learn to tell the
    swapped ones from the judges' signals. Because every judge is odd (swapping a pair negates
    its signal) and the swaps are random, that logistic fit is, in expectation, exactly a
    Bradley-Terry fit without intercept on the data's own orientation; so we fit that directly,
    with no randomness to seed. Cross-fitted: a pair's margin comes from weights fitted on the
    other folds, so its own label (flipped or not) does not pull the weights towards it.

    sigmoid(-margin) is the stack's probability that the rejected response is the preferred one:
    it counts judge errors as well as flips (HH, 10% injected: mean 0.45). The flip probability is
    instead the posterior of ``flip_posterior``'s mixture over the margins. ``evaluate`` measures
    how both track injected flips.
    """
    names = list(signals)
    features = torch.stack([signed_ranks(signals[name]) for name in names], dim=1).float()
    fitted = cross_fitted_margins(features, folds=folds, seed=seed, l2=l2, cache=cache)
    weights = (fitted.weights / fitted.scale).mean(0)
    margin = fitted.margins.double()
    posterior, mixture = cache.flip_posterior(margin) if cache is not None else flip_posterior(margin)
    return Stack(margin, {name: float(w) for name, w in zip(names, weights, strict=True)}, posterior,
                 torch.sigmoid(-margin), mixture)


def aggregate(signals: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None, *,
              method: str = "mean-rank", folds: int = 5, seed: int = 0,
              head_cache: HeadCache | None = None) -> tuple[torch.Tensor, Stack]:
    """The suspicion of every pair from its judges' signals, and the stack (for its flip probability).

    ``mean-rank`` (the default): the weighted mean of the judges' percentiles from the low end
    (``suspicion``); ``stacked``: the stack's probability that the rejected response is better
    (sigmoid(-margin): the same order as the flip probability, without its ties at 0). The stack is fitted over the
    judges with a positive weight either way, so every scan has a flip probability per pair.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {method!r}")
    weights = dict(weights or {name: 1.0 for name in signals})
    used = {name: values for name, values in signals.items() if weights.get(name)}
    stack = stack_judges(used, folds=folds, seed=seed, cache=head_cache)  # a warm scan reads the stack's fit too
    if method == "stacked":
        return stack.rejected_probability.clone(), stack
    return suspicion(signals, weights), stack


def ranking_weights(config: ScanConfig) -> dict[str, float]:
    """Judge -> weight in the ranking: ``config.ranking`` by default, equal weights for ``--judge``."""
    if config.judges is None:
        return dict(config.ranking)
    return {name: 1.0 for name in config.judges}


def ranking_description(weights: Mapping[str, float], aggregation: str) -> str:
    """What a ranking combines, for the report: ``mean percentile rank from the low end of (a, 2*b)``."""
    used = ", ".join(f"{w:g}*{name}" if w != 1 else name for name, w in weights.items() if w)
    if aggregation == "stacked":
        return f"P(rejected is better) of a cross-fitted Bradley-Terry stack over ({used})"
    return f"mean percentile rank from the low end of ({used})"
