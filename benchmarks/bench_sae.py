"""Benchmark: our TopK SAE training against EleutherAI sparsify's SparseCoder, side by side.

Both train on the same activations after one seeded global shuffle (ours then shuffles
within its 64k-token buffer, as it always does; sparsify takes them in that order), with the same width, k, batch size, steps, learning rate and schedule,
AuxK weight and dead-latent threshold, on the same number of CPU threads. sparsify is
trained by a loop that follows its own ``Trainer`` (Adam, ``b_dec`` initialised to the
first batch's mean, decoder renormalised every step, gradient parallel to the decoder
removed); it sees the inputs already layer-normed exactly as our SAE normalises them,
because sparsify has no input normalisation of its own.

Both are then evaluated the same way over all the activations: FVU as docs/method.md defines
it (mean over tokens of ||x_hat - x||^2 / ||x||^2), FVU as sparsify defines it (summed
squared error over the total variance around the mean token), mean L0, and the fraction
of latents that never fire.

Each trainer runs ``--repeats`` times, interleaved (ours, sparsify, ours, ...), so that a
busy machine slows both alike; the table reports the median and every run, and the ratio
of the medians. ``--profile N`` instead profiles one training of ours (torch.profiler).

    python benchmarks/bench_sae.py --acts acts.safetensors   # a tensor "acts" [N, d_in]
    python benchmarks/bench_sae.py                           # structured synthetic data
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time

import torch
from safetensors.torch import load_file

from safer_audit.config import SaeTrainConfig
from safer_audit.sae import SaeConfig, TopKSAE, default_lr, train_sae
from safer_audit.sae.train import _lr_at

CHUNK_TOKENS = 4096


def synthetic_activations(n_tokens: int, d_in: int, n_atoms: int, per_token: int, seed: int) -> torch.Tensor:
    """Raw-looking hidden states with known sparse structure: positive mixes of unit atoms,
    a shared offset (real residual streams have one) and a little noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    which = torch.rand(n_tokens, n_atoms, generator=g).topk(per_token, dim=1).indices
    coef = torch.rand(n_tokens, per_token, generator=g) * 2 + 0.2
    h = (coef.unsqueeze(-1) * atoms[which]).sum(1)
    return h + 0.5 * torch.randn(d_in, generator=g) + 0.02 * torch.randn(n_tokens, d_in, generator=g)


def load_acts(path: str) -> torch.Tensor:
    tensors = load_file(path)
    if "acts" not in tensors or tensors["acts"].ndim != 2:
        sys.exit(f'{path}: expected a 2-D tensor named "acts"')
    return tensors["acts"].float()


def layer_norm(h: torch.Tensor) -> torch.Tensor:
    return TopKSAE(SaeConfig(h.shape[1], 1, 1)).normalize(h)


@torch.no_grad()
def evaluate(encode_decode, x: torch.Tensor, n_latents: int) -> dict:
    """Figures over the layer-normed tokens ``x``; ``encode_decode(x) -> (x_hat, vals, idx)``."""
    fired = torch.zeros(n_latents, dtype=torch.bool)
    sq_err = ratio_sum = l0 = 0.0
    for chunk in x.split(CHUNK_TOKENS):
        x_hat, vals, idx = encode_decode(chunk)
        err = (x_hat - chunk).pow(2).sum(-1)
        sq_err += float(err.sum())
        ratio_sum += float((err / chunk.pow(2).sum(-1)).sum())
        active = vals > 0
        l0 += float(active.sum())
        fired[idx[active]] = True
    total_variance = float((x - x.mean(0)).pow(2).sum())
    return {
        "fvu": ratio_sum / len(x),
        "fvu_var": sq_err / total_variance,
        "l0": l0 / len(x),
        "dead_fraction": 1 - float(fired.float().mean()),
    }


def train_ours(chunks: list[torch.Tensor], d_in: int, cfg: SaeTrainConfig, n_tokens: int):
    start = time.perf_counter()
    sae, stats = train_sae(lambda: chunks, d_in, cfg, n_tokens=n_tokens)
    seconds = time.perf_counter() - start

    def encode_decode(x):  # x is already layer-normed; normalising again changes it by ~1e-6
        out = sae(x)
        return out.x_hat, out.top_vals, out.top_idx

    return encode_decode, seconds, stats.tokens_seen


def train_sparsify(chunks: list[torch.Tensor], d_in: int, cfg: SaeTrainConfig, n_tokens: int):
    from sparsify import SparseCoder, SparseCoderConfig

    n_latents = cfg.n_latents or cfg.expansion * d_in
    total_steps = math.ceil(n_tokens / cfg.batch_size) * cfg.epochs
    warmup_steps = max(1, round(cfg.warmup_fraction * total_steps))
    peak_lr = cfg.lr or default_lr(n_latents)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=cfg.k), dtype=torch.float32)
    adam = torch.optim.Adam(coder.parameters(), lr=peak_lr)
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    step = tokens = 0
    for _ in range(cfg.epochs):
        for batch in torch.cat(chunks).split(cfg.batch_size):
            x = layer_norm(batch)
            if step == 0:
                coder.b_dec.data = x.mean(0)
            coder.set_decoder_norm_to_unit_norm()
            for group in adam.param_groups:
                group["lr"] = _lr_at(step, total_steps, peak_lr, warmup_steps)
            dead_mask = since_fired >= cfg.dead_tokens if cfg.auxk_alpha > 0 else None
            out = coder(x, dead_mask=dead_mask)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            adam.step()
            adam.zero_grad(set_to_none=True)
            since_fired += len(x)
            since_fired[out.latent_indices.flatten()] = 0
            step += 1
            tokens += len(x)
    seconds = time.perf_counter() - start

    def encode_decode(x):
        out = coder(x)
        return out.sae_out, out.latent_acts, out.latent_indices

    return encode_decode, seconds, tokens


