"""The same data and options give the same report: across processes, hash seeds and cache histories."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from safer_audit.config import ActivationConfig, SaeTrainConfig, ScanConfig
from safer_audit.data import load_pairs
from safer_audit.model import activations
from safer_audit.model.activations import extract_activations
from safer_audit.model.texts import pair_texts
from safer_audit.pipeline.scan import run_scan

from .conftest import FIXTURES, ROOT

SMALL_SHARDS = 16  # texts per shard: several shards even for a small dataset, so their order matters

SCAN = """
import sys
import safer_audit.model.activations as activations
activations.SHARD_TEXTS = {shard_texts}
from safer_audit.cli import cli
cli(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with open(FIXTURES / "hh-harmless-300.jsonl", encoding="utf-8") as handle:
        path.write_text("".join(list(handle)[:48]), encoding="utf-8")
    return path


def without_run_clock(report: bytes) -> bytes:
    """The report's bytes minus the two fields that say when and how fast it ran."""
    report = re.sub(rb'"created": "[^"]*"', b'"created": null', report)
    return re.sub(rb'"timings": \{[^}]*\}', b'"timings": null', report)


def start_scan(workdir, model_dir, data_file, hash_seed: str) -> subprocess.Popen:
    """A cold scan in a fresh process, with a cache under ``workdir`` named relatively (same path in the report)."""
    workdir.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    args = ["scan", str(data_file), "--model", str(model_dir), "--layer", "1", "--max-length", "64",
            "--batch-size", "4", "--cache-dir", "cache", "--latents", "64", "--k", "4", "--n-features", "16",
            "--output", "report.json", "--quiet"]
    return subprocess.Popen([sys.executable, "-c", SCAN.format(shard_texts=SMALL_SHARDS), *args], cwd=workdir,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, workdir) -> bytes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    return (workdir / "report.json").read_bytes()


def test_two_cold_scans_in_separate_processes_write_the_same_report(tiny_llama_dir, data_file, tmp_path):
    # the processes run side by side: separate caches, different hash seeds
    first = start_scan(tmp_path / "a", tiny_llama_dir, data_file, "0")
    second = start_scan(tmp_path / "b", tiny_llama_dir, data_file, "12345")
    first, second = finished(first, tmp_path / "a"), finished(second, tmp_path / "b")
    assert len(list((tmp_path / "a" / "cache").rglob("shard-*.safetensors"))) > 3  # several shards to order
    assert without_run_clock(first) == without_run_clock(second)


def scan_config(model_dir, cache_dir) -> ScanConfig:
    return ScanConfig(activations=ActivationConfig(model=str(model_dir), layer=1, max_length=64, batch_size=4,
                                                   cache_dir=cache_dir),
                      sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16)


class Interrupted(Exception):
    pass


def report_bytes(result) -> bytes:
    return without_run_clock(json.dumps(result.report.to_dict(), indent=1).encode())


def test_a_scan_resumed_after_an_interruption_equals_a_cold_one(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(activations, "SHARD_TEXTS", SMALL_SHARDS)
    # relative cache dirs, from two working directories: the report names the SAE by the same path
    (tmp_path / "cold").mkdir()
    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "cold")
    cold = run_scan(str(data_file), scan_config(tiny_llama_dir, "cache"))

    monkeypatch.chdir(tmp_path / "resumed")
    config = scan_config(tiny_llama_dir, "cache")

    def stop_after_some_batches(done, total):
        if done >= total // 3:
            raise Interrupted

    texts = pair_texts(load_pairs(str(data_file)).pairs, cold.backend)
    with pytest.raises(Interrupted):
        extract_activations(texts, cold.backend, config.activations, progress=stop_after_some_batches)
    written = len(list(tmp_path.joinpath("resumed", "cache").rglob("shard-*.safetensors")))
    assert 0 < written < len(list(tmp_path.joinpath("cold", "cache").rglob("shard-*.safetensors")))
    resumed = run_scan(str(data_file), config)
    assert 0 < resumed.store.n_forward_texts < len(texts)
    assert report_bytes(resumed) == report_bytes(cold)


def test_training_tokens_are_gathered_from_the_chunks_as_concatenating_them_would():
    import numpy as np
    import torch

    from safer_audit.model.activations import _gathered

    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 6, generator=generator) for n in (5, 1, 9, 3)]
    whole = torch.cat(chunks)
    for order in (np.random.default_rng(1).permutation(18)[:11], np.arange(18)[::-1].copy(), np.array([], dtype=int)):
        held = list(chunks)
        assert torch.equal(_gathered(held, order), whole[torch.from_numpy(order)])
        assert held == [None] * 4  # each chunk let go once its rows were copied
