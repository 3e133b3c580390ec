"""The review loop, and the README's review walkthrough run as written on the committed sample."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from safer_audit.cli import cli
from safer_audit.data import load_pairs, pair_digest
from safer_audit.workflows.decisions import read_decisions
from safer_audit.workflows.review import review_findings

from .conftest import FIXTURES, ROOT
from .test_clean import make_report, write_report


def console() -> Console:
    return Console(record=True, width=120, force_terminal=False, markup=False, highlight=False)


def scripted(*answers: str):
    answers = list(answers)
    asked = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        if not answers:
            raise EOFError
        return answers.pop(0)
    return ask, asked


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    records = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i} is safe",
                "rejected": f"\n\nHuman: question {i}?\n\nAssistant: answer {i} is \x1b[31mharmful"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_decision_is_saved_at_once_and_review_resumes(data, tmp_path):
    report = make_report(data, {0: "flipped", 1: "noisy", 2: "noisy", 3: "flipped", 5: "quality"})
    path = tmp_path / "decisions.json"
    ask, asked = scripted("f", "x", "o looks fine", "s", "q")
    out = console()
    outcome = review_findings(report.findings, path, ask=ask, console=out, reviewer="Ann <ann@x.org>")
    assert (outcome.decided, outcome.skipped, outcome.quit, outcome.suspects) == (2, 1, True, 5)
    decisions = read_decisions(path)
    first, second = report.findings[0], report.findings[1]
    assert decisions[first.digest].verdict == "flipped" and decisions[first.digest].reviewer == "Ann <ann@x.org>"
    assert decisions[first.digest].where == f"{data}:1" and decisions[first.digest].pair_id == first.pair_id
    assert decisions[second.digest].verdict == "ok" and decisions[second.digest].note == "looks fine"
    text = out.export_text()
    assert "'x' is not a key here" in text
    assert "question 0?" in text  # the request before the final turn
    assert "\x1b" not in text and "\\x1b[31mharmful" in text  # dataset text is inert
    assert "»" in text  # the differing span is marked without colours
    # resumed: the two decided pairs are not shown again; the skipped one is
    ask, asked = scripted("n", "n", "n")
    outcome = review_findings(report.findings, path, ask=ask, console=console(), reviewer="Bo")
    assert (outcome.already, outcome.decided, outcome.remaining, outcome.quit) == (2, 3, 0, False)
    assert len(read_decisions(path)) == 5
    ask, asked = scripted()
    outcome = review_findings(report.findings, path, ask=ask, console=console(), reviewer="Bo")
    assert asked == [] and outcome.remaining == 0
    # --all shows them again, and a new decision replaces the old one
    ask, _ = scripted("o")
    review_findings(report.findings, path, ask=ask, console=console(), reviewer="Cy", review_all=True)
    assert read_decisions(path)[first.digest].verdict == "ok"


def test_review_command_refuses_a_report_of_other_data(data, tmp_path):
    report = write_report(make_report(data, {0: "flipped"}), tmp_path / "report.json")
    lines = data.read_text().splitlines(keepends=True)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(lines[1:]))
    result = CliRunner().invoke(cli, ["review", str(other), "--report", str(report), "--decisions",
                                      str(tmp_path / "d.json")], input="f\n")
    assert result.exit_code == 2 and "is not in" in result.output and not (tmp_path / "d.json").exists()


def test_clean_by_decisions_only_flipped(data, tmp_path):
    report = make_report(data, {0: "flipped", 1: "noisy", 2: "flipped"})
    decisions = tmp_path / "d.json"
    review_findings(report.findings, decisions, ask=scripted("f", "n", "o")[0], console=console(), reviewer="A")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["clean", str(data), "--decisions", str(decisions), "--only", "flipped",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    before, after = data.read_text().splitlines(), out.read_text().splitlines()
    assert len(after) == len(before) and after[1:] == before[1:]
    flipped = json.loads(after[0])
    assert flipped["chosen"] == json.loads(before[0])["rejected"]
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["selection"]["rule"] == "review decisions"
    assert [c["reason"].split(" by ")[0] for c in manifest["changes"]] == ["marked flipped"]
    result = CliRunner().invoke(cli, ["clean", str(data), "--decisions", str(decisions), "--mode", "flip",
                                      "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "--decisions sets each pair's action" in result.output


# ----------------------------------------------------------------------- the README walkthrough

def walkthrough() -> list[tuple[list[str], str | None]]:
    """The commands of the README's review walkthrough: (arguments after safer-audit, piped input)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```\n<!-- /walkthrough -->", readme, re.S).group(1)
    commands = []
    for line in block.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        piped = None
        if " | " in line:
            feed, line = line.split(" | ", 1)
            words = shlex.split(feed)
            assert words[0] == "printf"
            piped = words[1].encode().decode("unicode_escape")
        words = shlex.split(line)
        assert words[0] == "safer-audit"
        commands.append((words[1:], piped))
    return commands


def test_readme_walkthrough_scan_review_ten_clean_and_reorder(tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "fixtures").mkdir()
    shutil.copy(FIXTURES / "hh-harmless-300.jsonl", tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    # the tiny model, short texts and one SAE epoch keep the 300-pair scan quick
    tiny = ["--model", str(tiny_llama_dir), "--layer", "1", "--max-length", "32", "--cache-dir", str(tmp_path / "c"),
            "--latents", "64", "--k", "4", "--epochs", "1", "--n-features", "16", "--quiet"]
    commands = walkthrough()
    assert [c[0][0] for c in commands] == ["scan", "review", "review", "clean"]
    runner = CliRunner()
    for args, piped in commands:
        extra = tiny if args[0] == "scan" else []
        result = runner.invoke(cli, args + extra, input=piped or "", catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
        if piped:
            assert "10 decided, 1 skipped" in result.output

    decisions = read_decisions(".safer-audit/decisions.json")
    assert len(decisions) == 10
    verdicts = sorted(d.verdict for d in decisions.values())
    assert verdicts == sorted(["flipped"] * 3 + ["noisy"] * 2 + ["ok"] * 5)
    source = Path("fixtures/hh-harmless-300.jsonl")
    cleaned = Path("hh-reviewed.jsonl")
    original = [(r["context"], r["chosen"], r["rejected"]) for r in load_pairs(source).pairs.iter_rows(named=True)]
    expected = []
    for context, chosen, rejected in original:
        decision = decisions.get(pair_digest(context, chosen, rejected))
        if decision is None or decision.verdict == "ok":
            expected.append((context, chosen, rejected))
        elif decision.verdict == "flipped":
            expected.append((context, rejected, chosen))
    got = [(r["context"], r["chosen"], r["rejected"]) for r in load_pairs(cleaned).pairs.iter_rows(named=True)]
    assert got == expected and len(got) == len(original) - 2

    # decisions survive a reordering of the dataset
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    shuffled = Path("shuffled.jsonl")
    shuffled.write_text("".join(lines[::-1]), encoding="utf-8")
    result = runner.invoke(cli, ["clean", str(shuffled), "--decisions", ".safer-audit/decisions.json",
                                 "-o", "shuffled-reviewed.jsonl"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = [(r["context"], r["chosen"], r["rejected"])
             for r in load_pairs("shuffled-reviewed.jsonl").pairs.iter_rows(named=True)]
    assert again == got[::-1]
