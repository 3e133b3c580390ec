"""Profile (not a timing): the driver's RSS and glibc heap in use per step of one whole scan.

    python benchmarks/profile_scan_memory.py PAIRS.jsonl CACHE_DIR [--model DIR]

Runs ``run_scan`` with bench_ray.py's large-run options (layer 1, max length 64, float16 cache,
an SAE trained on 50,000 tokens), with the steps below wrapped: for each call it prints its
seconds, RSS on entry, on exit and the peak in between (from /proc, sampled every 0.05 s), and
glibc's heap in use (``mallinfo2``: uordblks + hblkhd) on entry and exit, then the arena size and
its free bytes. ``mallinfo2`` walks the heap, so it is read only at calls, never in the sampler.
CACHE_DIR should be empty (a cold scan). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEPS = {
    "scan": ["read_data", "rendered_texts", "extract_activations", "find_quality_issues", "get_sae", "encode_store",
             "judge_pairs", "compute_signals", "aggregate", "build_report"],
    "activations": ["plan_missing", "_compute"],
    "scoring": ["score_safe", "cross_fitted_head", "stack_judges"],
}


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("cache", type=Path)
    parser.add_argument("--model", default="/tmp/flat-tiny")
    args = parser.parse_args()
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def rss() -> float:
        with open("/proc/self/status", encoding="ascii") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024

    def heap() -> tuple[float, float, float]:
        info = libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20, info.arena / 2**20, info.fordblks / 2**20

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append((time.perf_counter(), rss()))

    rows = []
    depth = [0]

    def wrap(module, name: str) -> None:
        original = getattr(module, name)

        def wrapper(*a, **k):
            t0, r0, (h0, _, _) = time.perf_counter(), rss(), heap()
            depth[0] += 1
            try:
                return original(*a, **k)
            finally:
                depth[0] -= 1
                t1, r1, (h1, arena, free) = time.perf_counter(), rss(), heap()
                peak = max([r0, r1] + [r for t, r in samples if t0 <= t <= t1])
                rows.append((depth[0], f"{module.__name__.rsplit('.', 1)[-1]}.{name}", t1 - t0, r0, r1, peak, h0, h1,
                             arena, free))

        setattr(module, name, wrapper)

    import importlib

    for module_name, names in STEPS.items():
        module = importlib.import_module(f"safer_audit.{module_name}")
        for name in names:
            wrap(module, name)
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.pipeline import scan

    config = ScanConfig(activations=ActivationConfig(model=args.model, layer=1, max_length=64, batch_size=16,
                                                     cache_dir=args.cache, cache_dtype="float16"))
    config.sae_train.max_tokens = 50000
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    result = scan.run_scan(args.data, config)
    stop.set()
    print(f"scan {time.perf_counter() - start:.1f} s, {len(result.pairs)} pairs, timings {json.dumps(result.timings)}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("| depth | step | s | RSS in | RSS out | RSS peak | heap in | heap out | arena | arena free |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]:.1f} | " + " | ".join(f"{v:.0f}" for v in row[3:]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
