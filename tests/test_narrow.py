"""Views laid out for 80 columns: a CI log (no terminal) and a real 80x24 terminal (tmux)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from safer_audit.report.types import FeatureContribution
from safer_audit.report.view import print_report

from .conftest import ROOT
from .test_clean import make_report, write_report

LABELS = ["refusal to give dangerous instructions", "hedging and disclaimers about legality",
          "step-by-step harmful how-to"]


def long_report(tmp_path: Path):
    """Five pairs, three suspects whose responses fill more than a screen, each with three labelled features."""
    data = tmp_path / "pairs.jsonl"
    words = "the assistant explains at length why this request cannot be helped with safely "
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: {words * 12} yes {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: {words * 12} no {i}"} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = make_report(data, {0: "flipped", 1: "noisy", 2: "flipped"})
    for finding in report.findings:
        finding.top_features = [FeatureContribution(100 + j, label, 0.4 - j / 10, 0.1) for j, label in
                                enumerate(LABELS)]
    return data, report


def test_the_scan_table_in_an_80_column_log_keeps_each_feature_label_on_one_line(tmp_path):
    _data, report = long_report(tmp_path)
    with open(os.devnull, "w") as sink:
        console = Console(width=80, record=True, file=sink, force_terminal=False, highlight=False, markup=False)
        print_report(report, console, top=3)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for label in LABELS:  # whole, on one line, for each of the three suspects
        assert sum(label in line for line in lines) == 3, (label, text)


def _tmux(socket: str, *args: str, env=None) -> str:
    return subprocess.run(["tmux", "-L", socket, "-f", os.devnull, *args], capture_output=True, text=True,
                          env=env, check=True).stdout


def _screen_when(socket: str, ready: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux(socket, "capture-pane", "-p", "-t", "t")
        if ready in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{ready!r} never showed; the screen:\n{screen}")


@pytest.fixture
def tmux_80x24(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the 80x24 terminal checks cannot run")
    socket = f"safer-audit-test-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TERM": "xterm-256color", "COLUMNS": "", "LINES": ""}
    env = {k: v for k, v in env.items() if v != "" and k != "TMUX"}

    def start(command: list[str]) -> None:
        shell = shlex.join(command) + "; sleep 30"  # keeps the last screen for capture-pane
        _tmux(socket, "new-session", "-d", "-s", "t", "-x", "80", "-y", "24", "-c", str(tmp_path), shell, env=env)

    yield start, socket
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def test_review_keeps_the_pair_and_its_scores_on_an_80x24_screen(tmp_path, tmux_80x24):
    start, socket = tmux_80x24
    data, report = long_report(tmp_path)
    report_path = write_report(report, tmp_path / "report.json")
    start([sys.executable, "-m", "safer_audit", "review", str(data), "--report", str(report_path),
           "--decisions", str(tmp_path / "decisions.json")])
    screen = _screen_when(socket, "[q] quit")
    rows = screen.splitlines()
    assert len(rows) <= 24 and max(len(row) for row in rows) <= 80
    # the responses fill more than a screen, yet what is being decided is right above the prompt
    assert "1/3  rank 1  flipped" in screen and "suspicion " in screen and "score_safe " in screen, screen
    assert not any("the request (conversation" in row for row in rows), "the whole panel fits: not a test of scrolling"
    _tmux(socket, "send-keys", "-t", "t", "q")


def test_the_scan_table_on_an_80x24_terminal_wraps_no_label_or_hint_mid_word(tmp_path, tmux_80x24):
    start, socket = tmux_80x24
    _data, report = long_report(tmp_path)
    path = write_report(report, tmp_path / "report.json")
    script = ("import sys; from safer_audit.cli import stdout_console; from safer_audit.report.view import print_report;"
              "from safer_audit.workflows.clean import load_report;"
              f"print_report(load_report({str(path)!r}), stdout_console(), top=1); print('DONE')")
    start([sys.executable, "-c", script])
    screen = _screen_when(socket, "DONE")
    rows = screen.splitlines()
    assert max(len(row) for row in rows) <= 80
    for label in LABELS:
        assert any(label in row for row in rows), (label, screen)
    # the legend under the table breaks between words only
    legend = " ".join(row.strip() for row in rows if row.strip() and not row.startswith(("│", "┃", "─", "━")))
    assert "low or negative is suspicious" in legend
