"""Built-in exporters: JSON, CSV, Parquet, Markdown and HTML renderings of a Report.

Every piece of dataset text is untrusted: Markdown and HTML escape all of it, and CSV quotes
text that a spreadsheet would run as a formula.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import polars as pl

from ..common.domain import Category
from ..common.files import write_atomic
from ..config import PROFILES
from ..errors import inert
from ..features.types import EvidenceSpan
from ..hookspecs import hookimpl
from ..report.types import CATEGORY_DESCRIPTIONS, FeatureCard, Finding, Report, few_pairs_warning
from ..report.view import (
    Excerpt,
    diff_excerpts,
    format_feature,
    format_number,
    pieces,
    span_excerpt,
    summary_lines,
    top_span,
)

# the decisions file the page downloads, as review and clean read it
from ..workflows.decisions import FORMAT as DECISIONS_FORMAT
from ..workflows.decisions import VERDICTS
from ..workflows.decisions import VERSION as DECISIONS_VERSION

PARQUET_METADATA_KEY = "safer_audit.report"  # run metadata and feature cards, as JSON
_SCORE_SAFE_NOTE = "score_safe = V(chosen) - V(rejected): low or negative means the chosen response looks less safe."


def export_json(report: Report, path: Path) -> None:
    """The report as ``json.dumps(report.to_dict(), indent=2)`` writes it, a finding at a time."""
    head = json.dumps({**report.to_dict(include_findings=False), "findings": []}, ensure_ascii=False, indent=2,
                      allow_nan=False)
    # the findings list is the last key: what precedes it is the text before its "[]"
    if not head.endswith('"findings": []\n}'):
        raise RuntimeError("Report.to_dict no longer ends with its findings: the JSON exporter must change with it")

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(head[:-len("]\n}")])
            first = True
            for finding in report.findings:
                item = json.dumps(asdict(finding), ensure_ascii=False, indent=2, allow_nan=False)
                # nested two levels deep, as json.dumps indents it (a newline in a string is escaped: \\n)
                out.write(("\n    " if first else ",\n    ") + item.replace("\n", "\n    "))
                first = False
            out.write("]\n}\n" if first else "\n  ]\n}\n")

    write_atomic(path, write)


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...),
# =cmd|' /C calc'!A0, DDE). As OWASP advises for CSV injection, such a text cell gets a
# leading single quote, which spreadsheets read as "this is text" and do not show.
_FORMULA_START = r"^[=+\-@\t\r]"


def spreadsheet_safe(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every text cell that a spreadsheet would run as a formula quoted.

    Only text columns change: a negative score in a numeric column stays a number.
    """
    return frame.with_columns(
        pl.when(pl.col(name).str.contains(_FORMULA_START)).then(pl.lit("'") + pl.col(name)).otherwise(pl.col(name))
        .alias(name)
        for name, dtype in frame.schema.items() if dtype == pl.String
    )


def export_csv(report: Report, path: Path) -> None:
    write_atomic(path, lambda tmp: spreadsheet_safe(report.to_frame(nested=False)).write_csv(tmp))


def export_parquet(report: Report, path: Path) -> None:
    header = json.dumps(report.to_dict(include_findings=False), ensure_ascii=False, allow_nan=False)
    frame = report.to_frame()
    write_atomic(path, lambda tmp: frame.write_parquet(tmp, metadata={PARQUET_METADATA_KEY: header}))


