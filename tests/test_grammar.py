"""One option grammar: a meaning has one spelling on every command, and the old spellings still work, warned."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from safer_audit.cli import RENAMED_OPTIONS, cli
from safer_audit.workflows.decisions import write_decisions

FIXTURE = Path(__file__).parent.parent / "fixtures" / "hh-harmless-300.jsonl"

# meaning -> (the canonical spelling, every spelling or parameter name that means it)
MEANINGS = {
    "a file or directory the command writes": (
        ("--output", "-o"), {"--out", "--output", "-o", "--write", "--dest", "out", "output", "outputs"}),
    "a scan report the command reads": (("--report",), {"--report", "--from-report", "--report-file", "report_path"}),
    "the format of what the command prints or writes": (
        ("--format",), {"--format", "--json", "--as-json", "--output-format", "as_json", "output_format"}),
}
# the commands that must have each meaning (a command that loses one fails here too)
MUST_HAVE = {
    "a file or directory the command writes": {"scan", "features", "baseline", "train-sae", "evaluate", "clean"},
    "a scan report the command reads": {"explain", "review", "clean"},
    "the format of what the command prints or writes": {"validate", "plugins", "cache info", "gate", "scan"},
}


def _commands(group: click.Group = cli, prefix: str = ""):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_each_meaning_has_one_spelling_on_every_command():
    wrong, having = [], {meaning: set() for meaning in MEANINGS}
    for name, command in _commands():
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            spellings = {*param.opts, *param.secondary_opts, param.name}
            for meaning, (canonical, words) in MEANINGS.items():
                if spellings & words:
                    having[meaning].add(name)
                    if sorted(param.opts) != sorted(canonical):
                        wrong.append(f"{name}: {'/'.join(param.opts)} ({meaning}) should be {'/'.join(canonical)}")
    assert not wrong, "\n".join(wrong)
    for meaning, commands in MUST_HAVE.items():
        assert commands <= having[meaning], (meaning, commands - having[meaning])


def test_old_spellings_are_documented_nowhere_but_still_map_to_the_canonical_ones():
    canonical = {spelling for spellings, _ in MEANINGS.values() for spelling in spellings}
    assert {new[0] for new in RENAMED_OPTIONS.values()} <= canonical
    for name, command in _commands():
        options = {opt for param in command.params for opt in getattr(param, "opts", ())}
        assert not options & set(RENAMED_OPTIONS), name  # the old names are not options, so not in --help


def test_validate_json_still_works_with_a_warning_line_on_stderr():
    old = CliRunner().invoke(cli, ["validate", str(FIXTURE), "--json"])
    new = CliRunner().invoke(cli, ["validate", str(FIXTURE), "--format", "json"])
    assert old.exit_code == new.exit_code == 0, old.output
    assert json.loads(old.stdout) == json.loads(new.stdout)  # stdout stays JSON only
    assert old.stderr.splitlines() == ["Warning: --json is deprecated and goes in a later release; use --format json"]
    assert new.stderr == ""


def test_clean_takes_out_and_from_report_as_before(tmp_path):
    decisions = write_decisions(tmp_path / "decisions.json", {})
    old = CliRunner().invoke(cli, ["clean", str(FIXTURE), f"--out={tmp_path / 'a.jsonl'}", "--decisions",
                                   str(decisions), "--dry-run"])
    assert old.exit_code == 0, old.output
    assert "Warning: --out is deprecated and goes in a later release; use --output" in old.stderr
    new = CliRunner().invoke(cli, ["clean", str(FIXTURE), "-o", str(tmp_path / "a.jsonl"), "--decisions",
                                   str(decisions), "--dry-run"])
    assert new.exit_code == 0 and "deprecated" not in new.stderr
    # --from-report reaches --report: a report that is not there is named as --report's
    missing = CliRunner().invoke(cli, ["clean", str(FIXTURE), "-o", str(tmp_path / "a.jsonl"), "--from-report",
                                       str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "--report" in missing.stderr and "use --report" in missing.stderr


def test_an_old_spelling_after_double_dash_or_on_a_command_without_the_new_option_is_left_alone():
    from safer_audit.cli import renamed_to_current

    assert renamed_to_current(cli.commands["validate"], ["x", "--", "--json"]) == ["x", "--", "--json"]
    # explain writes nothing: --out stays an unknown option there
    run = CliRunner().invoke(cli, ["explain", str(FIXTURE), "1", "--out", "x"])
    assert run.exit_code == 2 and "No such option '--out'" in run.output
