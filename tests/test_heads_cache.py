"""The fitted Bradley-Terry heads are cached: a warm scan fits none and writes the same report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from safer_audit.backends.exporters import export_json
from safer_audit.config import ScanConfig
from safer_audit.pipeline.scan import run_scan
from safer_audit.scoring import heads as scoring

from .conftest import hh_records, tiny_scan_config
from .test_determinism import without_run_clock


def write_pairs(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def config(model_dir, cache_dir, **extra) -> ScanConfig:
    return tiny_scan_config(model_dir, cache_dir, **{"labeller": "none", **extra})


@pytest.fixture
def fits(monkeypatch):
    """Counts the Bradley-Terry fits of the scan's heads, and of the stack over the judges (in ``fits.stack``)."""
    counted = Fits()
    counted.stack = []
    real = scoring.fit_bradley_terry

    def counting(diffs, **kwargs):
        (counted if diffs.shape[1] > 3 else counted.stack).append(diffs.shape)
        return real(diffs, **kwargs)

    monkeypatch.setattr(scoring, "fit_bradley_terry", counting)
    return counted


class Fits(list):
    stack: list


def json_bytes(result, path) -> bytes:
    export_json(result.report, path)
    return without_run_clock(path.read_bytes())


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])  # a reward head; pooled means (two heads)
def test_warm_scan_reads_the_heads_and_writes_the_same_json(model, request, tmp_path, fits):
    model_dir = request.getfixturevalue(model)
    data = write_pairs(tmp_path / "pairs.jsonl", hh_records(30))
    cold = run_scan(str(data), config(model_dir, tmp_path / "cache"))
    heads = 1 if model == "tiny_llama_dir" else 2  # sae_margin; and reward_margin without a reward head
    assert len(fits) == 5 * heads
    assert len(fits.stack) == 5
    assert len(list((tmp_path / "cache").rglob("heads/head-*.safetensors"))) == heads + 1  # and the stack
    fits.clear()
    fits.stack.clear()
    warm = run_scan(str(data), config(model_dir, tmp_path / "cache"))
    assert fits == [] and fits.stack == []  # nothing fitted: every head and the stack came from the cache
    assert json_bytes(cold, tmp_path / "cold.json") == json_bytes(warm, tmp_path / "warm.json")
    for name in warm.signals:
        assert torch.equal(cold.signals[name], warm.signals[name]), name


def test_a_changed_pair_or_seed_fits_the_heads_again(tiny_bert_dir, tmp_path, fits):
    records = hh_records(30)
    run_scan(str(write_pairs(tmp_path / "a.jsonl", records)), config(tiny_bert_dir, tmp_path / "cache"))
    assert len(fits) == 10
    fits.clear()
    run_scan(str(tmp_path / "a.jsonl"), config(tiny_bert_dir, tmp_path / "cache"))
    assert fits == []  # the same data and options: read back
    changed = [dict(r) for r in records]
    changed[7]["chosen"], changed[7]["rejected"] = records[7]["rejected"], records[7]["chosen"]  # one pair flipped
    flipped = run_scan(str(write_pairs(tmp_path / "b.jsonl", changed)), config(tiny_bert_dir, tmp_path / "cache"))
    assert len(fits) == 10
    fits.clear()
    reseeded = run_scan(str(write_pairs(tmp_path / "a.jsonl", records)),
                        config(tiny_bert_dir, tmp_path / "cache", seed=1))
    assert len(fits) == 10
    fits.clear()
    # and each of them equals a scan of its own data and options into an empty cache
    for result, data, extra in ((flipped, "b.jsonl", {}), (reseeded, "a.jsonl", {"seed": 1})):
        fresh = run_scan(str(tmp_path / data), config(tiny_bert_dir, tmp_path / f"fresh-{data}", **extra))
        assert json_bytes(fresh, tmp_path / "fresh.json") == json_bytes(result, tmp_path / "cached.json")


def test_head_cache_key_covers_rows_and_options(tmp_path):
    from safer_audit.scoring.heads import HeadCache, cross_fitted_margins

    diffs = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    base = dict(folds=5, seed=0, l2=1.0, l1=0.0)
    key = HeadCache.key(diffs, **base)
    changed = diffs.clone()
    changed[3, 2] = torch.nextafter(changed[3, 2], torch.tensor(10.0))  # one bit of one row
    assert HeadCache.key(changed, **base) != key
    for option, value in (("folds", 4), ("seed", 1), ("l2", 0.5), ("l1", 1e-3)):
        assert HeadCache.key(diffs, **{**base, option: value}) != key, option
    cache = HeadCache(tmp_path / "heads")
    fitted = cross_fitted_margins(diffs, cache=cache, **base)
    again = cross_fitted_margins(diffs, cache=cache, **base)
    plain = cross_fitted_margins(diffs, **base)
    for field in dataclasses.fields(plain):
        if getattr(plain, field.name) is None:  # CrossFit.sample: None for a fit on every pair
            assert getattr(fitted, field.name) is None and getattr(again, field.name) is None
            continue
        assert torch.equal(getattr(fitted, field.name), getattr(plain, field.name))
        assert torch.equal(getattr(again, field.name), getattr(plain, field.name))
    cache.path(key).write_bytes(b"not a safetensors file")  # unreadable: fitted again, and rewritten
    assert torch.equal(cross_fitted_margins(diffs, cache=cache, **base).margins, plain.margins)
    assert cache.get(key, len(diffs)) is not None


def test_cache_info_counts_the_sae_codes_and_heads(tiny_llama_dir, tmp_path):
    from safer_audit.cli import cli

    data = write_pairs(tmp_path / "pairs.jsonl", hh_records(30))
    run_scan(str(data), config(tiny_llama_dir, tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(tmp_path / "cache"), "--format", "json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)["entries"]
    directory = tmp_path / "cache" / "activations" / entry["key"]
    for field, part in (("sae_bytes", "saes"), ("codes_bytes", "codes"), ("heads_bytes", "heads")):
        assert entry[field] == sum(p.stat().st_size for p in (directory / part).rglob("*") if p.is_file()) > 0
    assert entry["activation_bytes"] == sum(p.stat().st_size for p in directory.glob("shard-*.safetensors")) > 0
    assert entry["bytes"] == sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert entry["bytes"] > entry["activation_bytes"] + entry["sae_bytes"] + entry["codes_bytes"]
    table = CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(tmp_path / "cache")], env={"COLUMNS": "200"})
    assert "codes" in table.output and "heads" in table.output
