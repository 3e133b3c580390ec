"""The outputs rule (devices, FIFOs, links, read-only files, ``-``) and bounded side inputs."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.common.files import read_bounded, writable_target, write_atomic
from safer_audit.errors import ConfigError

from .conftest import hh_records


def _mknod_char(path: Path) -> bool:
    try:  # the same major/minor as /dev/null: a real device node, made in a scratch folder
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return True
    except (PermissionError, OSError):
        return False


def test_a_device_node_is_never_replaced(tmp_path):
    node = tmp_path / "null"
    if not _mknod_char(node):
        pytest.skip("making a device node needs root")
    with pytest.raises(ConfigError, match="character device"):
        write_atomic(node, "x")
    assert stat.S_ISCHR(node.lstat().st_mode)


def test_a_link_to_a_device_or_fifo_is_refused_and_both_stay(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, kind in ((Path("/dev/null"), "character device"), (fifo, "FIFO")):
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        with pytest.raises(ConfigError, match=kind):
            write_atomic(link, "x")
        assert link.is_symlink()
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_link_to_a_regular_file_replaces_the_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "report.json"
    target.write_text("old")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_read_only_output_and_a_directory_are_refused(tmp_path):
    locked = tmp_path / "locked.json"
    locked.write_text("keep")
    locked.chmod(0o444)
    with pytest.raises(ConfigError, match="read-only"):
        write_atomic(locked, "x")
    assert locked.read_text() == "keep"
    with pytest.raises(ConfigError, match="directory"):
        writable_target(tmp_path)
    with pytest.raises(ConfigError, match="standard output"):
        writable_target("-")


def test_scan_refuses_a_device_output_before_the_work(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(4)))
    link = tmp_path / "out.json"
    link.symlink_to("/dev/null")
    result = CliRunner().invoke(cli, ["scan", str(data), "-o", str(link), "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2, result.output
    assert "character device" in result.output and "Traceback" not in result.output
    assert link.is_symlink()


def test_clean_never_replaces_a_device(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(4)))
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    report = tmp_path / "report.json"
    report.write_text("{}")
    result = CliRunner().invoke(cli, ["clean", str(data), "-o", str(fifo), "--report", str(report),
                                      "--force", "--drop-fraction", "0.5"])
    assert result.exit_code == 2, result.output
    assert "FIFO" in result.output and stat.S_ISFIFO(fifo.lstat().st_mode)


def test_read_bounded_refuses_a_fifo_without_waiting(tmp_path):
    fifo = tmp_path / "decisions.json"
    os.mkfifo(fifo)
    outcome = {}

    def read():
        try:
            read_bounded(fifo, 1000, ValueError)
        except ValueError as exc:
            outcome["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock the thread before failing
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        pytest.fail("reading a FIFO blocked")
    assert "FIFO" in outcome["error"]


def test_read_bounded_refuses_endless_and_oversized_files(tmp_path):
    with pytest.raises(ValueError, match="character device"):
        read_bounded("/dev/zero", 1000, ValueError)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(ValueError, match="1,001 bytes"):
        read_bounded(big, 1000, ValueError)
    assert read_bounded(big, 1001, ValueError) == b"x" * 1001


def test_scan_dash_writes_the_report_to_standard_output_alone(tiny_llama_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_records(24)))
    args = ["scan", str(data), "--model", str(tiny_llama_dir), "--layer", "1", "--max-length", "64",
            "--cache-dir", str(tmp_path / "cache"), "--latents", "64", "--k", "4", "--n-features", "16",
            "-o", "-", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)  # nothing but the report on standard output
    assert len(report["findings"]) == 24
    assert not (Path.cwd() / "-").exists()
