"""Benchmark: the default model's forward pass in float32, bfloat16 autocast and dynamic int8, on a CPU.

    python benchmarks/bench_dtype.py [--data FILE] [--limit N] [--seeds 0 1 2 3 4] [--speed-pairs 300]

Side by side in one run, for each way of computing (float32: ``--dtype float32``; bfloat16: ``--dtype
bfloat16``, autocast around float32 weights; int8: float32 weights with every linear layer quantised by
torch's dynamic int8 quantisation, a benchmark-only backend):
- speed: extraction of the first ``--speed-pairs`` pairs into an empty cache, the variants interleaved
  ``--rounds`` times (median), and the extraction stage of each full scan below;
- agreement: the mean relative difference of the hidden state read, against float32, on those pairs;
- ranking: a scan of the data per variant (its own cache): the Spearman correlation of the suspicion with
  float32's, and the overlap of the top 5% most suspicious pairs;
- detection: ``evaluate`` (10% uniform flips, ``response`` positions) on seeds ``--seeds``, on the same
  caches: each scorer's AUROC per seed, and the largest difference from float32.
Prints Markdown tables for BENCHMARKS.md. Thresholds for a default: Spearman >= 0.995, top-5% overlap
>= 95%, every AUROC within 0.005 of float32's.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import bench_parser, read_pairs

VARIANTS = ("float32", "bfloat16", "int8")


def int8_backend(config):
    """The hf backend over float32 weights whose linear layers are dynamically quantised to int8."""
    from safer_audit.backends import hf

    class Int8Backend(hf.HFModelBackend):
        def __init__(self):
            super().__init__(config.model, device="cpu", dtype="float32")
            self.identity += "+dynamic-int8"
            self.compute_dtype = "int8"
            self._quantised = None

        @property
        def model(self):
            if self._quantised is None:
                model = torch.ao.quantization.quantize_dynamic(hf.HFModelBackend.model.fget(self),
                                                              {torch.nn.Linear}, dtype=torch.qint8)
                self._layers = hf._layer_list(model, self.n_layers)  # noqa: SLF001 (the hook goes on these)
                self._quantised = self._model = model
            return self._quantised

    return Int8Backend()


def make_backend(variant: str, config):
    from safer_audit.model.activations import load_backend

    if variant == "int8":
        return int8_backend(config)
    return load_backend(replace(config, dtype=variant, device="cpu"))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from safer_audit.workflows.evaluate import spearman as rank_correlation

    return rank_correlation(a, b)


def top_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.05) -> float:
    k = max(1, round(len(a) * fraction))
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(top_a & top_b) / k


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--speed-pairs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()

    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.model.activations import extract_activations
    from safer_audit.model.texts import pair_texts
    from safer_audit.pipeline.scan import scan_pairs
    from safer_audit.workflows.evaluate import evaluate

    pairs = read_pairs(args)
    variants = list(dict.fromkeys(["float32", *args.variants]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = ActivationConfig(cache_dir=tmp / "unused", device="cpu")
        backends = {v: make_backend(v, base) for v in variants}
        print(f"{len(pairs)} pairs; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"compute dtypes: {', '.join(f'{v}={b.compute_dtype}' for v, b in backends.items())}", flush=True)

        # speed and agreement on a slice, the variants interleaved
        sample = pairs.head(args.speed_pairs)
        texts = pair_texts(sample, backends["float32"])
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        stores = {}
        for round_ in range(args.rounds):
            for v in variants:
                config = replace(base, cache_dir=tmp / f"speed-{v}-{round_}")
                start = time.perf_counter()
                stores[v] = extract_activations(texts, backends[v], config)
                seconds[v].append(time.perf_counter() - start)
        reference = torch.cat(list(stores["float32"].iter_acts()))
        print(f"\nExtraction of {len(sample)} pairs ({len(texts)} texts), {args.rounds} interleaved rounds\n")
        print("| compute | median s | runs (s) | speed vs float32 | mean relative difference of the hidden state |")
        print("|---|---:|---|---:|---:|")
        f32 = statistics.median(seconds["float32"])
        for v in variants:
            acts = torch.cat(list(stores[v].iter_acts()))
            difference = float(((acts - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)).mean())
            median = statistics.median(seconds[v])
            print(f"| {v} | {median:.2f} | {', '.join(f'{s:.2f}' for s in seconds[v])} | {f32 / median:.2f}x "
                  f"| {difference:.4f} |", flush=True)

        # ranking and detection on the whole data, each variant in its own cache
        suspicion, stage, aurocs = {}, {}, {}
        for v in variants:
            config = ScanConfig(activations=replace(base, dtype=v if v != "int8" else "float32",
                                                    cache_dir=tmp / f"scan-{v}"))
            start = time.perf_counter()
            result = scan_pairs(pairs, config, source=args.data, backend=backends[v])
            stage[v] = (time.perf_counter() - start, result.report.run.timings.get("activations", float("nan")))
            suspicion[v] = result.suspicion.double()
            if args.seeds:
                evaluation = evaluate(pairs, config, seeds=tuple(args.seeds), positions=("response",),
                                      source=args.data, backend=backends[v])
                aurocs[v] = {scorer: [evaluation.runs[s][scorer].auroc for s in args.seeds]
                             for scorer in evaluation.runs[args.seeds[0]]}
            print(f"{v}: scan {stage[v][0]:.1f} s (activations {stage[v][1]:.1f} s)", flush=True)

        print(f"\nScan of {len(pairs)} pairs per variant (an empty cache each)\n")
        print("| compute | scan s | activations s | activations vs float32 | Spearman of suspicion | top-5% overlap |")
        print("|---|---:|---:|---:|---:|---:|")
        for v in variants:
            print(f"| {v} | {stage[v][0]:.1f} | {stage[v][1]:.1f} | {stage['float32'][1] / stage[v][1]:.2f}x "
                  f"| {spearman(suspicion[v], suspicion['float32']):.4f} "
                  f"| {top_overlap(suspicion[v], suspicion['float32']):.1%} |")
        if aurocs:
            print(f"\nevaluate, seeds {' '.join(map(str, args.seeds))}: AUROC mean per scorer (largest |difference| "
                  "from float32 over the seeds)\n")
            print("| scorer | " + " | ".join(variants) + " |")
            print("|---|" + "---:|" * len(variants))
            for scorer in aurocs["float32"]:
                if scorer == "random":
                    continue
                cells = []
                for v in variants:
                    mean = statistics.fmean(aurocs[v][scorer])
                    worst = max(abs(a - b) for a, b in zip(aurocs[v][scorer], aurocs["float32"][scorer], strict=True))
                    cells.append(f"{mean:.4f}" + ("" if v == "float32" else f" ({worst:.4f})"))
                print(f"| {scorer} | " + " | ".join(cells) + " |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
