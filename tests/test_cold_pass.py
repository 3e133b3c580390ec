"""A cold scan's bookkeeping, made cheaper: the same tensors and shards as before, with less work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from safer_audit.backends.hf import HFModelBackend
from safer_audit.config import ActivationConfig
from safer_audit.model import activations
from safer_audit.model.activations import extract_activations
from safer_audit.model.texts import pair_texts
from safer_audit.sae import SaeConfig, TopKSAE
from safer_audit.sae.codes import _unique_small, encode_chunk
from safer_audit.sae.stats import TOP_ACTIVATIONS, keep_strongest, latent_value_key, rank_within_latent
from tests.test_activations import make_pairs


def _four_sorts(entries: dict[str, torch.Tensor], n_latents: int) -> dict[str, torch.Tensor]:
    """keep_strongest as it was: one stable sort per key, (latent, value descending, text, position)."""
    order = torch.argsort(entries["position"], stable=True)
    for name, descending in (("text", False), ("value", True), ("latent", False)):
        order = order[torch.argsort(entries[name][order], descending=descending, stable=True)]
    grouped = {name: values[order] for name, values in entries.items()}
    keep = rank_within_latent(grouped["latent"], n_latents) < TOP_ACTIVATIONS
    return {name: values[keep] for name, values in grouped.items()}


@pytest.mark.parametrize("n", [0, 1, 7, 20_000])
def test_strongest_entries_are_those_of_four_single_key_sorts_in_two(n, monkeypatch):
    g = torch.Generator().manual_seed(n)
    # few distinct values, texts and positions: many ties, which must go to the earlier entry as before
    entries = {"latent": torch.randint(0, 40, (n,), generator=g),
               "value": torch.randint(-20, 60, (n,), generator=g).float() / 7,
               "text": torch.randint(0, 30, (n,), generator=g), "position": torch.randint(0, 9, (n,), generator=g),
               "token": torch.arange(n)}  # tells entries with equal keys apart
    entries["value"][::13] = -0.0
    entries["value"][1::17] = 0.0
    expected = _four_sorts(entries, 40)
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *args, **kwargs: sorts.append(1) or argsort(*args, **kwargs))
    got = keep_strongest(entries, 40)
    assert len(sorts) == 2
    for name in entries:
        assert torch.equal(got[name], expected[name]), name


def test_latent_value_key_sorts_by_latent_then_value_descending():
    g = torch.Generator().manual_seed(3)
    latents = torch.randint(0, 5, (5000,), generator=g)
    values = torch.cat([torch.randn(4990, generator=g) * 1e3, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.4e38,
                                                                             -3.4e38, 1.0, 1.0, -1.0, -1.0])])
    by_value = torch.argsort(values, descending=True, stable=True)
    expected = by_value[torch.argsort(latents[by_value], stable=True)]
    assert torch.equal(torch.argsort(latent_value_key(latents, values), stable=True), expected)


@pytest.mark.parametrize("n, bound", [(0, 10), (1, 10), (5000, 300), (5000, 1 << 25)])
def test_unique_by_counting_is_torch_unique(n, bound):
    values = torch.randint(0, bound, (n,), generator=torch.Generator().manual_seed(n))
    expected = torch.unique(values, return_inverse=True)
    got = _unique_small(values, bound)
    for a, b in zip(expected, got, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _chunk(n_texts: int = 6, d_in: int = 16):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 0, 9, 1, 7, 3][:n_texts])
    offsets = torch.zeros(n_texts + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    return offsets, {"acts": torch.randn(total, d_in, generator=g) * 4 + 1,
                     "token_ids": torch.randint(0, 50, (total,), generator=g),
                     "positions": torch.arange(total, dtype=torch.int32), "scores": torch.randn(n_texts, generator=g)}


class ThroughForward(TopKSAE):
    """A TopKSAE whose forward is its own: encode_chunk takes the generic path (sae(acts)) for it."""

    def forward(self, h, dead_mask=None):
        return super().forward(h, dead_mask)


def test_encode_chunk_does_not_run_the_training_forward_and_gives_its_tensors(monkeypatch):
    cfg = SaeConfig(16, 64, 4)
    sae = TopKSAE(cfg, generator=torch.Generator().manual_seed(0))
    reference = ThroughForward(cfg)
    reference.load_state_dict(sae.state_dict())
    offsets, tensors = _chunk()
    expected = encode_chunk(reference, offsets, tensors, torch.device("cpu"))

    def no_forward(*args, **kwargs):
        raise AssertionError("the SAE pass ran the training forward (loss terms and all)")

    monkeypatch.setattr(sae, "forward", no_forward)
    got = encode_chunk(sae, offsets, tensors, torch.device("cpu"))
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name


class TokenCounting:
    """Wraps a backend and counts the texts it tokenizes."""

    def __init__(self, backend):
        self._backend = backend
        self.tokenized = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def tokenize(self, texts, **kwargs):
        self.tokenized += len(texts)
        return self._backend.tokenize(texts, **kwargs)


def _shards(cache_dir) -> dict[str, dict[str, torch.Tensor]]:
    # tensors by shard name (itself the hash of the keys and tensors); the header's metadata order is not fixed
    return {p.name: load_file(p) for p in sorted(cache_dir.rglob("shard-*.safetensors"))}


def test_extraction_tokenizes_each_text_once_and_writes_the_same_shards(tiny_llama_dir, tmp_path, monkeypatch):
    backend = TokenCounting(HFModelBackend(str(tiny_llama_dir), device="cpu"))
    texts = pair_texts(make_pairs(12), backend)

    def config(name):
        return ActivationConfig(model="tiny", layer=1, positions="response", max_length=64, batch_size=4,
                                cache_dir=tmp_path / name)

    store = extract_activations(texts, backend, config("once"))
    assert backend.tokenized == len(texts)  # the plan's encodings were run, not made again
    assert store.n_forward_texts == len(texts)

    monkeypatch.setattr(activations, "KEEP_TOKENS", 0)  # no encoding kept: tokenized again for the forward pass
    backend.tokenized = 0
    extract_activations(texts, backend, config("twice"))
    assert backend.tokenized == 2 * len(texts)
    once, twice = _shards(tmp_path / "once"), _shards(tmp_path / "twice")
    assert once and once.keys() == twice.keys()
    for name, tensors in once.items():
        assert tensors.keys() == twice[name].keys()
        assert all(torch.equal(tensors[k], twice[name][k]) for k in tensors)
