"""Benchmark: activation extraction on the HH file, against a bare forward pass, cold and warm.

    python benchmarks/bench_extract.py [--data FILE] [--limit N] [--dump-acts FILE]

Measured side by side in one run, on the same length-sorted batches:
- bare full forward: the whole model (what a naive extractor runs), no cache, no positions;
- bare forward to the layer: the model cut after the read layer, no cache;
- cold extraction: safer-audit's extract_activations into an empty cache (early stop,
  positions, shards written to disk);
- warm extraction: the same call again (the cache holds everything).
Prints a Markdown table for BENCHMARKS.md. ``--dump-acts`` writes every read activation
to one safetensors file (tensor "acts"), the input of bench_sae.py.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_parser, read_pairs


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--positions", default="response")
    parser.add_argument("--dump-acts", type=Path, default=None)
    args = parser.parse_args()

    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import extract_activations, load_backend
    from safer_audit.model.texts import pair_texts

    pairs = read_pairs(args)
    n_pairs = len(pairs)
    with tempfile.TemporaryDirectory() as cache_dir:
        config = ActivationConfig(layer=args.layer, positions=args.positions, max_length=args.max_length,
                                  batch_size=args.batch_size, cache_dir=Path(cache_dir))
        backend = load_backend(config)
        texts = pair_texts(pairs, backend)
        ids, _offsets, _special = backend.tokenize([t.text for t in texts], max_length=args.max_length,
                                                   has_special_tokens=False)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches = [backend.pad_batch([ids[i] for i in order[s:s + args.batch_size]])
                   for s in range(0, len(order), args.batch_size)]
        n_tokens = sum(len(i) for i in ids)

        def bare(full: bool) -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for input_ids, mask in batches:
                    if full:
                        backend.model(input_ids=input_ids, attention_mask=mask)
                    else:
                        backend.forward(input_ids, mask, layer=args.layer, want_score=False)
            return time.perf_counter() - start

        timings = {}
        timings["bare full forward"] = bare(full=True)
        timings["bare forward to the layer"] = bare(full=False)
        start = time.perf_counter()
        store = extract_activations(texts, backend, config)
        timings["cold extraction (safer-audit)"] = time.perf_counter() - start
        assert store.n_forward_texts == len(set(t.text for t in texts))
        start = time.perf_counter()
        again = extract_activations(texts, backend, config)
        timings["warm extraction (safer-audit)"] = time.perf_counter() - start
        assert again.n_forward_texts == 0
        start = time.perf_counter()
        n_read = again.n_tokens()
        pooled = again.pooled_mean()
        timings["warm: stream every activation back"] = time.perf_counter() - start
        cache_bytes = sum(p.stat().st_size for p in Path(cache_dir).rglob("*.safetensors"))
        if args.dump_acts:
            from safetensors.torch import save_file

            save_file({"acts": torch.cat(list(again.iter_acts()))}, str(args.dump_acts))

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cold = timings["cold extraction (safer-audit)"]
    print(f"\n{n_pairs} pairs ({2 * n_pairs} texts, {n_tokens:,} tokens, {n_read:,} read positions, "
          f"{args.positions} positions, layer {args.layer}, max_length {args.max_length}), "
          f"torch threads {torch.get_num_threads()}\n")
    print("| step | seconds | pairs/s | vs cold extraction |")
    print("|---|---:|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} | {n_pairs / seconds:,.1f} | {seconds / cold:.3f}x |")
    print(f"\ncold extraction / bare forward to the layer: "
          f"{cold / timings['bare forward to the layer']:.3f}x; "
          f"cold / bare full forward: {cold / timings['bare full forward']:.3f}x; "
          f"cold / warm: {cold / timings['warm extraction (safer-audit)']:.0f}x")
    print(f"cache on disk: {cache_bytes / 2**20:.1f} MiB; peak RSS of this process: {peak_rss:.0f} MiB; "
          f"pooled shape {tuple(pooled.shape)}")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
