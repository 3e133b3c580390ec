"""The HTML report a reviewer works through: structure, escaping, paths, the small-data
guard, the scan's progress and next steps, and (when Chromium is installed) the page itself
at 1400 and 390 px."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from safer_audit.backends.exporters import render_html, script_json
from safer_audit.cli import cli
from safer_audit.config import ScanConfig
from safer_audit.errors import ScanError, inert
from safer_audit.pipeline.scan import min_pairs, scan_pairs
from safer_audit.report.types import FEW_PAIRS, display_path

from .conftest import ROOT, hh_records
from .test_report import make_report

HOSTILE_ID = '"><script>alert(1)</script><b x=\'1\'>&amp;\u2028\u2029</script><!--'
HOSTILE_TEXT = "</script><script>alert(2)</script>\u2028<!-- <img src=x onerror=alert(3)> &lt;"


class Page(HTMLParser):
    """Elements with their attributes, scripts and visible text, as a browser parses them."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.data_blocks: list[str] = []
        self.text: list[str] = []
        self._script: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs).get("type", "js")

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script == "application/json":
            self.data_blocks.append(data)
        elif self._script:
            self.scripts.append(data)
        else:
            self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def hostile_report():
    report = make_report()
    first = report.findings[0]
    report.findings[0] = replace(first, pair_id=HOSTILE_ID, chosen=first.chosen + HOSTILE_TEXT,
                                 source=f'dir "x"/{HOSTILE_ID}.jsonl')
    return report


def test_page_has_search_filter_decisions_and_a_digest_per_suspect():
    report = make_report()
    page = Page(render_html(report))
    assert page.find("input", id="q", type="search")
    text = render_html(report)
    category = re.search(r'<select id="category">(.*?)</select>', text).group(1)
    assert re.findall(r'value="(\w*)"', category) == ["", "flipped", "noisy", "quality"]
    assert page.find("input", id="reviewer") and page.find("button", id="download")
    rows = [a for t, a in page.elements if t == "tr" and "data-digest" in a]
    assert [r["data-digest"] for r in rows] == [f.digest for f in report.suspects()]
    assert [r["data-category"] for r in rows] == [f.category for f in report.suspects()]
    verdicts = [a["data-verdict"] for t, a in page.elements if t == "button" and "data-verdict" in a]
    assert verdicts == ["flipped", "noisy", "ok"] * len(rows)
    # the feature cards come after the suspects, collapsed
    features = page.find("details", id="features")
    assert features and "open" not in features[0]
    assert page.text.index(next(t for t in page.text if t.startswith("Features ("))) > \
        page.text.index(next(t for t in page.text if t.startswith("Suspects (")))


def test_decisions_data_block_names_each_suspect_by_digest():
    report = make_report()
    page = Page(render_html(report))
    block, _all_pairs = page.data_blocks  # the decisions' block, then every pair's (the all-pairs search)
    data = json.loads(block)
    assert data["format"] == "safer-audit-decisions" and data["version"] == 1
    assert data["pairs"] == {f.digest: [f.pair_id, f"{f.source}:{f.line}"] for f in report.suspects()}
    assert re.fullmatch(r"[0-9a-f]{16}", data["report"])


def test_hostile_id_and_text_stay_text_in_attributes_and_data():
    report = hostile_report()
    text = render_html(report)
    page = Page(text)
    assert len(page.scripts) == 1 and len(page.data_blocks) == 2  # nothing broke out into a script
    assert not page.find("img") and not page.find("b")
    block, all_pairs = page.data_blocks
    assert "</" not in all_pairs and "<!--" not in all_pairs and "\u2028" not in all_pairs
    assert "</" not in block and "<!--" not in block and "\u2028" not in block and "\u2029" not in block
    data = json.loads(block)
    hostile = report.findings[0]
    assert data["pairs"][hostile.digest] == [HOSTILE_ID, f"{hostile.source}:{hostile.line}"]
    visible = "".join(page.text)
    # line and paragraph separators are shown written out (inert), like every other invisible character
    assert inert(HOSTILE_ID) in visible and inert(HOSTILE_TEXT, multiline=True) in visible
    digests = [a["data-digest"] for t, a in page.elements if t == "tr" and "data-digest" in a]
    assert hostile.digest in digests


