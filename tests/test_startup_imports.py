"""Commands that need no model start without torch or transformers: each one runs in its own interpreter
under ``python -X importtime``, which names every module imported, however it was reached (plugin
loading, a registration hook, a lazy import that fired)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safer_audit.workflows.gate import build_baseline

from .conftest import ROOT, tiny_scan_config, write_hh_pairs

HEAVY = ("torch", "transformers")
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +([\w.]+)$")


def run(*args: str | Path, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The command line in a fresh interpreter: its result, and the top-level packages it imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    code = "from safer_audit.cli import main; main()"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    imported = {m.group(1).split(".")[0] for line in done.stderr.splitlines() if (m := IMPORTED.match(line))}
    return done, imported


def heavy(imported: set[str]) -> list[str]:
    return [name for name in HEAVY if name in imported]


def test_the_importtime_reading_sees_torch_when_it_is_imported():
    # the check below can fail: a command that does load torch is seen doing it
    done, imported = run("plugins", "--format", "json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "click" in imported
    probe = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True,
                           text=True, timeout=300)
    assert "torch" in {m.group(1).split(".")[0] for line in probe.stderr.splitlines()
                       if (m := IMPORTED.match(line))}


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["plugins"], ["plugins", "--format", "json"],
                                  ["scan", "--help"], ["validate", ROOT / "fixtures" / "hh-harmless-300.jsonl"]],
                         ids=lambda args: " ".join(map(str, args)).replace(str(ROOT) + "/", ""))
def test_commands_without_a_model_import_neither_torch_nor_transformers(args):
    done, imported = run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert heavy(imported) == []


def test_plugins_lists_every_backend_without_loading_one():
    done, imported = run("plugins", "--format", "json")
    listed = {info["name"]: info["registers"] for info in json.loads(done.stdout)}
    assert listed["safer_audit.backends.hf"] == {"models": ["hf"]}
    assert set(listed["safer_audit.backends.judges"]["judges"]) >= {"score_safe", "reward_margin", "length"}
    assert listed["safer_audit.backends.labellers"] == {"labellers": ["offline"]}
    assert heavy(imported) == []


@pytest.fixture(scope="module")
def baselined(tmp_path_factory, tiny_llama_dir):
    """A data file and its baseline (made in this process, which may load anything)."""
    root = tmp_path_factory.mktemp("gate-startup")
    data = write_hh_pairs(root / "data.jsonl", 24)
    config = tiny_scan_config(tiny_llama_dir, root / "cache")
    build_baseline([str(data)], root / "baseline.json", config)
    return data, root / "baseline.json"


def test_the_gate_on_unchanged_data_imports_neither_torch_nor_transformers(baselined, tmp_path):
    data, baseline = baselined
    done, imported = run("gate", data, "--baseline", baseline, "--format", "json", "--quiet",
                         "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["new"] == 0
    assert heavy(imported) == []
    # nor pandas (pyarrow imports it when it builds a table from Python lists): no table is built
    assert "pandas" not in imported


def test_the_gate_with_a_new_pair_does_load_the_model(baselined, tmp_path):
    data, baseline = baselined
    changed = tmp_path / "changed.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[0])
    record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    changed.write_text("".join(lines[1:]) + json.dumps(record) + "\n", encoding="utf-8")
    done, imported = run("gate", changed, "--baseline", baseline, "--format", "json", "--quiet",
                         "--cache-dir", tmp_path / "cache")
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert json.loads(done.stdout)["new"] == 1
    assert "torch" in imported
