"""Benchmark: flip detection on HH for the candidate defaults, to choose them.

    python benchmarks/bench_evaluate.py --choose-seeds 0 1 2 --confirm-seeds 3 4 [--limit N]

For every seed: flip 10% of the pairs, scan the flipped copy once per position set, and
score variants that reuse that scan's codes and activations (no new forward pass):
the number of features N, the ranking formula (which signals are rank-averaged), and
max- rather than mean-pooled codes for score_safe. Variants are ranked on the choose
seeds; the same table on the confirm seeds shows whether the choice holds.

    python benchmarks/bench_evaluate.py --flip-modes uniform length margin --choose-seeds 0 1 2 3 4 \
        --confirm-seeds --positions response [--judge NAME ...]

measures instead every judge, its length-residualised variant and the aggregations (evaluate's
scorers) under each flip mode, with each judge's correlation with the length
difference, the calibration of the flip probability (the mixture posterior, beside the stack's
P(rejected is better) it replaced) and the wall time of each mode;
``--profile thorough`` adds SmolLM2's judges (``smollm2/NAME``) to the same flipped copies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def select_variants(result, config):
    """score_safe and the default ranking with features selected by salience or by safety.

    Safety: the offline labeller rates the top-1024 candidates by |salience| (labels are
    cached by SAE, so later seeds reuse them); those with relevance >= T are kept, up to N.
    """
    from safer_audit.features.salience import feature_salience, select_by_safety, select_features
    from safer_audit.scoring.heads import score_safe
    from safer_audit.scoring.ranks import suspicion

    salience = feature_salience(*result.stats.totals())
    pool = select_features(salience, 1024)
    relevance = {latent: label.relevance for latent, label in result.labelling.label(pool.latents.tolist()).items()}
    margin = result.signals["reward_margin"]
    out = {}
    for n in (64, 256, 1024):
        sets = {"salience": select_features(salience, n)}
        for threshold in (0.3, 0.5):
            sets[f"safety>={threshold:g}"] = select_by_safety(pool, relevance, threshold, n)
        for name, features in sets.items():
            if not features.features:
                continue
            ss = score_safe(result.stats, features)
            print(f"  {name} N={n}: {len(features.features)} features kept", file=sys.stderr)
            out[f"score_safe {name} N={n}"] = -ss
            out[f"rank(ss, rm) {name} N={n}"] = suspicion({"score_safe": ss, "reward_margin": margin})
    return out


def variants(result, config):
    """Scorer name -> suspicion (higher = more suspicious) from one scan, reusing its codes."""
    from safer_audit.features.salience import feature_salience, select_features
    from safer_audit.scoring.heads import cross_fitted_margins, score_safe
    from safer_audit.scoring.ranks import suspicion
    from safer_audit.workflows.evaluate import length_suspicion

    salience = feature_salience(*result.stats.totals())
    signals = {}  # name -> signal, low = suspicious
    for n in (64, 256, 1024, 3072):
        signals[f"score_safe N={n}"] = score_safe(result.stats, select_features(salience, n))
    code_diffs = result.stats.mean_codes[0::2] - result.stats.mean_codes[1::2]
    for l1 in (2e-3, 8e-3, 2e-2, 5e-2):
        signals[f"sae_margin l1={l1:g}"] = cross_fitted_margins(code_diffs, folds=config.folds, seed=config.seed,
                                                                l2=1e-4, l1=l1).margins
    pooled = result.store.pooled_mean()
    for l2 in (1e-2, 1e-1, 3e-1, 1.0, 3.0):
        signals[f"reward_margin l2={l2:g}"] = cross_fitted_margins(pooled[0::2] - pooled[1::2], folds=config.folds,
                                                                   seed=config.seed, l2=l2).margins
    signals["length"] = -length_suspicion(result.pairs, config.folds, config.seed)
    out = {name: -values for name, values in signals.items()}
    ss = f"score_safe N={config.n_features}"
    for l2 in ("0.1", "1", "3"):
        rm = f"reward_margin l2={l2}"
        for l1 in ("0.008", "0.05"):
            sae = f"sae_margin l1={l1}"
            out[f"rank(ss, rm l2={l2})"] = suspicion({ss: signals[ss], rm: signals[rm]})
            out[f"rank(ss, rm l2={l2}, sae l1={l1})"] = suspicion({k: signals[k] for k in (ss, rm, sae)})
            out[f"rank(ss, 2 rm l2={l2}, sae l1={l1})"] = suspicion({k: signals[k] for k in (ss, rm, sae)},
                                                                    {ss: 1, rm: 2, sae: 1})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--flip-rate", type=float, default=0.1)
    parser.add_argument("--choose-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--confirm-seeds", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--positions", nargs="+", default=["response", "all", "punctuation"])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/safer-audit-bench-cache"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--select-only", action="store_true",
                        help="only the feature-selection variants: salience vs safety")
    parser.add_argument("--flip-modes", nargs="+", default=None, choices=["uniform", "length", "margin"],
                        help="Measure the judges under these flip modes (evaluate's scorers) instead of the variants.")
    parser.add_argument("--judge", action="append", default=None, help="Judges of the ranking (repeatable).")
    parser.add_argument("--profile", choices=["fast", "thorough"], default="fast",
                        help="Models the scan reads (safer_audit.pipeline.profiles): fast = MiniLM, thorough = + SmolLM2.")
    parser.add_argument("--smollm2-layer", type=int, default=None, help="thorough: SmolLM2's layer (default: the profile's)")
    parser.add_argument("--smollm2-positions", default=None, help="thorough: SmolLM2's positions (default: the profile's)")
    args = parser.parse_args()
    if args.flip_modes:
        return judges_main(args)

    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import load_pairs
    from safer_audit.model.activations import load_backend
    from safer_audit.pipeline.scan import scan_pairs
    from safer_audit.workflows.evaluate import flip_pairs, measure

    pairs = load_pairs(args.data).pairs
    if args.limit:
        pairs = pairs.head(args.limit)
    base = ScanConfig(activations=ActivationConfig(layer=args.layer, cache_dir=args.cache_dir))
    if args.k:
        base.sae_train.k = args.k
    backend = load_backend(base.activations)
    results: dict[int, dict[str, object]] = {}
    started = time.perf_counter()
    for seed in args.choose_seeds + args.confirm_seeds:
        flipped, positive = flip_pairs(pairs, args.flip_rate, seed)
        scores = {}
        for position in args.positions:
            config = replace(base, activations=replace(base.activations, positions=position), seed=seed)
            t = time.perf_counter()
            result = scan_pairs(flipped, config, source=args.data, backend=backend)
            print(f"seed {seed} {position}: scan {time.perf_counter() - t:.1f} s", file=sys.stderr)
            scores[f"default ranking [{position}]"] = measure(result.suspicion, positive)
            found = select_variants(result, config) if args.select_only else variants(result, config)
            for name, values in found.items():
                scores[f"{name} [{position}]"] = measure(values, positive)
        generator = torch.Generator().manual_seed(10_000 + seed)
        scores["random"] = measure(torch.rand(len(pairs), generator=generator), positive)
        results[seed] = scores

    def table(seeds: list[int], title: str) -> None:
        names = list(results[seeds[0]])
        rows = []
        for name in names:
            au = [results[s][name].auroc for s in seeds]
            p5 = [results[s][name].precision["5%"] for s in seeds]
            p10 = [results[s][name].precision["10%"] for s in seeds]
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            rows.append((statistics.fmean(au), sd(au), statistics.fmean(p5), sd(p5), statistics.fmean(p10), name))
        rows.sort(reverse=True)
        print(f"\n### {title} (seeds {', '.join(map(str, seeds))}; {len(pairs)} pairs, "
              f"{args.flip_rate:.0%} flipped; mean ± sd)\n")
        print("| scorer | AUROC | precision@5% | precision@10% |")
        print("|---|---:|---:|---:|")
        for au, au_sd, p5, p5_sd, p10, name in rows:
            print(f"| {name} | {au:.3f} ± {au_sd:.3f} | {p5:.3f} ± {p5_sd:.3f} | {p10:.3f} |")

    table(args.choose_seeds, "Choose")
    if args.confirm_seeds:
        table(args.confirm_seeds, "Confirm")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: python {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps({str(s): {n: {"auroc": r.auroc, "precision": r.precision}
                                                  for n, r in scores.items()} for s, scores in results.items()},
                                        indent=1))
    return 0


def print_calibration(figures: list[dict[str, float]], flip_rate: float) -> None:
    """The flip probability against the injected flips, mean ± sd over seeds: the mixture posterior
    (what findings carry since) beside the stack's P(rejected is better) (what they carried
    before), from the same scans."""
    def cell(key: str) -> str:
        values = [f[key] for f in figures]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {sd:.3f}"

    print(f"\nFlip probability against the injected flips ({flip_rate:.0%} flipped; mean ± sd over seeds)\n")
    print("| flip probability | mean predicted | estimated flip rate | Brier | ECE |")
    print("|---|---:|---:|---:|---:|")
    print(f"| before: P(rejected is better) = sigmoid(-stacked margin) | {cell('rejected_mean_predicted')} |  "
          f"| {cell('rejected_brier')} | {cell('rejected_ece')} |")
    print(f"| after: mixture posterior | {cell('mean_predicted')} | {cell('estimated_rate')} | {cell('brier')} "
          f"| {cell('ece')} |")
    constant = statistics.fmean(f["flip_rate"] * (1 - f["flip_rate"]) for f in figures)
    print(f"\n(Brier of the constant true rate, for reference: {constant:.3f}.)")


def judges_main(args) -> int:
    """Every scorer of ``safer-audit evaluate`` under each flip mode, on the same seeds."""
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import load_pairs
    from safer_audit.model.activations import load_backend
    from safer_audit.workflows.evaluate import evaluate

    pairs = load_pairs(args.data).pairs
    if args.limit:
        pairs = pairs.head(args.limit)
    base = ScanConfig(activations=ActivationConfig(layer=args.layer, cache_dir=args.cache_dir))
    base.judges = tuple(args.judge) if args.judge else None
    base.profile = args.profile
    if args.smollm2_layer or args.smollm2_positions:  # measure another layer/positions than the profile's
        from safer_audit.pipeline import profiles

        model = profiles.SMOLLM2
        model = replace(model, layer=args.smollm2_layer or model.layer,
                        positions=args.smollm2_positions or model.positions)
        profiles.PROFILES["thorough"] = (model,)
    if args.k:
        base.sae_train.k = args.k
    backend = load_backend(base.activations)
    seeds = args.choose_seeds + args.confirm_seeds
    started = time.perf_counter()
    out = {}
    for mode in args.flip_modes:
        t = time.perf_counter()
        result = evaluate(pairs, base, flip_rate=args.flip_rate, seeds=seeds, positions=tuple(args.positions),
                          source=args.data, flip_mode=mode, backend=backend,
                          on_seed=lambda seed, _s, mode=mode, t=t: print(
                              f"{mode} seed {seed}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True))
        wall = time.perf_counter() - t
        out[mode] = {**result.to_dict(), "wall_seconds": round(wall, 1)}
        summary, rho = result.summary(), result.length_correlations()
        print(f"\n#### Flip mode {mode}, profile {args.profile} (seeds {', '.join(map(str, seeds))}; {result.pairs} "
              f"pairs, {result.flipped} flipped; mean ± sd; wall time {wall:.0f} s)\n")
        print("| scorer | AUROC | precision@5% | precision@10% | ρ with length difference |")
        print("|---|---:|---:|---:|---:|")
        for name, m in sorted(summary.items(), key=lambda item: -item[1]["auroc"][0]):
            r = f"{rho[name]:+.2f}" if name in rho else ""
            print(f"| {name} | {m['auroc'][0]:.3f} ± {m['auroc'][1]:.3f} | {m['p@5%'][0]:.3f} ± {m['p@5%'][1]:.3f} "
                  f"| {m['p@10%'][0]:.3f} | {r} |")
        print_calibration(list(result.calibration.values()), result.flip_rate)
        sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: python {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