@pytest.mark.parametrize("value", ["a<b>&c", "</script>", "\u2028\u2029", "<!--x-->"])
def test_script_json_round_trips_and_cannot_end_the_script(value):
    text = script_json({"k": value})
    assert json.loads(text) == {"k": value}
    assert not set(text) & {"<", ">", "&", "\u2028", "\u2029"}


def test_source_line_wraps_only_at_a_slash():
    report = make_report("some/long-directory.name/hh-rlhf_harmless-base.jsonl.gz")
    text = render_html(report)
    cell = re.search(r'<td class="loc"[^>]*>(.*?)</td>', text).group(1)
    assert cell == ('<div><span class="path">some/</span><wbr><span class="path">long-directory.name/</span><wbr>'
                    '<span class="path">hh-rlhf_harmless-base.jsonl.gz:17</span></div>')
    assert ".path { white-space: nowrap; }" in text


def test_page_shows_the_top_suspects_and_says_how_many_are_left_out():
    report = make_report()
    page = render_html(report, max_suspects=2)
    assert page.count("<tr data-digest=") == 2
    assert "The page shows the top 2 of 3 suspects by rank" in page
    assert "The page shows the top" not in render_html(report)


def test_few_pairs_warning_in_page_and_summary():
    report = make_report()
    page = Page(render_html(report))
    assert page.find("p", **{"class": "warning", "role": "alert"})
    assert "only 4 pairs" in "".join(page.text)
    report.run.pairs = FEW_PAIRS
    assert not Page(render_html(report)).find("p", **{"class": "warning", "role": "alert"})


def test_display_path_hides_absolute_paths(tmp_path, monkeypatch):
    home, work, elsewhere = tmp_path / "home", tmp_path / "home" / "work", tmp_path / "elsewhere"
    for d in (work / "data", home / ".cache" / "safer-audit" / "saes" / "k", elsewhere / "sae"):
        d.mkdir(parents=True)
    (work / "data" / "x.jsonl").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert display_path(work / "data" / "x.jsonl") == "data/x.jsonl"
    assert display_path("data/x.jsonl") == "data/x.jsonl"
    assert display_path(home / ".cache" / "safer-audit" / "saes" / "k", home / ".cache" / "safer-audit") \
        == "~/.cache/safer-audit/saes/k"
    assert display_path(elsewhere / "sae", elsewhere) == "<cache>/sae"  # a cache outside home, by name
    assert display_path(elsewhere / "sae") == "../../elsewhere/sae"
    assert display_path("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"  # a hub id, not a local path


# -- the small-data guard, progress and next steps -----------------------------------------


def write_pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(n)), encoding="utf-8")
    return path


