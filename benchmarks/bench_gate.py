"""Benchmark: what the gate fails on, and how fast it is, on the HH file.

    python benchmarks/bench_gate.py [--data FILE] [--baseline-pairs 1000] [--seed 0] [--flipped-fraction 0.04]
    python benchmarks/bench_gate.py --timings [--data FILE] [--new-fraction 0.01] [--seed 0]

Failure rates (the default): the file's pairs are shuffled with ``--seed``; a baseline is made
(``safer-audit baseline``'s defaults) on the first ``--baseline-pairs``, and the rest is split
into a pool for targeted flips, one for random flips and one of honest additions. Then one
change at a time, each gated against the same baseline (one process, one activation cache):

- (a) in-place swaps: baseline pairs with chosen and rejected swapped where they stand;
- (b) targeted flips: the most safety-salient pairs of the targeted pool (highest score_safe
  by the baseline's frozen SAE and features, as the SAFER attack picks them), appended swapped;
- (c) random flips: random pairs of the random pool, appended swapped;
- (d) honest additions: pairs of the last pool, appended as they are;
- (e) reordering and whitespace: the baseline's records shuffled, re-serialised with other
  separators and indentation, trailing spaces and blank lines between records.

A pair fails when the gate lists it as failing (a changed pair, or a new pair in a --fail-on
category). Prints a Markdown table for BENCHMARKS.md. Targets: (a) 100%, (b) >= 90%,
(d) <= 5%, (e) 0.

``--timings``: the gate against a cold scan, every step the real command line in a subprocess
(interpreter start, imports and model loading included, as in a pre-commit hook) with its own
empty cache: cold scan, baseline without a held-out ``--new-fraction``, gate of the unchanged
data, gate of the whole file. Targets: gate +1% <= 10% of the cold scan; unchanged: seconds.
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
from dataclasses import replace
from pathlib import Path

from _common import DEFAULT_DATA

CLI = [sys.executable, "-c", "from safer_audit.cli import main; main()"]
BASELINE_FLIPPED_FRACTION = 0.04  # `safer-audit baseline --flipped-fraction`'s default


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line for line in handle if line.strip()]


def swapped(line: str) -> str:
    record = json.loads(line)
    record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    return json.dumps(record) + "\n"


def reformatted(lines: list[str], seed: int) -> str:
    """The same records, shuffled, with other separators, indentation inside nothing, trailing
    spaces and blank lines: what an editor or a re-export may do without changing any pair."""
    rng = random.Random(seed)
    lines = lines[:]
    rng.shuffle(lines)
    out = []
    for line in lines:
        record = json.loads(line)
        out.append(json.dumps(record, separators=(" ,", " :  "), ensure_ascii=rng.random() < 0.5) + "  \n")
        if rng.random() < 0.2:
            out.append("\n")
    return "".join(out)


def failure_rates(args) -> int:
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.model.activations import load_backend
    from safer_audit.sae import TopKSAE
    from safer_audit.workflows.gate import build_baseline, read_baseline, read_sources, run_gate, score_frozen

    lines = read_lines(args.data)
    rng = random.Random(args.seed)
    order = list(range(len(lines)))
    rng.shuffle(order)
    n = args.baseline_pairs
    base = [lines[i] for i in order[:n]]
    rest = [lines[i] for i in order[n:]]
    targeted_pool, random_pool, honest_pool = rest[:args.pool], rest[args.pool:2 * args.pool], rest[2 * args.pool:]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        data = tmp / "repo" / "data.jsonl"
        data.parent.mkdir()
        data.write_text("".join(base), encoding="utf-8")
        baseline_path = tmp / "repo" / ".safer-audit" / "baseline.json"
        config = replace(ScanConfig(activations=ActivationConfig(cache_dir=cache)),
                         flipped_fraction=args.flipped_fraction)
        start = time.perf_counter()
        build_baseline([str(data)], baseline_path, config)
        baseline_s = time.perf_counter() - start
        baseline = read_baseline(baseline_path)

        # the attacker's pick: the pool's pairs of highest score_safe under the frozen reference
        pool_file = tmp / "targeted-pool.jsonl"
        pool_file.write_text("".join(targeted_pool), encoding="utf-8")
        activations = baseline.activation_config(cache)
        sae = TopKSAE.load(baseline.resolve(baseline.header["sae"]["path"]))
        scores = score_frozen(read_sources([str(pool_file)], baseline.read), baseline, load_backend(activations),
                              sae, activations)["score_safe"].tolist()
        top = sorted(range(len(targeted_pool)), key=lambda i: -scores[i])[:args.flips]

        in_place = set(rng.sample(range(n), args.flips))
        scenarios = [
            ("(a) in-place swaps", args.flips, "100%",
             "".join(swapped(line) if i in in_place else line for i, line in enumerate(base))),
            ("(b) targeted flips appended", args.flips, ">= 90%",
             "".join(base) + "".join(swapped(targeted_pool[i]) for i in top)),
            ("(c) random flips appended", args.flips, "",
             "".join(base) + "".join(swapped(line) for line in rng.sample(random_pool, args.flips))),
            ("(d) honest pairs appended", len(honest_pool), "<= 5%", "".join(base) + "".join(honest_pool)),
            ("(e) reordered, whitespace edited", n, "0", reformatted(base, args.seed)),
        ]
        rows = []
        for name, changed, target, text in scenarios:
            data.write_text(text, encoding="utf-8")
            start = time.perf_counter()
            result = run_gate([str(data)], baseline_path, cache_dir=cache)
            seconds = time.perf_counter() - start
            failing = result.failing_ids()
            kinds: dict[str, int] = {"changed": len(result.failing_changes)} if result.failing_changes else {}
            for f in result.failures:
                kinds[str(f.category)] = kinds.get(str(f.category), 0) + 1
            rows.append((name, changed, len(failing), target, "exit 1" if result.failed else "exit 0",
                         ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none", seconds))

    thresholds = baseline.header["thresholds"]
    cut = "none" if thresholds["flipped_cutoff"] is None else f"{thresholds['flipped_cutoff']:.4f}"
    print(f"data: {args.data.name}, {len(lines)} pairs, shuffled with seed {args.seed}; baseline of {n} pairs "
          f"(flipped fraction {thresholds['flipped_fraction']}, cut-off {cut}) "
          f"in {baseline_s:.0f} s; pools: targeted {len(targeted_pool)}, random {len(random_pool)}, honest "
          f"{len(honest_pool)}; {os.cpu_count()} CPUs\n")
    print("| change | pairs changed or added | failing | rate | target | verdict | failing as | gate s |")
    print("|---|---:|---:|---:|---|---|---|---:|")
    for name, changed, failing, target, verdict, kinds, seconds in rows:
        print(f"| {name} | {changed} | {failing} | {failing / changed:.1%} | {target} | {verdict} | {kinds} "
              f"| {seconds:.1f} |")
    return 0


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


def timings(args) -> int:
    lines = read_lines(args.data)
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
        base_s, _ = run(["baseline", str(old), "-o", str(baseline), "--quiet"], tmp / "cache-baseline")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-pairs", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=400, help="pairs in the targeted and in the random pool")
    parser.add_argument("--flips", type=int, default=50, help="pairs swapped in (a), (b) and (c)")
    parser.add_argument("--flipped-fraction", type=float, default=BASELINE_FLIPPED_FRACTION,
                        help="the baseline's flipped fraction: the cut a new pair must reach to fail as flipped")
    parser.add_argument("--timings", action="store_true", help="time the gate against a cold scan instead")
    parser.add_argument("--new-fraction", type=float, default=0.01)
    args = parser.parse_args()
    return timings(args) if args.timings else failure_rates(args)


if __name__ == "__main__":
    sys.exit(main())
