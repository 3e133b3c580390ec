"""The project's promises about itself: help everywhere, a true man page, README = CI."""

from __future__ import annotations

import re
import runpy

import click
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


def test_ci_runs_the_readme_install_and_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.+?)\n```", readme.split("## Set-up")[1].split("## Usage")[0], re.S)
    assert len(blocks) == 2, "the set-up is two commands"
    test_command = blocks[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install, run_tests = test_command.split(" && ")[2:]
    assert install in ci.splitlines() and run_tests in ci.splitlines()
    assert "fixtures/hh-harmless-300.jsonl" in blocks[0] and "safer-audit scan" in blocks[0]
