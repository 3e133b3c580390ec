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
- ``aggregate``: the same, over any judges (safer_audit.scoring.judges), or the ``stacked``
  alternative: a cross-fitted Bradley-Terry stack over the judges' signed ranks
  (``stack_judges`` says why that fit is the honest one without flip labels). Its margin gives
  every pair a flip probability: the posterior of a symmetric two-component mixture fitted to the
  margins without labels (``flip_posterior``; docs/method.md "The flip probability").
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.domain import SIGNALS
from ..common.entries import read_entry, tensors_digest, write_entry
from ..features.salience import FeatureSet
from ..sae.stats import CodeStats, TextRows, stream_pairs
from .posterior import FlipMixture, flip_posterior, plausible_posterior

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


POSTERIOR_FORMAT = 2  # bump when fit_flip_mixture or flip_posterior changes what it returns
# a cached posterior's mixture, as one float64 tensor in this order
MIXTURE_FIELDS = (("rate", float), ("separation", float), ("log_likelihood", float), ("rate_sd", float),
                  ("size_sign_z", float), ("agreeing", int), ("disagreeing", int))


def _entry_digest(key: str, kind: str, tensors: dict[str, torch.Tensor]) -> str:
    """The digest a head or posterior entry carries in its header (entries.tensors_digest of its key and tensors)."""
    return tensors_digest([HEADS_FORMAT, kind, key], tensors)


class HeadCache:
    """Fitted cross-fitted heads on disk, content-addressed.

    A head is a function of its input rows (the per-pair differences of the SAE codes or of the
    pooled activations: what the SAE, the texts and which side is chosen determine), the folds,
    the seed, the penalties, the fitting code and torch's numerics. The key hashes exactly
    those, so a warm scan reads the heads back bit for bit and any change of data, SAE or
    option fits again. One small safetensors file per head (its margins, folds, weights and
    column scale), written atomically with a digest of its key and tensors in its header. An entry
    is used only when that digest matches and its values are ones a fit gives (finite margins and
    weights, a positive scale, fold ids in range; a posterior in [0, 1]): anything else is fitted again.
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
        """The tensors ``names`` of the entry ``key``, or None: missing, unreadable, or not what was written (its
        digest differs: a flipped byte), or holding a value no fit gives (NaN or infinite). It is fitted again."""
        entry = read_entry(self.path(key, kind))
        if entry is None:
            return None
        tensors, metadata = entry
        if set(tensors) != set(names) or metadata.get("digest") != _entry_digest(key, kind, tensors):
            return None
        if not all(torch.isfinite(tensor).all() for tensor in tensors.values()):
            return None
        return [tensors[name] for name in names]

    def _write(self, key: str, tensors: dict[str, torch.Tensor], kind: str = "head") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_entry(self.path(key, kind), tensors,
                    {"format": str(HEADS_FORMAT), "digest": _entry_digest(key, kind, tensors)})

    def get(self, key: str, n_pairs: int) -> CrossFit | None:
        """The cached fit, or None (missing, unreadable or the wrong shape: it is fitted again)."""
        tensors = self._read(key, CROSS_FIT_FIELDS)
        if tensors is None:
            return None
        fit = CrossFit(*tensors)
        if fit.margins.shape != (n_pairs,) or fit.fold.shape != (n_pairs,) or fit.weights.dim() != 2 \
                or fit.scale.shape != fit.weights.shape[1:] or not bool((fit.scale > 0).all()) \
                or not bool(((fit.fold >= 0) & (fit.fold < len(fit.weights))).all()):
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
        if tensors is not None and tensors[0].shape == margin.shape and tensors[1].shape == (len(MIXTURE_FIELDS),):
            values = tensors[1].tolist()
            if all(math.isfinite(v) for v in values):  # else a damaged entry: fitted again
                posterior = tensors[0]
                mixture = FlipMixture(**{name: kind(v) for (name, kind), v in zip(MIXTURE_FIELDS, values, strict=True)})
                if plausible_posterior(posterior, mixture):
                    return posterior, mixture
        posterior, mixture = flip_posterior(margin)
        self._write(key, {"posterior": posterior, "mixture": torch.tensor(
            [float(getattr(mixture, name)) for name, _ in MIXTURE_FIELDS], dtype=torch.float64)}, "posterior")
        return posterior, mixture

    def get_head(self, key: str, folds: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached fold heads (weights [folds, width], column scale [width]) of a bounded fit, or None."""
        tensors = self._read(key, ("weights", "scale"))
        if tensors is None:
            return None
        weights, scale = tensors
        if tuple(weights.shape) != (folds, width) or tuple(scale.shape) != (width,) or not bool((scale > 0).all()):
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

        for start in range(0, max(self.n, 1), stream_pairs()):
            rows = self.rows.read(2 * start, 2 * (start + stream_pairs()))
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
