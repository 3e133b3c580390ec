"""The dtype a forward pass computes in: bfloat16 on a CPU is autocast around float32 weights (opt-in,
``--dtype bfloat16``; auto stays float32 there), and activations computed in another dtype are cached under
another key."""

from __future__ import annotations

import torch

from safer_audit.backends.hf import HFModelBackend
from safer_audit.config import ActivationConfig
from safer_audit.model.activations import config_key, open_cache


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
    assert HFModelBackend(str(tiny_llama_dir), device="cpu").compute_dtype == "float32"  # auto on a CPU


def test_bfloat16_linears_on_a_cpu_give_autocasts_numbers_to_the_bit(tiny_llama_dir):
    """The weights autocast would cast at every call are cast once when the model loads: the same numbers."""
    autocast = HFModelBackend(str(tiny_llama_dir), device="cpu", dtype="float32")
    bf16 = HFModelBackend(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
    linears = [m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    ids, mask = bf16.pad_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9]])
    hidden, _ = bf16.forward(ids, mask, layer=2, want_score=False)
    _ = autocast.model  # loaded in float32, then computed under autocast, which casts the weights at each call
    autocast.dtype, autocast._autocast = torch.bfloat16, True
    reference, _ = autocast.forward(ids, mask, layer=2, want_score=False)
    assert torch.equal(hidden, reference)
    assert autocast.model.dtype == torch.float32 and all(  # the float32 model another backend shares is untouched
        m.weight.dtype == torch.float32 for m in autocast.model.modules() if isinstance(m, torch.nn.Linear))


def test_no_key_value_cache_is_filled(tiny_llama_dir):
    backend = HFModelBackend(str(tiny_llama_dir), device="cpu")
    assert backend.model.config.use_cache is False
