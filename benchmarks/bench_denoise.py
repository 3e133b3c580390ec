"""Benchmark: the paper's denoise and poison experiments at CPU scale (docs/method.md section 7).

    python benchmarks/bench_denoise.py [--seeds 0 1 2 3 4] [--limit N] [--json FILE] [--plot FILE]
    python benchmarks/bench_denoise.py --profile thorough --seeds 0 --json seed0.json   # one seed per run
    python benchmarks/bench_denoise.py --combine seed0.json seed1.json ... [--plot FILE]  # the tables over seeds

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

``--profile thorough`` scans the train part with both models (safer_audit.pipeline.profiles: MiniLM and
SmolLM2) and adds their selectors: each of SmolLM2's judges, the fast ranking (MiniLM's judges
alone), the thorough ranking (the mean percentile rank of every model's judges) and the
cross-fitted stack (lowest stacked margin first; poison: highest). The head refitted after the
selection is the same MiniLM head in both profiles, so only the selectors differ. A slow seed
can run alone (``--seeds S --json FILE``) and ``--combine`` then prints the tables over the files.
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
COLOURS = {"score_safe": "tab:blue", "reward margin": "tab:orange", "suspicion": "tab:green", "random": "tab:grey",
           "smollm2/score_safe": "tab:cyan", "smollm2/reward margin": "tab:red", "suspicion fast": "tab:olive",
           "stack": "tab:purple"}


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
    from safer_audit.scoring.heads import fit_bradley_terry

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


def run_seed(pairs, seed: int, backend, activations, margin_l2: float, profile: str = "fast") -> dict:
    """One split: scan the train part (with every model of ``profile``), then every selector at every
    ratio, for both experiments."""
    from safer_audit.config import ScanConfig
    from safer_audit.model.activations import extract_activations
    from safer_audit.model.texts import pair_texts
    from safer_audit.pipeline.scan import scan_pairs

    train_idx, heldout_idx = split_indices(len(pairs), HELDOUT_FRACTION, seed)
    train, heldout = pairs[train_idx.tolist()], pairs[heldout_idx.tolist()]
    started = time.perf_counter()
    config = ScanConfig(activations=activations, seed=seed, margin_l2=margin_l2)
    source = f"train split of seed {seed}"
    if profile == "fast":
        result = scan_pairs(train, config, source=source, backend=backend)
    else:
        from dataclasses import replace

        from safer_audit.pipeline.scan import scan_profile

        config = replace(config, profile=profile, labeller="none", labeller_options={})  # labels feed no selector
        result = scan_profile(train, config, source=source, backend=backend, labels=False)
    scan_seconds = time.perf_counter() - started
    print(f"seed {seed}: {profile} scan of {len(train)} train pairs {scan_seconds:.0f} s "
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
    }
    poison_orders = {
        "score_safe (highest)": selection_order(signals["score_safe"], highest=True),
        "reward margin (highest)": selection_order(signals["reward_margin"], highest=True),
    }
    if profile != "fast":
        denoise_orders.update(thorough_orders(result, config, highest=False))
        poison_orders.update(thorough_orders(result, config, highest=True))
    denoise_orders["random"] = poison_orders["random"] = random_order
    return {
        "profile": profile, "n_train": len(train), "n_heldout": len(heldout), "sae_fvu": result.stats.fvu,
        "scan_seconds": round(scan_seconds, 1),
        "baseline": heldout_accuracy(train_diffs, heldout_diffs, margin_l2),
        "denoise": {name: {str(r): heldout_accuracy(without(train_diffs, take(order, r)), heldout_diffs, margin_l2)
                           for r in DENOISE_RATIOS} for name, order in denoise_orders.items()},
        "poison": {name: {str(r): heldout_accuracy(flipped(train_diffs, take(order, r)), heldout_diffs, margin_l2)
                          for r in POISON_RATIOS} for name, order in poison_orders.items()},
    }


def thorough_orders(result, config, *, highest: bool) -> dict[str, torch.Tensor]:
    """The thorough profile's extra selectors. Denoise (``highest=False``): SmolLM2's judges lowest
    first, the fast ranking (MiniLM's judges alone) and the stack's lowest margin first (the pairs
    whose rejected response the stack likes most); the thorough ranking is ``suspicion``. Poison
    (``highest=True``): SmolLM2's judges and the stack highest first (the surest pairs flipped)."""
    from safer_audit.pipeline.profiles import profile_weights
    from safer_audit.scoring.ranks import suspicion
    from safer_audit.scoring.stack import ranking_weights, stack_judges

    signals = result.signals
    weights = profile_weights(config, list(result.models))
    stack = stack_judges({name: values for name, values in signals.items() if weights.get(name)},
                         folds=config.folds, seed=config.seed)
    orders = {}
    for prefix in result.models:
        for name, label in (("score_safe", "score_safe"), ("reward_margin", "reward margin")):
            if f"{prefix}/{name}" in signals:
                orders[f"{prefix}/{label} ({'highest' if highest else 'lowest'})"] = selection_order(
                    signals[f"{prefix}/{name}"], highest=highest)
    if not highest:
        own = {name: w for name, w in ranking_weights(config).items() if w}
        orders["suspicion fast (highest)"] = selection_order(suspicion(
            {name: signals[name] for name in own}, own), highest=True)
    orders[f"stack ({'highest' if highest else 'lowest'} margin)"] = selection_order(stack.margin, highest=highest)
    return orders


def plot(runs: list[dict], path: Path) -> None:
    """Two panels (denoise, poison): held-out accuracy against ratio per selector, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safer_audit.common.files import write_atomic

    baselines = [run["baseline"] for run in runs]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, ratios, verb in ((axes[0], "denoise", DENOISE_RATIOS, "removed"),
                                   (axes[1], "poison", POISON_RATIOS, "flipped")):
        for selector in runs[0][kind]:
            stats = [mean_sd(baselines)] + [mean_sd([run[kind][selector][str(r)] for run in runs]) for r in ratios]
            ax.errorbar([0.0, *(100 * r for r in ratios)], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=selector, color=COLOURS.get(selector.split(" (")[0]))
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


def difference_table(per_seed: list[dict[str, dict[str, float]]], ratios: tuple[float, ...]) -> str:
    """Each selector minus random at the same ratio on the same seed (paired), mean ± sd over seeds."""
    header = "| selector | " + " | ".join(f"{r:.1%}".replace(".0%", "%") for r in ratios) + " |"
    lines = [header, "|---|" + "---:|" * len(ratios)]
    for selector in per_seed[0]:
        if selector == "random":
            continue
        cells = ["{:+.4f} ± {:.4f}".format(*mean_sd([seed[selector][str(r)] - seed["random"][str(r)]
                                                      for seed in per_seed])) for r in ratios]
        lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(runs: list[dict], seeds: list[str]) -> None:
    baselines = [run["baseline"] for run in runs]
    profile = runs[0].get("profile", "fast")
    listed = ", ".join(seeds)
    print(f"\n### Denoise: remove train pairs, held-out pairwise accuracy (profile {profile}; seeds {listed}; "
          f"{runs[0]['n_train']} train / {runs[0]['n_heldout']} held-out pairs; mean ± sd)\n")
    print(markdown_table([run["denoise"] for run in runs], baselines, DENOISE_RATIOS))
    print(f"\nDenoise minus random removal, paired by seed (profile {profile}; seeds {listed}; mean ± sd)\n")
    print(difference_table([run["denoise"] for run in runs], DENOISE_RATIOS))
    print(f"\n### Poison: flip train pairs, held-out pairwise accuracy (profile {profile}; seeds {listed}; "
          "mean ± sd)\n")
    print(markdown_table([run["poison"] for run in runs], baselines, POISON_RATIOS))
    if all("scan_seconds" in run for run in runs):
        print("\nscan of the train part per seed: " + ", ".join(f"{run['scan_seconds']:.0f} s" for run in runs))


def main() -> int:
    parser = bench_parser(__doc__, limit_help="use only the first N pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/safer-audit-bench-cache"),
                        help="activation and SAE cache, shared by every seed")
    parser.add_argument("--profile", choices=["fast", "thorough"], default="fast",
                        help="models the train part is scanned with (safer_audit.pipeline.profiles); thorough adds "
                             "SmolLM2's judges, the fast ranking and the stack as selectors")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG figure here")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print the tables (and --plot) over the seeds of these --json files; run nothing")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 10:
        parser.error("--limit must be at least 10")
    if args.combine:
        seeds, runs = [], []
        for path in args.combine:
            for seed, run in json.loads(path.read_text())["seeds"].items():
                seeds.append(seed)
                runs.append(run)
        print_tables(runs, seeds)
        if args.plot:
            plot(runs, args.plot)
        return 0

    from safer_audit.common.files import write_atomic
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import DataError, load_pairs
    from safer_audit.model.activations import load_backend
    from safer_audit.pipeline.scan import ScanError

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
        runs = [run_seed(pairs, seed, backend, activations, margin_l2, args.profile) for seed in args.seeds]
    except ScanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_tables(runs, [str(seed) for seed in args.seeds])
    command = shlex.join(["python", *sys.argv])
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: {command}")
    if args.json:
        write_atomic(args.json, json.dumps({"command": command, "data": args.data, "pairs": len(pairs),
                                            "margin_l2": margin_l2, "profile": args.profile,
                                            "seeds": dict(zip(map(str, args.seeds), runs, strict=False))},
                                           indent=1))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
