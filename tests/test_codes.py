"""The per-text SAE codes cache: a warm scan encodes nothing and reports the same."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

from safer_audit.config import ActivationConfig, ScanConfig
from safer_audit.pipeline.scan import run_scan
from safer_audit.sae.codes import _header_keys, encode_store

from .conftest import hh_records, tiny_scan_config


def write_pairs(path, n: int):
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(n)), encoding="utf-8")
    return path


def config(model_dir, cache_dir, **extra) -> ScanConfig:
    return tiny_scan_config(model_dir, cache_dir, **{"labeller": "none", **extra})


def assert_same_stats(a, b, texts=slice(None)):
    torch.testing.assert_close(a.mean_codes[texts], b.mean_codes[texts])
    assert torch.equal(a.n_positions[texts], b.n_positions[texts])
    for name in ("fire_counts", "top_values", "top_texts", "top_positions", "top_tokens", "token_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.fvu == pytest.approx(b.fvu, rel=1e-5)


def assert_same_report(a, b):
    assert [f.pair_id for f in a.findings] == [f.pair_id for f in b.findings]  # the same ranking
    assert [f.category for f in a.findings] == [f.category for f in b.findings]
    assert [f.suspicion for f in a.findings] == pytest.approx([f.suspicion for f in b.findings], abs=1e-6)
    assert [f.score_safe for f in a.findings] == pytest.approx([f.score_safe for f in b.findings], abs=1e-5)
    cards = [dataclasses.asdict(c) for c in a.features], [dataclasses.asdict(c) for c in b.features]
    assert [c["latent"] for c in cards[0]] == [c["latent"] for c in cards[1]]
    assert [c["contexts"] for c in cards[0]] == [c["contexts"] for c in cards[1]]
    assert [c["top_tokens"] for c in cards[0]] == [c["top_tokens"] for c in cards[1]]


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])  # a reward head, and pooled means
def test_warm_scan_encodes_nothing_and_reports_the_same(model, request, tmp_path):
    model_dir = request.getfixturevalue(model)
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(model_dir, tmp_path / "cache"))
    warm = run_scan(str(data), config(model_dir, tmp_path / "cache"))
    assert cold.stats.n_encoded == 60 and warm.stats.n_encoded == 0
    assert_same_stats(cold.stats, warm.stats)
    assert_same_report(cold.report, warm.report)
    # the same as one uncached pass over the activations, and the pooled means and scores a scan needs
    assert_same_stats(encode_store(cold.store, cold.sae), warm.stats)
    torch.testing.assert_close(warm.stats.pooled, cold.store.pooled_mean())
    torch.testing.assert_close(warm.stats.scores, cold.store.scores(), equal_nan=True)


def test_scan_with_two_new_pairs_encodes_only_their_texts(tiny_llama_dir, tmp_path):
    first = run_scan(str(write_pairs(tmp_path / "a.jsonl", 30)), config(tiny_llama_dir, tmp_path / "cache"))
    sae_dir = tmp_path / "sae"
    first.sae.save(sae_dir)
    frozen = config(tiny_llama_dir, tmp_path / "cache", sae_path=str(sae_dir))
    before = run_scan(str(write_pairs(tmp_path / "b.jsonl", 30)), frozen)  # the same SAE, read from a directory
    assert before.stats.n_encoded == 0  # the cache is keyed by the SAE's weights, not by where it came from
    grown = run_scan(str(write_pairs(tmp_path / "c.jsonl", 32)), frozen)
    assert grown.stats.n_encoded == 4
    reference = encode_store(grown.store, grown.sae)
    assert_same_stats(reference, grown.stats)


def _truncated(raw: bytes) -> bytes:
    return raw[:100]  # inside the header: it does not read


def _cut_after_header(raw: bytes) -> bytes:
    # the header reads, the tensors are cut short: safetensors raises SafetensorError, not a ValueError
    return raw[:8 + struct.unpack("<Q", raw[:8])[0] + 16]


def _flipped_byte(raw: bytes) -> bytes:
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # lengths and header intact: only the content digest can tell
    return bytes(flipped)


@pytest.mark.parametrize("damage", [_truncated, _cut_after_header, _flipped_byte])
def test_a_damaged_codes_shard_is_encoded_again(tiny_llama_dir, tmp_path, damage):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    shards = sorted((tmp_path / "cache").rglob("codes/*/shard-*.safetensors"))
    keys = _header_keys(shards[0])
    shards[0].write_bytes(damage(shards[0].read_bytes()))
    drop_summaries(tmp_path / "cache")  # else the warm scan reads the scan's summary and no shard
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert warm.stats.n_encoded == len(set(keys))
    assert_same_stats(cold.stats, warm.stats)
    assert_same_report(cold.report, warm.report)


def drop_summaries(cache_dir):
    summaries = sorted(cache_dir.rglob("codes/*/summary-*.safetensors"))
    assert summaries
    for path in summaries:
        path.unlink()


def _count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_warm_scan_reads_no_activation_shard(tiny_llama_dir, tmp_path, monkeypatch):
    from safer_audit.model.activations import ActivationCache

    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    loads = _count_calls(monkeypatch, ActivationCache, "load_shard")
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert loads == [] and warm.stats.n_encoded == 0
    assert_same_report(cold.report, warm.report)
    # the store is still whole: reading it checks the shards then
    torch.testing.assert_close(warm.store.pooled_mean(), cold.store.pooled_mean())
    assert loads


def test_a_corrupt_activation_shard_is_computed_again_when_it_is_read(tiny_llama_dir, tmp_path):
    import shutil

    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    shard = sorted((tmp_path / "cache").rglob("activations/*/shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # a flipped byte in the tensors: the header still reads
    shard.write_bytes(bytes(raw))
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))  # codes cached: the shard is not read
    assert warm.store.n_forward_texts == 0 and shard.exists()
    for codes in (tmp_path / "cache").rglob("codes"):
        shutil.rmtree(codes)
    again = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))  # encoding reads it: made again
    assert again.store.n_forward_texts > 0 and again.stats.n_encoded == 60
    assert_same_stats(cold.stats, again.stats)
    assert_same_report(cold.report, again.report)


def test_a_warm_scan_takes_the_token_counts_from_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    from safer_audit.data import tokens

    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    counted: list[int] = []
    original = tokens.tokenizer_counter

    def counting(tokenizer):
        count = original(tokenizer)
        return lambda texts: counted.append(len(texts)) or count(texts)

    monkeypatch.setattr("safer_audit.pipeline.stages.tokenizer_counter", counting)
    short = dataclasses.replace(config(tiny_llama_dir, tmp_path / "cache"), activations=ActivationConfig(
        model=str(tiny_llama_dir), layer=1, max_length=8, cache_dir=tmp_path / "cache"))  # some responses truncated
    cold = run_scan(str(data), short)
    assert counted == [120]
    files = sorted((tmp_path / "cache").rglob("token-counts/*.json"))
    assert len(files) == 1
    warm = run_scan(str(data), short)
    assert counted == [120]  # not tokenized again
    assert [f.quality for f in warm.report.findings] == [f.quality for f in cold.report.findings]
    assert any("truncated" in f.quality for f in cold.report.findings)
    files[0].write_text('{"checksum": "0", "counts": [1]}')  # a broken entry is counted again, not trusted
    again = run_scan(str(data), short)
    assert counted == [120, 120]
    assert [f.quality for f in again.report.findings] == [f.quality for f in cold.report.findings]


def test_a_damaged_evidence_entry_is_computed_again(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    entries = sorted((tmp_path / "cache").rglob("evidence/*.json"))
    assert entries and any(f.evidence for f in cold.report.findings)
    for entry in entries:  # spans whose text no longer is their slice, and plain garbage
        spans = json.loads(entry.read_text())
        for span in spans:
            span["text"] = "forged " + span["text"]
        entry.write_text(json.dumps(spans) if spans else "{not json")
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert_same_report(cold.report, warm.report)
    assert all("forged" not in entry.read_text() for entry in entries)  # written over with the computed spans
