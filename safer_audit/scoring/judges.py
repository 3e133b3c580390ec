"""Judges: anything that gives every pair a signed preference signal it did not learn from that pair.

A judge reads a ``JudgeContext`` (the pairs, the SAE codes and features, the rewards or pooled
activations, how heads are fitted) and returns one float per pair, in table order:

- **signed**: positive when the chosen response looks better (safer), negative when the
  rejected one does; the magnitude is the judge's confidence, in any unit (the aggregation
  reads percentiles or a standardised value, never the raw scale). NaN: no opinion.
- **cross-fitted**: the value of a pair never depends on that pair's own label. A judge that
  learns from the labels (a Bradley-Terry head, a sign, a length slope) fits on the other folds
  (``scoring.heads.cross_fitted_margins``) or is frozen on other data (the gate's heads); a judge that
  learns nothing from the labels (score_safe's fixed feature signs aside, see below; an LLM
  asked zero-shot) is cross-fitted trivially. The aggregation relies on this: a judge that saw
  a pair's label would agree with it, flipped or not, and hide the flip.

  score_safe's features are chosen by salience on the scanned pairs, labels included: a
  documented exception kept from the paper's method (docs/method.md section 4) (1,024 of 3,072 latents, a weak dependence).

Built-in judges (safer_audit.backends.judges registers them): ``score_safe``, ``reward_margin``
and ``sae_margin`` (the scan's signals), ``length`` (the response-length difference, its
sign learnt cross-fitted: a baseline, not a safety judge), ``harm`` (safer_audit.backends.harm: how far each
reply goes along with a harmful request, read without labels; scoring.categories uses it to call a pair
flipped) and ``<judge>-lenres`` (a judge with the part linearly explained by the length difference removed,
the slope cross-fitted).
Plugins add judges through the ``register_judges`` hook; ``--judge NAME`` picks them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ScanConfig
from ..data import PairTable, response_lengths
from ..errors import ConfigError
from ..features.salience import FeatureSet
from ..plugins import registry
from ..sae.stats import CodeStats
from .heads import HeadCache, HeadFit, compute_signals, fold_ids
from .ranks import signed_rank
from .stack import aggregate, ranking_weights
from .types import HARM_JUDGE, LENGTH_RESIDUAL_SUFFIX, FunctionJudge, Judge, registered_judge


@dataclass
class JudgeContext:
    """What a judge may read about one scan's pairs (every tensor in table order)."""

    pairs: Any  # data.PairTable (a scan), or a table in data.load_pairs' layout: context, chosen, rejected, ...
    stats: Any = None  # salience.CodeStats of the scan (None for judges run without a model)
    features: Any = None  # salience.FeatureSet
    rewards: torch.Tensor | None = None  # reward per text (chosen, rejected interleaved), a reward model's
    pooled: torch.Tensor | None = None  # pooled activations per text, for a model without a reward head
    heads: Mapping[str, torch.Tensor] | None = None  # frozen heads (the gate); None: cross-fit
    fit: Any = None  # scoring.heads.HeadFit
    cache_dir: Path | None = None  # where a judge may keep answers across runs
    dtype: str = "float32"  # what a judge with its own model may compute in: the scan's --dtype (auto, float32, ...)
    computed: dict[str, torch.Tensor] = field(default_factory=dict)  # judges already run, by name

    def signal(self, name: str) -> torch.Tensor:
        """Another judge's signal (run once per context): for judges built on judges."""
        if name not in self.computed:
            self.computed[name] = run_judge(name, self)
        return self.computed[name]

    def length_difference(self) -> torch.Tensor:
        """Characters of the final chosen response minus the final rejected one, per pair."""

        chosen, rejected = response_lengths(self.pairs)
        return torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)


