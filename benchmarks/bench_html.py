"""Screenshot check of the HTML report in headless Chromium, at 1400 and 390 px wide.

    python benchmarks/bench_html.py [--report report.json] [--out DIR] [--cache-dir DIR]
    python benchmarks/bench_html.py --report report.json --pairs 2000 20000   # page size and load time

Renders a report (a JSON report given with --report, else a scan of the committed sample
fixtures/hh-harmless-300.jsonl with the default model) to HTML, opens it in headless
Chromium at 1400x1000 and 390x2400 px, writes the screenshots to --out, and checks the
layout: the page's own script writes the document's scroll width into the DOM when the URL
carries ?measure, and at 390 px it must be no wider than the viewport (no sideways scroll).
Look at the screenshots: BENCHMARKS.md "HTML report" says what they should show.

With --pairs N..., the report's pairs are repeated (new ids, lines and ranks, the same texts
and categories in the same proportions) up to N pairs each, and for each page this prints its
size, how long Chromium takes to load it (navigation start to the end of the load event, the
page's own script included) and how long a first search of every pair takes (its data block
parsed, the first matches made into rows).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCREENSHOTS = ((1400, 1000), (390, 2400))  # (width, height) of the window; the phone one is tall to show several cards
MEASURED = (1400, 1280, 1201, 1024, 390)  # 1201: the narrowest table layout  # widths checked for sideways scroll
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-extensions", "--mute-audio")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def _run(chromium: str, profile: Path, width: int, height: int, *args: str, timeout: float = 120) -> str:
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


# The report is measured inside an iframe of exactly the width under test: headless Chromium
# will not make a window narrower than 500 px, but an iframe's viewport (and so the page's
# media queries) is its own width. The report's script writes its layout widths into its DOM
# (?measure), and this page copies them into its own DOM, where --dump-dom shows them.
_HARNESS = """<!doctype html><html><body style="margin:0">
<iframe id="f" src="{src}" style="border:0;width:{width}px;height:900px"></iframe>
<script>
window.addEventListener("load", function () {{
  var d = document.getElementById("f").contentDocument.documentElement;
  document.body.setAttribute("data-result", d.getAttribute("data-scroll-width") + "/" +
                             d.getAttribute("data-client-width"));
}});
</script></body></html>
"""


def measure(page: Path, chromium: str, width: int, profile: Path) -> tuple[int, int]:
    """(scroll width, client width) of ``page`` laid out ``width`` CSS px wide."""
    harness = page.with_name(f"measure-{width}.html")
    harness.write_text(_HARNESS.format(src=page.name + "?measure", width=width), encoding="utf-8")
    dom = _run(chromium, profile, 1400, 1000, "--allow-file-access-from-files", "--dump-dom", harness.as_uri())
    found = re.search(r'data-result="(\d+)/(\d+)"', dom)
    if not found:
        raise RuntimeError(f"the report's script did not run at {width} px (no layout widths in the DOM)")
    return int(found.group(1)), int(found.group(2))


# Works through the page as a reviewer would: names the reviewer, marks the first suspect
# flipped with a note, the second ok, and presses Download; the Blob the page builds is caught
# (no file is saved) and its text copied into this page's DOM.
_DECIDE = """<!doctype html><html><body>
<iframe id="f" src="{src}" style="width:1400px;height:900px"></iframe>
<script>
window.addEventListener("load", function () {{
  var w = document.getElementById("f").contentWindow, d = w.document;
  w.HTMLAnchorElement.prototype.click = function () {{}};
  w.URL.createObjectURL = function (blob) {{
    blob.text().then(function (t) {{ document.body.setAttribute("data-decisions", t); }});
    return "blob:caught";
  }};
  function type(input, text) {{ input.value = text; input.dispatchEvent(new w.Event("input")); }}
  type(d.getElementById("reviewer"), "rev");
  var rows = d.querySelectorAll("table.suspects tbody tr");
  rows[0].querySelector("button[data-verdict=flipped]").click();
  type(rows[0].querySelector("input.note"), "swapped <\\/script> & \\u2028");
  if (rows.length > 1) {{ rows[1].querySelector("button[data-verdict=ok]").click(); }}
  type(d.getElementById("q"), rows[0].querySelector("td.pair").textContent);
  document.body.setAttribute("data-shown", d.getElementById("shown").textContent);
  document.body.setAttribute("data-counter", d.getElementById("counter").textContent);
  d.getElementById("download").click();
}});
</script></body></html>
"""


def decide(page: Path, chromium: str, profile: Path) -> dict:
    """Decisions made in ``page`` by a scripted reviewer: the downloaded JSON, parsed, and the
    page's status lines afterwards."""
    import html
    import json

    page = page.resolve()
    harness = page.with_name("decide.html")
    harness.write_text(_DECIDE.format(src=page.name), encoding="utf-8")
    dom = _run(chromium, profile, 1400, 1000, "--allow-file-access-from-files", "--virtual-time-budget=5000",
               "--dump-dom", harness.as_uri())
    found = {name: re.search(f'data-{name}="([^"]*)"', dom) for name in ("decisions", "shown", "counter")}
    if not found["decisions"]:
        raise RuntimeError("the page built no decisions file")
    return {"decisions": json.loads(html.unescape(found["decisions"].group(1))),
            **{name: html.unescape(m.group(1)) for name, m in found.items() if name != "decisions" and m}}


