"""Training and evaluating a TopK SAE (docs/method.md section 2) on a stream of hidden states."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from ..config import SaeTrainConfig
from ..errors import ConfigError
from .config import SaeConfig
from .model import TopKSAE

SHUFFLE_BUFFER_TOKENS = 65_536
# TrainStats.fvu and .l0 average the last part of training, where the weights have settled.
STATS_WINDOW = 0.1


@dataclass
class TrainStats:
    """Training figures (docs/method.md section 2), stored in the SAE's metadata on save.

    ``fvu`` and ``l0`` are token-weighted means over the last tenth of training;
    ``dead_fraction`` counts latents silent over the last ``min(dead_tokens, tokens_seen)``
    training tokens.
    """

    fvu: float
    l0: float
    dead_fraction: float
    tokens_seen: int
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check_batch(batch: torch.Tensor, d_in: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or batch.shape[1] != d_in:
        shape = list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"activation batches must be tensors [tokens, {d_in}], got {shape}")
    return batch


def shuffled_batches(
    chunks: Iterable[torch.Tensor], batch_size: int, generator: torch.Generator, d_in: int
) -> Iterator[torch.Tensor]:
    """Re-batch chunks that come in dataset order, shuffled within a ~64k-token buffer.

    Yields ``ceil(total_tokens / batch_size)`` batches: all full but the last.
    """
    pending: list[torch.Tensor] = []
    n_pending = 0
    for chunk in chunks:
        chunk = _check_batch(chunk, d_in)
        if len(chunk) == 0:
            continue
        pending.append(chunk.float())
        n_pending += len(chunk)
        if n_pending >= max(SHUFFLE_BUFFER_TOKENS, batch_size):
            tokens = _permuted(torch.cat(pending), generator)
            n_full = len(tokens) // batch_size * batch_size
            yield from tokens[:n_full].split(batch_size)
            pending, n_pending = [tokens[n_full:]], len(tokens) - n_full
    if n_pending:
        yield from _permuted(torch.cat(pending), generator).split(batch_size)


def _permuted(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return tokens[torch.randperm(len(tokens), generator=generator).to(tokens.device)]


def _lr_at(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak``, then linear decay to 0 at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return peak * max(0.0, 1 - (step - warmup_steps) / remaining)


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel for the device (CPU since torch 2.4).

    The fused step measured ~10x faster than the default foreach one on the SAE's
    2 x 1.2M weights (2 CPU threads); same update up to float rounding.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def default_lr(n_latents: int) -> float:
    """Gao et al.'s scaling rule: 2e-4 at 16,384 latents, times sqrt(16384 / n_latents)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def train_sae(
    make_batches: Callable[[], Iterable[torch.Tensor]],
    d_in: int,
    cfg: SaeTrainConfig,
    *,
    n_tokens: int | None = None,
    metadata: dict | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> tuple[TopKSAE, TrainStats]:
    """Train a TopK SAE on raw hidden states; ``make_batches()`` streams one epoch per call.

    Without ``n_tokens`` one extra pass counts the tokens, to size the LR schedule.
    ``progress(step, total_steps, {"loss", "fvu", "auxk", "dead_fraction", "lr"})`` is
    called after every step. Deterministic for the same inputs, config and seed on CPU.

    b_pre starts at the mean of the first (shuffled) batch rather than the paper's 0: on
    MiniLM layer-3 response activations of HH-RLHF harmless (203k tokens, defaults) that
    measured FVU 0.281 against 0.295, and 0.0% dead latents against 0.1%.
    """
    start = time.perf_counter()
    if cfg.batch_size <= 0 or cfg.epochs <= 0:
        raise ConfigError(f"batch_size and epochs must be positive, not {cfg.batch_size} and {cfg.epochs}")
    if n_tokens is None:
        n_tokens = sum(len(_check_batch(b, d_in)) for b in make_batches())
    if n_tokens <= 0:
        raise ConfigError("no activations to train the SAE on")
    n_latents = cfg.n_latents or cfg.expansion * d_in
    steps_per_epoch = math.ceil(n_tokens / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, round(cfg.warmup_fraction * total_steps))
    peak_lr = cfg.lr or default_lr(n_latents)
    window_start = total_steps - max(1, round(STATS_WINDOW * total_steps))

    generator = torch.Generator().manual_seed(cfg.seed)
    sae_cfg = SaeConfig(d_in=d_in, n_latents=n_latents, k=cfg.k, metadata=dict(metadata or {}))
    sae = TopKSAE(sae_cfg, generator=generator)
    optimizer: torch.optim.Optimizer | None = None
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    tokens_seen = step = 0
    window = {"tokens": 0, "fvu": 0.0, "l0": 0.0}

    for _ in range(cfg.epochs):
        for h in shuffled_batches(make_batches(), cfg.batch_size, generator, d_in):
            if optimizer is None:  # the first batch tells the device and sets b_pre
                sae.to(h.device)
                with torch.no_grad():
                    sae.b_pre.copy_(sae.normalize(h).mean(0))
                since_fired = since_fired.to(h.device)
                optimizer = _adam(sae.parameters(), peak_lr)
            lr = _lr_at(step, total_steps, peak_lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            dead_mask = since_fired >= cfg.dead_tokens if cfg.auxk_alpha > 0 else None
            out = sae(h, dead_mask=dead_mask)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae._remove_gradient_parallel_to_decoder()
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()

            with torch.no_grad():
                fired = out.top_idx[out.top_vals > 0]
                since_fired += len(h)
                since_fired[fired] = 0
                if step >= window_start:
                    window["tokens"] += len(h)
                    window["fvu"] += out.fvu.item() * len(h)
                    window["l0"] += float((out.top_vals > 0).sum())
            tokens_seen += len(h)
            step += 1
            if progress is not None:
                dead = float((since_fired >= min(cfg.dead_tokens, tokens_seen)).float().mean())
                figures = {"loss": loss.item(), "fvu": out.fvu.item(), "auxk": out.auxk_loss.item()}
                progress(step, total_steps, {**figures, "dead_fraction": dead, "lr": lr})

    if step == 0:
        raise ConfigError("no activations to train the SAE on")
    denominator = max(window["tokens"], 1)
    stats = TrainStats(
        fvu=window["fvu"] / denominator,
        l0=window["l0"] / denominator,
        dead_fraction=float((since_fired >= min(cfg.dead_tokens, tokens_seen)).float().mean()),
        tokens_seen=tokens_seen,
        steps=step,
        seconds=time.perf_counter() - start,
    )
    sae.cfg.metadata["training"] = {"config": cfg.to_dict(), "lr": peak_lr, **stats.to_dict()}
    return sae, stats


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, batches: Iterable[torch.Tensor]) -> dict:
    """FVU and mean L0 over a stream of raw hidden states; dead = never fired in the stream."""
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=sae.W_enc.device)
    tokens = 0
    fvu_sum = l0_sum = 0.0
    for h in batches:
        h = _check_batch(h, sae.cfg.d_in).to(sae.W_enc.device)
        if len(h) == 0:
            continue
        out = sae(h)
        active = out.top_vals > 0
        fired[out.top_idx[active]] = True
        fvu_sum += float(out.fvu) * len(h)
        l0_sum += float(active.sum())
        tokens += len(h)
    if tokens == 0:
        raise ValueError("no activations to evaluate the SAE on")
    return {
        "fvu": fvu_sum / tokens,
        "l0": l0_sum / tokens,
        "dead_fraction": 1 - float(fired.float().mean()),
        "tokens": tokens,
    }
