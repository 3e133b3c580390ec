"""How well a scan finds flipped pairs (METHOD.md section 7).

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

from .config import EVALUATE_POSITIONS, ScanConfig
from .domain import MARGIN_SIGNALS
from .errors import ConfigError
from .progress import no_progress
from .scan import scan_pairs
from .scoring import average_ranks, cross_fitted_margins

TOP_FRACTIONS = (0.01, 0.05, 0.10)


def flip_pairs(pairs: pl.DataFrame, rate: float, seed: int) -> tuple[pl.DataFrame, torch.Tensor]:
    """A copy with exactly round(rate * n) pairs, chosen by ``seed``, flipped; and the mask."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"flip rate must be in [0, 1], not {rate}")
    n = len(pairs)
    count = round(rate * n)
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[:count]] = True
    mask = pl.Series(flipped.tolist())
    swapped = pairs.with_columns(
        pl.when(mask).then(pl.col("rejected")).otherwise(pl.col("chosen")).alias("chosen"),
        pl.when(mask).then(pl.col("chosen")).otherwise(pl.col("rejected")).alias("rejected"),
        pl.when(mask).then(pl.col("rejected_messages")).otherwise(pl.col("chosen_messages")).alias("chosen_messages"),
        pl.when(mask).then(pl.col("chosen_messages")).otherwise(pl.col("rejected_messages")).alias("rejected_messages"),
    )
    return swapped, flipped


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


@dataclass
class EvaluationResult:
    flip_rate: float
    seeds: list[int]
    pairs: int
    flipped: int
    runs: dict[int, dict[str, ScorerResult]]  # seed -> scorer -> result
    config: dict = field(default_factory=dict)

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
            "flip_rate": self.flip_rate, "seeds": self.seeds, "pairs": self.pairs, "flipped": self.flipped,
            "config": self.config,
            "summary": {scorer: {m: {"mean": mean, "std": std} for m, (mean, std) in metrics.items()}
                        for scorer, metrics in self.summary().items()},
            "runs": {str(seed): {scorer: {"auroc": r.auroc, "precision": r.precision}
                                 for scorer, r in scorers.items()} for seed, scorers in self.runs.items()},
        }


def measure(suspicion: torch.Tensor, positive: torch.Tensor) -> ScorerResult:
    return ScorerResult(auroc(suspicion, positive),
                        {f"{round(f * 100)}%": precision_at(suspicion, positive, f) for f in TOP_FRACTIONS})


def length_suspicion(pairs: pl.DataFrame, folds: int, seed: int) -> torch.Tensor:
    """Suspicion from the response-length difference, its sign learnt cross-fitted."""
    diff = torch.tensor((pairs["chosen"].str.len_chars() - pairs["rejected"].str.len_chars()).to_list(),
                        dtype=torch.float32).unsqueeze(1)
    return -cross_fitted_margins(diff, folds=folds, seed=seed, l2=1e-4).margins


def evaluate(pairs: pl.DataFrame, config: ScanConfig, *, flip_rate: float = 0.1, seeds=(0,),
             positions: tuple[str, ...] = EVALUATE_POSITIONS, source: str = "data",
             backend=None, steps=no_progress, on_seed=None) -> EvaluationResult:
    """Flip, scan and measure every scorer, for each seed."""
    from .activations import load_backend

    if backend is None:
        backend = load_backend(config.activations)
    runs: dict[int, dict[str, ScorerResult]] = {}
    flipped_count = 0
    for seed in seeds:
        flipped_pairs, positive = flip_pairs(pairs, flip_rate, seed)
        flipped_count = int(positive.sum())
        scorers: dict[str, ScorerResult] = {}
        for i, position_set in enumerate(positions):
            run_config = replace(config, activations=replace(config.activations, positions=position_set), seed=seed)
            result = scan_pairs(flipped_pairs, run_config, source=source, steps=steps, backend=backend)
            scorers[f"score_safe[{position_set}]"] = measure(-result.signals["score_safe"], positive)
            if i == 0:
                for name in MARGIN_SIGNALS:
                    scorers[f"{name}[{position_set}]"] = measure(-result.signals[name], positive)
                scorers[f"combined[{position_set}]"] = measure(result.suspicion, positive)
        scorers["length"] = measure(length_suspicion(flipped_pairs, config.folds, seed), positive)
        generator = torch.Generator().manual_seed(10_000 + seed)
        scorers["random"] = measure(torch.rand(len(pairs), generator=generator), positive)
        runs[seed] = scorers
        if on_seed is not None:
            on_seed(seed, scorers)
    return EvaluationResult(flip_rate, list(seeds), len(pairs), flipped_count, runs,
                            config={"model": backend.identity, "layer": config.activations.layer,
                                    "positions": list(positions), "n_features": config.n_features,
                                    "sae": config.sae_train.to_dict(), "ranking": config.ranking})
