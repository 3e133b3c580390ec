"""Benchmark: one cold extraction (extract_activations into an empty cache), for A/B runs of two checkouts.

    PYTHONPATH=CHECKOUT python benchmarks/bench_cold_extract.py [--data FILE] [--limit N] [--batch-tokens N]

Whichever safer_audit is first on PYTHONPATH is measured, so running it with an older checkout and
then this one, alternately, under the benchmark lock, compares the CPU extraction path of the two.
Prints one line: seconds, pairs/s and a digest of every cached activation (equal digests: the same
activations, bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only")
    parser.add_argument("--batch-tokens", type=int, default=None, help="(this checkout only) token budget")
    args = parser.parse_args()

    import safer_audit
    from safer_audit.activations import extract_activations, load_backend, pair_texts
    from safer_audit.config import ActivationConfig
    from safer_audit.data import load_pairs

    pairs = load_pairs(args.data).pairs
    if args.limit:
        pairs = pairs.head(args.limit)
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
