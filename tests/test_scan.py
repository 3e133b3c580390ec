"""scan, features, explain, train-sae and cache end to end, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import yaml
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.config import ScanConfig
from safer_audit.data import load_pairs
from safer_audit.pipeline.scan import run_scan
from safer_audit.report.types import Report

from .conftest import hh_records, tiny_scan_config

SMALL_SAE = ["--latents", "64", "--k", "4", "--n-features", "16"]


def model_args(model_dir, cache_dir) -> list[str]:
    return ["--model", str(model_dir), "--layer", "1", "--max-length", "64", "--cache-dir", str(cache_dir)]


def scan_config(model_dir, cache_dir) -> ScanConfig:
    return tiny_scan_config(model_dir, cache_dir)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_scan_writes_every_format_and_ranks_every_pair(tiny_llama_dir, data_file, tmp_path):
    outputs = [tmp_path / f"report.{ext}" for ext in ("json", "csv", "parquet", "html", "md")]
    args = ["scan", data_file, *model_args(tiny_llama_dir, tmp_path / "cache"), *SMALL_SAE, "--top", "5", "--quiet"]
    for path in outputs:
        args += ["--output", path]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "suspects" in result.output
    report = Report.from_dict(json.loads(outputs[0].read_text()))
    assert report.run.pairs == 40 and len(report.findings) == 40
    assert sorted(f.rank for f in report.findings) == list(range(1, 41))
    # a local model is named relative to the working directory, not by its absolute path
    assert Path(report.run.model).resolve() == tiny_llama_dir.resolve() and report.run.layer == 1
    assert report.run.n_features == 16 and len(report.features) == 16
    assert sum(report.run.counts.values()) == 40
    parquet = pl.read_parquet(outputs[2])
    assert parquet.sort("rank")["pair_id"].to_list() == [f.pair_id for f in sorted(report.findings, key=lambda f: f.rank)]
    for path in outputs:
        assert path.stat().st_size > 0
    # the reward margin comes from the tiny Llama's own head
    assert all(f.reward_margin is not None for f in report.findings)


def test_scan_is_deterministic_and_a_warm_rerun_computes_nothing(tiny_llama_dir, data_file, tmp_path):
    first = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "a"))
    cold = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "b"))
    warm = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path / "b"))
    assert warm.store.n_forward_texts == 0 and cold.store.n_forward_texts == 80
    for other in (cold, warm):
        assert [f.pair_id for f in other.report.findings] == [f.pair_id for f in first.report.findings]
        assert [f.suspicion for f in other.report.findings] == [f.suspicion for f in first.report.findings]
    assert warm.report.run.sae_hash == cold.report.run.sae_hash  # the cached SAE, not a new one


def test_encoder_without_reward_head_gets_a_cross_fitted_margin(tiny_bert_dir, data_file, tmp_path):
    result = run_scan(str(data_file), scan_config(tiny_bert_dir, tmp_path))
    margins = [f.reward_margin for f in result.report.findings]
    assert all(m is not None for m in margins) and len(set(margins)) > 1


def test_explain_known_and_unknown_pair(tiny_llama_dir, data_file, tmp_path):
    base = [data_file]
    opts = [*model_args(tiny_llama_dir, tmp_path), *SMALL_SAE, "--quiet"]
    scan = run_scan(str(data_file), scan_config(tiny_llama_dir, tmp_path))
    pair = scan.report.findings[0]
    result = invoke("explain", *base, pair.pair_id, *opts)
    assert result.exit_code == 0, result.output
    assert pair.pair_id in result.output and "score_safe" in result.output
    result = CliRunner().invoke(cli, ["explain", str(data_file), "no-such-pair", *map(str, opts)])
    assert result.exit_code == 2
    assert 'pair id "no-such-pair" is not in' in result.output
    assert "Traceback" not in result.output


def test_features_file_round_trip_through_scan(tiny_llama_dir, data_file, tmp_path):
    opts = [*model_args(tiny_llama_dir, tmp_path / "cache"), *SMALL_SAE, "--quiet"]
    features_path = tmp_path / "features.yaml"
    result = invoke("features", data_file, *opts, "--top", "3", "-o", features_path)
    assert result.exit_code == 0, result.output
    assert "latent" in result.output
    written = yaml.safe_load(features_path.read_text())["features"]
    assert len(written) == 16
    dropped = written[0]["latent"]
    written[0]["include"] = False
    written[1]["label"] = "refusal"
    features_path.write_text(yaml.safe_dump({"features": written}))
    out = tmp_path / "r.json"
    result = invoke("scan", data_file, *opts, "--features", features_path, "--output", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    latents = [card["latent"] for card in report["features"]]
    assert dropped not in latents
    assert {card["label"] for card in report["features"] if card["latent"] == written[1]["latent"]} == {"refusal"}


def test_scan_refuses_bad_data_and_writing_over_its_input(tiny_llama_dir, data_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a"}\n')
    result = CliRunner().invoke(cli, ["scan", str(bad), *map(str, model_args(tiny_llama_dir, tmp_path))])
    assert result.exit_code == 2
    assert f'{bad}:1: field "rejected" is missing' in result.output
    result = CliRunner().invoke(cli, ["scan", str(data_file), "--output", str(tmp_path / "r.xyz")])
    assert result.exit_code == 2 and "cannot tell the format" in result.output
    before = data_file.read_bytes()
    result = CliRunner().invoke(cli, ["scan", str(data_file), *map(str, model_args(tiny_llama_dir, tmp_path)),
                                      *SMALL_SAE, "--quiet", "--output", str(data_file)])
    assert result.exit_code == 2 and "refusing to write over an input file" in result.output
    assert data_file.read_bytes() == before


def test_train_sae_then_scan_with_it(tiny_llama_dir, data_file, tmp_path):
    sae_dir = tmp_path / "sae"
    result = invoke("train-sae", data_file, "-o", sae_dir, *model_args(tiny_llama_dir, tmp_path / "c"),
                    "--latents", "32", "--k", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert "FVU" in result.output
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["d_sae"] == 32 and cfg["safer_audit"]["metadata"]["layer"] == 1
    out = tmp_path / "r.json"
    result = invoke("scan", data_file, *model_args(tiny_llama_dir, tmp_path / "c"), "--sae", sae_dir,
                    "--n-features", "8", "--quiet", "--output", out)
    assert result.exit_code == 0, result.output
    sae_path = json.loads(out.read_text())["run"]["sae_path"]
    assert not Path(sae_path).is_absolute() and Path(sae_path).resolve() == sae_dir.resolve()


def test_sae_of_another_width_is_a_clear_error(tiny_llama_dir, tiny_bert_dir, data_file, tmp_path):
    sae_dir = tmp_path / "sae"
    invoke("train-sae", data_file, "-o", sae_dir, *model_args(tiny_bert_dir, tmp_path), "--latents", "16",
           "--k", "2", "--quiet")
    result = CliRunner().invoke(cli, ["scan", str(data_file), *map(str, model_args(tiny_llama_dir, tmp_path)),
                                      "--sae", str(sae_dir), "--quiet"])
    assert result.exit_code == 2
    assert "reads width 32" in result.output and "has width 64" in result.output


def test_cache_info_and_clear(tiny_llama_dir, data_file, tmp_path):
    cache = tmp_path / "cache"
    run_scan(str(data_file), scan_config(tiny_llama_dir, cache))
    result = invoke("cache", "info", "--cache-dir", cache, "--format", "json")
    entries = json.loads(result.output)["entries"]
    assert len(entries) == 1 and entries[0]["texts"] == 80 and entries[0]["layer"] == 1
    result = invoke("cache", "clear", "--cache-dir", cache, "--yes")
    assert result.exit_code == 0 and "freed" in result.output
    assert json.loads(invoke("cache", "info", "--cache-dir", cache, "--format", "json").output)["entries"] == []


def test_scan_and_validate_count_tokens_alike(tiny_bert_dir, tmp_path):
    """`validate --max-length N` and a scan at max length N flag the same responses as truncated:
    one token counter, counting the special tokens extraction adds (the encoder adds two)."""
    from transformers import AutoTokenizer

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(12)), encoding="utf-8")
    pairs = load_pairs(path).pairs
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    chosen, rejected = (tokenizer(pairs[side].to_list(), add_special_tokens=False)["input_ids"]
                        for side in ("chosen", "rejected"))
    longest = sorted(max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True))
    # the pair whose longer response is exactly this long (without special tokens) is on the
    # boundary: its response only fits if the special tokens are not counted
    max_length = longest[len(longest) // 2]
    config = scan_config(tiny_bert_dir, tmp_path / "cache")
    config.activations.max_length = max_length
    scanned = run_scan(str(path), config)
    in_scan = sum(1 for f in scanned.report.findings if "truncated" in f.quality)
    validated = invoke("validate", path, "--max-length", max_length, "--model", tiny_bert_dir, "--format", "json")
    assert validated.exit_code == 0, validated.output
    in_validate = json.loads(validated.output)["findings"]["truncated"]["count"]
    assert in_scan == in_validate and in_scan > 0
