"""benchmarks/_common.py: the scripts' shared --data/--limit options and the full HH file's default place."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from .conftest import FIXTURES, ROOT


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("_common", ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_full_data_file_is_found_from_the_main_checkout_and_from_a_worktree(common, tmp_path):
    """/work/main and /work/wt/NAME both default to /work/shared/data/...: the scripts looked only beside
    the checkout, so from a worktree their default --data named /work/wt/shared/..., which does not exist."""
    shared = tmp_path / "work" / "shared" / common.HH_TEST_FILE
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    assert common.shared_data(tmp_path / "work" / "main") == shared
    assert common.shared_data(tmp_path / "work" / "wt" / "hygiene") == shared
    assert common.shared_data(tmp_path / "elsewhere" / "a" / "b") == tmp_path / "elsewhere" / "a" / "shared" / \
        common.HH_TEST_FILE  # neither exists: the first place, for the error message


def test_data_and_limit(common):
    parser = common.bench_parser("Benchmark: something.\n\nMore.")
    assert parser.description == "Benchmark: something."
    args = parser.parse_args(["--data", str(FIXTURES / "hh-harmless-300.jsonl"), "--limit", "7"])
    assert len(common.read_pairs(args)) == 7
    assert len(common.read_pairs(parser.parse_args(["--data", str(FIXTURES / "hh-harmless-300.jsonl")]))) == 300


def test_every_benchmark_script_still_reads_its_options(common, monkeypatch):
    """The scripts import _common from their own folder; --help runs each one's parser set-up."""
    import runpy

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("bench_cold_extract", "bench_extract", "bench_gpu", "bench_layers", "bench_denoise", "bench_gate"):
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "benchmarks" / f"{name}.py"), run_name="__main__")
        assert exit_.value.code == 0, name
