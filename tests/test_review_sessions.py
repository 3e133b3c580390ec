"""Review sessions that overlap, are killed or interrupted: no decision is lost, no debris is committed, and
the summary counts what the decisions file holds."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit import cli as cli_module
from safer_audit.cli import cli
from safer_audit.common.files import temporary_name
from safer_audit.workflows.decisions import lock_path, read_decisions
from safer_audit.workflows.review import review_findings

from .test_clean import make_report, write_report
from .test_review import console, scripted


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    records = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i} is safe",
                "rejected": f"\n\nHuman: question {i}?\n\nAssistant: answer {i} is harmful"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class Session:
    """A review session in a thread whose answers the test gives one at a time: ``answer`` returns once the
    session has acted on it and waits for the next (or has ended)."""

    def __init__(self, findings, path: Path, reviewer: str):
        self.answers: queue.Queue = queue.Queue()
        self.asked: queue.Queue = queue.Queue()
        self.outcome = None

        def ask(prompt: str) -> str:
            self.asked.put("asked")
            answer = self.answers.get()
            if answer is None:
                raise EOFError
            return answer

        def run():
            try:
                self.outcome = review_findings(findings, path, ask=ask, console=console(), reviewer=reviewer)
            finally:
                self.asked.put("done")

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.asked.get(timeout=60) == "asked"  # it has read the file and shows its first pair

    def answer(self, key: str | None) -> None:
        self.answers.put(key)
        self.asked.get(timeout=60)

    def end(self):
        self.answer(None)
        self.thread.join(timeout=60)
        return self.outcome


def test_two_sessions_on_one_file_keep_each_others_decisions(data, tmp_path):
    report = make_report(data, {i: "flipped" for i in range(6)})
    path = tmp_path / "decisions.json"
    first = Session(report.findings, path, "Ann")
    second = Session(report.findings, path, "Bo")  # both have read the (empty) file
    for key in ("f", "n", "o", "f"):  # Ann decides the first four pairs
        first.answer(key)
    for key in ("s", "s", "s", "n"):  # then Bo, who still holds the empty file, decides the fourth: his is later
        second.answer(key)
    assert (first.end().decided, second.end().decided) == (4, 1)
    saved = read_decisions(path)
    digests = [f.digest for f in report.findings]
    assert {d: (saved[d].verdict, saved[d].reviewer) for d in saved} == {
        digests[0]: ("flipped", "Ann"), digests[1]: ("noisy", "Ann"), digests[2]: ("ok", "Ann"),
        digests[3]: ("noisy", "Bo")}
    assert not lock_path(path).exists()  # the lock file goes with the lock


def test_a_killed_writers_temporary_is_removed_and_never_committed(data, tmp_path, monkeypatch):
    report = write_report(make_report(data, {0: "flipped", 1: "noisy"}), tmp_path / "report.json")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(cli, ["review", str(data), "--report", str(report)], input="f\n")
    assert result.exit_code == 0, result.output
    state = repo / ".safer-audit"
    # a writer killed mid-save leaves its temporary: its pid names a process that is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    debris = state / temporary_name("decisions.json").replace(f".{os.getpid()}@", f".{dead.pid}@")
    debris.write_text("half a file")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout.split()
    assert staged == [".safer-audit/.gitignore", ".safer-audit/decisions.json"]
    result = CliRunner().invoke(cli, ["review", str(data), "--report", str(report)], input="n\n")
    assert result.exit_code == 0, result.output
    assert not debris.exists() and len(read_decisions(state / "decisions.json")) == 2
    assert sorted(p.name for p in state.iterdir()) == [".gitignore", "decisions.json"]


def test_ctrl_c_prints_the_summary_and_exits_130(data, tmp_path, monkeypatch):
    report = write_report(make_report(data, {0: "flipped", 1: "noisy", 2: "noisy"}), tmp_path / "report.json")
    answers = iter(["f\n"])

    def read_line(prompt: str) -> str:
        answer = next(answers, None)
        if answer is None:
            raise KeyboardInterrupt  # what SIGINT raises while the prompt waits
        return answer

    monkeypatch.setattr(cli_module, "_read_line", read_line)
    decisions = tmp_path / "d.json"
    result = CliRunner().invoke(cli, ["review", str(data), "--report", str(report), "--decisions", str(decisions)])
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output
    assert (f"Interrupted: every decision made is saved. 1 decided, 0 skipped, 2 of 3 suspects undecided; "
            f"decisions in {decisions}") in result.output
    assert len(read_decisions(decisions)) == 1


def test_ctrl_c_stops_the_loop_with_the_decisions_kept(data, tmp_path, monkeypatch):
    report = make_report(data, {0: "flipped", 1: "noisy"})
    answers = iter(["f"])

    def ask(prompt: str) -> str:
        answer = next(answers, None)
        if answer is None:
            raise KeyboardInterrupt
        return answer

    try:
        outcome = review_findings(report.findings, tmp_path / "d.json", ask=ask, console=console(), reviewer="A")
    except KeyboardInterrupt:  # escaping, it would stop the test run itself
        pytest.fail("Ctrl-C escaped the review loop")
    assert (outcome.interrupted, outcome.decided, outcome.remaining) == (True, 1, 1)
    # on a terminal, Ctrl-C's key is the same interrupt (not a quiet quit)
    monkeypatch.setattr("click.getchar", lambda: "\x03")
    with pytest.raises(KeyboardInterrupt):
        cli_module._read_key("> ")


def test_review_all_after_one_decision_counts_the_undecided(data, tmp_path):
    report = write_report(make_report(data, {i: "noisy" for i in range(11)}), tmp_path / "report.json")
    decisions = tmp_path / "d.json"
    ask, _ = scripted("f")
    review_findings(make_report(data, {i: "noisy" for i in range(11)}).findings, decisions, ask=ask,
                    console=console(), reviewer="A")
    result = CliRunner().invoke(cli, ["review", str(data), "--report", str(report), "--decisions", str(decisions),
                                      "--all"], input="q\n")
    assert result.exit_code == 0, result.output
    assert "0 decided, 0 skipped, 10 of 11 suspects undecided" in result.output


def _save_many(path: str, writer: int, count: int) -> None:
    from safer_audit.workflows.decisions import Decision, update_decisions

    for i in range(count):
        update_decisions(path, {f"{writer:016x}{i:016x}": Decision("ok", "2026-11-24T14:00:00Z", f"w{writer}")})


def test_writers_in_other_processes_lose_nothing(tmp_path):
    import multiprocessing

    path = tmp_path / "decisions.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_save_many, args=(str(path), w, 25)) for w in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    assert len(read_decisions(path)) == 75
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decisions.json"]  # no lock file, no temporary left


def test_a_note_can_be_typed_on_a_terminal(data, tmp_path, monkeypatch):
    # on a terminal one key decides at once; the capital asks for a note first
    keys = iter(["N", "o"])
    monkeypatch.setattr("click.getchar", lambda: next(keys))
    monkeypatch.setattr("click.prompt", lambda *args, **kwargs: "the replies say the same thing")
    report = make_report(data, {0: "noisy", 1: "noisy"})
    decisions = tmp_path / "d.json"
    review_findings(report.findings, decisions, ask=cli_module._read_key, console=console(), reviewer="A")
    notes = sorted((d.verdict, d.note) for d in read_decisions(decisions).values())
    assert notes == [("noisy", "the replies say the same thing"), ("ok", "")]
