"""Options declared once: config fields become CLI options, read options reach every reader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import click
from click.testing import CliRunner

from safer_audit.cli import cli, options_from
from safer_audit.config import option
from safer_audit.workflows.decisions import write_decisions

from .test_integrity import _edit_baseline, _gate, baseline_dir  # noqa: F401 (a fixture)


@dataclass(frozen=True)
class _Demo:
    level: Literal["low", "high"] = option("low", "How high.")
    count: int = option(2, "How many.", min=1)
    loud: bool = option(False, "Shout.")
    tags: tuple[str, ...] | None = option(None, "A tag (repeatable).", flag="--tag", multiple=True)
    internal: int = 7  # no help: not an option


@click.command()
@options_from(_Demo, "demo")
def _demo_command(demo: _Demo):
    click.echo(repr(demo))


def test_a_field_with_help_is_an_option_of_its_type_and_the_command_gets_one_object():
    run = CliRunner().invoke(_demo_command, ["--level", "high", "--count", "3", "--loud", "--tag", "b", "--tag", "a",
                                             "--tag", "b"])
    assert run.exit_code == 0, run.output
    assert run.output.strip() == repr(_Demo(level="high", count=3, loud=True, tags=("b", "a")))
    assert CliRunner().invoke(_demo_command, []).output.strip() == repr(_Demo())
    assert CliRunner().invoke(_demo_command, ["--level", "mid"]).exit_code == 2  # a Literal is a closed choice
    assert CliRunner().invoke(_demo_command, ["--count", "0"]).exit_code == 2  # min from the metadata
    assert CliRunner().invoke(_demo_command, ["--internal", "1"]).exit_code == 2


def _jsonl(path, n, big_line=None):
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]
    if big_line is not None:
        rows[big_line]["chosen"] = "x" * 500
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_scan_reads_with_max_record_bytes(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", 12, big_line=4)
    run = CliRunner().invoke(cli, ["scan", str(data), "--max-record-bytes", "200", "--cache-dir",
                                   str(tmp_path / "cache"), "--quiet"])
    assert run.exit_code == 2
    assert "d.jsonl:5" in run.output and "over the --max-record-bytes limit" in run.output  # refused while reading, before a model


def test_clean_reads_with_max_record_bytes(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", 12, big_line=2)
    decisions = write_decisions(tmp_path / "decisions.json", {})
    run = CliRunner().invoke(cli, ["clean", str(data), "-o", str(tmp_path / "out.jsonl"), "--decisions",
                                   str(decisions), "--max-record-bytes", "200"])
    assert run.exit_code == 2
    assert "d.jsonl:3" in run.output and "over the --max-record-bytes limit" in run.output


def test_the_gate_reads_with_the_baselines_max_record_bytes(baseline_dir):  # noqa: F811
    _edit_baseline(baseline_dir, lambda d: d["header"]["data"].update(max_record_bytes=50))
    run = _gate(baseline_dir)
    assert run.exit_code == 2
    assert "over the --max-record-bytes limit" in run.output, run.output


def test_backends_and_device_are_checked_before_any_work(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", 12)
    base = ["scan", str(data), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    run = CliRunner().invoke(cli, [*base, "--backend", "nope"])
    assert run.exit_code == 2 and "unknown model backend 'nope'" in run.output
    run = CliRunner().invoke(cli, [*base, "--device", "gpu"])
    assert run.exit_code == 2 and "'gpu' is not one of" in run.output
    run = CliRunner().invoke(cli, [*base, "--dtype", "float64"])
    assert run.exit_code == 2 and "float64" in run.output


def test_an_option_with_one_meaning_is_declared_once_in_cli_py():
    """Two click.option calls for the same flag must mean different things (their help differs);
    the same option shared by commands is one decorator (quiet_option, gate_decisions_option...)."""
    import ast
    import collections

    from .conftest import ROOT

    tree = ast.parse((ROOT / "safer_audit" / "cli.py").read_text(encoding="utf-8"))
    declared = collections.defaultdict(list)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "option"
                and node.args and isinstance(node.args[0], ast.Constant)):
            help_text = next((ast.unparse(k.value) for k in node.keywords if k.arg == "help"), None)
            declared[node.args[0].value].append(help_text)
    assert declared["--quiet"] == ["'No progress bars.'"]  # the walk sees the declarations
    repeated = {flag: helps for flag, helps in declared.items() if len(set(helps)) < len(helps)}
    assert not repeated, f"declared again with the same help: {repeated}"


def test_each_command_takes_exactly_the_options_of_its_groups_in_config_py():
    """A new option group is a change to config.py alone: its fields plus its name in COMMAND_GROUPS."""
    from safer_audit.cli import _params, cli
    from safer_audit.config import COMMAND_GROUPS, ScanConfig, option_fields

    declared = {spec.metadata.get("group") for spec in option_fields(ScanConfig)} - {None}
    assert declared == set().union(*COMMAND_GROUPS.values())  # every group reaches some command, none is unknown
    excluded = {"evaluate": ("activations.positions", "sae_train.seed")}  # evaluate declares these itself
    for command, groups in COMMAND_GROUPS.items():
        expected = {p.name for p in _params(ScanConfig, groups, excluded.get(command, ()))}
        others = {p.name for p in _params(ScanConfig, tuple(declared - set(groups)), ())} - expected
        got = {p.name for p in cli.commands[command].params}
        assert expected <= got, command
        assert not others & got, command