def residualise_on_length(signal: torch.Tensor, length: torch.Tensor, *, folds: int = 5, seed: int = 0) -> torch.Tensor:
    """``signal - beta * length`` per pair, beta the least-squares slope (no intercept: swapping a
    pair negates both) fitted on the other folds. Both are rank-normalised to a symmetric scale
    first (signed rank / n), so a few very long responses do not set the slope."""

    s, x = signed_rank(signal), signed_rank(length)
    out = torch.full_like(s, float("nan"))
    finite = torch.isfinite(s) & torch.isfinite(x)
    ids = fold_ids(len(s), max(2, min(folds, len(s))), seed)
    for k in ids.unique().tolist():
        held, train = ids == k, (ids != k) & finite
        denominator = float((x[train] * x[train]).sum())
        beta = float((x[train] * s[train]).sum()) / denominator if denominator > 0 else 0.0
        out[held] = s[held] - beta * x[held]
    return out


def length_residualised(base: str) -> FunctionJudge:
    """The judge ``base`` with its linear dependence on the length difference removed (cross-fitted)."""

    def function(context: JudgeContext) -> torch.Tensor:
        fit = context.fit
        return residualise_on_length(context.signal(base), context.length_difference(),
                                     folds=getattr(fit, "folds", 5), seed=getattr(fit, "seed", 0))

    return FunctionJudge(base + LENGTH_RESIDUAL_SUFFIX,
                         f"{base} less its cross-fitted linear dependence on the length difference", function)


def available_judges() -> dict[str, Any]:
    """Judge factories by name (built-in and plugins'); ``factory()`` returns a Judge."""
    return registry("judge")


def make_judge(name: str) -> Judge:
    """The judge registered under ``name``, or ``<registered>-lenres`` of one; ConfigError names the known ones."""
    judge = registered_judge(name)
    return length_residualised(name.removesuffix(LENGTH_RESIDUAL_SUFFIX)) if judge is None else judge


def run_judge(name: str, context: JudgeContext) -> torch.Tensor:
    """Run one judge and check what it gave: one float per pair."""
    values = make_judge(name).judge(context)
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.shape != (len(context.pairs),):
        raise ConfigError(f"judge {name!r} gave {tuple(values.shape)} values for {len(context.pairs)} pairs")
    return values


def run_judges(names: tuple[str, ...] | list[str], context: JudgeContext) -> tuple[dict[str, torch.Tensor], dict]:
    """The signals of the judges ``names`` (each run once), and the cost of the judges that report one."""
    signals, costs = {}, {}
    for name in dict.fromkeys(names):
        if name not in context.computed:
            judge = make_judge(name)
            values = torch.as_tensor(judge.judge(context), dtype=torch.float64)
            if values.shape != (len(context.pairs),):
                raise ConfigError(f"judge {name!r} gave {tuple(values.shape)} values for {len(context.pairs)} pairs")
            context.computed[name] = values
            if getattr(judge, "cost", None):
                costs[name] = dict(judge.cost)
        signals[name] = context.computed[name]
    return signals, costs


def judge_pairs(pairs: PairTable, stats: CodeStats, features: FeatureSet, config: ScanConfig, store, backend):
    """The judges' signals (the built-in three always, for the report, plus those chosen), the
    suspicion, the stack and the cost of judges that spend."""
    

    fit = HeadFit.of(config)
    # the encoding pass pooled the activations (and cached them): no second pass over the store
    rewards = stats.scores if backend.has_reward_head else None
    pooled = None if backend.has_reward_head else stats.pooled_rows  # read a range of pairs at a time
    # the heads' fits are cached beside the activations, keyed by their input rows and options
    cache = getattr(store, "cache", None)
    head_cache = HeadCache(Path(cache.directory) / "heads") if cache is not None else None
    signals = compute_signals(stats, features, rewards=rewards, pooled=pooled, fit=fit, head_cache=head_cache)
    weights = ranking_weights(config)
    context = JudgeContext(pairs, stats, features, rewards=rewards, pooled=pooled, fit=fit,
                           cache_dir=config.activations.cache_dir / "judges", dtype=config.activations.dtype,
                           computed={name: values.double() for name, values in signals.items()})
    wanted = [name for name in weights if weights[name] and name not in signals]
    if config.flipped_rule == "harm":  # it decides which pairs are flipped, ranked or not
        wanted.append(HARM_JUDGE)
    extra, costs = run_judges(wanted, context)
    signals = {**signals, **extra}
    ranked, stack = aggregate(signals, weights, method=config.aggregation, folds=config.folds, seed=config.seed,
                              head_cache=head_cache)
    return signals, ranked, stack, costs
