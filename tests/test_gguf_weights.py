"""A GGUF model's dequantised weights, kept in the cache (HFModelBackend.weights_entry)."""

from __future__ import annotations

import pytest
import torch

from safer_audit.backends import hf
from safer_audit.workflows.cache_admin import cache_clear, cache_summary

from .test_profiles import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_llama_dir / "tokenizer.json")


def hidden_of(backend):
    text, _start, special = backend.render([{"role": "user", "content": "hi there"},
                                            {"role": "assistant", "content": "I can't help with that"}])
    ids, _offsets, _special = backend.tokenize([text], max_length=64, has_special_tokens=special)
    return backend.forward(*backend.pad_batch(ids), layer=2, want_score=False)[0]


def fresh(tiny_gguf, cache_dir):
    """A backend whose weights come from the cache entry or the GGUF file, not from this process's memory."""
    hf._load_weights.cache_clear()
    return hf.HFModelBackend(str(tiny_gguf), device="cpu", cache_dir=cache_dir)


def test_the_dequantised_weights_are_cached_and_read_back_the_same(tiny_gguf, tmp_path, monkeypatch):
    first = fresh(tiny_gguf, tmp_path)
    expected = hidden_of(first)
    entry = first.weights_entry
    assert entry is not None and entry.is_file() and entry.parent == tmp_path / "models"
    dequantised = []
    monkeypatch.setattr(hf, "load_weights", lambda *a, **k: dequantised.append(1) or pytest.fail("dequantised"))
    second = fresh(tiny_gguf, tmp_path)
    assert torch.equal(hidden_of(second), expected)  # the same weights, bit for bit
    assert not dequantised
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor)
    assert any(kind["kind"] == "models" and kind["bytes"] > 0 for kind in cache_summary(tmp_path)["kinds"])
    cache_clear(tmp_path)
    assert not entry.exists()


def test_a_damaged_entry_is_not_used_but_dequantised_again(tiny_gguf, tmp_path, monkeypatch):
    expected = hidden_of(fresh(tiny_gguf, tmp_path))
    backend = fresh(tiny_gguf, tmp_path)
    entry = backend.weights_entry
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0x40  # a flipped bit in the last tensor
    entry.write_bytes(bytes(data))
    dequantised = []
    real = hf.load_weights
    monkeypatch.setattr(hf, "load_weights", lambda *a, **k: dequantised.append(1) or real(*a, **k))
    assert torch.equal(hidden_of(backend), expected)
    assert dequantised == [1] and entry.is_file() and entry.read_bytes() != bytes(data)  # rewritten whole


def test_no_cache_directory_no_entry_and_safetensors_models_have_none(tiny_gguf, tiny_llama_dir, tmp_path):
    assert hf.HFModelBackend(str(tiny_gguf), device="cpu").weights_entry is None
    assert hf.HFModelBackend(str(tiny_llama_dir), device="cpu", cache_dir=tmp_path).weights_entry is None


def test_the_file_is_parsed_once_for_config_tokenizer_and_weights(tiny_gguf, monkeypatch):
    import gguf

    real = gguf.GGUFReader
    parsed = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: parsed.append(path) or real(path, *a, **k))
    backend = fresh(tiny_gguf, None)
    once = hidden_of(backend)
    assert len(parsed) == 1  # transformers alone parses it four times
    assert gguf.GGUFReader is not real  # the real one is back in place: the memo lasts only while loading
    monkeypatch.undo()
    assert torch.equal(hidden_of(fresh(tiny_gguf, None)), once)  # the same weights as parsed each time


def test_while_loading_the_file_is_read_as_a_plain_array_with_the_same_fields_and_tensors(tiny_gguf):
    import gguf
    import numpy as np

    real = gguf.GGUFReader(tiny_gguf)
    with hf._gguf_parsed_once({}):
        plain = gguf.GGUFReader(tiny_gguf)
    assert type(real.data) is np.memmap and type(plain.data) is np.ndarray  # slices of a memmap are memmaps: slow
    assert list(plain.fields) == list(real.fields)
    for name, field in real.fields.items():
        assert [part.tobytes() for part in plain.fields[name].parts] == [part.tobytes() for part in field.parts]
        assert list(plain.fields[name].data) == list(field.data)
    assert [(t.name, t.data.tobytes()) for t in plain.tensors] == [(t.name, t.data.tobytes()) for t in real.tensors]


def test_the_parsed_file_is_not_kept_when_the_cache_holds_the_weights(tiny_gguf, tmp_path):
    first = fresh(tiny_gguf, tmp_path)
    assert first._gguf_readers  # kept for the weights, which are not cached yet
    _ = first.model
    assert first._gguf_readers is None  # dropped once they are loaded
    assert fresh(tiny_gguf, tmp_path)._gguf_readers is None  # a warm scan may never load them


def test_under_bfloat16_the_cached_weights_give_the_files_numbers_and_the_shared_model_stays_float32(tiny_gguf,
                                                                                                     tmp_path):
    hf._load_weights.cache_clear()
    from_file = hf.HFModelBackend(str(tiny_gguf), device="cpu", cache_dir=tmp_path, dtype="bfloat16")
    expected = hidden_of(from_file)  # dequantised from the file; the entry written
    shared = hf.load_weights(from_file._auto, from_file.directory, from_file.device, **from_file._load)
    assert all(m.weight.dtype == torch.float32 for m in shared.modules() if isinstance(m, torch.nn.Linear))
    from_entry = hf.HFModelBackend(str(tiny_gguf), device="cpu", cache_dir=tmp_path, dtype="bfloat16")
    assert torch.equal(hidden_of(from_entry), expected)  # read back and cast in place: the same numbers
    linears = [m for m in from_entry.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)


def test_the_cycle_collector_waits_while_loading_and_is_left_as_it_was():
    import gc

    assert gc.isenabled()
    with hf._gguf_parsed_once({}):
        assert not gc.isenabled()  # ~100k objects of the vocabulary, no garbage: full passes cost ~1 s for nothing
    assert gc.isenabled()
    gc.disable()
    try:
        with hf._gguf_parsed_once({}):
            pass
        assert not gc.isenabled()  # a caller's own choice stands
    finally:
        gc.enable()
