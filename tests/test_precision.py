"""--dtype auto on a CPU: bfloat16 only where the CPU has it natively and a probe finds it faster, decided once
per machine; activations computed in another dtype are cached under another key."""

from __future__ import annotations

import pytest
import torch

from safer_audit.backends.hf import HFModelBackend
from safer_audit.config import ActivationConfig
from safer_audit.model.activations import config_key, open_cache
from safer_audit.model.precision import MIN_BF16_WIDTH, cpu_auto_dtype, cpu_flags

WIDE = 4 * MIN_BF16_WIDTH


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
                    f"processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n", encoding="utf-8")
    return path


class Probe:
    def __init__(self, speedup: float):
        self.speedup, self.calls = speedup, 0

    def __call__(self, width: int) -> dict:
        self.calls += 1
        return {"float32": 1.0, "bfloat16": 1.0 / self.speedup, "speedup": self.speedup}


def test_the_flags_are_read_from_cpuinfo(tmp_path):
    name, flags = cpu_flags(cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert name == "Test CPU" and {"avx512_bf16", "avx2"} <= flags
    assert cpu_flags(tmp_path / "missing") == ("", frozenset())


@pytest.mark.parametrize("flags", ["avx512f", "avx512f avx512_vnni"])
def test_a_cpu_without_native_bf16_computes_in_float32_without_probing(tmp_path, flags):
    probe = Probe(3.0)
    assert cpu_auto_dtype(tmp_path / "cache", width=WIDE, cpuinfo=cpuinfo(tmp_path, flags), probe=probe) == "float32"
    assert probe.calls == 0


@pytest.mark.parametrize("flags", ["avx512_bf16", "amx_bf16 amx_tile"])
def test_native_bf16_is_used_when_the_probe_finds_it_faster_and_the_answer_is_kept(tmp_path, flags):
    info, probe = cpuinfo(tmp_path, flags), Probe(1.6)
    assert cpu_auto_dtype(tmp_path / "cache", width=WIDE, cpuinfo=info, probe=probe) == "bfloat16"
    # the next run (another process, a busier moment) reads the answer instead of probing again
    slower = Probe(0.5)
    assert cpu_auto_dtype(tmp_path / "cache", width=WIDE, cpuinfo=info, probe=slower) == "bfloat16"
    assert probe.calls == 1 and slower.calls == 0
    assert len(list((tmp_path / "cache" / "precision").glob("*.json"))) == 1


def test_a_near_tie_or_a_narrow_model_stays_float32(tmp_path):
    info = cpuinfo(tmp_path, "amx_bf16")
    assert cpu_auto_dtype(tmp_path / "a", width=WIDE, cpuinfo=info, probe=Probe(1.05)) == "float32"
    narrow = Probe(3.0)
    assert cpu_auto_dtype(tmp_path / "b", width=MIN_BF16_WIDTH - 1, cpuinfo=info, probe=narrow) == "float32"
    assert narrow.calls == 0


def test_a_damaged_answer_is_probed_again(tmp_path):
    info = cpuinfo(tmp_path, "amx_bf16")
    cpu_auto_dtype(tmp_path / "cache", width=WIDE, cpuinfo=info, probe=Probe(2.0))
    (memo,) = (tmp_path / "cache" / "precision").glob("*.json")
    memo.write_text('{"dtype": "int4"}', encoding="utf-8")
    probe = Probe(0.8)
    assert cpu_auto_dtype(tmp_path / "cache", width=WIDE, cpuinfo=info, probe=probe) == "float32"
    assert probe.calls == 1


def test_the_cache_key_holds_the_dtype_computed_in():
    parts = ("model", "abc", 3, "response", 512)
    assert config_key(*parts) == config_key(*parts, compute_dtype="float32")  # float32 caches keep their key
    assert config_key(*parts, compute_dtype="bfloat16") != config_key(*parts)
    assert config_key(*parts, compute_dtype="bfloat16") != config_key(*parts, "bfloat16")  # not the storage dtype


def test_bfloat16_on_a_cpu_is_autocast_around_float32_weights(tiny_llama_dir, tmp_path):
    config = ActivationConfig(model=str(tiny_llama_dir), cache_dir=tmp_path)
    f32 = HFModelBackend(str(tiny_llama_dir), device="cpu", dtype="float32")
    bf16 = HFModelBackend(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
    assert (f32.compute_dtype, bf16.compute_dtype) == ("float32", "bfloat16")
    assert bf16.model.dtype == torch.float32  # the weights
    ids, mask = bf16.pad_batch([[1, 2, 3, 4, 5, 6]])
    hidden, _ = bf16.forward(ids, mask, layer=1, want_score=False)
    reference, _ = f32.forward(ids, mask, layer=1, want_score=False)
    assert hidden.dtype == torch.float32 and not torch.equal(hidden, reference)  # computed in bfloat16
    assert torch.allclose(hidden, reference, atol=0.1, rtol=0.05)
    assert open_cache(bf16, config, 1).directory != open_cache(f32, config, 1).directory
    # the tiny model is narrower than any probe: auto is float32 wherever it runs
    assert HFModelBackend(str(tiny_llama_dir), device="cpu").compute_dtype == "float32"
