"""A Ray address that cannot be joined, and a seed out of range, are the user's to fix: one line, exit 2,
at once (Ray itself would retry an unreachable head for many minutes, printing its own warnings)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import threading

import pytest

from safer_audit.config import ActivationConfig
from safer_audit.engine import ray as engine
from safer_audit.errors import ConfigError

from .conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # a hang fails the test instead of blocking the suite
    return subprocess.run([sys.executable, "-m", "safer_audit", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


def refused_port() -> int:
    with socket.socket() as probe:  # bound, never listening: a connection to it is refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "cannot reach 127.0.0.1:1 (Connection refused)"),
    ("bogus", "not a Ray address"),
    ("127.0.0.1:99999", "not a Ray address"),
    ("ray://", "not a Ray address"),
])
def test_an_address_that_cannot_be_joined_is_one_line_and_exit_2(data_file, tmp_path, address, says):
    result = run_cli("scan", str(data_file), "--engine", "ray", "--ray-address", address,
                     "-o", str(tmp_path / "r.json"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"Error: --ray-address {address}: ") and says in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_ray_client_address_without_the_client_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    with pytest.raises(ConfigError, match=r"ray://127\.0\.0\.1:1: a ray:// address needs the Ray Client: "
                                          r"pip install 'ray\[client\]'"):
        engine.check_address("ray://127.0.0.1:1")


def test_an_unreachable_head_is_refused_before_ray_starts(monkeypatch):
    port = refused_port()
    with pytest.raises(ConfigError, match=f"cannot reach 127.0.0.1:{port}"):
        engine.RayExecutor(ActivationConfig(engine="ray", ray_address=f"127.0.0.1:{port}"))
    for fine in (None, "local", "auto"):  # Ray finds these itself
        engine.check_address(fine)


def serve(answer: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A server on a free port that reads the client's first bytes and sends ``answer`` (None: never answers)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def handle():
        try:
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                if answer is not None:
                    connection.sendall(answer)
                connection.recv(64)  # held open until the client goes
        except OSError:  # the client went first (reset), or the test closed the server
            pass

    thread = threading.Thread(target=handle, daemon=True)
    thread.start()
    return server, thread


def test_a_port_that_is_not_a_ray_head_is_refused_within_the_timeout():
    server, thread = serve(None)
    port = server.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} accepts connections but does not answer as a Ray"):
            engine.check_address(f"127.0.0.1:{port}", timeout=0.5)
    finally:
        server.close()
    server, thread = serve(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        with pytest.raises(ConfigError, match="does not answer as a Ray head"):
            engine.check_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=5)
    finally:
        server.close()


def test_a_grpc_server_passes_the_check():
    server, thread = serve(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64")  # SETTINGS
    try:
        engine.check_address(f"localhost:{server.getsockname()[1]}", timeout=5)
    finally:
        server.close()


@pytest.mark.parametrize("command", ["scan", "evaluate", "features"])
def test_a_seed_out_of_range_is_a_usage_error(data_file, command):
    result = run_cli(command, str(data_file), "--seed", "1180591620717411303424")
    assert result.returncode == 2 and "'--seed': 1180591620717411303424 is not in the range 0<=x<=4294967295" \
        in result.stderr, result.stderr
    assert "bug" not in result.stderr
