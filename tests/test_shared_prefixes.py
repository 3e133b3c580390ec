"""A causal model runs the common start of a pair's two texts once (compute_shard's shared-prefix path): the
same activations as running each text whole, up to float rounding, under another cache key."""

from __future__ import annotations

import pytest
import torch

from safer_audit.backends import hf
from safer_audit.config import ActivationConfig
from safer_audit.data import load_pairs
from safer_audit.model import activations
from safer_audit.model.activations import common_prefix, extract_activations, open_cache, plan_batches
from safer_audit.model.texts import pair_texts

from .test_profiles import write_tiny_gguf
from .tiny_models import HH_SAMPLE


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    pytest.importorskip("gguf")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_llama_dir / "tokenizer.json")


def whole_texts(monkeypatch):
    monkeypatch.setattr(hf.HFModelBackend, "shares_prefixes", property(lambda self: False))


@pytest.mark.parametrize("options", [{"batch_size": 3}, {"batch_tokens": 600}])
def test_shared_starts_give_the_activations_of_whole_texts(tiny_gguf, tmp_path, monkeypatch, options):
    backend = hf.HFModelBackend(str(tiny_gguf), device="cpu", dtype="float32")
    assert backend.shares_prefixes
    texts = pair_texts(load_pairs(HH_SAMPLE).pairs.head(10), backend)
    config = ActivationConfig(model=str(tiny_gguf), layer=1, positions="all", max_length=256,
                              cache_dir=tmp_path / "shared", **options)
    starts = []
    real = backend.forward_prefix
    monkeypatch.setattr(backend, "forward_prefix", lambda *a, **k: starts.append(a[0].shape) or real(*a, **k))
    shared = extract_activations(texts, backend, config)
    assert starts  # the pairs' starts ran on their own
    monkeypatch.undo()
    whole_texts(monkeypatch)
    reference = extract_activations(texts, backend, ActivationConfig(**{**config.__dict__, "cache_dir": tmp_path / "whole"}))
    for key in reference.keys:
        a, b = shared.cache.get(key), reference.cache.get(key)
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.positions, b.positions)
        assert torch.allclose(a.acts, b.acts, atol=1e-5, rtol=1e-4)


def test_a_pairs_texts_are_planned_side_by_side(tiny_gguf):
    backend = hf.HFModelBackend(str(tiny_gguf), device="cpu")
    texts = pair_texts(load_pairs(HH_SAMPLE).pairs.head(10), backend)
    items = [(activations.text_key(t.text), t) for t in texts]
    shards = plan_batches(items, backend, ActivationConfig(model=str(tiny_gguf), max_length=256))
    order = [i for shard in shards for batch in shard for i in batch]
    ids = [row[0] for row in activations.tokenize_prepared(list(texts), backend, 256)]
    for i in range(0, len(texts), 2):
        if common_prefix(ids[i], ids[i + 1]) >= activations.MIN_SHARED_TOKENS:
            assert abs(order.index(i) - order.index(i + 1)) == 1


def test_shared_starts_are_cached_apart(tiny_gguf, tmp_path, monkeypatch):
    backend = hf.HFModelBackend(str(tiny_gguf), device="cpu")
    config = ActivationConfig(model=str(tiny_gguf), cache_dir=tmp_path)
    shared = open_cache(backend, config, 1).directory
    whole_texts(monkeypatch)
    assert open_cache(backend, config, 1).directory != shared


def test_common_prefix_leaves_each_text_a_token_of_its_own():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 1
    assert common_prefix([5], [6]) == 0
