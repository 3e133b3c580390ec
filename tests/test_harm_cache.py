"""The harm judge's sentence embeddings: each distinct text encoded once, kept in the scan's cache, read back
only when whole and from the same encoder; a cached run gives the signals an uncached run gives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from safer_audit.backends.harm import HarmJudge
from safer_audit.backends.labellers import SentenceEncoder, encoder_fingerprint
from safer_audit.common.entries import split_entry, tensors_digest, write_entry
from safer_audit.data import load_pairs
from safer_audit.model.embeddings import FORMAT, EmbeddingCache, embed_distinct
from safer_audit.scoring.judges import JudgeContext

from .conftest import hh_records


@pytest.fixture(scope="module")
def hh_pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("harm-cache") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(12)), encoding="utf-8")
    return load_pairs(path).pairs


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return SentenceEncoder(tiny_bert_dir)


@pytest.fixture
def encoded(encoder, monkeypatch):
    """Every text the tiny encoder is asked to encode, in order."""
    seen: list[str] = []
    encode = encoder.encode

    def counting(texts, **options):
        seen.extend(texts)
        return encode(texts, **options)

    monkeypatch.setattr(encoder, "encode", counting)
    return seen


def shards(cache):
    return sorted((cache / "harm").rglob("shard-*.safetensors"))


def test_cached_and_uncached_runs_give_the_same_signals_bit_for_bit(encoder, encoded, hh_pairs, tmp_path,
                                                                    monkeypatch):
    import polars as pl

    import safer_audit.backends.harm as harm

    monkeypatch.setattr(harm, "READ_PAIRS", 5)  # slices of 5 pairs; the last holds pairs met in the first
    pairs = pl.concat([hh_pairs, hh_pairs.head(3)])
    uncached = HarmJudge(encoder).judge(JudgeContext(pairs))
    assert len(encoded) == len(set(encoded))  # each distinct text encoded once, however often it repeats
    encoded.clear()
    cold = HarmJudge(encoder).judge(JudgeContext(pairs, cache_dir=tmp_path))
    assert encoded and shards(tmp_path)
    encoded.clear()
    warm = HarmJudge(encoder).judge(JudgeContext(pairs, cache_dir=tmp_path))
    assert encoded == []  # the examples and every sentence and turn read back
    assert torch.equal(cold, uncached) and torch.equal(warm, uncached)
    assert torch.equal(uncached[-3:], uncached[:3])


def test_pairs_added_to_cached_data_encode_only_their_new_texts(encoder, encoded, hh_pairs, tmp_path):
    HarmJudge(encoder).judge(JudgeContext(hh_pairs.head(6), cache_dir=tmp_path))
    first = set(encoded)
    encoded.clear()
    whole = HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path))
    assert encoded and not set(encoded) & first
    # texts encoded in other batches move in float32's last bits only
    torch.testing.assert_close(whole, HarmJudge(encoder).judge(JudgeContext(hh_pairs)), rtol=0, atol=1e-5)


def test_a_damaged_or_altered_entry_is_encoded_again_never_used(encoder, encoded, hh_pairs, tmp_path):
    uncached = HarmJudge(encoder).judge(JudgeContext(hh_pairs))
    HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path))
    (small, middle, large) = sorted(shards(tmp_path), key=lambda p: p.stat().st_size)  # the examples', the texts'
    rows = sum(len(json.loads(split_entry(p.read_bytes())[1]["keys"])) for p in (small, middle, large))
    # a flipped byte in the embeddings: the digest fails
    data = bytearray(large.read_bytes())
    data[-5] ^= 0x40
    large.write_bytes(bytes(data))
    # scaled rows with a digest made to match: the range check (unit norm) fails
    tensors, metadata = split_entry(middle.read_bytes())
    scaled = tensors["embeddings"] * 2
    metadata["digest"] = tensors_digest([FORMAT, metadata["fingerprint"], json.loads(metadata["keys"])],
                                        {"embeddings": scaled})
    write_entry(middle, {"embeddings": scaled}, metadata)
    # cut short: not an entry at all
    small.write_bytes(small.read_bytes()[:100])
    encoded.clear()
    again = HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path))
    assert torch.equal(again, uncached)
    assert len(encoded) == rows  # every row of the three encoded again
    encoded.clear()  # and written anew, whole: the next run reads them
    assert torch.equal(HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path)), uncached)
    assert encoded == []


def test_the_key_changes_with_the_encoder(tiny_bert_dir, tmp_path):
    other = shutil.copytree(tiny_bert_dir, tmp_path / "other")
    assert encoder_fingerprint(other) == encoder_fingerprint(tiny_bert_dir)  # where it sits does not matter
    tokenizer = (tiny_bert_dir / "tokenizer.json").read_text(encoding="utf-8")
    (other / "tokenizer.json").write_text(tokenizer.replace('"[UNK]"', '"[unk]"'), encoding="utf-8")
    assert encoder_fingerprint(other) != encoder_fingerprint(tiny_bert_dir)  # the tokenizer's files do
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    shutil.copy(tiny_bert_dir / "tokenizer.json", other / "tokenizer.json")
    (other / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    assert encoder_fingerprint(other) != encoder_fingerprint(tiny_bert_dir)  # and the model's

    texts = ["I can't help with that.", "Where is the bank?"]
    first: list[str] = []
    second: list[str] = []
    EmbeddingCache(tmp_path / "cache", "encoder a").embed(texts, lambda t: first.extend(t) or unit_rows(len(t), 0))
    EmbeddingCache(tmp_path / "cache", "encoder b").embed(texts, lambda t: second.extend(t) or unit_rows(len(t), 1))
    assert first == second == texts  # b does not read a's embeddings
    repeat: list[str] = []
    EmbeddingCache(tmp_path / "cache", "encoder a").embed(texts, lambda t: repeat.extend(t) or unit_rows(len(t), 0))
    assert repeat == []


def unit_rows(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_repeated_texts_are_encoded_once_and_come_back_in_order(tmp_path):
    asked: list[list[str]] = []

    def encode(texts):
        asked.append(list(texts))
        return unit_rows(len(texts), len(asked))

    texts = ["b", "a", "b", "c", "a"]
    rows = embed_distinct(texts, encode)
    assert asked == [["b", "a", "c"]] and torch.equal(rows[0], rows[2]) and torch.equal(rows[1], rows[4])
    cache = EmbeddingCache(tmp_path, "encoder")
    kept = cache.embed(["a", "d", "a"], encode)
    assert asked[-1] == ["a", "d"]
    again = cache.embed(["d", "a", "e"], encode)
    assert asked[-1] == ["e"]
    assert torch.equal(again[0], kept[1]) and torch.equal(again[1], kept[0])


def test_token_budget_batches_give_the_embeddings_of_fixed_batches(encoder, hh_pairs):
    from safer_audit.backends.labellers import length_batches
    from safer_audit.scoring.harm import sentences

    texts = [piece for text in hh_pairs["chosen"].to_list() for piece in sentences(text)]
    torch.testing.assert_close(encoder.encode(texts, tokens_per_batch=256), encoder.encode(texts), rtol=0, atol=1e-5)
    lengths = [3, 3, 4, 9, 9, 40]
    assert length_batches(list(range(6)), lengths, 64, 20) == [[0, 1, 2], [3, 4], [5]]  # a text longer than the budget alone
    assert all(max(lengths[i] for i in batch) * len(batch) <= 20 for batch in length_batches(list(range(5)), lengths, 64, 20))


def test_the_evidence_of_a_scanned_pair_reads_the_judges_embeddings_back(encoder, encoded, hh_pairs, tmp_path):
    HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path))
    texts = [hh_pairs[name].to_list() for name in ("context", "chosen", "rejected")]
    encoded.clear()
    kept = HarmJudge(encoder).evidence(*texts, cache_dir=tmp_path)
    assert encoded == []  # a scan's flagged pairs: every sentence was embedded by the judge
    assert kept == HarmJudge(encoder).evidence(*texts) and any(kept)


def test_bfloat16_embeddings_are_kept_apart_from_float32_ones(encoder, encoded, hh_pairs, tmp_path, monkeypatch):
    import safer_audit.pipeline.profiles as profiles

    float32 = HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path, dtype="float32"))
    encoded.clear()
    bfloat16 = HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path, dtype="bfloat16"))
    assert encoded  # not float32's embeddings read back: they are another computation
    assert not torch.equal(bfloat16, float32) and torch.corrcoef(torch.stack([bfloat16, float32]))[0, 1] > 0.9
    texts = [hh_pairs[name].to_list() for name in ("context", "chosen", "rejected")]
    encoded.clear()
    assert torch.equal(HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path, dtype="bfloat16")), bfloat16)
    HarmJudge(encoder).evidence(*texts, cache_dir=tmp_path, dtype="bfloat16")
    assert encoded == []  # the warm run and the evidence read the bfloat16 embeddings back
    for native, expected in ((False, float32), (True, bfloat16)):  # auto: bfloat16 where the CPU has it natively
        monkeypatch.setattr(profiles, "native_bfloat16", lambda native=native: native)
        assert torch.equal(HarmJudge(encoder).judge(JudgeContext(hh_pairs, cache_dir=tmp_path, dtype="auto")), expected)
    assert encoded == []
