"""Per-pair scores, the suspicion ranking and the categories (docs/method.md section 5, and our additions).

The one scoring path of both ``scan`` and ``gate``: ``compute_signals`` turns a pair's codes,
features and reward (or pooled activations) into the signals, with heads cross-fitted on the
pairs themselves (a scan) or frozen in a baseline (the gate); ``percentile_against`` and
``combine`` rank them; ``Cutoffs`` and ``categorise_pair`` name the category. So a pair scored
by the gate against a baseline of the same data gets the scan's signals, suspicion and category.

- ``score_safe``: V(chosen) - V(rejected) over the selected features.
- ``reward_margin``: the reward model's own r(chosen) - r(rejected), or, for a model with
  no reward head, a Bradley-Terry linear head on pooled activations, cross-fitted: the
  pairs are split into folds and each pair is scored by a head fitted on the other folds.
- ``sae_margin``: the same cross-fitted Bradley-Terry fit, sparse (L1), on the difference
  of the pooled SAE codes: its weights are a learned salience, and the per-feature terms
  of its margin explain a pair.
- ``suspicion``: the mean over the signals of each pair's percentile rank from the low
  end: the fraction of the other pairs with a higher value, ties counting half (1: below
  every other pair, the most suspicious; 0: above every other). Low scores mean "rejected
  looks better", so every signal ranks the same way. In a scan the other pairs are the rest
  of the scan; in the gate they are the baseline's pairs (less the pair's own entry).
- ``aggregate``: the same, over any judges (safer_audit.judges), or the ``stacked``
  alternative: a cross-fitted Bradley-Terry stack over the judges' signed ranks
  (``stack_judges`` says why that fit is the honest one without flip labels). Its margin gives
  every pair a flip probability: the posterior of a symmetric two-component mixture fitted to the
  margins without labels (``flip_posterior``; docs/method.md "The flip probability").
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import AGGREGATIONS
from .domain import SIGNALS, Category
from .files import write_atomic
from .salience import CodeStats, FeatureSet

# pairs a Bradley-Terry head is fitted on (--head-pairs): above the 2,312-pair HH sample, so its
# reports are those of a fit on every pair; ~4096 x width x 16 B (scaled copy, float64 in the fit)
HEAD_PAIRS = 4096


def text_values(stats: CodeStats, features: FeatureSet) -> torch.Tensor:
    """V(t) for every text: mean over read positions of sum F+ z minus sum F- z (streamed over pairs)."""
    parts = [codes @ features.signs for _, codes in stats.pair_batches(features.latents)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def score_safe(stats: CodeStats, features: FeatureSet) -> torch.Tensor:
    """score_safe per pair = V(chosen) - V(rejected)."""
    values = text_values(stats, features)
    return values[0::2] - values[1::2]


def feature_contributions(stats: CodeStats, features: FeatureSet, pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each selected feature's signed term in V(chosen) and in V(rejected) of one pair."""
    codes = stats.codes.take(torch.tensor([2 * pair, 2 * pair + 1]))[:, features.latents] * features.signs
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
    sample: torch.Tensor | None = None  # [<= max_pairs] the pairs the heads were fitted on (None: every pair)


HEADS_FORMAT = 1  # bump when the fit (fit_bradley_terry, fold_ids, column_scale) changes what it returns
CROSS_FIT_FIELDS = ("margins", "fold", "weights", "scale")
POSTERIOR_FORMAT = 1  # bump when fit_flip_mixture or flip_posterior changes what it returns


