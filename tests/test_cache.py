"""The cache commands: `cache info` lists every kind of entry the cache holds, `cache clear` deletes them all."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import torch
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.features.labels import FeatureLabel, label_cache_file, label_features
from safer_audit.model.embeddings import EmbeddingCache
from safer_audit.pipeline.report_cache import scan_report

from .conftest import hh_records
from .test_heads_cache import config, write_pairs


def tree_bytes(directory):
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_cache_info_lists_and_clear_deletes_every_kind(tiny_llama_dir, tmp_path):
    from safer_audit_llm.client import DirCache

    cache = tmp_path / "cache"
    scan_config = config(tiny_llama_dir, cache)
    assert not scan_report(str(write_pairs(tmp_path / "pairs.jsonl", hh_records(12))), scan_config).cached
    # a judge's answer where the LLM judge keeps them by default (the scan's cache), and the labels of a
    # given SAE where a scan with --sae keeps them (under the cache, by the SAE's hash)
    DirCache(cache / "judges" / "llm")["a request"] = {"verdict": "chosen"}
    # the harm judge's sentence embeddings, where the judge keeps them in a scan (the scan's judges/harm)
    EmbeddingCache(cache / "judges" / "harm", "an encoder").embed(["a sentence"], lambda texts: torch.eye(1, 4))
    (sae_dir,) = (path.parent for path in cache.rglob("sae_weights.safetensors"))
    labeller = SimpleNamespace(name="stub", version="1", label=lambda requests: {
        0: FeatureLabel(latent=0, label="weapons", relevance=1.0, category="weapons", labeller="stub")})
    labels_file = label_cache_file(dataclasses.replace(scan_config, sae_path=sae_dir), sae_dir, labeller)
    label_features([0], lambda missing: [], labeller, labels_file)
    assert labels_file.is_file() and labels_file.is_relative_to(cache / "labels")

    result = CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(cache), "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    kinds = {kind["kind"]: kind["bytes"] for kind in info["kinds"]}
    (entry,) = info["entries"]
    token_counts = cache / "activations" / entry["key"] / "token-counts"
    assert entry["token_count_bytes"] == kinds["token counts"] == tree_bytes(token_counts) > 0
    assert kinds["harm embeddings"] == tree_bytes(cache / "judges" / "harm") > 0
    assert kinds["judges"] == tree_bytes(cache / "judges") - kinds["harm embeddings"] > 0
    assert kinds["labels"] == tree_bytes(cache / "labels") > 0
    assert kinds["reports"] == tree_bytes(cache / "reports") > 0
    assert sum(kinds.values()) == info["bytes"] == tree_bytes(cache)
    table = CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(cache)], env={"COLUMNS": "200"})
    assert all(kind in table.output for kind in ("token counts", "judges", "harm embeddings", "labels", "reports")), \
        table.output

    result = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(cache), "--yes"])
    assert result.exit_code == 0 and f"freed {info['bytes'] / 2**20:.1f} MiB" in result.output
    assert not any((cache / name).exists() for name in ("activations", "judges", "labels", "reports"))
    after = json.loads(CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(cache), "--format", "json"]).output)
    assert after["entries"] == [] and after["bytes"] == 0
    assert "is empty" in CliRunner().invoke(cli, ["cache", "info", "--cache-dir", str(cache)], env={"COLUMNS": "200"}).output


def test_cache_clear_leaves_what_is_not_the_caches(tmp_path):
    """A --cache-dir given by hand may hold other files: clear deletes the cache's own directories only."""
    cache = tmp_path / "cache"
    (cache / "judges").mkdir(parents=True)
    (cache / "judges" / "answer.json").write_text("{}")
    (cache / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(cache), "--yes"])
    assert result.exit_code == 0, result.output
    assert not (cache / "judges").exists() and (cache / "notes.txt").read_text() == "mine"


def test_the_plugins_table_folds_long_names_at_80_columns(monkeypatch):
    # Built-in plugin names (safer_audit.backends.labellers) are longer than the column: folded, never cut with "…"
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(cli, ["plugins"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "…" not in result.output
    assert "labellers" in result.output.replace("│", "").replace(" ", "").replace("\n", "")
