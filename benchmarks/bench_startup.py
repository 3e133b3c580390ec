"""Benchmark: start-up, a warm scan and the gate on unchanged data, against a cold scan, from the shell.

    python benchmarks/bench_startup.py [--data FILE] [--repeats 3]

Every step is the real command line in a new interpreter (as a person or a pre-commit hook runs it),
side by side in one run:
- ``--help``, ``--version``, ``plugins``, ``validate DATA``: start-up alone;
- cold scan: ``safer-audit scan DATA`` into an empty cache;
- warm scan: the same command again, on the cache the cold scan filled (its report is read back from the
  report cache);
- warm scan, ``--no-cache``: the same, scanning again on the cold scan's activations, SAE, codes and heads
  (timed, not a target);
- baseline: ``safer-audit baseline DATA`` on that cache (timed, not a target);
- gate, unchanged: ``safer-audit gate DATA`` against that baseline, with an empty cache (CI has none).
The short steps run ``--repeats`` times (the median is shown). Prints a Markdown table for BENCHMARKS.md.
Targets: the gate on unchanged data at most 1/100 of the cold scan, the warm scan at most 1/40.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_DATA

CLI = [sys.executable, "-c", "from safer_audit.cli import main; main()"]
TARGETS = {"warm scan": 40, "gate, unchanged data": 100}


def run(args: list, cache: Path, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Wall time of one command, and its stdout; a failure stops the benchmark."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFER_AUDIT_CACHE_DIR": str(cache)}
    env.pop("GITHUB_ACTIONS", None)
    start = time.perf_counter()
    done = subprocess.run([*CLI, *map(str, args)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in ok:
        sys.exit(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def repeated(args: list, cache: Path, repeats: int) -> list[float]:
    return [run(args, cache)[0] for _ in range(repeats)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further scan options, e.g. --dtype float32 (last on the line)")
    args = parser.parse_args()

    rows: list[tuple[str, list[float], str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache, empty = tmp / "cache", tmp / "empty-cache"
        for name, command in (("--help", ["--help"]), ("--version", ["--version"]), ("plugins", ["plugins"]),
                              ("validate", ["validate", args.data])):
            rows.append((name, repeated(command, empty, args.repeats), "start-up"))
        scan = ["scan", args.data, "--quiet", "--top", "0", "--output", tmp / "report.json", *args.extra]
        cold, _ = run(scan, cache)
        rows.append(("cold scan", [cold], "empty cache"))
        rows.append(("warm scan", repeated(scan, cache, args.repeats), "the cold scan's cache"))
        rows.append(("warm scan, --no-cache", repeated([*scan, "--no-cache"], cache, args.repeats),
                     "the cold scan's cache, its report not read"))
        baseline = tmp / "repo" / ".safer-audit" / "baseline.json"
        base, _ = run(["baseline", args.data, "--output", baseline, "--quiet", *args.extra], cache)
        rows.append(("baseline", [base], "the cold scan's cache"))
        gate = ["gate", args.data, "--baseline", baseline, "--format", "json", "--quiet"]
        times, out = [], ""
        for _ in range(args.repeats):
            seconds, out = run(gate, empty)
            times.append(seconds)
        new = json.loads(out)["new"]
        rows.append(("gate, unchanged data", times, f"empty cache; {new} new pairs"))

    print(f"data: {args.data}; repeats: {args.repeats}; python {sys.version.split()[0]}")
    print("\n| command | wall s (median) | runs (s) | vs cold scan | target | notes |")
    print("|---|---:|---|---:|---:|---|")
    met = True
    for name, times, notes in rows:
        median = statistics.median(times)
        ratio = median / cold
        target = TARGETS.get(name)
        if target is not None:
            met &= ratio <= 1 / target
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {name} | {median:.2f} | {runs} | 1/{1 / ratio:,.0f} | {f'1/{target}' if target else ''} | {notes} |")
    print(f"\ntargets {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
