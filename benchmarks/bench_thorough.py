"""Benchmark: the thorough profile's cold scan, two checkouts (or option sets) side by side in one run.

    python benchmarks/bench_thorough.py --data FILE [--limit 300] --run before OLD_CHECKOUT \
        --run after . [--run "after, float32" . "--dtype float32"] [--rounds 1]

Each ``--run NAME CHECKOUT ["SCAN OPTIONS"]`` is ``safer-audit scan DATA --profile thorough`` in a new
interpreter with that checkout's code, into an empty cache, so it pays for everything a first scan pays
for: loading both models, extracting, training both SAEs, the report. The runs alternate round by round,
so a busy spell of a shared machine falls on every one. Prints a Markdown table: wall time, SmolLM2's
share, the speed-up over the first run, and how the suspicion ranking agrees with the first run's
(Spearman correlation; overlap of the top 5%).

    python benchmarks/bench_thorough.py --weights-load [--rounds 3]

times instead loading SmolLM2's weights (this checkout's code) from the GGUF file (dequantised) against
from the cache's ``models/`` entry, alternately, and checks that both give the same tensors.

    python benchmarks/bench_thorough.py --data FILE --limit 60 --extraction [--rounds 2]

times SmolLM2's extraction alone (layer 16, every token, 384 tokens) in one process, float32 and
bfloat16 autocast alternating round by round, so that a shared machine's load falls on each alike.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_parser

SCAN = "import sys; from safer_audit.cli import main; sys.exit(main())"


def scan(checkout: Path, data: str, options: list[str], work: Path) -> tuple[float, dict]:
    """Wall time of one cold thorough scan with ``checkout``'s code, and its JSON report."""
    cache, report = work / "cache", work / "report.json"
    path = os.pathsep.join(str(checkout / part) for part in ("", "plugins/safer-audit-llm",
                                                              "plugins/safer-audit-jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    command = [sys.executable, "-c", SCAN, "scan", data, "--profile", "thorough", "--cache-dir", str(cache),
               "-o", str(report), "--top", "0", *options]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{checkout}: scan failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, json.loads(report.read_text(encoding="utf-8"))


def suspicion(report: dict) -> dict[str, float]:
    return {finding["pair_id"]: finding["suspicion"] for finding in report["findings"]}


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def agreement(base: dict[str, float], other: dict[str, float]) -> tuple[float, float]:
    """Spearman correlation of two suspicion rankings and the overlap of their top 5%."""
    pairs = sorted(base)
    a, b = ranks([base[p] for p in pairs]), ranks([other[p] for p in pairs])
    rho = statistics.correlation(a, b)
    top = max(1, round(0.05 * len(pairs)))
    best = [set(sorted(pairs, key=lambda p, s=s: -s[p])[:top]) for s in (base, other)]
    return rho, len(best[0] & best[1]) / top


def weights_load(rounds: int) -> int:
    """Seconds to load SmolLM2's weights from the GGUF file and from the cache entry, alternately."""
    import torch

    from safer_audit.backends import hf

    times: dict[str, list[float]] = {"GGUF file (dequantised)": [], "cache entry (models/)": []}
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for _ in range(rounds):
            for name, cache in (("GGUF file (dequantised)", None), ("cache entry (models/)", Path(tmp))):
                hf._load_weights.cache_clear()
                backend = hf.HFModelBackend("smollm2", device="cpu", cache_dir=cache)
                if cache is not None and not backend.weights_entry.is_file():
                    _ = hf.HFModelBackend("smollm2", device="cpu", cache_dir=cache).model  # write it (untimed)
                    hf._load_weights.cache_clear()
                start = time.perf_counter()
                state = backend.model.state_dict()
                times[name].append(time.perf_counter() - start)
                if reference is None:
                    reference = state
                if not all(torch.equal(reference[k], v) for k, v in state.items()):
                    sys.exit(f"{name}: other weights than the GGUF file's")
    print("| weights from | seconds (median) | runs |")
    print("|---|---:|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    return 0


def extraction(args) -> int:
    """Seconds of SmolLM2's extraction of ``args.limit`` pairs in float32 and under bfloat16 autocast."""
    import torch
    from _common import read_pairs

    from safer_audit.backends import hf
    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import extract_activations
    from safer_audit.model.texts import pair_texts

    # one backend per dtype: the bfloat16 one holds its linear weights in bfloat16 (cast once when loaded)
    backends = {dtype: hf.HFModelBackend("smollm2", device="cpu", dtype=str(dtype).removeprefix("torch."))
                for dtype in (torch.float32, torch.bfloat16)}
    texts = pair_texts(read_pairs(args), backends[torch.float32])
    for backend in backends.values():
        _ = backend.model
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in backends}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for dtype, backend in backends.items():
                config = ActivationConfig(model="smollm2", layer=16, positions="all", max_length=384,
                                          cache_dir=Path(tmp) / f"{round_}-{dtype}")
                start = time.perf_counter()
                extract_activations(texts, backend, config, want_score=False)
                times[dtype].append(time.perf_counter() - start)
    base = statistics.median(times[torch.float32])
    print(f"\n{len(texts) // 2} pairs, {args.rounds} round(s), median\n")
    print("| SmolLM2 extraction | seconds | speed-up | runs |")
    print("|---|---:|---:|---|")
    for dtype, values in times.items():
        print(f"| {dtype} | {statistics.median(values):.1f} | {base / statistics.median(values):.2f}x "
              f"| {', '.join(f'{v:.1f}' for v in values)} |")
    return 0


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--weights-load", action="store_true", help="time loading SmolLM2's weights instead")
    parser.add_argument("--extraction", action="store_true",
                        help="time SmolLM2's extraction, float32 against bfloat16, instead")
    parser.add_argument("--run", nargs="+", action="append", metavar="NAME CHECKOUT [OPTIONS]",
                        help="a name, a checkout, and scan options in one argument (repeatable; the first is "
                             "the reference)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.weights_load:
        return weights_load(args.rounds)
    if args.extraction:
        return extraction(args)
    if not args.run:
        parser.error("--run is needed (or --weights-load)")
    if any(len(run) not in (2, 3) for run in args.run):
        parser.error("--run takes a name, a checkout and at most one argument of scan options")
    runs = [(run[0], Path(run[1]).resolve(), shlex.split(run[2]) if len(run) == 3 else []) for run in args.run]
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(args.data).resolve())
        if args.limit:  # the first N records as they are
            opener = gzip.open if data.endswith(".gz") else open
            with opener(data, "rt", encoding="utf-8") as handle:
                lines = list(itertools.islice(handle, args.limit))
            data = str(Path(tmp) / "pairs.jsonl")
            Path(data).write_text("".join(lines), encoding="utf-8")
        walls: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        reports: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for name, checkout, options in runs:
                work = Path(tmp) / f"{round_}-{len(walls[name])}-{runs.index((name, checkout, options))}"
                work.mkdir()
                seconds, reports[name] = scan(checkout, data, options, work)
                walls[name].append(seconds)
                timings = reports[name]["run"].get("timings", {})
                print(f"{name}: {seconds:.1f} s; " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
                      file=sys.stderr, flush=True)
    reference = runs[0][0]
    print(f"\n{len(suspicion(reports[reference]))} pairs, {args.rounds} round(s), median wall time\n")
    print("| run | wall | SmolLM2 (load, extraction) | speed-up | Spearman with " + reference + " | top-5% overlap |")
    print("|---|---:|---:|---:|---:|---:|")
    base_wall = statistics.median(walls[reference])
    for name, _, options in runs:
        wall = statistics.median(walls[name])
        timings = reports[name]["run"].get("timings", {})
        smol = f"{timings.get('smollm2/model', 0):.0f} + {timings.get('smollm2/activations', 0):.0f} s"
        rho, overlap = agreement(suspicion(reports[reference]), suspicion(reports[name]))
        label = f"{name} ({' '.join(options)})" if options else name
        print(f"| {label} | {wall:.0f} s | {smol} | {base_wall / wall:.2f}x | {rho:.4f} | {overlap:.0%} |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
