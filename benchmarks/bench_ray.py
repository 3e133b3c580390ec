"""Benchmark: the local engine against the Ray engine (1 and 2 workers), side by side in one run.

    python benchmarks/bench_ray.py [--data FILE] [--limit N] [--model DIR] [--workers 1,2]
    python benchmarks/bench_ray.py --synthetic 100000 --model DIR   # recombined HH turns
    python benchmarks/bench_ray.py --cache-dtype float32,float16,bfloat16   # later dtypes: local engine only
    python benchmarks/bench_ray.py --build-tiny DIR   # the tests' tiny Llama (width 64), for large synthetic runs

Each engine scans the same pairs into its own empty cache with the same options; the
script prints, per engine: extraction pairs/s, the whole scan's seconds, whether the
ranking equals the local engine's and the largest score difference, the driver's peak
RSS, the largest peak RSS of an extraction worker and of an SAE-pass worker (each actor's
``ru_maxrss``, engine.ray.LAST_RUN and LAST_ENCODING), and the cache's size per 1k pairs, and the load average around each run. Every row is compared with the first
(the reference): same ranking, largest |suspicion| difference, Spearman correlation of
suspicion and the overlap of the flagged (flipped or noisy) pairs. ``--synthetic N`` first writes N pairs made by recombining the
prompts and responses of the input file (seeded), so a large dataset can be measured
with a tiny model on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ../shared beside a clone; a git worktree under wt/ has it two levels up
DEFAULT_DATA = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared")
                     if (p / "data").is_dir()), ROOT.parent / "shared") / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def make_synthetic(source: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``n`` HH-format pairs: a random record's prompt with the final turns of two other random records."""
    import gzip

    opener = gzip.open if str(source).endswith(".gz") else open
    with opener(source, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    marker = "\n\nAssistant:"
    split = [(r["chosen"][:r["chosen"].rindex(marker)], r["chosen"][r["chosen"].rindex(marker):],
              r["rejected"][r["rejected"].rindex(marker):]) for r in records if marker in r["chosen"]
             and marker in r["rejected"]]
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as handle:
        for i in range(n):
            prompt = split[rng.randrange(len(split))][0]
            chosen = split[rng.randrange(len(split))][1]
            rejected = split[rng.randrange(len(split))][2]
            handle.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected + f" ({i})"}) + "\n")
    return out


def build_tiny(directory: Path) -> Path:
    """The tests' tiny LlamaForSequenceClassification (tests/tiny_models.py, as tiny_llama_dir), saved to ``directory``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_llama

    return build_tiny_llama(directory)


def start_ray() -> None:
    """A fresh local Ray instance with at least 4 logical CPUs: on 2 cores Ray's default (2) lets an
    actor pool of 2 take every CPU slot, and Ray Data's map_batches then starves."""
    import logging

    import ray

    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


class RssSampler:
    """The driver's RSS every 0.2 s (from /proc), to say in which scan stage its memory grows."""

    def __init__(self):
        import threading

        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status", encoding="ascii") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024

    def _run(self):
        while not self.stop.wait(0.2):
            self.samples.append((time.perf_counter(), self.rss_mb()))

    def __enter__(self):
        self.samples.append((time.perf_counter(), self.rss_mb()))
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def by_stage(self, start: float, timings: dict[str, float]) -> dict[str, float]:
        """Peak RSS (MB) within each stage; timings are the scan's per-stage seconds, in order."""
        out, clock = {}, start
        for name, seconds in timings.items():
            inside = [rss for t, rss in self.samples if clock <= t <= clock + seconds + 0.2]
            out[name] = max(inside) if inside else None
            clock += seconds
        return out


def held_by_driver(result) -> dict[str, float]:
    """MB of the large objects the driver still holds after a scan (torch tensors and the pairs table)."""
    import torch

    stats = result.stats
    tensors = {"top activations": stats.top_values, "n_positions": stats.n_positions,
               "SAE weights": torch.cat([p.detach().flatten() for p in result.sae.parameters()])}
    out = {name: t.numel() * t.element_size() / 1e6 for name, t in tensors.items()}
    # the per-text code means: in a temporary file read a range of pairs at a time (0 MB held) or in memory
    rows, width = stats.codes.shape
    out["mean_codes [texts, latents] in memory"] = 0.0 if stats.codes._file is not None else rows * width * 4 / 1e6
    # the rendered texts: in a temporary file read back by index (SpooledTexts: 0 MB of them held) or in memory
    chars = sum(len(t.text) for t in result.texts) / 1e6
    out["texts (str, chars) in memory"] = 0.0 if hasattr(result.texts, "_records") else chars
    out["texts (str, chars) on disk"] = chars if hasattr(result.texts, "_records") else 0.0
    # the pairs: a PairTable (ids, sources, lines and lengths in memory, the texts in a temporary file) or polars
    pairs = getattr(result.pairs, "table", result.pairs)
    out["pairs table (polars) in memory"] = pairs.estimated_size() / 1e6
    out["pairs' texts on disk"] = getattr(result.pairs, "disk_bytes", 0) / 1e6
    out["n_latents"] = int(width)
    return out


