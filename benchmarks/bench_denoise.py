"""Benchmark: the paper's denoise and poison experiments at CPU scale (docs/method.md section 7).

    python benchmarks/bench_denoise.py [--seeds 0 1 2 3 4] [--limit N] [--json FILE] [--plot FILE]

For every seed the pairs are split 80/20 into train and held-out parts, and the train
part is scanned (SAE trained on it, score_safe, the cross-fitted reward margin, the
combined suspicion). Then, with every selector at every ratio:
- denoise: remove the selected train pairs (lowest score_safe, lowest reward margin,
  highest suspicion, or random);
- poison: flip the selected train pairs (highest score_safe, highest reward margin, or
  random);
and fit a Bradley-Terry linear reward head on the pooled layer activations of what
remains (chosen minus rejected, columns scaled as scoring.cross_fitted_margins does).
The figure is held-out pairwise accuracy: the share of held-out pairs the head scores
chosen above rejected. Ratio 0 (all train pairs, none flipped) is the baseline.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import bench_parser

DENOISE_RATIOS = (0.02, 0.04, 0.06, 0.08, 0.10)
POISON_RATIOS = (0.005, 0.01, 0.025, 0.05)
HELDOUT_FRACTION = 0.2
# one colour per signal, so a selector looks the same in both panels
COLOURS = {"score_safe": "tab:blue", "reward margin": "tab:orange", "suspicion": "tab:green", "random": "tab:grey"}


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``range(n)`` into (train, held-out) index tensors, both sorted."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_heldout = round(heldout_fraction * n)
    return order[n_heldout:].sort().values, order[:n_heldout].sort().values


def selection_order(values: torch.Tensor, *, highest: bool) -> torch.Tensor:
    """Pair indices, the ones to select first first: highest or lowest values (stable on ties)."""
    return torch.argsort(values, descending=highest, stable=True)


def take(order: torch.Tensor, ratio: float) -> torch.Tensor:
    """The first round(ratio * n) indices of ``order``: the selection at that ratio."""
    return order[:round(ratio * len(order))]


def heldout_accuracy(train_diffs: torch.Tensor, heldout_diffs: torch.Tensor, l2: float) -> float:
    """Fit a Bradley-Terry head on ``train_diffs`` (chosen - rejected rows) and return the
    share of held-out rows it scores above 0, i.e. chosen above rejected."""
    from safer_audit.scoring import fit_bradley_terry

    # the same column scaling as scoring.cross_fitted_margins, from the train rows only
    scale = train_diffs.pow(2).mean(0).sqrt().clamp(min=1e-8)
    w = fit_bradley_terry(train_diffs / scale, l2=l2)
    return float(((heldout_diffs / scale) @ w > 0).float().mean())


def without(diffs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``diffs`` with the selected rows removed."""
    keep = torch.ones(len(diffs), dtype=torch.bool)
    keep[selected] = False
    return diffs[keep]


