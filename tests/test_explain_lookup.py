"""explain names a pair as a person does (id prefix, FILE:LINE, line) and reads a scan's report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit.cli import cli
from safer_audit.errors import UnknownPairError
from safer_audit.report.types import FeatureContribution
from safer_audit.report.view import format_number
from safer_audit.workflows.explain import find_pair

from .test_clean import make_report, write_report

ROWS = [{"pair_id": pid, "source": src, "line": line} for pid, src, line in [
    ("abc123", "a.jsonl", 1), ("abd456", "a.jsonl", 2), ("17", "a.jsonl", 3), ("ffe001", "b.jsonl", 1)]]


def test_find_pair_by_id_prefix_file_line_and_line():
    assert find_pair(ROWS, "abd456", "a")["line"] == 2
    assert find_pair(ROWS, "abc", "a")["pair_id"] == "abc123"  # a unique prefix
    assert find_pair(ROWS, "17", "a")["pair_id"] == "17"  # an exact id wins over a line number
    assert find_pair(ROWS, "2", "a")["pair_id"] == "abd456"  # a line number
    assert find_pair(ROWS, "b.jsonl:1", "a")["pair_id"] == "ffe001"
    with pytest.raises(UnknownPairError, match=r'prefix "ab" is ambiguous: 2 pairs .*abc123 \(a.jsonl:1\), abd456'):
        find_pair(ROWS, "ab", "a")
    with pytest.raises(UnknownPairError, match=r'"1" names 2 pairs'):
        find_pair(ROWS, "1", "a")
    with pytest.raises(UnknownPairError, match="no pair starts on line 9 of a.jsonl"):
        find_pair(ROWS, "a.jsonl:9", "a")
    with pytest.raises(UnknownPairError, match='pair id "zzz" is not in a'):
        find_pair(ROWS, "zzz", "a")


def test_no_negative_zero():
    assert format_number(-0.0) == "0" and format_number(0.0) == "0"
    assert format_number(-0.5) == "-0.5" and format_number(None) == "—"


@pytest.fixture
def scanned(tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "pairs.jsonl"
    records = [{"chosen": f"\n\nHuman: how do I do thing {i}?\n\nAssistant: carefully {i}",
                "rejected": f"\n\nHuman: how do I do thing {i}?\n\nAssistant: recklessly {i}"} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = make_report(data, {0: "flipped"})
    report.findings[2].score_safe = -0.0
    report.findings[2].top_features = [FeatureContribution(7, "refusal", -0.0, 0.0)]
    return data, write_report(report, tmp_path / "report.json")


def explain(*args):
    return CliRunner().invoke(cli, ["explain", *map(str, args)], env={"COLUMNS": "200"})


def test_explain_from_a_report_by_line_shows_the_request_and_no_negative_zero(scanned):
    data, report = scanned
    result = explain(data, f"{data}:3", "--report", report)
    assert result.exit_code == 0, result.output
    assert "how do I do thing 2?" in result.output  # the conversation before the final turn
    assert "carefully 2" in result.output and "recklessly 2" in result.output
    assert "refusal" in result.output and not re.search(r"(?<![\w.-])-0(?![.\d])", result.output)
    assert re.search(r"score_safe\s+0\b", result.output)
    by_prefix = explain(data, json.loads(report.read_text())["findings"][2]["pair_id"][:8], "--report", report)
    assert by_prefix.exit_code == 0 and "carefully 2" in by_prefix.output


def test_explain_report_follows_the_pair_after_a_reordering_and_refuses_other_data(scanned, tmp_path):
    data, report = scanned
    lines = data.read_text().splitlines(keepends=True)
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(lines[::-1]))
    result = explain(moved, "4", "--report", report)  # line 4 of the reversed file: pair 2
    assert result.exit_code == 0, result.output
    assert "carefully 2" in result.output and f"{moved}:4" in result.output
    edited = tmp_path / "edited.jsonl"
    edited.write_text(lines[0].replace("carefully 0", "gently 0") + "".join(lines[1:]))
    result = explain(edited, "1", "--report", report)
    assert result.exit_code == 2 and "holds no pair with the text of" in result.output
