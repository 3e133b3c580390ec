"""Scans sharing a cache at the same time: nobody deletes a live writer's files, one SAE per key."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from safer_audit.common.files import temporary_name
from safer_audit.model.activations import ActivationCache
from safer_audit.sae import SaeConfig, TopKSAE
from safer_audit.sae import model as sae_module

from .conftest import ROOT
from .test_determinism import SCAN, data_file, without_run_clock  # noqa: F401 (data_file is a fixture)


def test_opening_a_cache_keeps_a_live_writers_temporary(tmp_path):
    cache = ActivationCache(tmp_path, "k")
    half_written = cache.directory / temporary_name("shard-abc.safetensors")  # this (live) process is the writer
    half_written.write_bytes(b"partial")
    opened = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from safer_audit.model.activations import ActivationCache; "
                             "ActivationCache(Path(sys.argv[1]), 'k')", str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert half_written.read_bytes() == b"partial"


def test_saving_an_sae_where_another_writer_just_saved_keeps_theirs(tmp_path, monkeypatch):
    target = tmp_path / "sae"
    theirs = TopKSAE(SaeConfig(16, 64, 4), generator=torch.Generator().manual_seed(1))
    ours = TopKSAE(SaeConfig(16, 64, 4), generator=torch.Generator().manual_seed(2))
    real_save_file = sae_module.save_file
    raced = []

    def save_file_while_another_writer_finishes(tensors, path):
        if not raced:  # the other writer renames its directory into place while we are still writing
            raced.append(1)
            theirs.save(target)
        real_save_file(tensors, path)

    monkeypatch.setattr(sae_module, "save_file", save_file_while_another_writer_finishes)
    ours.save(target)
    assert raced
    assert torch.equal(TopKSAE.load(target).W_enc, theirs.W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no staging directory left behind


def test_two_scans_of_the_same_data_in_one_cache_at_once(tiny_llama_dir, data_file, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["scan", str(data_file), "--model", str(tiny_llama_dir), "--layer", "1", "--max-length", "64",
            "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--latents", "64", "--k", "4",
            "--n-features", "16", "--quiet"]
    scans = [subprocess.Popen([sys.executable, "-c", SCAN.format(shard_texts=4), *args, "--output",
                               str(tmp_path / f"report-{n}.json")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for n in range(2)]
    for scan in scans:
        _, stderr = scan.communicate(timeout=300)
        assert scan.returncode == 0, stderr[-2000:]
    reports = [without_run_clock((tmp_path / f"report-{n}.json").read_bytes()) for n in range(2)]
    assert reports[0] == reports[1]  # same SAE (hash, FVU) and ranking
    assert len(list(tmp_path.joinpath("cache").rglob("cfg.json"))) == 1
    assert not list(tmp_path.joinpath("cache").rglob(".*.tmp"))