def profile_ours(chunks: list[torch.Tensor], d_in: int, cfg: SaeTrainConfig, n_tokens: int, top: int) -> None:
    """Where one training of ours spends its time: torch.profiler's operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    train_sae(lambda: chunks[:1], d_in, cfg, n_tokens=len(chunks[0]))  # one-off set-up costs
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_sae(lambda: chunks, d_in, cfg, n_tokens=n_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None) -> None:
    defaults = SaeTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--acts", help='safetensors file with a tensor "acts" [N, d_in]; default: synthetic data')
    parser.add_argument("--synthetic-tokens", type=int, default=100_000)
    parser.add_argument("--synthetic-d-in", type=int, default=384)
    parser.add_argument("--n-latents", type=int, default=None, help="default: expansion * d_in")
    parser.add_argument("--expansion", type=int, default=defaults.expansion)
    parser.add_argument("--k", type=int, default=defaults.k)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(n_latents / 2**14)")
    parser.add_argument("--auxk-alpha", type=float, default=defaults.auxk_alpha)
    parser.add_argument("--dead-tokens", type=int, default=defaults.dead_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("ours", "sparsify"), help="train just one of the two")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each trainer (median reported)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead: profile one training of ours (torch.profiler) and print the top N ops")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.acts:
        h, source = load_acts(args.acts), os.path.basename(args.acts)
    else:
        h = synthetic_activations(args.synthetic_tokens, args.synthetic_d_in, 8 * args.synthetic_d_in, 16, args.seed)
        source = f"synthetic ({args.synthetic_tokens} tokens, 16 of {8 * args.synthetic_d_in} atoms each)"
    d_in = h.shape[1]
    h = h[torch.randperm(len(h), generator=torch.Generator().manual_seed(args.seed))]
    chunks = list(h.split(CHUNK_TOKENS))
    cfg = SaeTrainConfig(
        expansion=args.expansion,
        n_latents=args.n_latents,
        k=args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        auxk_alpha=args.auxk_alpha,
        dead_tokens=args.dead_tokens,
        seed=args.seed,
    )
    n_latents = cfg.n_latents or cfg.expansion * d_in
    x = layer_norm(h)

    warm_up = SaeTrainConfig(n_latents=n_latents, k=cfg.k, batch_size=cfg.batch_size, seed=cfg.seed)
    trainers = {"safer-audit TopKSAE": train_ours, "sparsify SparseCoder": train_sparsify}
    if args.only:
        trainers = {n: t for n, t in trainers.items() if n.startswith({"ours": "safer", "sparsify": "sparsify"}[args.only])}
    if args.profile:
        profile_ours(chunks, d_in, cfg, len(h), args.profile)
        return
    for train in trainers.values():
        train(chunks[:1], d_in, warm_up, len(chunks[0]))  # first calls pay one-off set-up costs
    load_before = os.getloadavg()[0]
    # interleaved (ours, sparsify, ours, ...) so that a busy machine slows both alike
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    last = {}
    for _ in range(args.repeats):
        for name, train in trainers.items():
            encode_decode, secs, tokens = train(chunks, d_in, cfg, len(h))
            seconds[name].append(secs)
            last[name] = (encode_decode, tokens)
    load_after = os.getloadavg()[0]
    # training is deterministic: the last run's model stands for every run
    rows = [(name, seconds[name], last[name][1], evaluate(last[name][0], x, n_latents)) for name in trainers]

    steps = math.ceil(len(h) / cfg.batch_size) * cfg.epochs
    print(f"data: {source}, {len(h)} tokens x {d_in}; n_latents={n_latents}, k={cfg.k}, batch={cfg.batch_size}, "
          f"epochs={cfg.epochs} ({steps} steps), lr={cfg.lr or default_lr(n_latents):.3g}, auxk_alpha={cfg.auxk_alpha:.4g}, "
          f"dead_tokens={cfg.dead_tokens}, threads={args.threads}, torch {torch.__version__}; "
          f"{args.repeats} interleaved runs each, 1-min load average {load_before:.1f} before, {load_after:.1f} after\n")
    print("| trainer | median seconds | runs (s) | tokens/s | FVU (ours) | FVU (sparsify) | L0 | dead fraction |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, secs, tokens, fig in rows:
        med = statistics.median(secs)
        print(f"| {name} | {med:.1f} | {', '.join(f'{s:.1f}' for s in secs)} | {tokens / med:,.0f} | {fig['fvu']:.4f} "
              f"| {fig['fvu_var']:.4f} | {fig['l0']:.1f} | {fig['dead_fraction']:.4f} |")
    if len(rows) == 2:
        ours, theirs = (statistics.median(r[1]) for r in rows)
        print(f"\nratio ours / sparsify (medians): {ours / theirs:.2f}")
    print(f"\ncommand: python {shlex.join(['benchmarks/bench_sae.py', *(argv if argv is not None else sys.argv[1:])])}")


if __name__ == "__main__":
    main()
