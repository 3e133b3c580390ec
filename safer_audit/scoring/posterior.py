"""The flip posterior: a two-component mixture over the stack's margins, and each pair's probability of being flipped."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .ranks import average_ranks


@dataclass(frozen=True)
class FlipMixture:
    """The mixture ``flip_posterior`` fitted: on the fitted scale a correct pair's margin is
    N(separation, 1) and a flipped pair's N(-separation, 1); ``rate`` of the pairs are flipped."""

    rate: float
    separation: float
    log_likelihood: float  # of the margins' signs given their sizes, at the fit (nats)


SEPARATION_GRID = 48  # log-spaced separations tried before the refinement


SEPARATION_RANGE = (0.01, 6.0)


QUANTILE_POINTS = 4096  # above this many distinct sizes the scale is interpolated between this many


def _folded_normal_quantile(u: torch.Tensor, separation: float, steps: int = 60) -> torch.Tensor:
    """The ``u``-quantiles of |X|, X ~ N(separation, 1) (the same for -X): bisection on
    P(|X| <= a) = Phi(a - s) + Phi(a + s) - 1, which rises from 0 at a = 0."""
    lo = torch.zeros_like(u)
    hi = torch.full_like(u, separation + 12.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        below = torch.special.ndtr(mid - separation) + torch.special.ndtr(mid + separation) - 1 < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through (xp, fp), xp increasing; x within [xp[0], xp[-1]]."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * ((x - x0) / (x1 - x0).clamp(min=1e-300))


def _mixture_scale(u: torch.Tensor, separation: float) -> torch.Tensor:
    """Each size quantile ``u`` on the scale where sizes are |N(separation, 1)| (exact for up to
    QUANTILE_POINTS distinct quantiles, interpolated between that many beyond)."""
    unique, inverse = torch.unique(u, return_inverse=True)
    if len(unique) <= QUANTILE_POINTS:
        return _folded_normal_quantile(unique, separation)[inverse]
    knots = unique[torch.linspace(0, len(unique) - 1, QUANTILE_POINTS).round().long()]
    return _interpolate(u, knots, _folded_normal_quantile(knots, separation))


def _best_rate(agree: torch.Tensor) -> tuple[float, float]:
    """The flip rate pi in [0, 1/2] maximising sum log(pi + (1 - 2 pi) agree_i) (concave in pi),
    by bisection on its derivative; and that maximum. ``agree``: each pair's chance that its sign
    is the one it has, were it correct."""
    def slope(pi: float) -> float:
        return float(((1 - 2 * agree) / (pi + (1 - 2 * pi) * agree).clamp(min=1e-300)).sum())

    lo, hi = 0.0, 0.5
    if slope(lo) <= 0:
        hi = 0.0
    elif slope(hi) >= 0:
        lo = 0.5
    else:
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    rate = (lo + hi) / 2
    return rate, float((rate + (1 - 2 * rate) * agree).clamp(min=1e-300).log().sum())


def fit_flip_mixture(margin: torch.Tensor) -> tuple[FlipMixture, torch.Tensor]:
    """Fit the symmetric mixture to cross-fitted margins, without labels; also each pair's
    position on the fitted scale (signed: the margin's sign, its size's normal-mixture quantile).

    The model: on some increasing odd scale t(m), correct pairs' margins are N(s, 1) and flipped
    ones' N(-s, 1), a share pi of the pairs flipped. Odd, because flipping a pair negates its
    margin. The sizes |t| then follow |N(s, 1)| whatever pi is, so the scale for a given s is
    read off the ranks of |m| (no shape is assumed for the margins themselves), and pi and s are
    fitted by maximum likelihood of the signs given the sizes:
    P(m > 0 | |t| = a) = pi + (1 - 2 pi) sigmoid(2 s a). s: a log-spaced grid, then a
    golden-section refinement; pi: exact for each s. Deterministic; zero margins carry no sign
    and are left out of the fit.
    """
    m = margin.double().nan_to_num(0.0)
    n = len(m)
    if n == 0:
        return FlipMixture(0.0, 0.0, 0.0), m.clone()
    u = (average_ranks(m.abs()) + 0.5) / n
    signed = m != 0
    positive = (m > 0)[signed]
    if not bool(signed.any()):
        return FlipMixture(0.0, 0.0, 0.0), torch.zeros_like(m)

    def fit_at(separation: float) -> tuple[float, float]:
        size = _mixture_scale(u[signed], separation)
        correct = torch.sigmoid(2 * separation * size)  # P(m > 0 | size), a correct pair
        rate, log_likelihood = _best_rate(torch.where(positive, correct, 1 - correct))
        return log_likelihood, rate

    lo, hi = SEPARATION_RANGE
    grid = torch.logspace(math.log10(lo), math.log10(hi), SEPARATION_GRID, dtype=torch.float64).tolist()
    scores = [fit_at(s)[0] for s in grid]
    best = max(range(len(grid)), key=lambda i: (scores[i], -i))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = fit_at(c)[0], fit_at(d)[0]
    for _ in range(30):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = fit_at(c)[0]
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = fit_at(d)[0]
    candidates = [(scores[best], grid[best]), (fc, c), (fd, d)]
    _, separation = max(candidates, key=lambda item: item[0])
    log_likelihood, rate = fit_at(separation)
    scale = torch.where(signed, torch.sign(m) * _mixture_scale(u, separation), torch.zeros_like(m))
    return FlipMixture(rate, separation, log_likelihood), scale


@contextmanager
def _one_thread():
    """Torch on one thread: the fit is thousands of small tensor operations, which intra-op threads
    slow down badly on a busy machine (2,312 pairs: 0.3 s on one thread, 15 s on two shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def flip_posterior(margin: torch.Tensor) -> tuple[torch.Tensor, FlipMixture]:
    """Each pair's posterior probability of being flipped under ``fit_flip_mixture``'s mixture:
    pi N(t; -s, 1) / ((1 - pi) N(t; s, 1) + pi N(t; -s, 1)) = sigmoid(logit(pi) - 2 s t).
    Decreasing in the margin; pi for a margin of 0; 0 everywhere when the fit finds no flips."""
    with _one_thread():
        mixture, scale = fit_flip_mixture(margin)
    if mixture.rate <= 0:
        return torch.zeros(len(scale), dtype=torch.float64), mixture
    logit = math.log(mixture.rate) - math.log1p(-mixture.rate)
    return torch.sigmoid(logit - 2 * mixture.separation * scale), mixture




def plausible_posterior(posterior: torch.Tensor, mixture: FlipMixture) -> bool:
    """Whether ``posterior`` and ``mixture`` are values ``flip_posterior`` can return: probabilities in [0, 1], a
    rate in [0, 1/2], a separation of 0 or within SEPARATION_RANGE, a finite log-likelihood <= 0. A cached
    posterior that is not (a damaged entry) is fitted again rather than ranked or acted on (``clean
    --min-flip-probability``)."""
    lo, hi = SEPARATION_RANGE
    separation = mixture.separation
    return (posterior.dtype == torch.float64 and bool(((posterior >= 0) & (posterior <= 1)).all())
            and 0.0 <= mixture.rate <= 0.5
            and (separation == 0.0 or lo * (1 - 1e-9) <= separation <= hi * (1 + 1e-9))
            and math.isfinite(mixture.log_likelihood) and mixture.log_likelihood <= 0.0)