def check_page(page: Path, chromium: str, out: Path, widths=MEASURED) -> dict[int, dict]:
    """Screenshot ``page`` into ``out`` (1400 and 390 px) and measure it at each of ``widths``."""
    page = page.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="safer-audit-chromium-") as tmp:
        for width, height in SCREENSHOTS:
            shot = out / f"report-{width}.png"
            _run(chromium, Path(tmp) / f"shot-{width}", width, height, f"--screenshot={shot}", page.as_uri())
            results[width] = {"screenshot": shot}
        for width in widths:  # a fresh profile per run: no state carried over
            scroll, client = measure(page, chromium, width, Path(tmp) / f"measure-{width}")
            results.setdefault(width, {}).update(scroll_width=scroll, client_width=client)
    return results


# Loads the page in an iframe and times it, then types a search of every pair and times that.
_TIMING = """<!doctype html><html><body>
<iframe id="f" src="{src}" style="width:1400px;height:900px"></iframe>
<script>
window.addEventListener("load", function () {{
  var w = document.getElementById("f").contentWindow, d = w.document;
  var nav = w.performance.getEntriesByType("navigation")[0];
  var input = d.getElementById("all-q"), start = w.performance.now();
  input.value = "{query}";
  input.dispatchEvent(new w.Event("input"));
  var searched = w.performance.now() - start;
  document.body.setAttribute("data-timing", nav.loadEventEnd.toFixed(0) + "/" + searched.toFixed(0) + "/" +
                             d.querySelectorAll("table.all-pairs tbody tr").length);
}});
</script></body></html>
"""


def timing(page: Path, chromium: str, profile: Path, query: str) -> tuple[float, float, int]:
    """(load ms, first search ms, rows shown) of ``page`` in headless Chromium."""
    page = page.resolve()
    harness = page.with_name(f"timing-{page.stem}.html")
    harness.write_text(_TIMING.format(src=page.name, query=query), encoding="utf-8")
    dom = _run(chromium, profile, 1400, 1000, "--allow-file-access-from-files", "--dump-dom", harness.as_uri())
    found = re.search(r'data-timing="(\d+)/(\d+)/(\d+)"', dom)
    if not found:
        raise RuntimeError("the timing harness got no figures from the page")
    return float(found.group(1)), float(found.group(2)), int(found.group(3))


# What a curator meets at one width: is the note box wide enough for its placeholder, how far down the
# first suspect starts, and does the all-pairs search find a pair by its id.
_CURATOR = """<!doctype html><html><body style="margin:0">
<iframe id="f" src="{src}" style="border:0;width:{width}px;height:900px"></iframe>
<script>
window.addEventListener("load", function () {{
  var w = document.getElementById("f").contentWindow, d = w.document;
  var note = d.querySelector("input.note"), style = w.getComputedStyle(note);
  var pen = document.createElement("canvas").getContext("2d");
  pen.font = style.fontSize + " " + style.fontFamily;
  var needed = pen.measureText(note.placeholder).width + parseFloat(style.paddingLeft) +
    parseFloat(style.paddingRight);
  var first = d.querySelector("table.suspects tbody tr").getBoundingClientRect().top + w.scrollY;
  var input = d.getElementById("all-q");
  input.value = "{query}";
  input.dispatchEvent(new w.Event("input"));
  var found = d.querySelectorAll("table.all-pairs tbody tr").length;
  document.body.setAttribute("data-curator", [note.clientWidth, Math.ceil(needed), Math.round(first), found].join("/"));
}});
</script></body></html>
"""


def curator(page: Path, chromium: str, profile: Path, width: int, query: str) -> dict:
    """At ``width`` px: the note box's width and the width its placeholder needs, the first suspect's top
    (px from the page's top), and the rows the all-pairs search shows for ``query``."""
    page = page.resolve()
    harness = page.with_name(f"curator-{width}.html")
    harness.write_text(_CURATOR.format(src=page.name, width=width, query=query), encoding="utf-8")
    dom = _run(chromium, profile, 1400, 1000, "--allow-file-access-from-files", "--dump-dom", harness.as_uri())
    found = re.search(r'data-curator="(\d+)/(\d+)/(\d+)/(\d+)"', dom)
    if not found:
        raise RuntimeError(f"the curator harness got no figures from the page at {width} px")
    note, needed, first, rows = map(int, found.groups())
    return {"note_width": note, "placeholder_width": needed, "first_suspect_top": first, "search_rows": rows}


