"""How well a scan finds flipped pairs (docs/method.md section 7).

Flip a seeded random fraction of the pairs (swap chosen and rejected), scan the flipped
copy, and measure how well each scorer ranks the flipped pairs first: AUROC and
precision at the top 1 / 5 / 10 %. Every scorer is measured on the same flipped copy in
the same run:

- ``score_safe[P]`` for every positions set P asked for (each P has its own SAE);
- ``reward_margin``, ``sae_margin`` and ``combined`` (the scan's ranking) of the first
  positions set;
- ``length``: the final-response length difference, oriented by a cross-fitted 1-D
  Bradley-Terry fit (so the baseline does not peek at which pairs were flipped);
- ``random``: seeded random scores.

A flipped copy has exactly the texts of the original, so activations and SAEs come from
the cache after the first seed: extra seeds cost only the scoring.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

import polars as pl
import torch

from ..common.progress import no_progress
from ..config import EVALUATE_POSITIONS, ScanConfig
from ..errors import ConfigError
from ..model.activations import load_backend
from ..pipeline.profiles import profile_weights
from ..pipeline.scan import scan_pairs, scan_profile
from ..scoring.heads import cross_fitted_margins, fit_bradley_terry, fold_ids
from ..scoring.judges import JudgeContext, residualise_on_length, run_judge
from ..scoring.ranks import average_ranks, percentile_from_low, suspicion
from ..scoring.stack import aggregate, ranking_weights

TOP_FRACTIONS = (0.01, 0.05, 0.10)


FLIP_MODES = ("uniform", "length", "margin")
FLIP_BIAS = 3.0  # a biased mode's most likely pair is e**3 (about 20) times as likely flipped as its least likely
REFERENCE_JUDGE = "reward_margin"  # what ``margin`` mode asks which pairs are close


def flip_weights(pairs: pl.DataFrame, mode: str, reference: torch.Tensor | None = None) -> torch.Tensor | None:
    """How likely each pair is to be flipped (None: all alike).

    ``length``: annotators prefer the longer response, so a wrongly labelled pair tends to have
    the longer response as "chosen": pairs whose rejected response is longer (relative to the
    chosen one) are more likely flipped, so that in the flipped copy the flipped pairs' chosen
    responses are the longer ones. ``margin``: annotators err on close calls: pairs that the
    ``reference`` signal (a judge on the unflipped data) finds close (small |signal|) are more
    likely flipped. Weights are exp(FLIP_BIAS * r), r the rank of the criterion scaled to [0, 1].
    """
    if mode == "uniform":
        return None
    if mode == "length":
        criterion = torch.tensor((pairs["rejected"].str.len_chars().cast(pl.Int64)
                                  - pairs["chosen"].str.len_chars().cast(pl.Int64)).to_list(), dtype=torch.float64)
    elif mode == "margin":
        if reference is None or len(reference) != len(pairs):
            raise ConfigError("flip mode 'margin' needs a reference signal per pair")
        criterion = -reference.double().abs().nan_to_num(float("inf"))
    else:
        raise ConfigError(f"flip mode must be one of {', '.join(FLIP_MODES)}, not {mode!r}")
    ranks = average_ranks(criterion) / max(len(pairs) - 1, 1)
    return torch.exp(FLIP_BIAS * ranks)


def flip_pairs(pairs: pl.DataFrame, rate: float, seed: int, *,
               weights: torch.Tensor | None = None) -> tuple[pl.DataFrame, torch.Tensor]:
    """A copy with exactly round(rate * n) pairs, chosen by ``seed``, flipped; and the mask.

    ``weights``: the pairs are drawn without replacement with these relative chances (flip_weights).
    """
    if not 0 <= rate <= 1:
        raise ConfigError(f"flip rate must be in [0, 1], not {rate}")
    n = len(pairs)
    count = round(rate * n)
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.zeros(n, dtype=torch.bool)
    if weights is None:
        flipped[torch.randperm(n, generator=generator)[:count]] = True
    elif count:
        flipped[torch.multinomial(weights.double(), count, replacement=False, generator=generator)] = True
    mask = pl.Series(flipped.tolist())
    swapped = pairs.with_columns(
        pl.when(mask).then(pl.col("rejected")).otherwise(pl.col("chosen")).alias("chosen"),
        pl.when(mask).then(pl.col("chosen")).otherwise(pl.col("rejected")).alias("rejected"),
        pl.when(mask).then(pl.col("rejected_messages")).otherwise(pl.col("chosen_messages")).alias("chosen_messages"),
        pl.when(mask).then(pl.col("chosen_messages")).otherwise(pl.col("rejected_messages")).alias("rejected_messages"),
    )
    return swapped, flipped


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation over the pairs where both are finite (NaN if undefined)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    if finite.sum() < 3:
        return float("nan")
    ra, rb = average_ranks(a[finite]), average_ranks(b[finite])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def calibration(probability: torch.Tensor, positive: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """How a flip probability tracks the true flips: mean predicted against the flip rate,
    Brier score, and expected calibration error over ``bins`` equal-count bins."""
    p = probability.double()
    y = positive.double()
    order = torch.argsort(p, stable=True)
    ece = 0.0
    for chunk in order.tensor_split(bins):
        if len(chunk):
            ece += len(chunk) / len(p) * abs(float(p[chunk].mean() - y[chunk].mean()))
    return {"mean_predicted": float(p.mean()), "flip_rate": float(y.mean()),
            "brier": float(((p - y) ** 2).mean()), "ece": ece}


def oracle_stack(signals: dict[str, torch.Tensor], positive: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """An upper bound, only possible here: a logistic model over the judges' percentiles fitted
    on the true flip labels (cross-fitted: each pair scored by a model fitted on the other folds).
    A scan has no flip labels; this says how much any aggregation of these judges could gain."""

    columns = [percentile_from_low(v).nan_to_num(0.5) - 0.5 for v in signals.values()]
    x = torch.stack(columns + [torch.ones(len(positive), dtype=torch.float64)], dim=1)
    # logistic regression as a Bradley-Terry fit: rows signed by the label (+x for a flip, -x otherwise)
    rows = torch.where(positive.unsqueeze(1), x, -x)
    ids = fold_ids(len(positive), folds, seed)
    out = torch.zeros(len(positive), dtype=torch.float64)
    for k in range(folds):
        held = ids == k
        w = fit_bradley_terry(rows[~held], l2=1e-3).double()
        out[held] = x[held] @ w
    return out


def auroc(suspicion: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive ranks above a random negative (ties count half)."""
    s = suspicion.double()
    pos, neg = s[positive], s[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Mann-Whitney U through average ranks (1-based), O(n log n)
    ranks = average_ranks(s) + 1
    u = ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def precision_at(suspicion: torch.Tensor, positive: torch.Tensor, fraction: float) -> float:
    """Share of flipped pairs among the ``fraction`` most suspicious (stable order on ties)."""
    k = max(1, math.ceil(fraction * len(suspicion)))
    top = torch.argsort(-suspicion.double(), stable=True)[:k]
    return float(positive[top].double().mean())


@dataclass
class ScorerResult:
    auroc: float
    precision: dict[str, float]  # "1%" -> precision at the top 1 %
    # Spearman correlation of the scorer's signal (low = suspicious) with the length difference
    # (chosen - rejected) of the scanned copy; NaN for scorers without one
    length_correlation: float = float("nan")


@dataclass
class EvaluationResult:
    flip_rate: float
    seeds: list[int]
    pairs: int
    flipped: int
    runs: dict[int, dict[str, ScorerResult]]  # seed -> scorer -> result
    config: dict = field(default_factory=dict)
    flip_mode: str = "uniform"
    # seed -> the flip probability's calibration and the mixture's estimated rate (flip_calibration)
    calibration: dict[int, dict[str, float]] = field(default_factory=dict)

    def length_correlations(self) -> dict[str, float]:
        """scorer -> mean over seeds of its correlation with the length difference (scorers that have one)."""
        out = {}
        for scorer in self.runs[self.seeds[0]]:
            values = [self.runs[s][scorer].length_correlation for s in self.seeds]
            if all(math.isfinite(v) for v in values):
                out[scorer] = statistics.fmean(values)
        return out

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """scorer -> metric -> (mean, standard deviation over seeds)."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        scorers = next(iter(self.runs.values())).keys()
        for scorer in scorers:
            metrics = {"auroc": [self.runs[s][scorer].auroc for s in self.seeds]}
            for name in self.runs[self.seeds[0]][scorer].precision:
                metrics[f"p@{name}"] = [self.runs[s][scorer].precision[name] for s in self.seeds]
            out[scorer] = {m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                           for m, v in metrics.items()}
        return out

    def to_dict(self) -> dict:
        return {
            "flip_rate": self.flip_rate, "flip_mode": self.flip_mode, "seeds": self.seeds, "pairs": self.pairs,
            "flipped": self.flipped, "config": self.config,
            "length_correlation": self.length_correlations(),
            "calibration": {str(seed): figures for seed, figures in self.calibration.items()},
            "summary": {scorer: {m: {"mean": mean, "std": std} for m, (mean, std) in metrics.items()}
                        for scorer, metrics in self.summary().items()},
            "runs": {str(seed): {scorer: {"auroc": r.auroc, "precision": r.precision}
                                 for scorer, r in scorers.items()} for seed, scorers in self.runs.items()},
        }


def measure(suspicion: torch.Tensor, positive: torch.Tensor, length: torch.Tensor | None = None) -> ScorerResult:
    """AUROC and precisions of a suspicion; with ``length`` (the length difference), also the
    correlation of the signal (-suspicion) with it."""
    correlation = spearman(-suspicion.double(), length) if length is not None else float("nan")
    return ScorerResult(auroc(suspicion, positive),
                        {f"{round(f * 100)}%": precision_at(suspicion, positive, f) for f in TOP_FRACTIONS},
                        correlation)


def length_suspicion(pairs: pl.DataFrame, folds: int, seed: int) -> torch.Tensor:
    """Suspicion from the response-length difference, its sign learnt cross-fitted."""
    diff = torch.tensor((pairs["chosen"].str.len_chars() - pairs["rejected"].str.len_chars()).to_list(),
                        dtype=torch.float32).unsqueeze(1)
    return -cross_fitted_margins(diff, folds=folds, seed=seed, l2=1e-4).margins


def judge_label(result, name: str, position_set: str) -> str:
    """``name[positions]``: the positions its model's activations were pooled over. A profile's other
    model's judge (``prefix/NAME``) reads that model's own positions (SmolLM2: ``all``), not the
    first model's."""
    prefix = name.split("/", 1)[0] if "/" in name else None
    if prefix is not None and prefix in result.models:
        return f"{name}[{result.models[prefix].report.run.positions}]"
    return f"{name}[{position_set}]"


def judge_scorers(result, config: ScanConfig, positive: torch.Tensor, position_set: str):
    """Every judge of one scan measured, with its length-residualised variant, and the aggregations:
    the scan's ranking (``combined``), the same over the length-residualised judges
    (``combined-lenres``), the stack a scan can fit (``stacked``) and the oracle stack
    fitted on the true flips (``stack-oracle``: an upper bound, not available to a scan).
    Returns the scorers and the stack (its flip posterior's mixture and P(rejected is better))."""

    length = JudgeContext(result.pairs).length_difference()
    weights = (profile_weights(config, list(result.models)) if result.models
               else {name: w for name, w in ranking_weights(config).items() if w})
    scorers: dict[str, ScorerResult] = {}
    residual = {}
    for name, values in result.signals.items():
        label = judge_label(result, name, position_set)
        scorers[label] = measure(-values.double(), positive, length)
        residual[name] = residualise_on_length(values, length, folds=config.folds, seed=config.seed)
        base, positions = label.rsplit("[", 1)
        scorers[f"{base}-lenres[{positions}"] = measure(-residual[name], positive, length)
    scorers[f"combined[{position_set}]"] = measure(result.suspicion, positive, length)
    if result.models:  # a profile's ranking; also the first model's alone (what --profile fast ranks by)
        own = {name: w for name, w in ranking_weights(config).items() if w}
        scorers[f"combined-fast[{position_set}]"] = measure(suspicion(result.signals, own), positive, length)
    scorers[f"combined-lenres[{position_set}]"] = measure(suspicion(residual, weights), positive, length)
    stacked, stack = aggregate(result.signals, weights, method="stacked", folds=config.folds, seed=config.seed)
    scorers[f"stacked[{position_set}]"] = measure(stacked, positive, length)
    ranked = {name: result.signals[name] for name in weights}
    scorers[f"stack-oracle[{position_set}]"] = measure(oracle_stack(ranked, positive, config.folds, config.seed),
                                                       positive, length)
    return scorers, stack


def flip_calibration(flip_probability: torch.Tensor, stack, positive: torch.Tensor) -> dict[str, float]:
    """The scan's flip probability (the mixture posterior) against the true flips, the mixture's
    estimated flip rate (its posterior sd, and whether the judges identify the mixture at all), and the same figures for the stack's P(rejected is better) (``rejected_``:
    the flip probability before the mixture posterior), side by side."""
    figures = calibration(flip_probability, positive)
    figures["estimated_rate"] = stack.mixture.rate
    figures["rate_sd"] = stack.mixture.rate_sd
    figures["identified"] = float(stack.mixture.identified)  # 0: a scan's report would give no probability
    figures.update({f"rejected_{key}": value for key, value in calibration(stack.rejected_probability, positive).items()
                    if key != "flip_rate"})
    return figures


def reference_signal(pairs: pl.DataFrame, config: ScanConfig, *, judge: str, source: str, backend, steps):
    """``judge``'s signal on the unflipped pairs (a scan of them): what ``margin`` mode calls close."""
    result = scan_pairs(pairs, replace(config, judges=None), source=source, steps=steps, backend=backend)
    if judge in result.signals:
        return result.signals[judge]

    context = JudgeContext(pairs, result.stats, result.features, pooled=result.store.pooled_mean(),
                           cache_dir=config.activations.cache_dir / "judges")
    return run_judge(judge, context)


def evaluate(pairs: pl.DataFrame, config: ScanConfig, *, flip_rate: float = 0.1, seeds=(0,),
             positions: tuple[str, ...] = EVALUATE_POSITIONS, source: str = "data", flip_mode: str = "uniform",
             reference_judge: str = REFERENCE_JUDGE, backend=None, steps=no_progress,
             on_seed=None) -> EvaluationResult:
    """Flip (``flip_mode`` picks which pairs are likelier), scan and measure every scorer, for each seed."""

    if flip_mode not in FLIP_MODES:
        raise ConfigError(f"flip mode must be one of {', '.join(FLIP_MODES)}, not {flip_mode!r}")
    # the scorers are rankings, never categories: no harm judge run only to say which pairs are flipped
    config = replace(config, flipped_rule="judges")
    if backend is None:
        backend = load_backend(config.activations)
    reference = None
    if flip_mode == "margin":
        reference = reference_signal(pairs, config, judge=reference_judge, source=source, backend=backend,
                                     steps=steps)
    weights = flip_weights(pairs, flip_mode, reference)
    backends: dict = {}  # a profile's other models, loaded once
    runs: dict[int, dict[str, ScorerResult]] = {}
    calibrations: dict[int, dict[str, float]] = {}
    flipped_count = 0
    for seed in seeds:
        flipped_pairs, positive = flip_pairs(pairs, flip_rate, seed, weights=weights)
        flipped_count = int(positive.sum())
        scorers: dict[str, ScorerResult] = {}
        for i, position_set in enumerate(positions):
            run_config = replace(config, activations=replace(config.activations, positions=position_set), seed=seed)
            if i == 0:  # the profile's other models (if any) join the first position set's judges
                result = scan_profile(flipped_pairs, run_config, source=source, steps=steps, backend=backend,
                                      backends=backends, labels=False)
            else:
                result = scan_pairs(flipped_pairs, run_config, source=source, steps=steps, backend=backend)
            if i == 0:
                found, stack = judge_scorers(result, run_config, positive, position_set)
                scorers.update(found)
                calibrations[seed] = flip_calibration(result.flip_probability, stack, positive)
            else:
                scorers[f"score_safe[{position_set}]"] = measure(-result.signals["score_safe"], positive)
        scorers["length"] = measure(length_suspicion(flipped_pairs, config.folds, seed), positive)
        generator = torch.Generator().manual_seed(10_000 + seed)
        scorers["random"] = measure(torch.rand(len(pairs), generator=generator), positive)
        runs[seed] = scorers
        if on_seed is not None:
            on_seed(seed, scorers)
    return EvaluationResult(flip_rate, list(seeds), len(pairs), flipped_count, runs,
                            config={"model": backend.identity, "layer": config.activations.layer,
                                    "positions": list(positions), "n_features": config.n_features,
                                    "sae": config.sae_train.to_dict(), "ranking": config.ranking,
                                    "judges": list(config.judges) if config.judges else None,
                                    "aggregation": config.aggregation,
                                    "profile": config.profile,
                                    **({"reference_judge": reference_judge} if flip_mode == "margin" else {})},
                            flip_mode=flip_mode, calibration=calibrations)
