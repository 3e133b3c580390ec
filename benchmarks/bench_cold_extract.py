"""Benchmark: one cold extraction (extract_activations into an empty cache), for A/B runs of two checkouts.

    PYTHONPATH=CHECKOUT python benchmarks/bench_cold_extract.py [--data FILE] [--limit N] [--batch-tokens N]

Whichever safer_audit is first on PYTHONPATH is measured, so running it with an older checkout and
then this one, alternately, under the benchmark lock, compares the CPU extraction path of the two.
Prints one line: seconds, pairs/s and a digest of every cached activation (equal digests: the same
activations, bit for bit).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

from _common import bench_parser, read_pairs


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--batch-tokens", type=int, default=None, help="(this checkout only) token budget")
    args = parser.parse_args()

    import safer_audit
    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import extract_activations, load_backend
    from safer_audit.model.texts import pair_texts

    pairs = read_pairs(args)
    with tempfile.TemporaryDirectory() as cache_dir:
        extra = {"batch_tokens": args.batch_tokens} if args.batch_tokens else {}
        config = ActivationConfig(cache_dir=Path(cache_dir), **extra)
        backend = load_backend(config)
        texts = pair_texts(pairs, backend)
        start = time.perf_counter()
        store = extract_activations(texts, backend, config)
        seconds = time.perf_counter() - start
        digest = hashlib.sha256()
        for acts in store.iter_acts():
            digest.update(acts.numpy().tobytes())
    print(f"{Path(safer_audit.__file__).parent.parent}: {len(pairs)} pairs, cold extraction {seconds:.2f} s, "
          f"{len(pairs) / seconds:.1f} pairs/s, activations sha256 {digest.hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
