"""Activations: positions, left truncation, the layer read, the content-addressed cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import polars as pl
import pytest
import torch

from safer_audit.backends.hf import HFModelBackend, ModelLoadError
from safer_audit.common.files import temporary_name
from safer_audit.config import ActivationConfig
from safer_audit.model import activations
from safer_audit.model.activations import ActivationCache, extract_activations, read_positions, resolve_layer
from safer_audit.model.texts import pair_texts


def conversation(context_turns: int, final: str) -> list[dict]:
    messages = []
    for i in range(context_turns):
        messages.append({"role": "user", "content": f"Question number {i} about locks and keys?"})
        messages.append({"role": "assistant", "content": f"Answer number {i}, with some detail."})
    messages.append({"role": "user", "content": "And the last question?"})
    messages.append({"role": "assistant", "content": final})
    return messages


def make_pairs(n: int, start: int = 0) -> pl.DataFrame:
    chosen = [conversation(i % 3, f"I can't help with that, sorry {i}.") for i in range(start, start + n)]
    rejected = [conversation(i % 3, f"Sure! Here is how to do it {i}; step one.") for i in range(start, start + n)]
    return pl.DataFrame({"chosen_messages": chosen, "rejected_messages": rejected})


class CountingBackend:
    """Wraps a backend and counts the texts that go through a forward pass."""

    def __init__(self, backend):
        self._backend = backend
        self.forward_texts = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def forward(self, input_ids, attention_mask, **kwargs):
        self.forward_texts += input_ids.shape[0]
        return self._backend.forward(input_ids, attention_mask, **kwargs)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return HFModelBackend(str(tiny_llama_dir), device="cpu")


@pytest.fixture
def config(tmp_path):
    return ActivationConfig(model="tiny", layer=1, positions="response", max_length=64, batch_size=4,
                            cache_dir=tmp_path / "cache")


def test_layer_read_matches_full_forward_hidden_states(llama):
    ids, mask = llama.pad_batch([[5, 6, 7, 8], [9, 10]])
    hidden, score = llama.forward(ids, mask, layer=1, want_score=True)
    with torch.inference_mode():
        full = llama.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(hidden, full.hidden_states[1])
    torch.testing.assert_close(score, full.logits[:, 0])
    stopped, no_score = llama.forward(ids, mask, layer=1, want_score=False)
    assert no_score is None
    torch.testing.assert_close(stopped, hidden)


def test_left_truncation_keeps_the_final_turn(llama):
    final = "The final answer stays whole."
    text, start, special = llama.render(conversation(30, final))
    ids, offsets, specials = llama.tokenize([text], max_length=32, has_special_tokens=special)
    assert len(ids[0]) == 32
    kept = read_positions(text, offsets[0], specials[0], start, "response")
    decoded = llama.tokenizer.decode([ids[0][i] for i in kept])
    assert decoded.strip() == final
    assert "Question number 0 " not in llama.tokenizer.decode(ids[0])


def test_response_positions_are_exactly_the_final_turn(llama):
    messages = conversation(2, "Short reply. With two sentences!")
    text, start, special = llama.render(messages)
    ids, offsets, specials = llama.tokenize([text], max_length=512, has_special_tokens=special)
    kept = read_positions(text, offsets[0], specials[0], start, "response")
    expected = [i for i, (s, e) in enumerate(offsets[0]) if e > start and not specials[0][i] and e > s]
    assert kept == expected
    assert kept == list(range(kept[0], len(ids[0])))  # contiguous, to the end
    assert text[offsets[0][kept[0]][0]:].strip() == "Short reply. With two sentences!"
    assert offsets[0][kept[0] - 1][1] <= start  # the token before belongs to the context


def test_punctuation_positions_end_runs_and_keep_a_gap():
    text = "a b c. d e f g h i j?! k l\nm n o"
    # one token per non-space character run
    spans, i = [], 0
    for piece in text.replace("\n", " ").split(" "):
        j = text.index(piece, i)
        # split trailing punctuation into its own tokens
        core = piece.rstrip(".,?!;")
        if core:
            spans.append((j, j + len(core)))
        for k in range(len(core), len(piece)):
            spans.append((j + k, j + k + 1))
        i = j + len(piece)
    special = [0] * len(spans)
    kept = read_positions(text, spans, special, 0, "punctuation")
    kept_text = [text[spans[k][0]:spans[k][1]] for k in kept]
    # "." ends a run; "?!" is one run ending at "!"; "l" ends a line but is < 5 tokens after "!"
    assert kept_text == [".", "!"]
    assert read_positions(text, spans, special, 0, "all") == list(range(len(spans)))


def test_cache_returns_identical_tensors_and_skips_forward(llama, config):
    backend = CountingBackend(llama)
    texts = pair_texts(make_pairs(10), backend)
    first = extract_activations(texts, backend, config)
    assert backend.forward_texts == 20 and first.n_forward_texts == 20
    before = [first.text(i) for i in range(20)]
    second = extract_activations(texts, backend, config)
    assert backend.forward_texts == 20 and second.n_forward_texts == 0
    for i in range(20):
        after = second.text(i)
        assert torch.equal(after.acts, before[i].acts)
        assert torch.equal(after.token_ids, before[i].token_ids)
    assert torch.equal(first.pooled_mean(), second.pooled_mean())
    assert torch.isfinite(second.scores()).all()  # the tiny Llama has a reward head


def test_new_pairs_compute_only_what_is_new(llama, config):
    backend = CountingBackend(llama)
    extract_activations(pair_texts(make_pairs(10), backend), backend, config)
    grown = pl.concat([make_pairs(10), make_pairs(1, start=100)])
    store = extract_activations(pair_texts(grown, backend), backend, config)
    assert store.n_forward_texts == 2 and backend.forward_texts == 22
    assert store.n_texts == 22


def test_corrupt_shard_is_detected_and_recomputed(llama, config):
    backend = CountingBackend(llama)
    texts = pair_texts(make_pairs(6), backend)
    reference = extract_activations(texts, backend, config).pooled_mean()
    shard = next(config.cache_dir.rglob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the tensor bytes, header intact
    shard.write_bytes(bytes(data))
    again = extract_activations(texts, backend, config)
    assert again.n_forward_texts == 12
    torch.testing.assert_close(again.pooled_mean(), reference)


def test_truncated_shard_is_recomputed(llama, config):
    backend = CountingBackend(llama)
    texts = pair_texts(make_pairs(3), backend)
    extract_activations(texts, backend, config)
    shard = next(config.cache_dir.rglob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # disk full / killed mid-write
    assert extract_activations(texts, backend, config).n_forward_texts == 6


def test_interrupted_extraction_resumes(llama, config, monkeypatch):
    monkeypatch.setattr(activations, "SHARD_TEXTS", 4)
    texts = pair_texts(make_pairs(8), llama)

    class Killed(Exception):
        pass

    class Dying(CountingBackend):
        def forward(self, *args, **kwargs):
            if self.forward_texts >= 8:
                raise Killed
            return super().forward(*args, **kwargs)

    with pytest.raises(Killed):
        extract_activations(texts, Dying(llama), config)
    backend = CountingBackend(llama)
    store = extract_activations(texts, backend, config)
    assert store.n_forward_texts == 16 - 8  # the two shards written before the kill are kept
    assert store.n_texts == 16


def test_encoder_path_bert(tiny_bert_dir, tmp_path):
    bert = HFModelBackend(str(tiny_bert_dir), device="cpu")
    assert not bert.has_reward_head and bert.n_layers == 2
    cfg = ActivationConfig(model="bert", layer=-1, positions="all", max_length=48, cache_dir=tmp_path)
    store = extract_activations(pair_texts(make_pairs(3), bert), bert, cfg)
    assert store.pooled_mean().shape == (6, 32)
    assert torch.isnan(store.scores()).all()
    first = store.text(0)
    assert bert.tokenizer.cls_token_id not in first.token_ids.tolist()  # specials are not read


def test_different_settings_use_different_cache_entries(llama, config):
    texts = pair_texts(make_pairs(2), llama)
    extract_activations(texts, llama, config)
    config.positions = "all"
    assert extract_activations(texts, llama, config).n_forward_texts == 4
    assert len(list(config.cache_dir.glob("activations/*"))) == 2


def test_resolve_layer():
    assert resolve_layer(-1, 6) == 6 and resolve_layer(3, 6) == 3 and resolve_layer(-6, 6) == 1
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(7, 6)
    with pytest.raises(ValueError):
        resolve_layer(0, 6)


def test_missing_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        HFModelBackend("someone/no-such-model")
    with pytest.raises(ModelLoadError, match="no such model directory"):
        HFModelBackend(str(tmp_path / "absent"))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors"):
        HFModelBackend(str(tmp_path))


def test_cache_ignores_debris_of_a_killed_write(tmp_path):
    cache = ActivationCache(tmp_path, "k")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = cache.directory / temporary_name("shard-abc.safetensors").replace(f".{os.getpid()}@", f".{dead.pid}@")
    debris.write_bytes(b"partial")
    old = cache.directory / ".shard-abc.safetensors.0123456789ab.tmp"  # no owner in the name: judged by age
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    ActivationCache(tmp_path, "k")
    assert not debris.exists() and not old.exists()


def test_a_shard_is_hashed_once_per_cache_object(llama, config, monkeypatch):
    store = extract_activations(pair_texts(make_pairs(4), llama), llama, config)
    calls = []
    real = activations.content_digest
    monkeypatch.setattr(activations, "content_digest", lambda *args: calls.append(1) or real(*args))
    reopened = extract_activations(pair_texts(make_pairs(4), llama), llama, config)  # verify: hashes
    first = len(calls)
    assert first == len(list(config.cache_dir.rglob("shard-*.safetensors")))
    reopened.pooled_mean()
    reopened.pooled_mean()
    assert len(calls) == first
    torch.testing.assert_close(reopened.pooled_mean(), store.pooled_mean())


def test_a_shard_cut_short_after_its_header_is_recomputed(llama, config):
    """The header (and its keys) reads, the tensors do not: safetensors raises its own SafetensorError,
    which is not a ValueError; the shard is corrupt, so its texts are computed again, no traceback."""
    backend = CountingBackend(llama)
    texts = pair_texts(make_pairs(3), backend)
    reference = extract_activations(texts, backend, config).pooled_mean()
    shard = next(config.cache_dir.rglob("shard-*.safetensors"))
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    shard.write_bytes(data[:header_end + 16])  # the header whole, the tensors cut short
    again = extract_activations(texts, backend, config)
    assert again.n_forward_texts == 6
    torch.testing.assert_close(again.pooled_mean(), reference)