# -- Markdown --------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#!~])")


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no markup, no raw HTML."""
    text = html.escape(inert(re.sub(r"\s+", " ", text)), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_excerpt(excerpt: Excerpt) -> str:
    differ = excerpt.differ.strip()
    if not differ:
        return _md(excerpt.before + excerpt.after)
    # Emphasis markers must touch the text, so surrounding spaces stay outside them.
    lead = excerpt.differ[: len(excerpt.differ) - len(excerpt.differ.lstrip())]
    trail = excerpt.differ[len(excerpt.differ.rstrip()) :]
    return f"{_md(excerpt.before + lead)}**{_md(differ)}**{_md(trail + excerpt.after)}"


def _md_sides(f: Finding) -> tuple[str, str]:
    """Each response's cell: its strongest evidence span in bold with a little text around it; for a finding
    without evidence, where the responses first differ."""
    if not f.evidence:
        return tuple(_md_excerpt(excerpt) for excerpt in diff_excerpts(f.chosen, f.rejected))
    cells = []
    for side in ("chosen", "rejected"):
        span = top_span(f, side)
        cells.append(_md_excerpt(span_excerpt(getattr(f, side), span)) if span else "—")
    return cells[0], cells[1]


def render_markdown(report: Report) -> str:
    lines = ["# safer-audit report", ""]
    lines += [f"- **{heading}**: {_md(value)}" for heading, value in summary_lines(report)]
    lines += ["", "| category | pairs | meaning |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {report.run.counts.get(name, 0):,} | {CATEGORY_DESCRIPTIONS[name]} |" for name in Category]
    suspects = report.suspects()
    lines += ["", f"## Suspects ({len(suspects):,}, most suspicious first)", ""]
    if not suspects:
        lines.append("Every pair is clean.")
    else:
        lines += [
            "| rank | pair | line | category | why | score_safe | reward margin | features | chosen | rejected |",
            "| ---: | --- | ---: | --- | --- | ---: | ---: | --- | --- | --- |",
        ]
        for f in suspects:
            chosen, rejected = _md_sides(f)
            category = f.category + (f" ({', '.join(f.quality)})" if f.quality else "")
            features = "; ".join(_md(format_feature(c)) for c in f.top_features[:3])
            cells = [
                str(f.rank),
                _md(f.pair_id),
                str(f.line),
                _md(category),
                _md(f.why or ""),
                format_number(f.score_safe),
                format_number(f.reward_margin),
                features,
                chosen,
                rejected,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _SCORE_SAFE_NOTE + " chosen, rejected: the strongest evidence span of each response, in bold "
              "(the words whose features pull score_safe most).", ""]
    return "\n".join(lines)


def export_markdown(report: Report, path: Path) -> None:
    write_atomic(path, render_markdown(report))


# -- HTML ------------------------------------------------------------------------------

HTML_MAX_SUSPECTS = 200  # the page shows the top suspects by rank; the JSON/CSV/Parquet reports hold every pair

_CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 90rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .4rem; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
td.features { font-size: .9em; }
td.features { min-width: 8em; overflow-wrap: anywhere; }
td.texts { min-width: 14em; width: 42%; overflow-wrap: anywhere; }
td.pair { min-width: 6em; overflow-wrap: anywhere; }
.path { white-space: nowrap; }
.loc > div { max-width: 16em; overflow-x: auto; }
table.sortable th[data-sort] { cursor: pointer; user-select: none; }
table.sortable th { background: #f4f4f4; position: sticky; top: 0; z-index: 1; }
th[data-order=asc]::after { content: " \\25B2"; } th[data-order=desc]::after { content: " \\25BC"; }
mark { background: #ffe08a; }
p.why { font-weight: 600; margin: 0 0 .3rem; }
p.response { margin: 0 0 .3rem; white-space: pre-wrap; }
mark.ev { color: inherit; border-radius: 3px; padding: 0 .1em; }
mark.ev.neg.l1 { background: #fde0dc; } mark.ev.neg.l2 { background: #f9b4aa; }
mark.ev.neg.l3 { background: #f28b7d; } mark.ev.neg.l4 { background: #e65a4a; }
mark.ev.pos.l1 { background: #dcecfb; } mark.ev.pos.l2 { background: #b3d4f5; }
mark.ev.pos.l3 { background: #86b9ee; } mark.ev.pos.l4 { background: #5a9de6; }
.cut { color: #888; padding: 0 .3em; }
.flipped { color: #b00020; font-weight: 600; } .noisy { color: #8a5a00; } .quality { color: #555; }
.excerpt { margin: 0 0 .2rem; } .side { font-weight: 600; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f8f8f8; padding: .5rem; margin: .3rem 0; }
.warning { border: 2px solid #b00020; background: #fff0f0; padding: .5rem 1rem; border-radius: 6px; }
.controls { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: end; margin: .5rem 0 1rem;
  position: sticky; top: 0; background: #fff; padding: .5rem 0; z-index: 2; border-bottom: 1px solid #ddd; }
.controls label { display: flex; flex-direction: column; font-size: .85em; color: #444; }
.controls input, .controls select, .controls button { font: inherit; padding: .3rem .4rem; }
#q { width: 18rem; max-width: 100%; }
.status { font-size: .9em; color: #444; }
.verdicts { display: flex; flex-wrap: wrap; gap: .3rem; }
.verdicts button { font: inherit; font-size: .85em; padding: .2rem .5rem; border: 1px solid #999; border-radius: 4px;
  background: #fff; cursor: pointer; }
.verdicts button[aria-pressed=true] { background: #222; color: #fff; border-color: #222; }
.verdicts button[data-verdict=flipped][aria-pressed=true] { background: #b00020; border-color: #b00020; }
.verdicts button[data-verdict=noisy][aria-pressed=true] { background: #8a5a00; border-color: #8a5a00; }
.verdicts button[data-verdict=ok][aria-pressed=true] { background: #1b6e20; border-color: #1b6e20; }
td.decision input { width: 100%; min-width: 4em; margin-top: .3rem; font: inherit; font-size: .85em; }
tr.decided { background: #f6fbf6; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(26rem, 100%), 1fr)); gap: 1rem; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem 1rem; overflow-wrap: anywhere; }
.card h3 { font-size: 1rem; margin: .3rem 0; } .card ol { padding-left: 1.2rem; }
.card svg.hist { display: block; width: 100%; max-width: 30rem; height: auto; margin: .3rem 0; }
.card .provenance, .card .lower { font-size: .9em; color: #555; } .unlabelled { color: #777; font-style: italic; }
.card .flag { color: #b00020; }
details#features > summary { font-size: 1.2rem; font-weight: 600; cursor: pointer; margin-top: 2rem; }
details#run > summary { cursor: pointer; font-weight: 600; margin: .5rem 0; }
#all-pairs .controls { position: static; }
table.all-pairs td.texts { font-size: .9em; }
@media (max-width: 1200px) {
  body { margin: .5rem auto; padding: 0 .6rem; }
  dl { grid-template-columns: minmax(0, 1fr); } dd { margin-bottom: .3rem; }
  table.suspects, table.suspects tbody, table.suspects tr, table.suspects td { display: block; width: 100%; }
  table.suspects thead { display: none; }
  table.suspects tr { border: 1px solid #ccc; border-radius: 6px; margin: 0 0 .8rem; padding: .3rem .5rem; }
  table.suspects td { border: 0; padding: .15rem 0; text-align: left; min-width: 0; }
  table.suspects td::before { content: attr(data-label) ": "; font-weight: 600; color: #555; }
  table.suspects td.texts::before, table.suspects td.decision::before { content: none; }
  table.suspects td.loc > div { display: inline-block; max-width: 100%; vertical-align: top; }
  #q { width: 100%; } .controls label.grow { flex: 1 1 100%; }
}
"""