class HeadCache:
    """Fitted cross-fitted heads on disk, content-addressed (issue 15).

    A head is a function of its input rows (the per-pair differences of the SAE codes or of the
    pooled activations: what the SAE, the texts and which side is chosen determine), the folds,
    the seed, the penalties, the fitting code and torch's numerics. The key hashes exactly
    those, so a warm scan reads the heads back bit for bit and any change of data, SAE or
    option fits again. One small safetensors file per head (its margins, folds, weights and
    column scale), written atomically.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @staticmethod
    def key(diffs: torch.Tensor, *, folds: int, seed: int, l2: float, l1: float, pairs: int | None = None) -> str:
        """``pairs``: the number of pairs the folds are dealt over, when ``diffs`` is a sample of them."""
        rows = diffs.detach().cpu().contiguous()
        fields = {"format": HEADS_FORMAT, "torch": torch.__version__, "folds": folds, "seed": seed,
                  "l2": float(l2).hex(), "l1": float(l1).hex(), "dtype": str(rows.dtype), "shape": list(rows.shape)}
        if pairs is not None:
            fields["pairs"] = pairs
        h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        h.update(rows.view(torch.uint8).numpy().tobytes() if rows.numel() else b"")
        return h.hexdigest()[:32]

    def path(self, key: str, kind: str = "head") -> Path:
        return self.directory / f"{kind}-{key}.safetensors"

    def _read(self, key: str, names: tuple[str, ...], kind: str = "head") -> list[torch.Tensor] | None:
        """The tensors ``names`` of the entry ``key``, or None (missing or unreadable: it is fitted again)."""
        try:
            tensors = load_safetensors(self.path(key, kind).read_bytes())
            return [tensors[name] for name in names]
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError):
            return None

    def _write(self, key: str, tensors: dict[str, torch.Tensor], kind: str = "head") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = save_safetensors({name: tensor.contiguous() for name, tensor in tensors.items()},
                                metadata={"format": str(HEADS_FORMAT)})
        write_atomic(self.path(key, kind), data)

    def get(self, key: str, n_pairs: int) -> CrossFit | None:
        """The cached fit, or None (missing, unreadable or the wrong shape: it is fitted again)."""
        tensors = self._read(key, CROSS_FIT_FIELDS)
        if tensors is None:
            return None
        fit = CrossFit(*tensors)
        if len(fit.margins) != n_pairs or len(fit.fold) != n_pairs:
            return None
        return fit

    def put(self, key: str, fit: CrossFit) -> None:
        self._write(key, {name: getattr(fit, name) for name in CROSS_FIT_FIELDS})

    def flip_posterior(self, margin: torch.Tensor) -> tuple[torch.Tensor, FlipMixture]:
        """``flip_posterior(margin)``, read back when these margins were fitted before: the mixture's fit is
        thousands of small tensor operations (~0.3 s for 2,312 pairs), which a warm scan need not repeat."""
        fields = {"format": POSTERIOR_FORMAT, "torch": torch.__version__, "n": len(margin)}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        digest.update(margin.detach().double().contiguous().numpy().tobytes())
        key = digest.hexdigest()[:32]
        tensors = self._read(key, ("posterior", "mixture"), "posterior")
        if tensors is not None and tensors[0].shape == margin.shape and tensors[1].shape == (3,):
            return tensors[0], FlipMixture(*tensors[1].tolist())
        posterior, mixture = flip_posterior(margin)
        self._write(key, {"posterior": posterior, "mixture": torch.tensor(
            [mixture.rate, mixture.separation, mixture.log_likelihood], dtype=torch.float64)}, "posterior")
        return posterior, mixture

    def get_head(self, key: str, folds: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached fold heads (weights [folds, width], column scale [width]) of a bounded fit, or None."""
        tensors = self._read(key, ("weights", "scale"))
        if tensors is None:
            return None
        weights, scale = tensors
        if tuple(weights.shape) != (folds, width) or tuple(scale.shape) != (width,):
            return None
        return weights, scale

    def put_head(self, key: str, weights: torch.Tensor, scale: torch.Tensor) -> None:
        self._write(key, {"weights": weights, "scale": scale})


def cross_fitted_margins(diffs: torch.Tensor, *, folds: int = 5, seed: int = 0, l2: float = 1e-2,
                         l1: float = 0.0, cache: HeadCache | None = None) -> CrossFit:
    """Bradley-Terry margins w_k . d for the pairs of fold k, w_k fitted on the other folds.

    ``cache``: read the fit from there when the same rows were fitted with the same options,
    and store it there otherwise (HeadCache).
    """
    if cache is not None:
        key = HeadCache.key(diffs, folds=folds, seed=seed, l2=l2, l1=l1)
        cached = cache.get(key, len(diffs))
        if cached is not None:
            return cached
        fitted = cross_fitted_margins(diffs, folds=folds, seed=seed, l2=l2, l1=l1)
        cache.put(key, fitted)
        return fitted
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


