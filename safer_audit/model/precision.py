"""Which dtype a forward pass computes in when the user leaves ``--dtype auto``.

On a GPU: bfloat16. On a CPU: bfloat16 autocast (float32 weights, bfloat16 matrix products) where the CPU
has native bfloat16 instructions (AVX512-BF16 or AMX, from /proc/cpuinfo's flags) and a short probe, a
model-sized linear layer timed both ways, finds it clearly faster; float32 everywhere else, where bfloat16
would be emulated and slower. The probe's answer is remembered per machine (CPU model and flags, torch
version, threads) in the cache directory, so every run on one machine computes in the same dtype and gets
the same numbers; the activation cache is keyed by that dtype (activations.config_key).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

from ..common.files import read_bounded, write_atomic

CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
PROBE_FORMAT = 1
PROBE_TOKENS = 256  # the probe is one MLP projection of the model's width: [tokens, width] x [width, 4 width]
MIN_BF16_WIDTH = 256  # a narrower model computes in float32: its products are too small to gain
PROBE_REPEATS = 5
MIN_SPEEDUP = 1.15  # bfloat16 must beat float32 by this much: a near-tie is not worth the rounding
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> tuple[str, frozenset[str]]:
    """(the CPU's model name, its feature flags) from /proc/cpuinfo; ("", {}) where there is none."""
    try:
        text = read_bounded(cpuinfo, 1 << 22, OSError).decode("utf-8", "replace")
    except OSError:
        return "", frozenset()
    name, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        if name and flags:
            break
    return name, flags


def has_native_bf16(flags: frozenset[str]) -> bool:
    return bool(flags & CPU_BF16_FLAGS)


def probe_speedup(width: int, repeats: int = PROBE_REPEATS) -> dict:
    """Seconds of one linear layer of ``width`` in float32 and under bfloat16 autocast, the best of
    ``repeats`` interleaved runs each (a busy machine slows both alike), and their ratio."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tokens, d_in, d_out = PROBE_TOKENS, width, 4 * width
    weight = torch.randn(d_out, d_in, generator=generator) / d_in ** 0.5
    x = torch.randn(tokens, d_in, generator=generator)

    def seconds(bf16: bool) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            return time.perf_counter() - start

    seconds(False), seconds(True)  # warm-up: the first call of each pays for kernel selection
    best = {"float32": float("inf"), "bfloat16": float("inf")}
    for _ in range(repeats):
        best["float32"] = min(best["float32"], seconds(False))
        best["bfloat16"] = min(best["bfloat16"], seconds(True))
    return {**best, "speedup": best["float32"] / best["bfloat16"]}


def machine_key(name: str, flags: frozenset[str], width: int) -> str:
    import torch

    parts = [PROBE_FORMAT, name, sorted(flags), platform.machine(), torch.__version__, torch.get_num_threads(), width]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def cpu_auto_dtype(cache_dir: Path | None, *, width: int, cpuinfo: Path = CPUINFO, probe=probe_speedup) -> str:
    """``"bfloat16"`` or ``"float32"``: what ``--dtype auto`` computes in on this CPU for a model of ``width``
    (see the module's text); the probe's answer is kept under ``cache_dir``."""
    name, flags = cpu_flags(cpuinfo)
    if width < MIN_BF16_WIDTH or not has_native_bf16(flags):
        return "float32"
    memo = None if cache_dir is None else Path(cache_dir) / "precision" / f"{machine_key(name, flags, width)}.json"
    if memo is not None:
        try:
            known = json.loads(read_bounded(memo, 4096, ValueError))
            if isinstance(known, dict) and known.get("dtype") in ("bfloat16", "float32"):
                return known["dtype"]
        except ValueError:
            pass  # none yet, unreadable or not ours: probe again and rewrite it
    measured = probe(width)
    dtype = "bfloat16" if measured["speedup"] >= MIN_SPEEDUP else "float32"
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps({"dtype": dtype, "cpu": name, **{k: round(v, 6) for k, v in measured.items()}},
                                      sort_keys=True) + "\n")
    return dtype
