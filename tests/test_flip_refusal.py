"""A scan whose judges cannot identify the flip mixture gives no flip probability: the report's run says why in one
line, every view shows that line, every finding's flip_probability is null, and clean --min-flip-probability
refuses with that line (exit 2)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from safer_audit.cli import cli
from safer_audit.report.types import Report, export_report
from safer_audit.report.view import print_report
from safer_audit.scoring.posterior import FlipMixture

from .conftest import write_hh_pairs
from .test_profile_commands import N, _options

# what the fit of the 300-pair sample looks like: disagreeing margins as large as agreeing ones
WEAK = FlipMixture(0.2, 3.6, -154.2, 0.04, 1.2, N - 5, 5)


@pytest.fixture
def weak_judges(monkeypatch):
    from safer_audit.scoring import heads, stack

    for module in (heads, stack):
        monkeypatch.setattr(module, "flip_posterior", lambda margin: (torch.sigmoid(-margin), WEAK))


def test_weak_judges_give_no_flip_probability_and_clean_refuses_with_the_reason(tiny_llama_dir, tmp_path,
                                                                                weak_judges):
    data = write_hh_pairs(tmp_path / "pairs.jsonl", N)
    report_path = tmp_path / "report.json"
    run = CliRunner().invoke(cli, ["scan", str(data), "-o", str(report_path), "--labeller", "none",
                                   *_options(tiny_llama_dir, tmp_path)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    saved = json.loads(report_path.read_text())
    assert saved["run"]["flip_probability_note"] == WEAK.reason
    assert WEAK.reason.startswith("no flip probability: the judges are too weak") and "\n" not in WEAK.reason
    assert all(finding["flip_probability"] is None for finding in saved["findings"])
    report = Report.from_dict(saved)
    for name in ("report.md", "report.html"):
        report_copy = tmp_path / name
        export_report(report, report_copy)
        assert "no flip probability: the judges are too weak" in report_copy.read_text()
    console = Console(file=io.StringIO(), width=100)
    print_report(report, console)
    assert "no flip probability: the judges are too weak" in " ".join(console.file.getvalue().split())
    result = CliRunner().invoke(cli, ["clean", str(data), "-o", str(tmp_path / "c.jsonl"), "--report",
                                      str(report_path), "--min-flip-probability", "0.9"])
    assert result.exit_code == 2 and WEAK.reason in " ".join(result.output.split())
    assert not (tmp_path / "c.jsonl").exists()
    # the other rules still work on that report
    result = CliRunner().invoke(cli, ["clean", str(data), "-o", str(tmp_path / "d.jsonl"), "--report",
                                      str(report_path), "--drop-fraction", "0.25"])
    assert result.exit_code == 0, result.output