# The page's one script: sort, search and filter the suspects, record decisions (kept in
# localStorage when the browser allows it) and build decisions.json as a download. Nothing
# is sent anywhere: the policy below forbids every connection.
_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var table = document.querySelector("table.suspects");
  var rows = table ? Array.prototype.slice.call(table.tBodies[0].rows) : [];
  var storeKey = "safer-audit-decisions:" + data.report;
  var state = {};
  try { state = JSON.parse(window.localStorage.getItem(storeKey) || "{}") || {}; } catch (e) { state = {}; }
  var reviewer = document.getElementById("reviewer");
  try { reviewer.value = window.localStorage.getItem("safer-audit-reviewer") || ""; } catch (e) { /* no storage */ }

  function save() {
    try { window.localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) { /* no storage */ }
  }
  function now() { return new Date().toISOString().replace(/\\.\\d+Z$/, "Z"); }

  function show(row) {
    var entry = state[row.getAttribute("data-digest")] || {};
    row.querySelectorAll("button[data-verdict]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-verdict") === entry.verdict));
    });
    var note = row.querySelector("input.note");
    if (note && document.activeElement !== note) { note.value = entry.note || ""; }
    row.classList.toggle("decided", Boolean(entry.verdict));
  }

  function count() {
    var tally = {flipped: 0, noisy: 0, ok: 0}, decided = 0;
    rows.forEach(function (row) {
      var entry = state[row.getAttribute("data-digest")];
      if (entry && entry.verdict) { decided += 1; tally[entry.verdict] += 1; }
    });
    document.getElementById("counter").textContent = "decided " + decided + " of " + rows.length +
      " (flipped " + tally.flipped + ", noisy " + tally.noisy + ", ok " + tally.ok + ")";
    document.getElementById("download").disabled = decided === 0;
  }

  function filter() {
    var words = document.getElementById("q").value.toLowerCase().split(/\\s+/).filter(Boolean);
    var category = document.getElementById("category").value;
    var which = document.getElementById("decided").value;
    var shown = 0;
    rows.forEach(function (row) {
      if (!row.hasAttribute("data-text")) { row.setAttribute("data-text", row.textContent.toLowerCase()); }
      var text = row.getAttribute("data-text");
      var entry = state[row.getAttribute("data-digest")];
      var ok = (category === "" || row.getAttribute("data-category") === category) &&
        (which === "" || (which === "done") === Boolean(entry && entry.verdict)) &&
        words.every(function (w) { return text.indexOf(w) >= 0; });
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    document.getElementById("shown").textContent = shown + " of " + rows.length + " shown";
  }

  rows.forEach(function (row) {
    var digest = row.getAttribute("data-digest");
    row.querySelectorAll("button[data-verdict]").forEach(function (b) {
      b.addEventListener("click", function () {
        var entry = state[digest] || {};
        var verdict = b.getAttribute("data-verdict");
        entry.verdict = entry.verdict === verdict ? "" : verdict;  // a second click takes it back
        entry.at = now();
        entry.reviewer = reviewer.value;
        state[digest] = entry;
        save(); show(row); count(); filter();
      });
    });
    var note = row.querySelector("input.note");
    note.addEventListener("input", function () {
      var entry = state[digest] || {verdict: ""};
      entry.note = note.value;
      entry.at = now();
      state[digest] = entry;
      save();
    });
    show(row);
  });

  reviewer.addEventListener("input", function () {
    try { window.localStorage.setItem("safer-audit-reviewer", reviewer.value); } catch (e) { /* no storage */ }
  });
  ["q", "category", "decided"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", filter);
  });

  document.getElementById("download").addEventListener("click", function () {
    var decisions = {};
    Object.keys(state).sort().forEach(function (digest) {
      var entry = state[digest], pair = data.pairs[digest];
      if (!entry.verdict || !pair) { return; }
      // keys in sorted order, as safer_audit/decisions.py writes them
      decisions[digest] = {at: entry.at || now(), note: entry.note || "", pair_id: pair[0],
                           reviewer: entry.reviewer || reviewer.value || "", verdict: entry.verdict, where: pair[1]};
    });
    var text = JSON.stringify({decisions: decisions, format: data.format, version: data.version}, null, 1) + "\\n";
    var link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], {type: "application/json"}));
    link.download = "decisions.json";
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  });

  if (table) {
    table.querySelectorAll("th").forEach(function (th, col) {
      if (!th.hasAttribute("data-sort")) { return; }
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var asc = th.getAttribute("data-order") !== "asc";
        table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
        th.setAttribute("data-order", asc ? "asc" : "desc");
        var numeric = th.classList.contains("num");
        var key = function (row) {
          var cell = row.cells[col], v = cell.getAttribute("data-v");
          if (v === null) { v = cell.textContent; }
          if (!numeric) { return v; }
          var n = parseFloat(v);
          return isNaN(n) ? -Infinity : n;
        };
        var sorted = Array.prototype.slice.call(body.rows);
        sorted.sort(function (a, b) {
          var x = key(a), y = key(b);
          var c = numeric ? (x < y ? -1 : x > y ? 1 : 0) : String(x).localeCompare(String(y));
          return asc ? c : -c;
        });
        sorted.forEach(function (row) { body.appendChild(row); });
      });
    });
  }

  // on a phone the run's details would push the first suspect a screen down: folded, a tap opens them
  var run = document.getElementById("run");
  if (run && window.matchMedia && window.matchMedia("(max-width: 700px)").matches) { run.open = false; }

  // every pair, clean ones too, searched in their data block: parsed on the first search and only the
  // first ALL_SHOWN matches made into rows, so a page of many thousand pairs still opens at once
  var ALL_SHOWN = 50, allPairs = null;
  var allInput = document.getElementById("all-q"), allTable = document.querySelector("table.all-pairs");
  function allRow(pair) {
    var tr = document.createElement("tr");
    [pair[0], pair[1], pair[2], pair[3], pair[4]].forEach(function (value, i) {
      var td = document.createElement("td");
      td.textContent = String(value);
      if (i === 0 || i === 4) { td.className = "num"; }
      tr.appendChild(td);
    });
    var texts = document.createElement("td");
    texts.className = "texts";
    [["request", "…" + pair[5]], ["chosen", pair[6]], ["rejected", pair[7]]].forEach(function (part) {
      var p = document.createElement("p"), side = document.createElement("span");
      p.className = "excerpt"; side.className = "side"; side.textContent = part[0] + " ";
      p.appendChild(side); p.appendChild(document.createTextNode(part[1]));
      texts.appendChild(p);
    });
    tr.appendChild(texts);
    return tr;
  }
  function searchAll() {
    var words = allInput.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var body = allTable.tBodies[0], found = 0;
    body.textContent = "";
    if (words.length) {
      if (allPairs === null) {
        allPairs = JSON.parse(document.getElementById("all-pairs-data").textContent);
        allPairs.forEach(function (pair) { pair.push(pair.slice(1).join(" ").toLowerCase()); });
      }
      allPairs.forEach(function (pair) {
        var text = pair[pair.length - 1];
        if (words.every(function (w) { return text.indexOf(w) >= 0; })) {
          found += 1;
          if (found <= ALL_SHOWN) { body.appendChild(allRow(pair)); }
        }
      });
    }
    allTable.hidden = found === 0;
    document.getElementById("all-shown").textContent = !words.length ? "" : found + " pairs match" +
      (found > ALL_SHOWN ? "; the first " + ALL_SHOWN + " by rank are shown" : "");
  }
  if (allInput) { allInput.addEventListener("input", searchAll); }

  count(); filter();
  // ?measure: the screenshot check (benchmarks/bench_html.py) reads the layout width from the DOM
  if (/[?&]measure\\b/.test(window.location.search)) {
    var html = document.documentElement;
    html.setAttribute("data-scroll-width", String(html.scrollWidth));
    html.setAttribute("data-client-width", String(html.clientWidth));
  }
})();
"""

# Only this exact script may run: even a piece of dataset text that slipped past escaping
# could not execute; and nothing may be fetched or sent (default-src 'none', no form-action).
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; form-action 'none'; base-uri 'none'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()}'"
)


def _e(value: object) -> str:
    # inert: a raw ESC or BEL is invalid in HTML and shows (or hides) nothing; written out, a reader sees it
    return html.escape(inert(value, multiline=True), quote=True)


def script_json(value: object) -> str:
    """JSON that is safe inside a <script> element: no "</script>", "<!--", or line separators
    that older parsers end a string at, can appear in it."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def _html_excerpt(side: str, excerpt: Excerpt) -> str:
    return (
        f'<p class="excerpt"><span class="side">{side}</span> {_e(excerpt.before)}'
        f"<mark>{_e(excerpt.differ)}</mark>{_e(excerpt.after)}</p>"
    )


