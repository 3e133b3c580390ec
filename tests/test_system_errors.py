"""Errors from the system (full disk, unwritable directory, damaged cache, killed runs) are one
`Error:` line naming what and where, exit 2, never a traceback, and never leave debris behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.common import files
from safer_audit.common.files import write_atomic

from .conftest import hh_records
from .test_clean import make_report, write_report


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(6)), encoding="utf-8")
    return path


@pytest.fixture
def report(data, tmp_path) -> Path:
    return write_report(make_report(data, {0: "flipped", 3: "noisy"}), tmp_path / "report.json")


# -- writing outputs ---------------------------------------------------------------------


def test_a_full_disk_names_the_output_and_leaves_no_temporary(data, report, tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel says it: no file name

    monkeypatch.setattr(os, "fsync", no_space)
    out = tmp_path / "clean.jsonl"
    result = invoke("clean", data, "-o", out, "--report", report)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"Error: {out}: {os.strerror(errno.ENOSPC)}"]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "report.json"]


def test_an_unwritable_output_directory_names_the_output_not_the_temporary(data, report, tmp_path, monkeypatch):
    # As root, chmod does not stop a write: refuse the temporary's creation the way a read-only directory would.
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT and Path(path).parent == tmp_path / "ro":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "ro" / "clean.jsonl"
    result = invoke("clean", data, "-o", out, "--report", report)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"Error: {out}: {os.strerror(errno.EACCES)}"]
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_writer_error_about_another_file_keeps_that_file_name(tmp_path):
    missing = tmp_path / "gone.jsonl"

    def copy_missing(tmp: Path) -> None:
        tmp.write_bytes(missing.read_bytes())

    with pytest.raises(FileNotFoundError) as caught:
        write_atomic(tmp_path / "out.jsonl", copy_missing)
    assert caught.value.filename == str(missing)
    with pytest.raises(OSError) as caught:
        write_atomic(tmp_path / "out.jsonl", lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(tmp_path / "out.jsonl"))
    assert list(tmp_path.iterdir()) == []


# -- scan: refuse before the work --------------------------------------------------------


@pytest.fixture
def no_scan(monkeypatch):
    """A scan that must not start: the refusal has to come before the model loads."""
    from safer_audit.pipeline import scan

    def started(*args, **kwargs):
        raise AssertionError("the scan started")

    monkeypatch.setattr(scan, "run_scan", started)


def test_scan_output_onto_its_input_is_refused_before_the_scan(data, no_scan):
    before = data.read_bytes()
    result = invoke("scan", data, "--output", data.with_suffix(".html"), "-o", data)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"Error: {data}: refusing to write over an input file"]
    assert data.read_bytes() == before


def test_scan_output_into_a_missing_directory_is_refused_before_the_scan(data, tmp_path, no_scan):
    out = tmp_path / "no-such-dir" / "report.json"
    result = invoke("scan", data, "-o", out)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"Error: {out}: the directory {out.parent} does not exist"]


# -- the cache ---------------------------------------------------------------------------


def test_cache_clear_without_a_terminal_needs_yes(tmp_path):
    shard = tmp_path / "cache" / "activations" / "abc" / "shard-0.safetensors"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"x" * 100)
    result = invoke("cache", "clear", "--cache-dir", tmp_path / "cache")  # CliRunner's stdin is not a TTY
    assert result.exit_code == 2, result.output
    assert "--yes" in error_lines(result)[0] and str(tmp_path / "cache") in error_lines(result)[0]
    assert shard.exists()
    result = invoke("cache", "clear", "--cache-dir", tmp_path / "cache", "--yes")
    assert result.exit_code == 0 and not shard.exists()


@pytest.mark.parametrize("content", [b'{"model": "m", "lay', b"[1, 2]", b"\xff\xfe\x00"])
def test_a_damaged_cache_config_is_marked_not_a_crash(tmp_path, content):
    entry = tmp_path / "cache" / "activations" / "abc"
    entry.mkdir(parents=True)
    (entry / "config.json").write_bytes(content)
    result = invoke("cache", "info", "--cache-dir", tmp_path / "cache", "--format", "json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)["entries"]
    assert row["config_error"].startswith(f"{entry / 'config.json'}: ")
    assert (row["key"], row["texts"]) == ("abc", 0)
    result = invoke("cache", "info", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0 and error_lines(result) == [], result.output


def test_an_unwritable_cache_names_the_cache_file(tiny_llama_dir, data, tmp_path, monkeypatch):
    args = ["--model", tiny_llama_dir, "--layer", "1", "--max-length", "64", "--latents", "16", "--k", "2",
            "--n-features", "4", "--quiet", "--noisy-fraction", "0.2"]  # 6 pairs: room to flag one (scan.min_pairs)
    # For real: a cache directory that cannot be created (/sys is read-only even to root).
    result = invoke("scan", data, *args, "--cache-dir", "/sys/safer-audit-test-cache")
    assert result.exit_code == 2, result.output
    assert error_lines(result)[0].startswith("Error: /sys/safer-audit-test-cache")
    # Simulated: a cache directory where files cannot be created.
    cache = tmp_path / "cache"
    real_open = os.open

    def read_only(path, flags, *more):
        if flags & os.O_CREAT and str(path).startswith(str(cache)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *more)

    monkeypatch.setattr(os, "open", read_only)
    result = invoke("scan", data, *args, "--cache-dir", cache)
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert line.startswith(f"Error: {cache}") and line.endswith(os.strerror(errno.EACCES))
    assert ".tmp" not in line  # the file meant, not write_atomic's hidden temporary


# -- temporaries of a killed clean ---------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_temporaries_of_the_output_go_and_nothing_else(tmp_path):
    out = tmp_path / "clean.jsonl"
    old = time.time() - 2 * files.STALE_AFTER
    names = {
        "old": ".clean.jsonl.0123456789ab.tmp",  # a killed writer's, long unmodified
        "fresh": ".clean.jsonl.ba9876543210.tmp",  # maybe a live writer's: recent
        "dead": files.temporary_name("clean.jsonl").replace(f".{os.getpid()}@", f".{dead_pid()}@"),  # writer gone
        "alive": files.temporary_name("clean.jsonl"),  # a named writer still running (this process)
        "other output": ".clean.jsonl.manifest.json.0123456789ae.tmp",
        "other program": ".clean.jsonl.swp.tmp",
        "other name": ".other.jsonl.0123456789af.tmp",
    }
    for key, name in names.items():
        (tmp_path / name).write_text(key)
        if key != "fresh":
            os.utime(tmp_path / name, (old, old))
    removed = files.remove_stale_temporaries(out.parent, out.name)
    assert sorted(p.name for p in removed) == sorted([names["old"], names["dead"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names.values()) - {names["old"], names["dead"]})


def test_the_next_clean_removes_what_a_killed_clean_left(data, report, tmp_path):
    out = tmp_path / "clean.jsonl"
    script = f"""
import os, signal
from safer_audit.workflows import clean
from safer_audit.workflows.clean import clean_dataset, load_report
def killed(*args):
    os.kill(os.getpid(), signal.SIGKILL)
clean._flip_in_place = killed
clean_dataset({str(data)!r}, {str(out)!r}, load_report({str(report)!r}), mode="flip")
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert completed.returncode == -9, completed.stderr.decode()
    [leftover] = [p for p in tmp_path.iterdir() if p.name.startswith(".clean.jsonl.")]
    old = time.time() - 2 * files.STALE_AFTER  # its writer is long gone
    os.utime(leftover, (old, old))
    result = invoke("clean", data, "-o", out, "--report", report, "--mode", "flip")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data.jsonl", "report.json", "clean.jsonl", "clean.jsonl.manifest.json"])