# ------------------------------------------------------------------------------ the signals

@dataclass(frozen=True)
class HeadFit:
    """How the Bradley-Terry heads are fitted (ScanConfig's folds, seed and penalties)."""

    folds: int = 5
    seed: int = 0
    margin_l2: float = 1.0
    sae_l1: float = 2e-2
    sae_l2: float = 1e-4
    max_pairs: int = HEAD_PAIRS  # pairs a head is fitted on: a seeded sample when there are more

    @classmethod
    def of(cls, config) -> HeadFit:
        """The fit a ScanConfig asks for."""
        return cls(config.folds, config.seed, config.margin_l2, config.sae_l1, config.sae_l2,
                   getattr(config, "head_pairs", HEAD_PAIRS))

    def penalties(self, signal: str) -> tuple[float, float]:
        """(l2, l1) of the head behind ``signal``: ridge on activations, sparse on SAE codes."""
        return (self.sae_l2, self.sae_l1) if signal == "sae_margin" else (self.margin_l2, 0.0)


def head_inputs(stats: CodeStats, pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What each Bradley-Terry head reads, per pair, in memory (small data; the scan streams pair_inputs):
    the difference of the mean SAE codes (``sae_margin``) and, given pooled activations per text, their
    difference (``reward_margin``)."""
    return {name: diffs.take(torch.arange(diffs.n)) for name, diffs in pair_inputs(stats, pooled).items()}


class PairDiffs:
    """Per pair, the chosen text's row minus the rejected one's, of a TextRows (or tensor) ``[2 x pairs, width]``:
    read for chosen pairs (``take``) or a range of pairs at a time (``batches``), never all at once."""

    def __init__(self, rows):
        from .codes import TextRows

        self.rows = TextRows.of(rows)
        self.n = self.rows.shape[0] // 2

    def take(self, pairs: torch.Tensor) -> torch.Tensor:
        """``[len(pairs), width]`` differences of the pairs ``pairs``."""
        if len(pairs) == self.n and torch.equal(pairs, torch.arange(self.n)):
            parts = [diffs for _, diffs in self.batches()]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        texts = torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()
        rows = self.rows.take(texts)
        return rows[0::2] - rows[1::2]

    def batches(self):
        """``(first pair, differences)`` of STREAM_PAIRS pairs at a time, in order."""
        from .salience import STREAM_PAIRS

        for start in range(0, max(self.n, 1), STREAM_PAIRS):
            rows = self.rows.read(2 * start, 2 * (start + STREAM_PAIRS))
            yield start, rows[0::2] - rows[1::2]


def pair_inputs(stats: CodeStats, pooled=None) -> dict[str, PairDiffs]:
    """What each Bradley-Terry head reads, per pair, as PairDiffs: ``reward_margin`` (given pooled
    activations per text, a TextRows or tensor) and ``sae_margin`` (the mean SAE codes)."""
    inputs = {}
    if pooled is not None:
        inputs["reward_margin"] = PairDiffs(pooled)
    inputs["sae_margin"] = PairDiffs(stats.codes)
    return inputs


def head_sample(n_pairs: int, max_pairs: int, seed: int) -> torch.Tensor:
    """The pairs a head is fitted on, in table order: every pair up to ``max_pairs``; past it, the
    first ``max_pairs`` of the seeded permutation fold_ids deals the folds from (so each fold
    keeps its share of the sample)."""
    if n_pairs <= max_pairs:
        return torch.arange(n_pairs)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_pairs, generator=generator)[:max_pairs].sort().values


def cross_fitted_head(name: str, diffs: PairDiffs, fit: HeadFit, cache: HeadCache | None = None) -> CrossFit:
    """The cross-fitted Bradley-Terry head behind the signal ``name`` and its margin for every pair.

    Every pair gets a fold (fold_ids over all pairs); the head of fold k is fitted on the pairs of
    the bounded sample (head_sample, ``fit.max_pairs``) outside fold k, and scores every pair of
    fold k, in or out of the sample, a range of pairs at a time: no pair is scored by a head that
    saw it, and no more than ``fit.max_pairs`` pairs' differences are held. Up to the bound this is
    exactly cross_fitted_margins on the whole table.

    ``cache``: the fold heads (weights and column scale) are read from there when the same sample rows
    were fitted with the same folds, seed, penalties and number of pairs; the margins are always computed
    again from the current rows, so a changed pair outside the sample is never scored from stale values.
    """
    n = diffs.n
    folds = max(2, min(fit.folds, n))
    ids = fold_ids(n, folds, fit.seed)
    sample = head_sample(n, max(fit.max_pairs, 2), fit.seed)
    l2, l1 = fit.penalties(name)
    train = diffs.take(sample)
    key = None
    if cache is not None:  # the fold assignment is a function of (n, folds, seed): all in the key
        key = HeadCache.key(train, folds=folds, seed=fit.seed, l2=l2, l1=l1, pairs=n)
        cached = cache.get_head(key, folds, train.shape[1])
    if cache is not None and cached is not None:
        weights, scale = cached
        del train
    else:
        scale = column_scale(train)
        scaled = train / scale
        del train
        sample_ids = ids[sample]
        weights = torch.zeros(folds, scaled.shape[1])
        for k in range(folds):
            weights[k] = fit_bradley_terry(scaled[sample_ids != k], l2=l2, l1=l1)
        del scaled
        if cache is not None:
            cache.put_head(key, weights, scale)
    margins = torch.zeros(n)
    for start, batch in diffs.batches():
        batch_scaled = batch / scale
        batch_ids = ids[start:start + len(batch)]
        out = margins[start:start + len(batch)]
        for k in range(folds):
            held = batch_ids == k
            out[held] = batch_scaled[held] @ weights[k]
    return CrossFit(margins, ids, weights, scale, sample)


def fit_heads(stats: CodeStats, fit: HeadFit, pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Heads fitted on every pair, to freeze (a baseline's heads file): ``<signal>.scale`` and
    ``<signal>.weight`` for the SAE-code head, and the activation head when ``pooled`` is given
    (a model without a reward head of its own). Column-scaled as cross_fitted_margins does."""
    heads = {}
    for name, diffs in head_inputs(stats, pooled).items():
        scale = column_scale(diffs)
        l2, l1 = fit.penalties(name)
        heads[f"{name}.scale"] = scale.contiguous()
        heads[f"{name}.weight"] = fit_bradley_terry(diffs / scale, l2=l2, l1=l1).contiguous()
    return heads


def frozen_margins(heads: Mapping[str, torch.Tensor], name: str, diffs: torch.Tensor) -> torch.Tensor:
    """Margins of the frozen head ``name`` (fit_heads' layout); a KeyError names a missing tensor."""
    return (diffs / heads[f"{name}.scale"]) @ heads[f"{name}.weight"]


def compute_signals(stats: CodeStats, features: FeatureSet, *, rewards: torch.Tensor | None = None,
                    pooled: torch.Tensor | None = None, heads: Mapping[str, torch.Tensor] | None = None,
                    fit: HeadFit = HeadFit(), head_cache: HeadCache | None = None) -> dict[str, torch.Tensor]:
    """The signals of every pair, in SIGNALS order.

    ``rewards``: the model's reward per text (chosen, rejected interleaved), for a model with a
    reward head; else ``pooled``: pooled activations per text, read by a Bradley-Terry head.
    ``heads``: frozen heads (fit_heads' layout) for pairs they never saw (the gate); None
    cross-fits them on these pairs (a scan), so no pair is scored by a head that saw it;
    ``head_cache`` keeps those fits for a re-scan of the same pairs (HeadCache).
    """
    if (rewards is None) == (pooled is None):
        raise ValueError("give the rewards (a reward model) or the pooled activations, not both or neither")
    signals = {"score_safe": score_safe(stats, features)}
    if rewards is not None:
        signals["reward_margin"] = rewards[0::2] - rewards[1::2]
    for name, diffs in pair_inputs(stats, pooled).items():
        signals[name] = head_margins(name, diffs, fit, heads, cache=head_cache)
    return {name: signals[name] for name in SIGNALS}


def head_margins(name: str, diffs: PairDiffs, fit: HeadFit, heads: Mapping[str, torch.Tensor] | None = None,
                 cache: HeadCache | None = None):
    """The margins of the head ``name`` for every pair: frozen ``heads`` (streamed), or cross-fitted
    (its fits read from ``cache`` when the same sample was fitted with the same options)."""
    if heads is None:
        return cross_fitted_head(name, diffs, fit, cache=cache).margins
    parts = [frozen_margins(heads, name, batch) for _, batch in diffs.batches()]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# -------------------------------------------------------------------------------- ranking

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


# ----------------------------------------------------------------------------- categories

QUALITY_KINDS_THAT_CATEGORISE = ("identical", "empty_response", "contradiction", "context_mismatch")


@dataclass(frozen=True)
class Cutoffs:
    """The suspicion a pair must reach to be ``flipped`` or ``noisy`` (None: no pair can)."""

    flipped: float | None
    noisy: float | None

    @classmethod
    def from_ranking(cls, suspicion_values: torch.Tensor, flipped_fraction: float, noisy_fraction: float) -> Cutoffs:
        return cls(_cutoff(suspicion_values, flipped_fraction), _cutoff(suspicion_values, noisy_fraction))


def _cutoff(suspicion_values: torch.Tensor, fraction: float) -> float | None:
    """The suspicion of the last pair inside the most suspicious ``fraction`` (pairs tied with
    it are inside too: a category does not depend on the order of the input)."""
    n = len(suspicion_values)
    count = sum(1 for position in range(n) if (position + 1) / n <= fraction)
    return float(torch.sort(suspicion_values.double(), descending=True).values[count - 1]) if count else None


def categorise_pair(suspicion_value: float, signals: Mapping[str, float | None], quality_kinds: Iterable[str],
                    cutoffs: Cutoffs) -> Category:
    """The category of one pair.

    quality: a data-quality finding that makes the pair unusable as it is (identical
    responses, an empty one, a contradiction, different contexts); flipped: its suspicion
    reaches the flipped cut-off and every signal given (those the ranking uses) says rejected
    is better; noisy: it reaches the noisy cut-off otherwise; clean: the rest.
    """
    if any(kind in QUALITY_KINDS_THAT_CATEGORISE for kind in quality_kinds):
        return Category.QUALITY
    all_negative = all(v is not None and math.isfinite(v) and v < 0 for v in signals.values())
    if cutoffs.flipped is not None and suspicion_value >= cutoffs.flipped and all_negative:
        return Category.FLIPPED
    if cutoffs.noisy is not None and suspicion_value >= cutoffs.noisy:
        return Category.NOISY
    return Category.CLEAN


def categorise(suspicion_values: torch.Tensor, signals: Mapping[str, torch.Tensor], quality: list[list[str]], *,
               flipped_fraction: float, noisy_fraction: float) -> list[Category]:
    """A category per pair of a scan, with the cut-offs of its own ranking (categorise_pair)."""
    cutoffs = Cutoffs.from_ranking(suspicion_values, flipped_fraction, noisy_fraction)
    return [categorise_pair(float(suspicion_values[i]), {name: float(v[i]) for name, v in signals.items()},
                            quality[i], cutoffs) for i in range(len(suspicion_values))]


# ----------------------------------------------------------------------------- aggregation over judges

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


def signed_ranks(values: torch.Tensor) -> torch.Tensor:
    """sign(v) * rank(|v|) / n: an odd, scale-free version of a judge's signal (NaN -> 0: no opinion)."""
    from .judges import _signed_rank

    return _signed_rank(values).nan_to_num(0.0)


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


# ------------------------------------------------------------------ the flip posterior

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