def _num_cell(label: str, value: float | None) -> str:
    v = "" if value is None else repr(float(value))
    return f'<td class="num" data-label="{label}" data-v="{v}">{_e(format_number(value))}</td>'


def _location(source: str, line: int) -> str:
    """``source:line`` that wraps only after a "/", never inside a name or before ":line"
    (a name too long for its cell scrolls inside the cell, not the page)."""
    *folders, name = source.split("/")
    head = "".join(f'<span class="path">{_e(part)}/</span><wbr>' for part in folders)
    return f'<div>{head}<span class="path">{_e(name)}:{line}</span></div>'


EVIDENCE_LEVELS = 4  # shades of a highlight, by the span's weight against the pair's strongest
_GAP_CHARS = 160  # unmarked text longer than this, between two spans, is cut to its ends in the row


def _mark(text: str, span: EvidenceSpan, peak: float) -> str:
    """One evidence span as a <mark>: red when it pulls toward the rejected response, blue toward the chosen,
    darker the more it weighs; its weight and features in the tooltip."""
    level = max(1, min(EVIDENCE_LEVELS, math.ceil(EVIDENCE_LEVELS * abs(span.weight) / peak))) if peak else 1
    features = f"; features {', '.join(f'#{latent}' for latent in span.latents)}" if span.latents else ""
    tip = f"share of score_safe {format_number(span.weight)}{features}"
    return (f'<mark class="ev {"neg" if span.weight < 0 else "pos"} l{level}" title="{_e(tip)}">{_shown(text)}</mark>')


