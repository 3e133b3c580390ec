"""Benchmark: extraction on a CUDA GPU -- pairs/s and peak GPU memory, the default model and a causal model.

    python benchmarks/bench_gpu.py [--data FILE] [--limit N] [--model PATH] [--batch-tokens N]
                                   [--dtype auto|float32|bfloat16] [--layer N]

For the embedded default model (all-MiniLM-L6-v2) and, with ``--model PATH``, a causal model
(a 1B-class Llama-like directory), runs a cold extraction (safer_audit.model.activations
.extract_activations, into an empty cache) on ``cuda`` and reports pairs/s, tokens/s and
torch.cuda.max_memory_allocated. bfloat16 by default on the GPU (``--dtype auto``), batches by
``--batch-tokens`` padded tokens. Prints a Markdown table for BENCHMARKS.md. Exits with status 2
and a message on a machine without CUDA.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _common import bench_parser, read_pairs


def measure(pairs, model: str | None, args) -> dict:
    import torch

    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import extract_activations, load_backend
    from safer_audit.model.texts import pair_texts

    with tempfile.TemporaryDirectory() as cache_dir:
        config = ActivationConfig(model=model, device="cuda", dtype=args.dtype, batch_tokens=args.batch_tokens,
                                  cache_dir=Path(cache_dir), **({"layer": args.layer} if args.layer else {}))
        torch.cuda.reset_peak_memory_stats()
        backend = load_backend(config)
        texts = pair_texts(pairs, backend)
        loaded = torch.cuda.max_memory_allocated()
        torch.cuda.synchronize()
        start = time.perf_counter()
        store = extract_activations(texts, backend, config)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        positions = store.n_tokens()
    return {"model": backend.identity, "dtype": str(backend.dtype).removeprefix("torch."), "layer": config.layer,
            "pairs": len(pairs), "seconds": seconds, "pairs/s": len(pairs) / seconds,
            "read positions": positions, "weights GiB": loaded / 2**30,
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default=None, help="a causal model directory, measured after the default model")
    parser.add_argument("--batch-tokens", type=int, default=16_384, help="padded tokens per forward pass")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on the GPU), float32, bfloat16")
    parser.add_argument("--layer", type=int, default=None, help="layer of --model (default: the scan's default)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU "
              "and a CUDA build of torch.", file=sys.stderr)
        return 2

    pairs = read_pairs(args)
    rows = [measure(pairs, None, args)]
    if args.model:
        rows.append(measure(pairs, args.model, args))
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch tokens {args.batch_tokens}\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
                                for v in row.values()) + " |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
