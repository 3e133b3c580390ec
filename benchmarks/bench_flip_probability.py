"""Benchmark: does the flip probability mean what it says, and is it withheld when it cannot?

    python benchmarks/bench_flip_probability.py --data $HH --cache-dir cache [--seeds 0 1 2 3 4] \
        [--modes uniform length]

Scans, with the default scan, (1) the data as they are and the committed 300-pair sample: whether the
judges identify the flip mixture (else the report gives no probability, and why), the estimated rate,
and how many pairs sit at exactly 0 or 1 (as findings round them) or at >= 0.9; (2) per mode and seed, a copy
with 10% planted flips (``evaluate``'s flip_pairs and flip modes): the mean flip probability against the
planted rate and the expected calibration error against the planted flips (10 equal-count bins, as
``evaluate`` measures it).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import ROOT, bench_parser, read_pairs

SAMPLE = ROOT / "fixtures" / "hh-harmless-300.jsonl"


def describe(name: str, result) -> str:
    mixture, p = result.flip_mixture, result.flip_probability.double()
    shown = p.mul(1e6).round().div(1e6)  # as findings carry it
    return (f"| {name} | {len(p):,} | {'yes' if mixture.identified else 'no'} | {mixture.size_sign_z:.1f} | "
            f"{mixture.rate:.3f} ± {mixture.rate_sd:.3f} | {int((shown == 0).sum())} / {int((shown == 1).sum())} | "
            f"{int((p >= 0.9).sum())} | {mixture.reason or ''} |")


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/safer-audit-bench-cache"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--modes", nargs="+", default=["uniform", "length"], choices=["uniform", "length"])
    parser.add_argument("--flip-rate", type=float, default=0.1)
    args = parser.parse_args()
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import load_pairs
    from safer_audit.model.activations import load_backend
    from safer_audit.pipeline.scan import scan_profile
    from safer_audit.workflows.evaluate import calibration, flip_pairs, flip_weights

    config = ScanConfig(activations=ActivationConfig(cache_dir=args.cache_dir))
    backend = load_backend(config.activations)
    started = time.perf_counter()
    pairs = read_pairs(args)
    print("| data | pairs | identified | size-sign z | estimated rate ± sd | at exactly 0 / 1 | >= 0.9 | why none |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for name, table, source in ((SAMPLE.name, load_pairs(SAMPLE).pairs, str(SAMPLE)), (Path(args.data).name, pairs,
                                                                                        args.data)):
        print(describe(name, scan_profile(table, config, source=source, backend=backend, labels=False)), flush=True)
    print("\n| mode | seed | planted rate | mean probability | estimated rate ± sd | ECE | identified |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode in args.modes:
        weights = flip_weights(pairs, mode)
        eces = []
        for seed in args.seeds:
            flipped, positive = flip_pairs(pairs, args.flip_rate, seed, weights=weights)
            result = scan_profile(flipped, replace(config, seed=seed), source=args.data, backend=backend, labels=False)
            figures, mixture = calibration(result.flip_probability, positive), result.flip_mixture
            eces.append(figures["ece"])
            print(f"| {mode} | {seed} | {figures['flip_rate']:.3f} | {figures['mean_predicted']:.3f} | "
                  f"{mixture.rate:.3f} ± {mixture.rate_sd:.3f} | {figures['ece']:.3f} | "
                  f"{'yes' if mixture.identified else 'no'} |", flush=True)
        print(f"| {mode} | mean | | | | {statistics.fmean(eces):.3f} (max {max(eces):.3f}) | |", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
