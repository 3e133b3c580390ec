"""Benchmark: the gate against a cold scan, on the HH file, side by side in one run.

    python benchmarks/bench_gate.py [--data FILE] [--new-fraction 0.01] [--seed 0]

Every step runs the real command line in a subprocess (interpreter start, imports and
model loading included, as in a pre-commit hook), each with its own empty activation
cache, because CI has no cache:
- cold scan: ``safer-audit scan`` of the whole file;
- baseline: ``safer-audit baseline`` of the file without a held-out ``--new-fraction`` of
  its pairs (picked with ``--seed``);
- gate, unchanged: ``safer-audit gate`` of exactly the baselined pairs;
- gate, +new: ``safer-audit gate`` of the whole file, i.e. the held-out pairs are new.
Prints a Markdown table for BENCHMARKS.md, with the sizes of what the baseline commits.
Targets: gate +1% <= 10% of the cold scan; gate unchanged: a few seconds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_DATA

CLI = [sys.executable, "-c", "from safer_audit.cli import main; main()"]


def run(args: list[str], cache: Path, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Wall time of one command, and its stdout; a failure stops the benchmark."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFER_AUDIT_CACHE_DIR": str(cache)}
    env.pop("GITHUB_ACTIONS", None)
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in ok:
        sys.exit(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    opener = gzip.open if args.data.suffix == ".gz" else open
    with opener(args.data, "rt", encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    n_new = round(len(lines) * args.new_fraction)
    held_out = set(random.Random(args.seed).sample(range(len(lines)), n_new))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full, old = tmp / "full.jsonl", tmp / "baselined.jsonl"
        full.write_text("".join(lines), encoding="utf-8")
        old.write_text("".join(line for i, line in enumerate(lines) if i not in held_out), encoding="utf-8")
        baseline = tmp / "repo" / ".safer-audit" / "baseline.json"
        rows = []
        scan_s, _ = run(["scan", str(full), "--quiet", "--top", "0"], tmp / "cache-scan")
        rows.append(("cold scan", len(lines), scan_s, ""))
        base_s, _ = run(["baseline", str(old), "--out", str(baseline), "--quiet"], tmp / "cache-baseline")
        rows.append(("baseline", len(lines) - n_new, base_s, ""))
        gate = ["gate", "--baseline", str(baseline), "--format", "json", "--quiet"]
        same_s, out = run([*gate, str(old)], tmp / "cache-gate-same")
        same = json.loads(out)
        rows.append(("gate, unchanged", same["new"], same_s, f"exit 0; stages {same['timings']}"))
        new_s, out = run([*gate, str(full)], tmp / "cache-gate-new", ok=(0, 1))
        new = json.loads(out)
        rows.append((f"gate, +{args.new_fraction:.0%} new", new["new"], new_s,
                     f"{new['failures']} failing of {len(new['findings'])} flagged; stages {new['timings']}"))
        sizes = {name: size(baseline.with_name(name)) for name in
                 (baseline.name, f"{baseline.stem}-sae", f"{baseline.stem}-heads.safetensors")}

    print(f"data: {args.data.name}, {len(lines)} pairs; {n_new} held out of the baseline (seed {args.seed}); "
          f"{os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| step | pairs scored | wall s | vs cold scan | notes |")
    print("|---|---:|---:|---:|---|")
    for name, pairs, seconds, notes in rows:
        print(f"| {name} | {pairs} | {seconds:.1f} | {seconds / scan_s:.1%} | {notes} |")
    print()
    print("| committed file | bytes |")
    print("|---|---:|")
    for name, n_bytes in sizes.items():
        print(f"| {name} | {n_bytes:,} |")
    print(f"\ngate +new / cold scan = {new_s / scan_s:.3f} (target <= 0.10); gate unchanged {same_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
