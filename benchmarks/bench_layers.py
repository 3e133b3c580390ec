"""Benchmark: which layer and positions of a model separate chosen from rejected best.

    python benchmarks/bench_layers.py --model smollm2 --layers 4 8 12 16 20 --limit 600 [--seeds 0 1 2 3 4]

One forward pass per text (stopped after the deepest layer asked for) pools the hidden states
at every layer asked for, over the final turn (``response``) and over every token (``all``),
with the scan's own rendering (chat template), left truncation and positions. Each
(layer, positions) is then scored as the scan scores a model without a reward head: a
cross-fitted Bradley-Terry head on the pooled chosen - rejected differences (reward_margin,
ridge 1.0), on copies with 10% of the pairs flipped (seeds): AUROC and precision at 5% of
ranking the flipped pairs first. The pooled vectors are saved (--save) so that a rerun only
scores. This picks the layer and positions; the full scan (SAE, score_safe) is measured on the
chosen one with bench_evaluate.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from _common import bench_parser, read_pairs

POSITION_SETS = ("response", "all")


class _Stop(Exception):
    pass


def pooled_layers(texts, backend, layers: list[int], max_length: int, batch_size: int) -> dict:
    """(layer, positions) -> pooled mean hidden state per text, from one forward pass per batch."""
    from safer_audit.model.activations import read_positions, tokenize_prepared

    out = {(layer, p): torch.zeros(len(texts), backend.d_model) for layer in layers for p in POSITION_SETS}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].text))
    deepest = max(layers)
    started = time.perf_counter()
    for n, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start:start + batch_size]
        encoded = tokenize_prepared([texts[i] for i in batch], backend, max_length)
        input_ids, mask = backend.pad_batch([ids for ids, _, _ in encoded])
        captured = {}

        def hook(_module, _inputs, output, layer, captured=captured):
            captured[layer] = (output[0] if isinstance(output, tuple) else output).float()
            if layer == deepest:
                raise _Stop

        handles = [backend._layers[layer - 1].register_forward_hook(
            lambda m, i, o, layer=layer: hook(m, i, o, layer)) for layer in layers]
        try:
            with torch.inference_mode():
                backend.model(input_ids=input_ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for b, (i, (_ids, offsets, special)) in enumerate(zip(batch, encoded, strict=True)):
            for p in POSITION_SETS:
                keep = read_positions(texts[i].text, offsets, special, texts[i].response_start, p)
                if not keep:
                    continue
                index = torch.tensor(keep, dtype=torch.long)
                for layer in layers:
                    out[(layer, p)][i] = captured[layer][b, index].mean(0)
        if n % 10 == 0:
            done = start + len(batch)
            print(f"  {done}/{len(texts)} texts, {done / (time.perf_counter() - started):.1f} texts/s",
                  file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--flip-rate", type=float, default=0.1)
    parser.add_argument("--save", type=Path, default=None, help="pooled vectors: read if present, else written")
    args = parser.parse_args()

    from safer_audit.config import ActivationConfig
    from safer_audit.model.activations import load_backend
    from safer_audit.model.texts import pair_texts
    from safer_audit.scoring.heads import cross_fitted_margins
    from safer_audit.workflows.evaluate import flip_pairs, measure

    torch.manual_seed(0)
    pairs = read_pairs(args)
    started = time.perf_counter()
    if args.save and args.save.exists():
        pooled = torch.load(args.save, weights_only=True)
        print(f"pooled vectors read from {args.save}", file=sys.stderr)
    else:
        backend = load_backend(ActivationConfig(model=args.model, device="cpu"))
        print(f"model {backend.identity}: {backend.n_layers} layers, width {backend.d_model}, loaded in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        t = time.perf_counter()
        found = pooled_layers(pair_texts(pairs, backend), backend, args.layers, args.max_length, args.batch_size)
        print(f"extraction: {len(pairs)} pairs in {time.perf_counter() - t:.0f} s "
              f"({len(pairs) / (time.perf_counter() - t):.2f} pairs/s)", file=sys.stderr)
        pooled = {f"{layer}:{p}": v for (layer, p), v in found.items()}
        if args.save:
            torch.save(pooled, args.save)
    print(f"\n#### {args.model}: reward_margin head per layer and positions ({len(pairs)} pairs, "
          f"{args.flip_rate:.0%} flipped, seeds {', '.join(map(str, args.seeds))}; mean ± sd)\n")
    print("| layer | positions | AUROC | precision@5% | pairwise accuracy (unflipped) |")
    print("|---:|---|---:|---:|---:|")
    for name, vectors in pooled.items():
        layer, positions = name.split(":")
        diffs = vectors[0::2] - vectors[1::2]
        au, p5 = [], []
        for seed in args.seeds:
            _flipped, positive = flip_pairs(pairs, args.flip_rate, seed)
            signed = torch.where(positive.unsqueeze(1), -diffs, diffs)
            margins = cross_fitted_margins(signed, folds=5, seed=seed, l2=1.0).margins
            result = measure(-margins, positive)
            au.append(result.auroc)
            p5.append(result.precision["5%"])
        accuracy = float((cross_fitted_margins(diffs, folds=5, seed=0, l2=1.0).margins > 0).double().mean())
        print(f"| {layer} | {positions} | {statistics.fmean(au):.3f} ± {statistics.stdev(au):.3f} "
              f"| {statistics.fmean(p5):.3f} ± {statistics.stdev(p5):.3f} | {accuracy:.3f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; command: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
