"""Benchmark: how few pairs can a scan work with? (point 4)

    python benchmarks/bench_min_pairs.py [--sizes 2 5 10 20 50 100] [--seeds 0 1 2] [--model DIR] [--data FILE]

Scans the first N pairs of the committed sample fixtures/hh-harmless-300.jsonl (or --data)
with the embedded model (or --model) and reports, per N: whether the scan runs, SAE training steps and
FVU, how many pairs each category can hold, and the AUROC of the combined ranking at finding
10% of the pairs flipped on purpose (mean over seeds). scan.min_pairs and report.FEW_PAIRS are
picked from this table (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=str(ROOT / "fixtures" / "hh-harmless-300.jsonl"))
    parser.add_argument("--cache", default=None, help="cache directory (default: a fresh temporary one)")
    args = parser.parse_args()

    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import load_pairs
    from safer_audit.model.activations import load_backend
    from safer_audit.pipeline import scan as scan_module
    from safer_audit.workflows.evaluate import evaluate

    cache = Path(args.cache or tempfile.mkdtemp(prefix="safer-audit-minpairs-"))
    all_pairs = load_pairs(args.data).pairs
    config = ScanConfig(activations=ActivationConfig(model=args.model, cache_dir=cache))
    backend = load_backend(config.activations)
    # measure the method itself, without the refusal this benchmark calibrates
    scan_module.check_pair_count = lambda n, config, source: None
    print(f"model {backend.identity}, width {backend.d_model}; cache {cache}")
    print("| pairs | scan | SAE steps | FVU | flipped slots | noisy slots | combined AUROC (10% flipped) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        pairs = all_pairs.head(n)
        try:
            if len(pairs) < n:
                raise ValueError(f"the data holds only {len(pairs)} pairs")
            result = scan_module.scan_pairs(pairs, config, source="sample", backend=backend)
            status = "runs"
            tokens = result.store.n_tokens()
            steps = max(1, tokens // config.sae_train.batch_size) * config.sae_train.epochs
            fvu = f"{result.stats.fvu:.3f}"
            flipped = int(config.flipped_fraction * n)
            noisy = int(config.noisy_fraction * n)
        except Exception as error:  # noqa: BLE001 - the point is to see what breaks
            status = f"fails: {type(error).__name__}: {str(error)[:60]}"
            traceback.print_exc(file=sys.stderr)
            steps = fvu = flipped = noisy = "-"
        auroc = "-"
        if status == "runs" and round(0.1 * n) >= 1:
            try:
                ev = evaluate(pairs, config, flip_rate=0.1, seeds=args.seeds, positions=("response",),
                              backend=backend)
                values = [ev.runs[s]["combined[response]"].auroc for s in args.seeds]
                auroc = f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"
            except Exception as error:  # noqa: BLE001
                auroc = f"fails: {type(error).__name__}"
        print(f"| {n} | {status} | {steps} | {fvu} | {flipped} | {noisy} | {auroc} |", flush=True)


if __name__ == "__main__":
    main()
