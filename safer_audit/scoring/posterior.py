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
    N(separation, 1) and a flipped pair's N(-separation, 1); ``rate`` of the pairs are flipped.
    ``rate`` and ``separation`` are posterior means over a grid (fit_flip_mixture: a prior on the
    rate that makes high rates less likely, log-uniform on the separation); ``rate_sd`` is the
    rate's posterior sd."""

    rate: float
    separation: float
    log_likelihood: float  # of the margins' signs given their sizes, at the grid's best fit (nats)
    rate_sd: float = 0.0
    # how much larger the margins that agree with the labels are than those that disagree: the z of the
    # Mann-Whitney test of |margin| between positive and negative margins (0 when either side is empty)
    size_sign_z: float = 0.0
    agreeing: int = 0  # margins > 0
    disagreeing: int = 0  # margins < 0

    @property
    def identified(self) -> bool:
        return self.reason is None

    @property
    def reason(self) -> str | None:
        """Why the mixture cannot be identified (no flip probability can be given), in one line; None when it can."""
        if self.agreeing == 0 and self.disagreeing == 0:
            return "no flip probability: no pair has a margin with a sign (the judges cannot tell its responses apart)"
        if self.agreeing == 0 or self.disagreeing == 0:
            side = "agrees" if self.disagreeing == 0 else "disagrees"
            return (f"no flip probability: every judged pair's margin {side} with its label, so judge errors "
                    "cannot be told from flips")
        if self.size_sign_z < MIN_SIZE_SIGN_Z:
            return (f"no flip probability: the judges are too weak to tell flips from their own errors (their "
                    f"margins are hardly larger where they agree with the label: z {self.size_sign_z:.1f} "
                    f"< {MIN_SIZE_SIGN_Z:g})")
        return None


# the mixture tells a flip from a judge error by the size of its margin: a judge that is no surer when it agrees
# with the label than when it disagrees (margin sizes alike on both sides, by a Mann-Whitney z) gives it nothing
# to go on, and a fit calls every disagreement a flip (the 300-pair sample: z 2.2, and a point fit put 63 pairs at
# exactly 1; the HH file: z 10.8; copies of it with 10% planted flips: z 7.0-9.5)
MIN_SIZE_SIGN_Z = 3.0


RATE_GRID = 100  # flip rates tried: the midpoints of 100 equal steps over [0, 1/2]
# the prior on the flip rate pi: 2 pi ~ Beta(1, 1 + RATE_PRIOR_POWER), density (1 - 2 pi)^3, mean 0.1. High rates are
# made less likely (a quarter of the pairs flipped is rare in preference data); with weak judges the likelihood is
# flat up to pi ~ 0.25, and a flat prior let the rate drift to 0.19 on a copy with 10% planted flips (measured:
# BENCHMARKS.md "The flip probability": flat, power 2 and power 3 on the same seeds, the largest ECE 0.087, 0.059
# and 0.044)
RATE_PRIOR_POWER = 3


SEPARATION_GRID = 48  # log-spaced separations the posterior is taken over


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


def size_sign_z(margin: torch.Tensor) -> tuple[float, int, int]:
    """The Mann-Whitney z of |margin| between the positive and the negative margins (> 0: the judges are surer
    where they agree with the label), and the counts of each; zero and missing margins are left out."""
    m = margin.double().nan_to_num(0.0)
    m = m[m != 0]
    positive = m > 0
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return 0.0, n1, n0
    ranks = average_ranks(m.abs())  # 0-based
    u = float(ranks[positive].sum()) - n1 * (n1 - 1) / 2
    z = (u - n1 * n0 / 2) / math.sqrt(n1 * n0 * (n1 + n0 + 1) / 12)
    return z, n1, n0


