"""Side inputs read whole (decisions, reports, features and taxonomy files, an SAE's config) are bounded: a FIFO,
a device such as /dev/zero or a file over the limit is one line and exit 2 at once, never a wait or a fill of
memory. The CLI runs in a subprocess with a timeout, so a hang fails the test instead of blocking the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safer_audit import config
from safer_audit.errors import SaferAuditError
from safer_audit.features.salience import read_features_file
from safer_audit.sae import formats
from safer_audit.workflows import clean, decisions

from .conftest import ROOT
from .test_clean import make_report, write_report

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def run_cli(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safer_audit", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, stdin=subprocess.DEVNULL)


def refused(result: subprocess.CompletedProcess, path: Path | str, says: str) -> None:
    """Exit 2 and exactly one error line, naming ``path`` and saying ``says``."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and "bug" not in result.stderr, result.stderr
    assert errors[0].startswith(f"Error: {path}") and says in errors[0], errors[0]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    records = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i} is safe",
                "rejected": f"\n\nHuman: question {i}?\n\nAssistant: answer {i} is harmful"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def report(data, tmp_path) -> Path:
    return write_report(make_report(data, {0: "flipped", 1: "noisy"}), tmp_path / "report.json")


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.json"
    os.mkfifo(path)  # nobody writes to it: a plain open() would wait for ever
    return path


BAD = ("fifo", "zero")


def bad_input(kind: str, fifo: Path) -> tuple[Path, str]:
    """The path of a bad side input of ``kind`` and what its refusal says."""
    return (fifo, "is a FIFO; give a regular file") if kind == "fifo" else \
        (Path("/dev/zero"), "is a character device; give a regular file")


@pytest.mark.parametrize("kind", BAD)
def test_decisions_that_are_not_a_regular_file(kind, data, report, fifo, tmp_path):
    path, says = bad_input(kind, fifo)
    refused(run_cli("clean", data, "--decisions", path, "-o", tmp_path / "out.jsonl"), path, says)
    assert not (tmp_path / "out.jsonl").exists()
    if kind == "fifo":
        refused(run_cli("review", data, "--report", report, "--decisions", path), path, says)


@pytest.mark.parametrize("kind", BAD)
def test_a_report_that_is_not_a_regular_file(kind, data, fifo, tmp_path):
    path, says = bad_input(kind, fifo)
    refused(run_cli("clean", data, "--report", path, "--drop-fraction", "0.1", "-o", tmp_path / "o.jsonl"),
            path, says)
    refused(run_cli("explain", data, "1", "--report", path) if kind == "fifo" else
            run_cli("review", data, "--report", path, "--decisions", tmp_path / "d.json"), path, says)


def tiny_scan(model_dir: Path, cache_dir: Path, data: Path, *more) -> subprocess.CompletedProcess:
    return run_cli("scan", data, "--model", model_dir, "--layer", "1", "--max-length", "64", "--latents", "64",
                   "--k", "4", "--n-features", "16", "--cache-dir", cache_dir, "--labeller", "none", "-q", *more)


@pytest.mark.parametrize("kind", BAD)
def test_a_features_file_that_is_not_a_regular_file(kind, data_file, fifo, tiny_llama_dir, tmp_path):
    path, says = bad_input(kind, fifo)
    refused(tiny_scan(tiny_llama_dir, tmp_path / "cache", data_file, "--features", path, "-o", tmp_path / "r.json"),
            path, says)


@pytest.mark.parametrize("kind", BAD)
def test_a_taxonomy_that_is_not_a_regular_file(kind, fifo):
    path, says = bad_input(kind, fifo)
    # the offline labeller reads its taxonomy when it is made; a subprocess, so a wait fails rather than blocks
    code = ("import sys\nfrom safer_audit.backends.labellers import load_taxonomy\nfrom safer_audit.errors import "
            "ConfigError\ntry:\n    load_taxonomy(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc)\n"
            "    sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 2 and result.stdout == f"{path}: {says}\n", result.stdout + result.stderr


# ----------------------------------------------------------------------------- files over the limit

def oversized(path: Path, limit: int) -> Path:
    with open(path, "wb") as out:  # sparse: the size is what counts, nothing is written
        out.truncate(limit + 1)
    return path


def test_a_report_over_the_limit_is_refused_by_its_size_before_a_byte_is_read(data, tmp_path):
    path = oversized(tmp_path / "report.json", config.MAX_REPORT_BYTES)
    result = run_cli("clean", data, "--report", path, "--drop-fraction", "0.1", "-o", tmp_path / "o.jsonl")
    refused(result, path, f"is {config.MAX_REPORT_BYTES + 1:,} bytes; the most read is {config.MAX_REPORT_BYTES:,}")


@pytest.mark.parametrize("read, module, limit", [
    (lambda p: decisions.read_decisions(p), decisions, "MAX_DECISIONS_BYTES"),
    (lambda p: clean.load_report(p), clean, "MAX_REPORT_BYTES"),
    (lambda p: read_features_file(p), sys.modules[read_features_file.__module__], "MAX_FEATURES_BYTES"),
    (lambda p: formats.read_json(p), formats, "MAX_SAE_CONFIG_BYTES"),
], ids=["decisions", "report", "features", "sae-config"])
def test_each_side_input_over_its_limit_is_one_line(read, module, limit, tmp_path, monkeypatch):
    monkeypatch.setattr(module, limit, 1000)
    path = tmp_path / "input.json"
    path.write_text(" " * 1001)
    with pytest.raises(SaferAuditError) as caught:
        read(path)
    assert str(caught.value) == f"{path}: is 1,001 bytes; the most read is 1,000"


def test_a_taxonomy_over_its_limit_is_one_line(tmp_path, monkeypatch):
    from safer_audit.backends import labellers

    monkeypatch.setattr(labellers, "MAX_TAXONOMY_BYTES", 1000)
    path = tmp_path / "taxonomy.yaml"
    path.write_text("#" * 1001)
    with pytest.raises(SaferAuditError, match=r"is 1,001 bytes; the most read is 1,000$"):
        labellers.load_taxonomy(path)


def test_limits_are_kept_in_one_place():
    # each reader uses the one value config.py holds (not a copy that could drift)
    from safer_audit.backends import labellers

    assert clean.MAX_REPORT_BYTES is config.MAX_REPORT_BYTES and decisions.MAX_DECISIONS_BYTES is \
        config.MAX_DECISIONS_BYTES and labellers.MAX_TAXONOMY_BYTES is config.MAX_TAXONOMY_BYTES
    assert config.MAX_REPORT_BYTES >= 1_000_000 * 2_500  # a 1M-pair report of HH pairs (~2.5 kB each)



def test_a_model_whose_config_is_a_fifo(data_file, tmp_path, tiny_llama_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    result = run_cli("scan", data_file, "--model", model, "-o", tmp_path / "r.json")
    refused(result, model / "config.json", "is a FIFO; give a regular file")