def cache_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("shard-*.safetensors"))


def codes_bytes(directory: Path) -> int:
    """The SAE codes' shards: what the driver's fold reads back."""
    return sum(p.stat().st_size for p in directory.rglob("codes/*/shard-*.safetensors"))


def run(data: str, engine: str, workers: int | None, args, cache: Path) -> dict:
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.pipeline.scan import run_scan

    config = ScanConfig(activations=ActivationConfig(model=args.model, layer=args.layer, max_length=args.max_length,
                                                     batch_size=args.batch_size, cache_dir=cache, engine=engine,
                                                     ray_workers=workers, cache_dtype=args.cache_dtype))
    config.sae_train.max_tokens = args.sae_tokens
    if engine == "ray":
        start_ray()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        with RssSampler() as sampler:
            result = run_scan(data, config)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the scan's, not this script's lists
    finally:
        if engine == "ray":
            import ray

            ray.shutdown()  # stops the raylet, GCS and workers this process started
    seconds = time.perf_counter() - start
    worker_rss = encode_rss = ray_seconds = worker_peaks = None
    encoded_on_workers = 0
    if engine == "ray":
        from safer_audit.engine.ray import LAST_ENCODING, LAST_RUN

        worker_rss = LAST_RUN.get("worker_peak_rss")
        encode_rss = LAST_ENCODING.get("worker_peak_rss")
        encoded_on_workers = LAST_ENCODING.get("texts", 0)
        ray_seconds = {"extraction": LAST_RUN.get("seconds"), "sae_pass": LAST_ENCODING.get("seconds")}
        # the largest worker peak so far after 10%, 25%, 50% and all of each job's rows: growth within a run
        worker_peaks = {job: [round(peaks[max(0, int(len(peaks) * f) - 1)]) for f in (0.1, 0.25, 0.5, 1.0)]
                        for job, peaks in (("extraction", LAST_RUN.get("worker_peaks") or [0]),
                                           ("sae_pass", LAST_ENCODING.get("worker_peaks") or [0]))}
    pairs = len(result.pairs)
    name = f"{engine}" + (f" x{workers}" if workers else "")
    ranking, scores, flagged = [], {}, []
    for f in result.report.findings:  # one pass: a scan's findings are made as they are read
        ranking.append(f.pair_id)
        scores[f.pair_id] = f.suspicion
        if str(f.category) in ("flipped", "noisy"):
            flagged.append(f.pair_id)
    return {"engine": name + ("" if args.cache_dtype == "float32" else f" {args.cache_dtype}"), "pairs": pairs,
            "extract_pairs_per_s": pairs / result.timings["activations"], "scan_s": seconds,
            "timings": result.timings, "load": [load_before, os.getloadavg()[0]],
            "driver_rss_by_stage_mb": sampler.by_stage(start, result.timings), "held_mb": held_by_driver(result),
            "ranking": ranking, "scores": scores, "flagged": sorted(flagged),
            "cache_mb_per_1k": cache_bytes(cache) / 1e6 / pairs * 1000, "driver_peak_rss_mb": peak_rss,
            "worker_peak_rss_mb": worker_rss, "encode_worker_peak_rss_mb": encode_rss,
            "encoded_texts": result.stats.n_encoded, "encoded_on_workers": encoded_on_workers,
            "ray_job_s": ray_seconds, "worker_peaks_by_progress_mb": worker_peaks, "codes_mb_per_1k": codes_bytes(cache) / 1e6 / pairs * 1000}


