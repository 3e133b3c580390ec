"""The GPU path: batches by token budget, and a CUDA scan that matches the CPU one."""

from __future__ import annotations

import json
import random

import pytest
import torch

from safer_audit.backends.hf import HFModelBackend
from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig
from safer_audit.data import load_pairs
from safer_audit.errors import ConfigError
from safer_audit.model.activations import SHARD_TEXTS, _shards_of, plan_batches, plan_missing, text_key
from safer_audit.model.texts import pair_texts
from safer_audit.pipeline.scan import run_scan

from .conftest import hh_records

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def write_pairs(path, n: int):
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(n)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def planned(tiny_llama_dir, tmp_path_factory):
    """(texts, backend) of 60 HH pairs: 120 texts of varied length."""
    backend = HFModelBackend(str(tiny_llama_dir), device="cpu")
    pairs = load_pairs(write_pairs(tmp_path_factory.mktemp("plan") / "pairs.jsonl", 60)).pairs
    texts = [(text_key(t.text), t) for t in pair_texts(pairs, backend)]
    return texts, backend


def lengths_of(texts, backend, max_length):
    return [len(backend.tokenize([t.text], max_length=max_length, has_special_tokens=t.has_special_tokens)[0][0])
            for _, t in texts]


@pytest.mark.parametrize("budget", [64, 100, 257, 1000])
def test_token_budget_batches_stay_within_it_and_cover_every_text_once(planned, budget):
    texts, backend = planned
    config = ActivationConfig(max_length=64, batch_tokens=budget)
    lengths = lengths_of(texts, backend, 64)
    shards = plan_batches(texts, backend, config)
    batches = [batch for shard in shards for batch in shard]
    assert sorted(i for batch in batches for i in batch) == list(range(len(texts)))  # each text exactly once
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= budget
    # greedy: no batch could have taken the next text too
    for batch, following in zip(batches, batches[1:], strict=False):
        assert (len(batch) + 1) * max(lengths[i] for i in [*batch, following[0]]) > budget
    assert all(sum(len(b) for b in shard) >= SHARD_TEXTS for shard in shards[:-1])
    # missing texts of a partly cached dataset are batched within the budget as well
    missing = {texts[i][0] for i in range(0, len(texts), 3)}
    loose = [batch for shard in plan_missing(texts, missing, backend, config) for batch in shard]
    assert sorted(i for batch in loose for i in batch) == sorted(i for i, (k, _) in enumerate(texts) if k in missing)
    assert all(len(batch) * max(lengths[i] for i in batch) <= budget for batch in loose)


def test_a_zero_token_budget_keeps_the_plan_of_batch_size_texts(planned):
    texts, backend = planned
    config = ActivationConfig(max_length=64, batch_size=8, batch_tokens=0)  # 0, the default: today's CPU plan
    lengths = lengths_of(texts, backend, 64)
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], texts[i][0]))
    assert plan_batches(texts, backend, config) == _shards_of(order, 8)
    assert plan_batches(texts, backend, ActivationConfig(max_length=64, batch_size=8)) == _shards_of(order, 8)


def test_a_budget_below_max_length_is_refused(planned):
    texts, backend = planned
    with pytest.raises(ConfigError, match="at least the max length"):
        plan_batches(texts, backend, ActivationConfig(max_length=64, batch_tokens=63))


def test_token_batches_handle_any_order():
    from safer_audit.model.activations import token_batches

    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    order = list(range(300))
    rng.shuffle(order)
    batches = token_batches(order, lengths, 120)
    assert [i for batch in batches for i in batch] == order
    assert all(len(batch) * max(lengths[i] for i in batch) <= 120 for batch in batches)


def scan_config(model_dir, cache_dir, **activations) -> ScanConfig:
    return ScanConfig(activations=ActivationConfig(model=str(model_dir), layer=1, max_length=64, cache_dir=cache_dir,
                                                   **activations),
                      sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16, labeller="none")


@CUDA
def test_a_cuda_scan_equals_the_cpu_scan(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cpu = run_scan(str(data), scan_config(tiny_llama_dir, tmp_path / "cpu", device="cpu"))
    cuda = run_scan(str(data), scan_config(tiny_llama_dir, tmp_path / "cuda", device="cuda", dtype="float32",
                                           batch_tokens=256))
    for a, b in zip(cpu.store.iter_acts(), cuda.store.iter_acts(), strict=True):
        assert b.dtype == torch.float32 and b.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cpu.stats.scores, cuda.stats.scores, rtol=1e-3, atol=1e-4, equal_nan=True)


@CUDA
def test_the_bfloat16_path_runs(tiny_llama_dir, tmp_path):
    backend = HFModelBackend(str(tiny_llama_dir), device="cuda", dtype="auto")
    assert backend.dtype == torch.bfloat16
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    result = run_scan(str(data), scan_config(tiny_llama_dir, tmp_path / "cache", device="cuda", batch_tokens=256))
    acts = torch.cat(list(result.store.iter_acts()))
    assert acts.dtype == torch.float32 and torch.isfinite(acts).all()
    cpu = run_scan(str(data), scan_config(tiny_llama_dir, tmp_path / "cpu", device="cpu"))
    reference = torch.cat(list(cpu.store.iter_acts()))
    assert acts.shape == reference.shape
    # bfloat16 keeps 8 bits of mantissa: close to the float32 activations, not equal
    assert float((acts - reference).norm() / reference.norm()) < 0.05
