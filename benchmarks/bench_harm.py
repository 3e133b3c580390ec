"""Benchmark: what the harm judge costs on the HH file, cold and warm, and what it adds to a cold scan.

    python benchmarks/bench_harm.py [--data FILE] [--limit N] [--rounds N] [--no-scans]

Measured in one run, one after the other (the first two interleaved, ``--rounds`` times):
- plain encoding: the judge's maths (scoring.harm) on the sentence encoder called as the judge first
  called it (every text of a slice of 1,024 pairs encoded, repeats included, in batches of 64 texts);
- the judge, cold: backends.harm.HarmJudge (each distinct text encoded once, in batches of at most 2,048
  padded tokens) with no cache directory (kept for the run in a temporary one), the last round into an
  empty cache directory;
- the judge, cold, under bfloat16 autocast (what ``--dtype auto`` runs on a CPU with native bfloat16);
- the judge, warm: a new judge on that cache (nothing encoded, the encoder not needed);
- scans from the shell (a new process each, a fresh cache each): ``safer-audit scan`` with
  ``--flipped-rule judges`` (no harm judge), as it is by default (the harm rule), with ``--dtype float32``,
  and with ``--judge score_safe --judge reward_margin --judge harm``; each again warm.
It checks the judge's signals: no cache, cold and warm bitwise equal; against plain encoding, and bfloat16
against float32, the largest difference, the rank correlation and the overlap of the 60 pairs whose chosen
reply looks most harmful (and of the 4% the harm rule reads).
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import gzip
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_parser, read_pairs

CLI = [sys.executable, "-c", "from safer_audit.cli import main; main()"]
HARM_JUDGES = ["--judge", "score_safe", "--judge", "reward_margin", "--judge", "harm"]


def plain_encoding(pairs, encoder, read_pairs: int) -> torch.Tensor:
    """The judge as first written: the maths on ``encoder.encode`` itself, a slice of pairs at a time."""
    from safer_audit.scoring.harm import Prototypes, harm_scores

    prototypes = Prototypes.embed(encoder.encode)
    rows = list(pairs.iter_rows(named=True))
    parts = []
    for start in range(0, len(rows), read_pairs):
        part = rows[start:start + read_pairs]
        parts.append(harm_scores([r["context"] for r in part], [r["chosen"] for r in part],
                                 [r["rejected"] for r in part], encoder.encode, prototypes).signal)
    return torch.cat(parts)


def timed(function):
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def scan(data: str, cache: Path, extra: list[str]) -> float:
    """Wall time of ``safer-audit scan`` in a new process (its report to a file, not the terminal)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAFER_AUDIT_CACHE_DIR": str(cache)}
    report = cache.parent / f"{cache.name}-report.json"
    start = time.perf_counter()
    done = subprocess.run([*CLI, "scan", data, *extra, "--quiet", "--output", str(report)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"scan {' '.join(extra)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> int:
    """How many of the ``k`` lowest of ``a`` (the most harmful chosen replies) are among ``b``'s ``k`` lowest."""
    return len(set(torch.argsort(a)[:k].tolist()) & set(torch.argsort(b)[:k].tolist()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from safer_audit.scoring.ranks import average_ranks

    ra, rb = average_ranks(a.double()), average_ranks(b.double())
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--no-scans", action="store_true", help="only the judge, no scans from the shell")
    parser.add_argument("--rounds", type=int, default=2, help="plain encoding and no cache, interleaved (default 2)")
    args = parser.parse_args()

    from safer_audit.backends.harm import READ_PAIRS, HarmJudge
    from safer_audit.backends.labellers import sentence_encoder
    from safer_audit.config import ScanConfig
    from safer_audit.scoring.judges import JudgeContext

    pairs = read_pairs(args)
    print(f"{len(pairs):,} pairs; load average {os.getloadavg()[0]:.1f}; {torch.get_num_threads()} torch threads",
          file=sys.stderr)
    load_seconds, encoder = timed(sentence_encoder)  # loaded once, before any timing: every run below shares it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain_seconds, new_seconds, bf16_seconds, signals = [], [], [], []
        for turn in range(args.rounds):  # interleaved: a shared machine's load moves all alike
            seconds, plain = timed(lambda: plain_encoding(pairs, encoder, READ_PAIRS))
            plain_seconds.append(seconds)
            # no cache directory (the run's embeddings in a temporary one), then the last round into a kept one
            cache_dir = tmp / "judges" if turn == args.rounds - 1 else None
            seconds, signal = timed(lambda at=cache_dir: HarmJudge(encoder).judge(JudgeContext(pairs, cache_dir=at)))
            new_seconds.append(seconds)
            signals.append(signal)
            seconds, bf16 = timed(lambda: HarmJudge(encoder).judge(JudgeContext(pairs, dtype="bfloat16")))
            bf16_seconds.append(seconds)
        rows.append(("harm judge, plain encoding (as first written)", plain_seconds))
        rows.append(("harm judge, cold (no cache directory; the last round: an empty one)", new_seconds))
        rows.append(("harm judge, cold, bfloat16 autocast (no cache directory)", bf16_seconds))
        warm_seconds, warm = timed(lambda: HarmJudge().judge(JudgeContext(pairs, cache_dir=tmp / "judges")))
        rows.append(("harm judge, warm cache", [warm_seconds]))
        stored = sum(path.stat().st_size for path in (tmp / "judges").rglob("*") if path.is_file())
        if not args.no_scans:
            data = args.data
            if args.limit:  # the scan reads a file: its first N records
                data = str(tmp / "pairs.jsonl")
                with (gzip.open if args.data.endswith(".gz") else open)(args.data, "rb") as source:
                    Path(data).write_bytes(b"".join(itertools.islice(source, args.limit)))
            for name, extra in (("--flipped-rule judges (no harm judge)", ["--flipped-rule", "judges"]),
                                ("default (harm rule; --dtype auto)", []),
                                ("--dtype float32 (the harm judge in float32)", ["--dtype", "float32"]),
                                ("--judge score_safe reward_margin harm", HARM_JUDGES)):
                cache = tmp / f"scan-{len(rows)}"
                rows.append((f"scan, {name}, cold", [scan(data, cache, extra)]))
                rows.append((f"scan, {name}, warm", [scan(data, cache, extra)]))
    print(f"encoder load {load_seconds:.2f} s (before the timings); cache after a cold run: "
          f"{stored / 2**20:.1f} MiB", file=sys.stderr)
    cold = signals[-1]
    same = all(torch.equal(signal, cold) for signal in signals) and torch.equal(cold, warm)
    print(f"no cache directory == cold cache == warm cache, bitwise: {same}; "
          f"against plain encoding: largest difference {float((cold - plain).abs().max()):.2e} "
          f"(signals from {float(plain.min()):.3f} to {float(plain.max()):.3f}), Spearman {spearman(cold, plain):.9f}, "
          f"top 60 shared {top_overlap(cold, plain, 60)}/60", file=sys.stderr)
    flipped = round(ScanConfig().flipped_fraction * len(cold))  # the harm rule's cut-off: its most harmful-chosen
    print(f"bfloat16 against float32: largest difference {float((bf16 - cold).abs().max()):.2e}, Spearman "
          f"{spearman(bf16, cold):.6f}, top 60 shared {top_overlap(bf16, cold, 60)}/60, most harmful-chosen "
          f"{flipped} shared {top_overlap(bf16, cold, flipped)}/{flipped}", file=sys.stderr)
    print(f"load average at the end {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print("| run | seconds (each round) | vs plain encoding (same round; cold, warm: the last) |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        ratios = ""
        if name.startswith("harm judge"):
            against = plain_seconds if len(seconds) > 1 else plain_seconds[-1:]  # cold, warm: the last round's
            ratios = ", ".join(f"{s / p:.3f}x" for s, p in zip(seconds, against, strict=False))
        print(f"| {name} | {', '.join(f'{s:.2f}' for s in seconds)} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
