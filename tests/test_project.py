"""The project's promises about itself: help everywhere, a true man page, README = CI."""

from __future__ import annotations

import re
import runpy

import click
import pytest
from click.testing import CliRunner

from safer_audit import __version__
from safer_audit.cli import cli

from .conftest import ROOT


def all_commands(group: click.Group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def test_version_and_help_on_every_command():
    runner = CliRunner()
    assert runner.invoke(cli, ["--version"]).output.strip() == f"safer-audit, version {__version__}"
    commands = list(all_commands(cli))
    assert {("scan",), ("validate",), ("explain",), ("features",), ("train-sae",), ("cache", "info"),
            ("plugins",), ("evaluate",), ("clean",), ("baseline",), ("gate",)} <= set(commands)
    for path in commands:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert result.output.startswith("Usage: ")


def test_man_page_is_generated_from_the_cli():
    generate = runpy.run_path(str(ROOT / "man" / "generate.py"))
    page = (ROOT / "man" / "safer-audit.1").read_text(encoding="utf-8")
    assert page == generate["render"](), "man/safer-audit.1 is stale: run python man/generate.py"
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS", "FILES",
                    "ENVIRONMENT", "EXAMPLES"):
        assert f".SH {section}" in page


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split(f"\n## {title}\n")[1].split("\n## ")[0]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", text, re.S)


def test_ci_runs_the_readme_install_and_test_command():
    blocks = sh_blocks(readme_section("Set-up").split("\n### ")[0])  # the commands before the torch notes
    assert len(blocks) == 2, "the set-up is two commands"
    test_command = blocks[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install, run_tests = test_command.split(" && ")[2:]
    assert install in ci.splitlines() and run_tests in ci.splitlines()
    assert "fixtures/hh-harmless-300.jsonl" in blocks[0] and "safer-audit scan" in blocks[0]


def test_readme_tells_how_to_get_the_cpu_torch_that_constraints_pins():
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(encoding="utf-8"), re.M).group(1)
    setup = readme_section("Set-up")
    assert "the CPU build" not in setup.split("\n### ")[0]  # the pin alone does not choose the build
    [cpu] = [block for block in sh_blocks(setup) if "--index-url" in block]
    # PyTorch's documented CPU-only install, into the same venv, at the version the set-up pins
    assert cpu.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert cpu.endswith(f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu")


def test_readme_never_clears_the_cache_unasked():
    usage = readme_section("Usage")
    lines = [line for line in usage.splitlines() if "cache clear" in line]
    assert lines, "the usage shows how to clear the cache"
    for line in lines:
        command = line.split("#")[0]
        assert "--yes" in command and "|" not in command, line


def test_ruff_is_clean():
    """The lint rules in pyproject.toml hold for the whole tree (CI runs this test)."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    completed = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_python_dash_m_runs_the_command_line():
    import os
    import subprocess
    import sys

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this tree first
    for args, expected in ((["--version"], f"safer-audit, version {__version__}"), (["--help"], "Usage: safer-audit ")):
        done = subprocess.run([sys.executable, "-m", "safer_audit", *args], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(expected), done.stdout
