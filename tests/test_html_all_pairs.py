"""The HTML report as a curator uses it: every pair searchable, the note box whole, the run header folded on a phone."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from safer_audit.backends.exporters import ALL_PAIRS_RESPONSE_CHARS, render_html
from safer_audit.errors import inert

from .test_html_report import HOSTILE_ID, _bench, hostile_report


def _all_pairs(text: str) -> list[list]:
    block = re.search(r'<script type="application/json" id="all-pairs-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(block)


def test_every_pair_clean_ones_too_is_in_the_pages_search_data_by_rank():
    report = hostile_report()
    text = render_html(report, max_suspects=1)
    pairs = _all_pairs(text)
    ranked = sorted(report.findings, key=lambda f: f.rank)
    assert [p[0] for p in pairs] == [f.rank for f in ranked] and len(pairs) == report.run.pairs
    assert [p[1] for p in pairs] == [inert(f.pair_id) for f in ranked]  # control characters written out
    assert {p[3] for p in pairs} >= {"clean", "flipped"}
    assert all(len(p[6]) <= ALL_PAIRS_RESPONSE_CHARS and len(p[7]) <= ALL_PAIRS_RESPONSE_CHARS for p in pairs)
    assert inert(HOSTILE_ID) in [p[1] for p in pairs]  # read back whole: its "</script>" could not end the block
    block = text.split('id="all-pairs-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and ">" not in block
    # the run header is a details element, open (a phone's script folds it)
    assert re.search(r'<details id="run" open><summary>Run: \d+ pairs from ', text)


def test_in_chromium_the_note_box_is_whole_the_phone_header_folded_and_a_clean_pair_found(tmp_path):
    bench = _bench()
    chromium = bench.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the browser check cannot run")
    report = hostile_report()
    clean = next(f for f in sorted(report.findings, key=lambda f: -f.rank) if f.category == "clean")
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="safer-audit-chromium-") as tmp:
        wide = bench.curator(page, chromium, Path(tmp) / "wide", 1400, clean.pair_id)
        phone = bench.curator(page, chromium, Path(tmp) / "phone", 390, clean.pair_id)
    assert wide["note_width"] >= wide["placeholder_width"], wide  # its placeholder whole, not "note (optior"
    assert wide["search_rows"] == 1 and phone["search_rows"] == 1
    assert phone["first_suspect_top"] < 900, phone  # the first suspect on the first screen, not 1,500 px down
