"""Benchmark: a cold and a warm scan of the HH file, against the bare forward pass to the layer.

    python benchmarks/bench_scan.py [--data FILE] [--limit N] [--profile FILE] [--profile-cold FILE]
                                    [--cache-dir DIR [--warm-only]]

Measured in one run, one after the other:
- bare forward to the layer: the model cut after the read layer over the scan's texts, in
  length-sorted batches of the scan's batch size, no cache, no positions, nothing else;
- cold scan: safer_audit.pipeline.scan.run_scan into an empty cache directory (model load, extraction,
  SAE training, the SAE pass, salience, labels, scores, report object);
- warm scan: the same call again on the same cache (nothing to extract, train or encode),
  under cProfile when ``--profile`` names a file for its top functions by cumulative time.
Prints a Markdown table for BENCHMARKS.md. Exporters (HTML, JSON) are not run.

``--cache-dir`` keeps the cache (default: a temporary directory, removed); ``--warm-only`` then runs
just a warm scan on it, e.g. with an older checkout first on PYTHONPATH, to profile that code's warm
scan on the same cache. ``--profile-cold`` profiles the cold scan too.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only")
    parser.add_argument("--profile", type=Path, default=None, help="write the warm scan's profile here")
    parser.add_argument("--profile-cold", type=Path, default=None, help="write the cold scan's profile here")
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep the cache here (default: temporary)")
    parser.add_argument("--warm-only", action="store_true", help="only a warm scan on --cache-dir")
    args = parser.parse_args()
    if args.warm_only and args.cache_dir is None:
        parser.error("--warm-only needs the --cache-dir of an earlier run")

    from safer_audit.backends.hf import _load_weights
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.data import load_pairs
    from safer_audit.model.activations import load_backend
    from safer_audit.model.texts import pair_texts
    from safer_audit.pipeline.scan import scan_pairs

    pairs = load_pairs(args.data).pairs
    if args.limit:
        pairs = pairs.head(args.limit)
    source = str(args.data)
    timings: dict[str, float] = {}
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as temporary:
        cache_dir = args.cache_dir or temporary
        config = ScanConfig(activations=ActivationConfig(cache_dir=Path(cache_dir)))
        act = config.activations
        backend = load_backend(act)
        texts = pair_texts(pairs, backend)
        start = time.perf_counter()
        with torch.inference_mode():
            if args.warm_only:
                texts = []
            for special in (False, True):
                group = [t.text for t in texts if t.has_special_tokens == special]
                if not group:
                    continue
                ids, _offsets, _special = backend.tokenize(group, max_length=act.max_length,
                                                           has_special_tokens=special)
                order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
                for s in range(0, len(order), act.batch_size):
                    input_ids, mask = backend.pad_batch([ids[i] for i in order[s:s + act.batch_size]])
                    backend.forward(input_ids, mask, layer=act.layer, want_score=False)
        timings["bare forward to the layer (tokenize + forward)"] = time.perf_counter() - start
        del backend

        if args.warm_only:
            timings.clear()
        for run in ("warm scan",) if args.warm_only else ("cold scan", "warm scan"):
            _load_weights.cache_clear()  # a scan from the shell starts with no weights loaded (the bare pass's)
            profile_file = args.profile if run == "warm scan" else args.profile_cold
            profiler = cProfile.Profile() if profile_file else None
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            result = scan_pairs(pairs, config, source=source)
            if profiler:
                profiler.disable()
            timings[run] = time.perf_counter() - start
            stages[run] = dict(result.timings)
            stages[run]["texts encoded"] = result.stats.n_encoded
            stages[run]["texts extracted"] = result.store.n_forward_texts
            if profiler:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
                profile_file.write_text(text.getvalue())
            ranking = [f.pair_id for f in result.report.findings]
            stages[run]["ranking"] = ranking
        if not args.warm_only:
            assert stages["cold scan"].pop("ranking") == stages["warm scan"].pop("ranking"), "warm ranking differs"
        else:
            stages["warm scan"].pop("ranking")
        codes_bytes = sum(p.stat().st_size for p in Path(cache_dir).rglob("codes/*/shard-*.safetensors"))
        summary_bytes = sum(p.stat().st_size for p in Path(cache_dir).rglob("codes/*/summary-*.safetensors"))
        heads_bytes = sum(p.stat().st_size for p in Path(cache_dir).rglob("heads/*.safetensors"))
        n_read = int(result.stats.n_positions.sum())

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.warm_only:
        print(f"\nwarm scan only: {timings['warm scan']:.2f} s; stages: {stages['warm scan']}")
        return 0
    bare = timings["bare forward to the layer (tokenize + forward)"]
    cold, warm = timings["cold scan"], timings["warm scan"]
    print(f"\n{len(pairs)} pairs ({2 * len(pairs)} texts, {n_read:,} read positions), layer {config.activations.layer}, "
          f"max_length {config.activations.max_length}, torch threads {torch.get_num_threads()}\n")
    print("| run | seconds | vs bare forward to the layer | stages (seconds) |")
    print("|---|---:|---:|---|")
    for name, seconds in timings.items():
        detail = ", ".join(f"{k} {v}" for k, v in stages.get(name, {}).items())
        print(f"| {name} | {seconds:.2f} | {seconds / bare:.3f}x | {detail} |")
    print(f"\nwarm / cold: 1/{cold / warm:.1f} (target <= 1/20); cold / bare forward to the layer: "
          f"{cold / bare:.2f}x (target <= 1.5x)")
    print(f"codes cache on disk: {codes_bytes / 2**20:.1f} MiB in shards, {summary_bytes / 2**20:.1f} MiB in the "
          f"scan's summary; heads: {heads_bytes / 2**10:.0f} KiB; "
          f"peak RSS of this process: {peak_rss:.0f} MiB")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
