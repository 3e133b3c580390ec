"""Benchmark: the driver's peak RSS in the passes after the SAE, against the number of pairs.

    python benchmarks/bench_flat.py --pairs 10000,100000 [--latents 512] [--features 64]

No model: each size runs in its own process, which fills a CodeStats of random sparse code
means (TextRows in a temporary file, as encode_store writes them) and runs the streamed
passes a scan runs on them: salience totals, score_safe, the cross-fitted sae_margin head
(fitted on at most --head-pairs pairs, every pair scored) and the feature-card summaries.
It prints, per size, seconds, the peak RSS before the passes (after filling) and after them,
and the size of the code-means file. Extraction, SAE training and the report are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n_pairs: int, n_latents: int, n_features: int, head_pairs: int) -> dict:
    import torch

    from safer_audit.features.cards import _column_summaries
    from safer_audit.features.salience import Feature, FeatureSet, feature_salience
    from safer_audit.sae.stats import CodeStats, TextRows
    from safer_audit.scoring.heads import HeadFit, PairDiffs, cross_fitted_head, score_safe

    torch.manual_seed(0)
    n_texts = 2 * n_pairs
    with tempfile.TemporaryDirectory() as directory:
        codes = TextRows(n_texts, n_latents, Path(directory))
        for start in range(0, n_texts, 8192):  # ~5% of latents fire per text, as a TopK SAE's means do
            rows = torch.arange(start, min(start + 8192, n_texts))
            values = torch.rand(len(rows), n_latents) * (torch.rand(len(rows), n_latents) < 0.05)
            codes.write(rows, values)
        zeros = torch.zeros(50, n_latents, dtype=torch.long)
        stats = CodeStats(codes, torch.randint(1, 90, (n_texts,)), torch.zeros(n_latents, dtype=torch.long),
                          zeros.float(), zeros, zeros, zeros)
        before = peak_mb()
        start = time.perf_counter()
        salience = feature_salience(*stats.totals())
        latents = torch.argsort(salience.abs(), descending=True)[:n_features].tolist()
        features = FeatureSet([Feature(j, 1 if salience[j] >= 0 else -1, float(salience[j])) for j in latents], "top-n")
        safe = score_safe(stats, features)
        head = cross_fitted_head("sae_margin", PairDiffs(stats.codes), HeadFit(max_pairs=head_pairs))
        _column_summaries(stats, features.latents)
        seconds = time.perf_counter() - start
        assert len(safe) == n_pairs and len(head.margins) == n_pairs
        return {"pairs": n_pairs, "seconds": round(seconds, 1), "peak_rss_after_fill_mb": round(before),
                "peak_rss_after_passes_mb": round(peak_mb()), "codes_file_mb": round(n_texts * n_latents * 4 / 1e6)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="10000,100000")
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--head-pairs", type=int, default=4096)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.latents, args.features, args.head_pairs)))
        return 0
    print("| pairs | passes s | peak RSS after filling MB | peak RSS after the passes MB | code-means file MB |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(p) for p in args.pairs.split(",")):
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--latents", str(args.latents),
                              "--features", str(args.features), "--head-pairs", str(args.head_pairs)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {row['pairs']:,} | {row['seconds']} | {row['peak_rss_after_fill_mb']} | "
              f"{row['peak_rss_after_passes_mb']} | {row['codes_file_mb']:,} | (load {load:.2f}/"
              f"{os.getloadavg()[0]:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