def flipped(diffs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``diffs`` with the selected rows negated: chosen and rejected swapped."""
    out = diffs.clone()
    out[selected] = -out[selected]
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(per_seed: list[dict[str, dict[str, float]]], baselines: list[float], ratios: tuple[float, ...],
                   ) -> str:
    """Selectors as rows, ratios as columns, cells "mean ± sd" over seeds; ratio 0 is the baseline."""
    header = "| selector | 0 (baseline) | " + " | ".join(f"{r:.1%}".replace(".0%", "%") for r in ratios) + " |"
    lines = [header, "|---|" + "---:|" * (len(ratios) + 1)]
    base = "{:.4f} ± {:.4f}".format(*mean_sd(baselines))
    for selector in per_seed[0]:
        cells = ["{:.4f} ± {:.4f}".format(*mean_sd([seed[selector][str(r)] for seed in per_seed])) for r in ratios]
        lines.append(f"| {selector} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_seed(pairs, seed: int, backend, activations, margin_l2: float) -> dict:
    """One split: scan the train part, then every selector at every ratio, for both experiments."""
    from safer_audit.activations import extract_activations, pair_texts
    from safer_audit.config import ScanConfig
    from safer_audit.scan import scan_pairs

    train_idx, heldout_idx = split_indices(len(pairs), HELDOUT_FRACTION, seed)
    train, heldout = pairs[train_idx.tolist()], pairs[heldout_idx.tolist()]
    started = time.perf_counter()
    result = scan_pairs(train, ScanConfig(activations=activations, seed=seed, margin_l2=margin_l2),
                        source=f"train split of seed {seed}", backend=backend)
    print(f"seed {seed}: scan of {len(train)} train pairs {time.perf_counter() - started:.0f} s "
          f"(SAE FVU {result.stats.fvu:.3f})", file=sys.stderr)
    pooled = result.store.pooled_mean()
    train_diffs = pooled[0::2] - pooled[1::2]
    heldout_pooled = extract_activations(pair_texts(heldout, backend), backend, activations).pooled_mean()
    heldout_diffs = heldout_pooled[0::2] - heldout_pooled[1::2]

    signals = result.signals
    random_order = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_000 + seed))
    denoise_orders = {
        "score_safe (lowest)": selection_order(signals["score_safe"], highest=False),
        "reward margin (lowest)": selection_order(signals["reward_margin"], highest=False),
        "suspicion (highest)": selection_order(result.suspicion, highest=True),
        "random": random_order,
    }
    poison_orders = {
        "score_safe (highest)": selection_order(signals["score_safe"], highest=True),
        "reward margin (highest)": selection_order(signals["reward_margin"], highest=True),
        "random": random_order,
    }
    return {
        "n_train": len(train), "n_heldout": len(heldout), "sae_fvu": result.stats.fvu,
        "baseline": heldout_accuracy(train_diffs, heldout_diffs, margin_l2),
        "denoise": {name: {str(r): heldout_accuracy(without(train_diffs, take(order, r)), heldout_diffs, margin_l2)
                           for r in DENOISE_RATIOS} for name, order in denoise_orders.items()},
        "poison": {name: {str(r): heldout_accuracy(flipped(train_diffs, take(order, r)), heldout_diffs, margin_l2)
                          for r in POISON_RATIOS} for name, order in poison_orders.items()},
    }


def plot(runs: list[dict], path: Path) -> None:
    """Two panels (denoise, poison): held-out accuracy against ratio per selector, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safer_audit.files import write_atomic

    baselines = [run["baseline"] for run in runs]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, ratios, verb in ((axes[0], "denoise", DENOISE_RATIOS, "removed"),
                                   (axes[1], "poison", POISON_RATIOS, "flipped")):
        for selector in runs[0][kind]:
            stats = [mean_sd(baselines)] + [mean_sd([run[kind][selector][str(r)] for run in runs]) for r in ratios]
            ax.errorbar([0.0, *(100 * r for r in ratios)], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=selector, color=COLOURS[selector.split(" (")[0]])
        ax.axhline(statistics.fmean(baselines), color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{kind}: train pairs {verb}")
        ax.set_xlabel(f"% of train pairs {verb}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out pairwise accuracy")
    figure.suptitle(f"HH-RLHF harmless, {runs[0]['n_train']} train / {runs[0]['n_heldout']} held-out pairs, "
                    f"{len(runs)} seeds (mean ± sd)", fontsize=10)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def main() -> int:
    parser = bench_parser(__doc__, limit_help="use only the first N pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/safer-audit-bench-cache"),
                        help="activation and SAE cache, shared by every seed")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG figure here")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 10:
        parser.error("--limit must be at least 10")

    from safer_audit.activations import load_backend
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import DataError, load_pairs
    from safer_audit.files import write_atomic
    from safer_audit.scan import ScanError

    try:
        pairs = load_pairs(args.data).pairs
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.limit:
        pairs = pairs.head(args.limit)
    activations = ActivationConfig(cache_dir=args.cache_dir)
    margin_l2 = ScanConfig().margin_l2
    backend = load_backend(activations)
    started = time.perf_counter()
    try:
        runs = [run_seed(pairs, seed, backend, activations, margin_l2) for seed in args.seeds]
    except ScanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    baselines = [run["baseline"] for run in runs]
    seeds = ", ".join(map(str, args.seeds))
    print(f"\n### Denoise: remove train pairs, held-out pairwise accuracy (seeds {seeds}; "
          f"{runs[0]['n_train']} train / {runs[0]['n_heldout']} held-out pairs; mean ± sd)\n")
    print(markdown_table([run["denoise"] for run in runs], baselines, DENOISE_RATIOS))
    print(f"\n### Poison: flip train pairs, held-out pairwise accuracy (seeds {seeds}; mean ± sd)\n")
    print(markdown_table([run["poison"] for run in runs], baselines, POISON_RATIOS))
    command = shlex.join(["python", *sys.argv])
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: {command}")
    if args.json:
        write_atomic(args.json, json.dumps({"command": command, "data": args.data, "pairs": len(pairs),
                                            "margin_l2": margin_l2, "seeds": dict(zip(map(str, args.seeds), runs, strict=False))},
                                           indent=1))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
