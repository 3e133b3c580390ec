"""Ranks and percentiles: the scale-free forms every judge is compared in."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


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


def percentile_against(values: torch.Tensor, reference: torch.Tensor,
                       leave_out: torch.Tensor | None = None) -> torch.Tensor:
    """For each value, the fraction of the finite reference values above it, ties counting half.

    ``leave_out[i]`` is one reference value that does not count for ``values[i]`` (its own
    entry; NaN: none). 1 below every other value, 0 above; NaN stays NaN, and so does a value
    with nothing left to compare to (``combine`` counts it 0.5). Float64, from counts, so the
    scan and the gate get the same bits for the same comparison.
    """
    ref = reference[torch.isfinite(reference)].double().sort().values
    v = values.double()
    out = torch.full(v.shape, math.nan, dtype=torch.float64)
    finite = torch.isfinite(v)
    below = torch.searchsorted(ref, v[finite], right=False).double()
    upto = torch.searchsorted(ref, v[finite], right=True).double()
    above, ties = len(ref) - upto, upto - below
    n = torch.full_like(above, float(len(ref)))
    if leave_out is not None:
        left = leave_out.double()[finite]
        counted = torch.isfinite(left)
        n -= counted.double()
        above -= (counted & (left > v[finite])).double()
        ties -= (counted & (left == v[finite])).double()
    out[finite] = torch.where(n > 0, (above + 0.5 * ties) / n.clamp(min=1), math.nan)
    return out


def percentile_from_low(values: torch.Tensor) -> torch.Tensor:
    """Each value's percentile among the others (each leaves itself out): 1 for the lowest,
    0 for the highest; ties share their mean; NaN stays NaN."""
    return percentile_against(values, values, leave_out=values)


def combine(percentiles: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Weighted mean of the signals' percentiles (a missing one counts 0.5): the suspicion."""
    weights = weights or {name: 1.0 for name in percentiles}
    total = torch.zeros(len(next(iter(percentiles.values()))), dtype=torch.float64)
    weight_sum = 0.0
    for name, values in percentiles.items():
        w = weights.get(name, 0.0)
        if w:
            total += w * values.nan_to_num(0.5)
            weight_sum += w
    return total / weight_sum


def suspicion(signals: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """The combined ranking of a scan: each pair's percentiles among the other pairs, combined."""
    return combine({name: percentile_from_low(values) for name, values in signals.items()}, weights)


def ranked_signals(signals: Mapping[str, object], weights: Mapping[str, float]) -> dict[str, object]:
    """The signals the ranking uses (a positive weight): the ones a ``flipped`` pair must have all negative."""
    return {name: value for name, value in signals.items() if weights.get(name)}


def signed_ranks(values: torch.Tensor) -> torch.Tensor:
    """sign(v) * rank(|v|) / n: an odd, scale-free version of a judge's signal (NaN -> 0: no opinion)."""
    

    return signed_rank(values).nan_to_num(0.0)


def signed_rank(values: torch.Tensor) -> torch.Tensor:
    """sign(v) * (rank of |v| among the finite |v|, 1-based) / n: odd in v, in [-1, 1]; NaN stays NaN."""
    

    v = values.double()
    out = torch.full_like(v, float("nan"))
    finite = torch.isfinite(v)
    if finite.any():
        ranks = average_ranks(v[finite].abs()) + 1
        out[finite] = torch.sign(v[finite]) * ranks * (v[finite] != 0) / int(finite.sum())
    return out