def scaled(report, pairs: int):
    """``report`` with its findings repeated up to ``pairs`` (new ids, lines and ranks; the texts and the
    mix of categories as they were)."""
    from dataclasses import replace

    base = sorted(report.findings, key=lambda f: f.rank)
    findings = [replace(base[i % len(base)], pair_id=f"{i:016x}", line=i + 1, rank=i + 1) for i in range(pairs)]
    counts = {}
    for finding in findings:
        counts[finding.category] = counts.get(finding.category, 0) + 1
    return replace(report, findings=findings, run=replace(report.run, pairs=pairs, counts=counts))


def scan_sample_report(cache_dir: Path | None):
    from safer_audit.config import ActivationConfig, ScanConfig
    from safer_audit.pipeline.scan import run_scan

    os.chdir(ROOT)  # the report names the sample relative to the working directory
    activations = ActivationConfig(cache_dir=cache_dir) if cache_dir else ActivationConfig()
    return run_scan("fixtures/hh-harmless-300.jsonl", ScanConfig(activations=activations)).report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=None, help="a JSON report (default: scan the sample)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the page and the screenshots")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache of the sample scan (default: the usual)")
    parser.add_argument("--pairs", type=int, nargs="+", default=None,
                        help="measure the page's size, load and search time at these numbers of pairs instead")
    args = parser.parse_args()

    import json

    from safer_audit.backends.exporters import render_html
    from safer_audit.report.types import Report

    chromium = find_chromium()
    if chromium is None:
        sys.exit("no chromium found: apt-get install -y chromium")
    out = (args.out or Path(tempfile.mkdtemp(prefix="safer-audit-html-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = (Report.from_dict(json.loads(args.report.read_text(encoding="utf-8"))) if args.report
              else scan_sample_report(args.cache_dir))
    if not args.report:  # kept, to re-render the page without scanning again (--report)
        (out / "report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False), encoding="utf-8")
    if args.pairs:
        import time

        for pairs in args.pairs:
            big = scaled(report, pairs)
            start = time.perf_counter()
            text = render_html(big)
            rendered = time.perf_counter() - start
            page = out / f"report-{pairs}.html"
            page.write_text(text, encoding="utf-8")
            query = big.findings[-1].pair_id  # the last pair: a clean one, only in the all-pairs search
            with tempfile.TemporaryDirectory(prefix="safer-audit-chromium-") as tmp:
                load_ms, search_ms, rows = timing(page, chromium, Path(tmp) / "timing", query)
            print(f"{pairs:>6} pairs: page {len(text.encode()) / 1e6:.2f} MB (rendered in {rendered:.2f} s); "
                  f"Chromium load {load_ms:.0f} ms; first search of every pair {search_ms:.0f} ms ({rows} row)")
        return
    page = out / "report.html"
    text = render_html(report)
    page.write_text(text, encoding="utf-8")
    print(f"page {page}: {len(text.encode()) / 1e6:.2f} MB, {len(report.suspects())} suspects "
          f"of {report.run.pairs} pairs, {len(report.features)} feature cards")
    failed = False
    for width, result in sorted(check_page(page, chromium, out).items(), reverse=True):
        fits = result["scroll_width"] <= result["client_width"]
        failed |= not fits
        print(f"{width:>5} px: scroll width {result['scroll_width']} px, viewport {result['client_width']} px "
              f"-> {'no sideways scroll' if fits else 'SIDEWAYS SCROLL'}"
              + (f"; screenshot {result['screenshot']}" if "screenshot" in result else ""))
    clean = [f for f in report.findings if f.category == "clean"]
    with tempfile.TemporaryDirectory(prefix="safer-audit-chromium-") as tmp:
        for width in (1400, 390):
            seen = curator(page, chromium, Path(tmp) / f"curator-{width}", width,
                           clean[-1].pair_id if clean else report.findings[-1].pair_id)
            print(f"{width:>5} px: note box {seen['note_width']} px for a placeholder of {seen['placeholder_width']} px; "
                  f"first suspect {seen['first_suspect_top']} px down; a clean pair's id found in "
                  f"{seen['search_rows']} row of the all-pairs search")
        made = decide(page, chromium, Path(tmp) / "decide")
    print(f"decisions made by a scripted reviewer ({made.get('counter')}; search: {made.get('shown')}):")
    print(json.dumps(made["decisions"], indent=1, ensure_ascii=False))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