def fit_flip_mixture(margin: torch.Tensor) -> tuple[FlipMixture, torch.Tensor]:
    """Fit the symmetric mixture to cross-fitted margins, without labels; also each pair's posterior
    probability of being flipped.

    The model: on some increasing odd scale t(m), correct pairs' margins are N(s, 1) and flipped
    ones' N(-s, 1), a share pi of the pairs flipped. Odd, because flipping a pair negates its
    margin. The sizes |t| then follow |N(s, 1)| whatever pi is, so the scale for a given s is
    read off the ranks of |m| (no shape is assumed for the margins themselves), and the signs
    given the sizes have the likelihood P(m > 0 | |t| = a) = pi + (1 - 2 pi) sigmoid(2 s a).

    Weak judges leave that likelihood flat over a wide range of (pi, s), and its maximum then sits
    on an edge: pi = 0 (every pair at exactly 0) or s at its top (every disagreeing pair at
    exactly 1). So pi and s are not fitted to a point: the likelihood is taken over a grid (pi on
    [0, 1/2] with the prior density (1 - 2 pi)^RATE_PRIOR_POWER, s log-uniform on SEPARATION_RANGE)
    and each pair's probability is its posterior averaged over the grid, P(flip | t) = sigmoid(logit(pi) - 2 s t)
    weighted by each (pi, s)'s posterior. Deterministic; zero margins carry no sign, are left out
    of the fit and get the posterior mean of pi.
    """
    m = margin.double().nan_to_num(0.0)
    n = len(m)
    z, agreeing, disagreeing = size_sign_z(m)
    signed = m != 0
    if n == 0 or not bool(signed.any()):
        return FlipMixture(0.0, 0.0, 0.0), torch.zeros(n, dtype=torch.float64)
    u = (average_ranks(m.abs()) + 0.5) / n
    positive = (m > 0)[signed]
    rates = (torch.arange(RATE_GRID, dtype=torch.float64) + 0.5) / (2 * RATE_GRID)
    lo, hi = SEPARATION_RANGE
    separations = torch.logspace(math.log10(lo), math.log10(hi), SEPARATION_GRID, dtype=torch.float64)
    sizes, log_likelihood = [], torch.empty(SEPARATION_GRID, RATE_GRID, dtype=torch.float64)
    for i, separation in enumerate(separations.tolist()):
        size = _mixture_scale(u, separation)
        sizes.append(size)
        correct = torch.sigmoid(2 * separation * size[signed])  # P(m > 0 | size), a correct pair
        agree = torch.where(positive, correct, 1 - correct)  # the chance of the sign it has, were it correct
        log_likelihood[i] = (rates + (1 - 2 * rates) * agree.unsqueeze(1)).clamp(min=1e-300).log().sum(0)
    log_prior = RATE_PRIOR_POWER * torch.log1p(-2 * rates)  # on the rate; log-uniform on s (the grid's spacing)
    weight = torch.softmax((log_likelihood + log_prior).flatten(), 0).reshape(log_likelihood.shape)
    logit = rates.log() - (-rates).log1p()
    posterior = torch.zeros(n, dtype=torch.float64)
    for i, separation in enumerate(separations.tolist()):
        kept = weight[i] > 1e-12  # (pi, s) of no weight add nothing: skipped
        if bool(kept.any()):
            t = torch.where(signed, torch.sign(m) * sizes[i], torch.zeros_like(m))
            posterior += torch.sigmoid(logit[kept] - 2 * separation * t.unsqueeze(1)) @ weight[i][kept]
    by_rate, by_separation = weight.sum(0), weight.sum(1)
    rate = float(by_rate @ rates)
    mixture = FlipMixture(rate, float(by_separation @ separations), float(log_likelihood.max()),
                          float((by_rate @ (rates - rate) ** 2).sqrt()), z, agreeing, disagreeing)
    return mixture, posterior.clamp(0.0, 1.0)


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
    """Each pair's posterior probability of being flipped under ``fit_flip_mixture``'s mixture, averaged over
    its grid of (pi, s): decreasing in the margin; the posterior mean of pi for a margin of 0. The
    probabilities are made whether or not the mixture is identified (``mixture.reason``): a report shows
    none when it is not."""
    with _one_thread():
        mixture, posterior = fit_flip_mixture(margin)
    return posterior, mixture


def plausible_posterior(posterior: torch.Tensor, mixture: FlipMixture) -> bool:
    """Whether ``posterior`` and ``mixture`` are values ``flip_posterior`` can return: probabilities in [0, 1], a
    rate and its sd in [0, 1/2], a separation of 0 or within SEPARATION_RANGE, a finite log-likelihood <= 0, a
    finite z and counts of margins that add up to at most the pairs. A cached posterior that is not (a damaged
    entry) is fitted again rather than ranked or acted on (``clean --min-flip-probability``)."""
    lo, hi = SEPARATION_RANGE
    separation = mixture.separation
    return (posterior.dtype == torch.float64 and bool(((posterior >= 0) & (posterior <= 1)).all())
            and 0.0 <= mixture.rate <= 0.5 and 0.0 <= mixture.rate_sd <= 0.5
            and (separation == 0.0 or lo * (1 - 1e-9) <= separation <= hi * (1 + 1e-9))
            and math.isfinite(mixture.log_likelihood) and mixture.log_likelihood <= 0.0
            and math.isfinite(mixture.size_sign_z)
            and 0 <= mixture.agreeing and 0 <= mixture.disagreeing
            and mixture.agreeing + mixture.disagreeing <= len(posterior))