def table_line(row: dict, base: dict) -> str:
    """One run's row of the table, compared with ``base`` (the first run)."""
    keys = list(base["scores"])
    diff = max(abs(row["scores"][k] - base["scores"][k]) for k in keys)
    rho = spearman([base["scores"][k] for k in keys], [row["scores"][k] for k in keys])
    both = len(set(row["flagged"]) & set(base["flagged"]))
    overlap = f"{both}/{len(base['flagged'])} (+{len(row['flagged']) - both})"
    worker = f"{row['worker_peak_rss_mb']:.0f}" if row["worker_peak_rss_mb"] else "-"
    encoder = f"{row['encode_worker_peak_rss_mb']:.0f}" if row.get("encode_worker_peak_rss_mb") else "-"
    return (f"| {row['engine']} | {row['pairs']} | {row['extract_pairs_per_s']:.1f} | {row['scan_s']:.1f} | "
            f"{row['load'][0]:.2f}/{row['load'][1]:.2f} | {'yes' if row['ranking'] == base['ranking'] else 'NO'} | "
            f"{diff:.1e} | {rho:.6f} | {overlap} | {row['driver_peak_rss_mb']:.0f} | {worker} | {encoder} | "
            f"{row['encoded_on_workers']}/{row['encoded_texts']} | {row['cache_mb_per_1k']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N", help="scan N recombined pairs instead")
    parser.add_argument("--model", default=None, help="default: the embedded MiniLM-L6")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-dtype", default="float32", help="comma-separated: one run per dtype")
    parser.add_argument("--sae-tokens", type=int, default=1_000_000)
    parser.add_argument("--engines", default="local,ray", help="comma-separated: local, ray")
    parser.add_argument("--workers", default="1,2", help="Ray actor counts to run, comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--build-tiny", type=Path, default=None, metavar="DIR", help="write the tiny model, exit")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # ENGINE:WORKERS, in a child process
    args = parser.parse_args()

    if args.build_tiny:
        print(build_tiny(args.build_tiny))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    data = args.data
    if args.synthetic and not args.one:
        data = str(make_synthetic(Path(args.data), args.synthetic, work / "synthetic.jsonl"))
    elif args.limit and not args.one:
        import gzip
        from itertools import islice
        opener = gzip.open if data.endswith(".gz") else open
        with opener(data, "rt", encoding="utf-8") as handle:
            (work / "head.jsonl").write_text("".join(islice(handle, args.limit)), encoding="utf-8")
        data = str(work / "head.jsonl")
    if args.one:
        engine, workers = args.one.split(":")
        try:
            row = run(data, engine, int(workers) if workers else None, args, work / "cache")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(row))
        return 0
    import subprocess

    rows = []
    print("| run | pairs | extraction pairs/s | scan s | load avg (before/after) | same ranking "
          "| max abs suspicion diff | Spearman suspicion | flagged overlap | driver peak RSS MB "
          "| extraction worker peak RSS MB | SAE-pass worker peak RSS MB | texts encoded on workers / in all "
          "| cache MB / 1k pairs |")
    print("|---|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|", flush=True)
    dtypes = args.cache_dtype.split(",")
    for dtype in dtypes:
        # past the first dtype only the local engine runs: a dtype changes what is stored, not who computes it
        for engine in args.engines.split(",") if dtype == dtypes[0] else ["local"]:
            for workers in ([int(w) for w in args.workers.split(",")] if engine == "ray" else [None]):
                # one process per run: peak RSS is a per-process high-water mark, and each gets its own empty cache
                command = [sys.executable, __file__, "--data", data, "--one", f"{engine}:{workers or ''}",
                           "--layer", str(args.layer), "--max-length", str(args.max_length), "--batch-size",
                           str(args.batch_size), "--cache-dtype", dtype, "--sae-tokens", str(args.sae_tokens)]
                if args.model:
                    command += ["--model", args.model]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.stderr.write(done.stderr[-4000:])
                    shutil.rmtree(work, ignore_errors=True)  # the synthetic or head file
                    raise SystemExit(f"run {engine}:{workers or ''} {dtype} failed ({done.returncode})")
                out = done.stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(table_line(rows[-1], rows[0]), flush=True)
                print(f"done: {rows[-1]['engine']} {rows[-1]['scan_s']:.0f} s; timings {json.dumps(rows[-1]['timings'])}; "
                      f"Ray jobs s {json.dumps(rows[-1]['ray_job_s'])}; worker peak MB after 10/25/50/100% of "
                      f"the rows {json.dumps(rows[-1]['worker_peaks_by_progress_mb'])}; codes MB / 1k pairs "
                      f"{rows[-1]['codes_mb_per_1k']:.1f}; driver RSS by stage "
                      f"{json.dumps(rows[-1]['driver_rss_by_stage_mb'])}; held {json.dumps(rows[-1]['held_mb'])}",
                      file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print("\nDriver RSS, peak MB within each scan stage:\n")
    stages = list(rows[0]["driver_rss_by_stage_mb"])
    print("| run | " + " | ".join(stages) + " |")
    print("|---|" + "---:|" * len(stages))
    for row in rows:
        print(f"| {row['engine']} | " + " | ".join(f"{row['driver_rss_by_stage_mb'].get(s) or 0:.0f}" for s in stages)
              + " |")
    print("\nHeld by the driver after the scan, MB:", json.dumps(rows[-1]["held_mb"]))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("ranking", "scores", "flagged")}
                                         for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
