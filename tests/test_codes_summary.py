"""A scan's summary of its SAE results: a warm scan of the same texts reads one checked entry."""

from __future__ import annotations

import pytest

from safer_audit.pipeline.scan import run_scan
from safer_audit.sae import codes, stats
from safer_audit.sae.codes import CodeCache, encode_store

from .test_codes import _count_calls, assert_same_stats, config, write_pairs


def report_json(report) -> dict:
    data = report.to_dict()
    for name in ("timings", "created"):
        data["run"].pop(name)
    return data


def summaries(cache_dir):
    return sorted(cache_dir.rglob("codes/*/summary-*.safetensors"))


def watch(monkeypatch):
    """Calls of the merge path: shards read back and strongest-activation merges."""
    return _count_calls(monkeypatch, CodeCache, "load"), _count_calls(monkeypatch, codes._Accumulator, "_merge")


def test_a_warm_scan_reads_the_summary_merges_nothing_and_reports_the_same(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert len(summaries(tmp_path / "cache")) == 1
    loads, merges = watch(monkeypatch)
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert loads == [] and merges == [] and warm.stats.n_encoded == 0
    assert report_json(warm.report) == report_json(cold.report)
    assert_same_stats(cold.stats, warm.stats)
    assert warm.stats.mean_codes.equal(cold.stats.mean_codes) and warm.stats.pooled.equal(cold.stats.pooled)
    assert warm.stats.scores.equal(cold.stats.scores) and warm.stats.fvu == cold.stats.fvu
    uncached = encode_store(cold.store, cold.sae)  # and what one pass over the activations gives
    assert_same_stats(uncached, warm.stats)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "header"])
def test_a_damaged_summary_is_made_again_not_trusted(damage, tiny_llama_dir, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    [path] = summaries(tmp_path / "cache")
    raw = bytearray(path.read_bytes())
    if damage == "flipped byte":
        raw[-5] ^= 0xFF  # the header still reads: only the content digest can tell
    elif damage == "truncated":
        raw = raw[:len(raw) // 2]
    else:
        raw[8:12] = b"junk"
    path.write_bytes(bytes(raw))
    loads, merges = watch(monkeypatch)
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert loads and warm.stats.n_encoded == 0  # the shards, merged again
    assert report_json(warm.report) == report_json(cold.report)
    assert path.read_bytes() != bytes(raw)  # made again, and read by the next scan
    loads.clear()
    again = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert loads == [] and report_json(again.report) == report_json(cold.report)


def test_a_scan_with_new_pairs_takes_the_merge_path(tiny_llama_dir, tmp_path, monkeypatch):
    first = run_scan(str(write_pairs(tmp_path / "a.jsonl", 30)), config(tiny_llama_dir, tmp_path / "cache"))
    first.sae.save(tmp_path / "sae")
    frozen = config(tiny_llama_dir, tmp_path / "cache", sae_path=str(tmp_path / "sae"))  # the same SAE again
    loads, _ = watch(monkeypatch)
    grown = run_scan(str(write_pairs(tmp_path / "b.jsonl", 32)), frozen)
    assert loads and grown.stats.n_encoded == 4  # another list of texts: another summary, made from the shards
    assert len(summaries(tmp_path / "cache")) == 2
    assert_same_stats(encode_store(grown.store, grown.sae), grown.stats)


def test_no_summary_beyond_its_size_bound(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(codes, "SUMMARY_NUMBERS", 100)
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert summaries(tmp_path / "cache") == []
    loads, _ = watch(monkeypatch)
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert loads and report_json(warm.report) == report_json(cold.report)


def test_a_summary_of_several_ranges_streams_its_rows(tiny_llama_dir, tmp_path, monkeypatch):

    monkeypatch.setattr(stats, "STREAM_PAIRS", 4)  # 8 ranges of pairs: the rows go to a file, as when made
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    cold = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    loads, merges = watch(monkeypatch)
    warm = run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    assert loads == [] and merges == [] and warm.stats.codes._file is not None
    assert report_json(warm.report) == report_json(cold.report)
    assert warm.stats.mean_codes.equal(cold.stats.mean_codes) and warm.stats.pooled.equal(cold.stats.pooled)