def _shown(text: str) -> str:
    """Response text in the page: escaped, its control characters written out (newlines kept)."""
    return _e(inert(text, multiline=True))


def evidence_html(response: str, spans: list[EvidenceSpan], peak: float, *, cut: bool) -> str:
    """``response`` escaped, its evidence spans marked; ``cut``: long unmarked stretches shown by their ends."""
    out = []
    parts = pieces(response, spans)
    for n, (text, span) in enumerate(parts):
        if span is not None:
            out.append(_mark(text, span, peak))
        elif cut and len(text) > _GAP_CHARS:
            head = "" if n == 0 else text[:_GAP_CHARS // 2]
            tail = "" if n == len(parts) - 1 else text[-_GAP_CHARS // 2:]
            out.append(f"{_shown(head)}<span class=\"cut\">…</span>{_shown(tail)}")
        else:
            out.append(_shown(text))
    return "".join(out)


def _evidence_cell(f: Finding) -> str:
    """The why line, then both responses with their evidence marked (a finding without evidence: where its
    responses first differ)."""
    why = f'<p class="why">{_e(f.why or CATEGORY_DESCRIPTIONS[f.category])}</p>'
    if not f.evidence:
        chosen, rejected = diff_excerpts(f.chosen, f.rejected, width=120)
        return why + _html_excerpt("chosen", chosen) + _html_excerpt("rejected", rejected)
    peak = max(abs(span.weight) for span in f.evidence)
    sides = "".join(
        f'<p class="response"><span class="side">{side}</span> '
        f"{evidence_html(getattr(f, side), [s for s in f.evidence if s.side == side], peak, cut=True)}</p>"
        for side in ("chosen", "rejected"))
    return why + sides


def _finding_row(f: Finding) -> str:
    features = "<br>".join(f"<span>{_e(format_feature(c))}</span>" for c in f.top_features)
    quality = f"<br>{_e(', '.join(f.quality))}" if f.quality else ""
    peak = max((abs(span.weight) for span in f.evidence), default=0.0)
    full = (
        "<details><summary>full texts</summary>"
        f"<div class=\"side\">context</div><pre>{_e(f.context)}</pre>"
        + "".join(f'<div class="side">{side}</div><pre>'
                  f"{evidence_html(getattr(f, side), [s for s in f.evidence if s.side == side], peak, cut=False)}</pre>"
                  for side in ("chosen", "rejected"))
        + "</details>"
    )
    buttons = "".join(
        f'<button type="button" data-verdict="{v}" aria-pressed="false">{v}</button>' for v in VERDICTS
    )
    return (
        f'<tr data-digest="{_e(f.digest)}" data-category="{_e(f.category)}">'
        f'<td class="num" data-label="rank" data-v="{f.rank}">{f.rank}</td>'
        f'<td data-label="pair" class="pair">{_e(f.pair_id)}</td>'
        f'<td class="texts">{_evidence_cell(f)}{full}</td>'
        f'<td data-label="category"><span class="{_e(f.category)}">{_e(f.category)}</span>{quality}</td>'
        f'{_num_cell("suspicion", f.suspicion)}{_num_cell("score_safe", f.score_safe)}'
        f'{_num_cell("reward margin", f.reward_margin)}{_num_cell("SAE margin", f.sae_margin)}'
        f'<td class="features" data-label="top features">{features}</td>'
        f'<td class="loc" data-label="source:line" data-v="{_e(f.source)}:{f.line:012d}">{_location(f.source, f.line)}</td>'
        f'<td class="decision"><div class="verdicts" role="group" aria-label="decision">{buttons}</div>'
        f'<input class="note" type="text" placeholder="note" title="a note, optional" aria-label="note (optional)"></td>'
        "</tr>"
    )


_SIDE_COLOURS = {"chosen": "#1f6fb4", "rejected": "#d9661f"}


def _histogram_svg(card: FeatureCard) -> str:
    """The per-text mean activation of the latent on chosen and on rejected texts, as two overlaid
    bar series in inline SVG (no script, no external file); empty when there is nothing to draw."""
    hist = card.histogram or {}
    edges, chosen, rejected = hist.get("edges") or [], hist.get("chosen") or [], hist.get("rejected") or []
    if len(edges) < 2 or not (any(chosen) or any(rejected)):
        return ""
    width, height, left, right, top, bottom = 360, 132, 34, 352, 22, 100
    bins = len(edges) - 1
    peak = max(chosen + rejected)
    step = (right - left) / bins
    bars = []
    for side, counts in (("chosen", chosen), ("rejected", rejected)):
        for i, count in enumerate(counts):
            if count:
                h = (bottom - top) * count / peak
                bars.append(f'<rect x="{left + i * step:.1f}" y="{bottom - h:.1f}" width="{step - 1:.1f}" '
                            f'height="{h:.1f}" fill="{_SIDE_COLOURS[side]}" fill-opacity=".55"/>')
    legend = "".join(
        f'<rect x="{x}" y="4" width="10" height="10" fill="{_SIDE_COLOURS[side]}" fill-opacity=".55"/>'
        f'<text x="{x + 14}" y="13">{side} ({sum(counts)})</text>'
        for x, side, counts in ((left, "chosen", chosen), (left + 130, "rejected", rejected)))
    summary = (f"latent {card.latent}: texts where it fires, by per-text mean activation; "
               f"chosen {sum(chosen)}, rejected {sum(rejected)}")
    return (
        f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(summary)}" '
        f'font-size="12" font-family="system-ui, sans-serif">'
        f"<title>{_e(summary)}</title>{legend}{''.join(bars)}"
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{bottom + 14}">0</text>'
        f'<text x="{right}" y="{bottom + 14}" text-anchor="end">{_e(f"{edges[-1]:.3g}")}</text>'
        f'<text x="{(left + right) / 2:.0f}" y="{bottom + 28}" text-anchor="middle">'
        "mean activation per text (texts where it fires)</text>"
        "</svg>"
    )


def _provenance(card: FeatureCard) -> str:
    if card.labelled_by and card.labelled_by.get("label") == card.label:
        by = card.labelled_by
        model = f", {by.get('model')}" if by.get("model") else ""
        return f"label by the {by.get('labeller')} labeller (v{by.get('version')}{model}): a suggestion to check"
    if card.label:
        return "label from the features file"
    return "unlabelled"


def _context_item(c) -> str:
    return (f'<li><span class="side">{_e(c.side)}</span> {_e(c.pair_id)}: '
            f"…{_e(c.text_before)}<mark>{_e(c.token)}</mark>{_e(c.text_after)}… ({c.value:.3g})</li>")


def _feature_card(card: FeatureCard) -> str:
    side = "chosen (F+)" if card.sign == "+" else "rejected (F-)"
    tokens = ", ".join(f"<code>{_e(token)}</code> ×{count}" for token, count in card.top_tokens) or "none recorded"
    top = "".join(_context_item(c) for c in card.contexts if c.sample == "top")
    lower = "".join(_context_item(c) for c in card.contexts if c.sample != "top")
    label = _e(card.label) if card.label else '<span class="unlabelled">unlabelled</span>'
    rating = (f'<p class="rating">{_e(card.category or "uncategorised")}, safety relevance {card.relevance:.2f}</p>'
              if card.relevance is not None else "")
    fires = ""
    if card.chosen_fires is not None and card.rejected_fires is not None:
        fires = f"; fires in {card.chosen_fires:.0%} of chosen and {card.rejected_fires:.0%} of rejected texts"
    length = ""
    if card.length_correlation is not None:
        flag = ' <strong class="flag">length-driven</strong>' if card.length_driven else ""
        length = f"<p>correlation with text length r = {card.length_correlation:+.2f}{flag}</p>"
    return (
        '<article class="card">'
        f"<h3>{_e(card.model) + ' ' if card.model else ''}latent {card.latent} — {label}</h3>"
        f'<p class="provenance">{_e(_provenance(card))}</p>{rating}'
        f"<p>{card.contribution:.1%} of the flagged pairs' feature scores; a top feature of "
        f"{card.flagged_pairs:,} flagged pair{'s' if card.flagged_pairs != 1 else ''}</p>"
        f"<p>salience {card.salience:+.3f}, fires more on {side}; C {card.chosen_total:.4g}, "
        f"R {card.rejected_total:.4g}; active at {card.fire_rate:.2%} of positions{fires}</p>"
        f"{length}{_histogram_svg(card)}"
        f"<p>fires most on: {tokens}</p>"
        f"<ol>{top}</ol>"
        + (f'<p class="lower">weaker activations (lower quantiles of the strongest):</p><ol>{lower}</ol>'
           if lower else "")
        + "</article>"
    )


def report_identity(report: Report) -> str:
    """A short digest naming this report (decisions made in its page are kept under it)."""
    run = report.run
    key = json.dumps([run.created, run.data_source, run.model_hash, run.sae_hash, run.pairs, run.counts],
                     sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


_SUSPECT_COLUMNS = (  # (header, numeric, sortable)
    ("rank", True, True),
    ("pair", False, True),
    ("why, and the evidence in each response", False, False),
    ("category", False, True),
    ("suspicion", True, True),
    ("score_safe", True, True),
    ("reward margin", True, True),
    ("SAE margin", True, True),
    ("top features", False, False),
    ("source:line", False, True),
    ("decision", False, False),
)


def _cards_shown(report: Report, suspects: list[Finding]) -> tuple[list[FeatureCard], str]:
    """The cards the page shows, and a note saying which: the features that the shown suspects' evidence names
    (the first model's: a profile's other models number their own latents), by contribution; for a report
    without evidence, the top --cards by contribution."""
    used = {latent for f in suspects for span in f.evidence for latent in span.latents}
    if not used:
        featured = [card for card in report.features if card.featured]
        return featured, (f"the top {len(featured):,} of {len(report.features):,} by contribution to the flagged "
                          "pairs (the JSON report holds all)" if len(featured) < len(report.features)
                          else "by contribution")
    others = {model.prefix for model in PROFILES.get(report.run.profile, ())}
    named = [card for card in report.features if card.latent in used and card.model not in others]
    limit = sum(1 for card in report.features if card.featured)  # --cards: how many cards a page shows
    shown = named[:limit]
    among = "" if len(shown) == len(named) else f"the top {len(shown):,} by contribution of "
    return shown, (f"{among}the {len(named):,} of {len(report.features):,} features that the evidence of the "
                   "suspects above names, by contribution to the flagged pairs (the JSON report holds all)")


# Of each pair's texts the all-pairs search holds the start of each response and the end of the request:
# enough to find a pair by what it says, at a few hundred bytes a pair (BENCHMARKS.md "HTML report": page size)
ALL_PAIRS_RESPONSE_CHARS = 160
ALL_PAIRS_REQUEST_CHARS = 100


def _all_pairs_data(report: Report) -> list[list]:
    """Every pair, by rank, as the page's search reads it: rank, id, source:line, category, suspicion,
    the end of the request, the start of the chosen and rejected responses (one line each)."""
    def squash(text: str) -> str:  # one line, and no control character: written out, as everywhere on the page
        return inert(" ".join(text.split()))

    return [[f.rank, inert(f.pair_id), inert(f"{f.source}:{f.line}"), f.category, format_number(f.suspicion),
             squash(f.context)[-ALL_PAIRS_REQUEST_CHARS:], squash(f.chosen)[:ALL_PAIRS_RESPONSE_CHARS],
             squash(f.rejected)[:ALL_PAIRS_RESPONSE_CHARS]]
            for f in sorted(report.findings, key=lambda f: f.rank)]


def render_html(report: Report, max_suspects: int = HTML_MAX_SUSPECTS) -> str:
    """One self-contained page: summary, the suspects to review (search, filter, decide,
    download the decisions), and the feature cards, collapsed, below them."""
    summary = "".join(f"<dt>{_e(heading)}</dt><dd>{_e(value)}</dd>" for heading, value in summary_lines(report)
                      if heading != "warning")  # the page shows it as a banner at the top
    counts = "".join(
        f'<tr><td><span class="{name}">{name}</span></td>'
        f'<td class="num">{report.run.counts.get(name, 0):,}</td><td>{_e(CATEGORY_DESCRIPTIONS[name])}</td></tr>'
        for name in Category
    )
    warning = few_pairs_warning(report.run.pairs)
    banner = f'<p class="warning" role="alert"><strong>Warning:</strong> {_e(warning)}</p>' if warning else ""
    everyone = report.suspects()
    suspects = everyone[:max_suspects]
    capped = (f" The page shows the top {len(suspects):,} of {len(everyone):,} suspects by rank; "
              "the JSON, CSV and Parquet reports hold every pair.") if len(suspects) < len(everyone) else ""
    headers = "".join(
        f'<th class="{"num" if numeric else ""}"{" data-sort" if sortable else ""}>{_e(name)}</th>'
        for name, numeric, sortable in _SUSPECT_COLUMNS
    )
    rows = "".join(_finding_row(f) for f in suspects)
    table = (
        f'<table class="sortable suspects"><thead><tr>{headers}</tr></thead><tbody>{rows}</tbody></table>'
        if suspects
        else "<p>Every pair is clean.</p>"
    )
    present = [name for name in ("flipped", "noisy", "quality") if any(f.category == name for f in suspects)]
    options = '<option value="">all</option>' + "".join(f'<option value="{n}">{n}</option>' for n in present)
    data = {
        "format": DECISIONS_FORMAT,
        "version": DECISIONS_VERSION,
        "report": report_identity(report),
        "pairs": {f.digest: [f.pair_id, f"{f.source}:{f.line}"] for f in suspects},
    }
    featured, shown_note = _cards_shown(report, suspects)
    run_line = (f"Run: {report.run.pairs:,} pairs from {report.run.data_source}; "
                + ", ".join(f"{name} {report.run.counts.get(name, 0):,}" for name in Category))
    cards = "".join(_feature_card(card) for card in featured)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>safer-audit report: {_e(report.run.data_source)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>safer-audit report</h1>
{banner}
<details id="run" open><summary>{_e(run_line)}</summary>
<section id="summary"><dl>{summary}</dl>
<table><thead><tr><th>category</th><th class="num">pairs</th><th>meaning</th></tr></thead>
<tbody>{counts}</tbody></table>
</section>
</details>
<section id="suspects"><h2>Suspects ({len(everyone):,} of {report.run.pairs:,} pairs)</h2>
<p>{_SCORE_SAFE_NOTE} Evidence: the words whose features pull score_safe most, <mark class="ev neg l3">red</mark>
toward the rejected response, <mark class="ev pos l3">blue</mark> toward the chosen one, darker the stronger (hover
for the share and the features). Top features: latent, label and its share of score_safe.{capped}</p>
<p>Mark each pair flipped, noisy or ok, then download decisions.json for <code>safer-audit review</code> or
<code>safer-audit clean --decisions</code>. Decisions stay in this browser until you download them; nothing is
sent anywhere.</p>
<div class="controls">
<label class="grow">search<input id="q" type="search" placeholder="pair id, file, text, feature" autocomplete="off"></label>
<label>category<select id="category">{options}</select></label>
<label>show<select id="decided"><option value="">all</option><option value="todo">undecided</option>
<option value="done">decided</option></select></label>
<label>reviewer<input id="reviewer" type="text" placeholder="your name (optional)" autocomplete="name"></label>
<button type="button" id="download">Download decisions.json</button>
<span class="status"><span id="shown"></span> · <span id="counter"></span></span>
</div>
{table}
</section>
<section id="all-pairs"><h2>All pairs ({report.run.pairs:,})</h2>
<p>Every scanned pair, clean ones too, by rank: search by pair id, file:line, category or what the pair says
(the end of the request, the start of each response).</p>
<div class="controls">
<label class="grow">search all pairs<input id="all-q" type="search" placeholder="pair id, file:line, text"
autocomplete="off"></label>
<span class="status" id="all-shown"></span>
</div>
<table class="all-pairs" hidden><thead><tr><th class="num">rank</th><th>pair</th><th>source:line</th>
<th>category</th><th class="num">suspicion</th><th>texts</th></tr></thead><tbody></tbody></table>
</section>
<details id="features"><summary>Features ({len(featured):,} shown): the latents behind the evidence</summary>
<p>Cards: {shown_note}. Histogram: per-text mean activation on chosen and rejected texts, where it fires.</p>
<div class="cards">{cards}</div>
</details>
<script type="application/json" id="report-data">{script_json(data)}</script>
<script type="application/json" id="all-pairs-data">{script_json(_all_pairs_data(report))}</script>
<script>{_JS}</script>
</body>
</html>
"""


def export_html(report: Report, path: Path) -> None:
    write_atomic(path, render_html(report))


@hookimpl
def register_exporters(register):
    register("json", (".json",), export_json)
    register("csv", (".csv",), export_csv)
    register("parquet", (".parquet",), export_parquet)
    register("markdown", (".md",), export_markdown)
    register("html", (".html", ".htm"), export_html)