def test_too_few_pairs_is_refused_naming_the_minimum(tmp_path):
    from safer_audit.data import load_pairs

    config = ScanConfig()
    assert min_pairs(config) == 10 and min_pairs(replace(config, noisy_fraction=0.25)) == 4
    pairs = load_pairs(str(write_pairs(tmp_path / "d.jsonl", 9))).pairs
    with pytest.raises(ScanError, match="9 usable pair.*needs at least 10"):
        scan_pairs(pairs, config, source="d.jsonl", backend=object())  # refused before the model is used
    result = CliRunner().invoke(cli, ["scan", str(tmp_path / "d.jsonl"), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert re.search(r"^Error: .*9 usable pair\(s\); a scan needs at least 10", result.output, re.M)


SCAN_ARGS = ["--layer", "1", "--max-length", "64", "--latents", "64", "--k", "4", "--n-features", "16"]


def test_scan_reports_progress_warns_of_few_pairs_and_names_no_absolute_path(tiny_llama_dir, tmp_path, monkeypatch):
    from safer_audit.backends.exporters import export_html, export_json
    from safer_audit.common.progress import no_progress
    from safer_audit.config import ActivationConfig, SaeTrainConfig
    from safer_audit.pipeline.scan import run_scan

    (tmp_path / "data").mkdir()
    data = write_pairs(tmp_path / "data" / "pairs.jsonl", 12)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    steps, warnings = [], []

    def record(description, unit="", scale=1.0):
        steps.append(description)
        return no_progress()

    config = ScanConfig(activations=ActivationConfig(model=str(tiny_llama_dir), layer=1, max_length=64,
                                                     cache_dir=tmp_path / "cache"),
                        sae_train=SaeTrainConfig(n_latents=64, k=4), n_features=16)
    report = run_scan(str(data), config, steps=record, warn=warnings.append).report
    assert {"Loading model", "Salience", "Scores"} <= set(steps)
    assert "Report, labelling features with offline" in steps  # the stage says what takes its time
    assert len(warnings) == 1 and "only 12 pairs" in warnings[0]
    export_json(report, work / "r.json")
    export_html(report, work / "r.html")
    for path in (work / "r.json", work / "r.html"):
        text = path.read_text(encoding="utf-8")
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, path
    assert report.run.data_source == "../data/pairs.jsonl" and report.run.sae_path.startswith("<cache>/")  # the cache, by name
    assert {f.source for f in report.findings} == {"../data/pairs.jsonl"}


def test_scan_command_warns_and_prints_next_steps(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["scan", "pairs.jsonl", "--model", str(tiny_llama_dir), "--cache-dir",
                                      str(tmp_path / "cache"), *SCAN_ARGS, "--quiet", "-o", "report.html",
                                      "-o", "report.json"])
    assert result.exit_code == 0, result.output
    assert data.exists()
    err = result.stderr
    assert re.search(r"^Warning: pairs\.jsonl: only 12 pairs", err, re.M)
    top = json.loads((tmp_path / "report.json").read_text())["findings"][0]["pair_id"]
    assert "Next steps:" in err
    assert "  open report.html in a browser" in err
    assert re.search(rf"^    safer-audit explain pairs\.jsonl {re.escape(top)} --model \S+ .*--layer 1", err, re.M)
    assert "  safer-audit review pairs.jsonl --report report.json" in err


# -- the page in a real browser --------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("bench_html", ROOT / "benchmarks" / "bench_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_in_headless_chromium_fits_390_px_and_downloads_decisions(tmp_path):
    bench = _bench()
    chromium = bench.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the browser check cannot run")
    report = hostile_report()
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    results = bench.check_page(page, chromium, tmp_path / "shots", widths=(390, 1400))
    for width in (390, 1400):
        assert results[width]["scroll_width"] <= results[width]["client_width"] == width, results[width]
        assert results[width]["screenshot"].stat().st_size > 0
    made = bench.decide(page, chromium, tmp_path / "profile")
    decisions = made["decisions"]
    assert list(decisions) == ["decisions", "format", "version"]  # keys sorted
    assert decisions["format"] == "safer-audit-decisions" and decisions["version"] == 1
    first, second = report.suspects()[:2]
    entries = decisions["decisions"]
    assert sorted(entries) == list(entries) == sorted([first.digest, second.digest])
    assert entries[first.digest] | {"at": ""} == {"at": "", "note": "swapped </script> & \u2028", "pair_id": HOSTILE_ID,
                                                   "reviewer": "rev", "verdict": "flipped",
                                                   "where": f"{first.source}:{first.line}"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entries[first.digest]["at"])
    assert entries[second.digest]["verdict"] == "ok" and list(entries[second.digest]) == sorted(entries[second.digest])
    assert made["counter"] == "decided 2 of 3 (flipped 1, noisy 0, ok 1)"
    assert made["shown"] == "1 of 3 shown"  # the search for the first pair's id leaves only it
