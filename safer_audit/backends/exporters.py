"""Built-in exporters: JSON, CSV, Parquet, Markdown and HTML renderings of a Report.

Every piece of dataset text is untrusted: Markdown and HTML escape all of it, and CSV quotes
text that a spreadsheet would run as a formula.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path

import polars as pl

from ..files import write_atomic
from ..hookspecs import hookimpl
from ..report import (
    CATEGORIES,
    CATEGORY_DESCRIPTIONS,
    Excerpt,
    FeatureCard,
    Finding,
    Report,
    diff_excerpts,
    format_feature,
    format_number,
    summary_lines,
)

PARQUET_METADATA_KEY = "safer_audit.report"  # run metadata and feature cards, as JSON
_SCORE_SAFE_NOTE = "score_safe = V(chosen) - V(rejected): low or negative means the chosen response looks less safe."


def export_json(report: Report, path: Path) -> None:
    text = json.dumps(report.to_dict(), ensure_ascii=False, indent=2, allow_nan=False)
    write_atomic(path, text + "\n")


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
    write_atomic(path, spreadsheet_safe(report.to_frame(nested=False)).write_csv())


def export_parquet(report: Report, path: Path) -> None:
    header = json.dumps(report.to_dict(include_findings=False), ensure_ascii=False, allow_nan=False)
    frame = report.to_frame()
    write_atomic(path, lambda tmp: frame.write_parquet(tmp, metadata={PARQUET_METADATA_KEY: header}))


# -- Markdown --------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#!~])")


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no markup, no raw HTML."""
    text = html.escape(re.sub(r"\s+", " ", text), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_excerpt(excerpt: Excerpt) -> str:
    differ = excerpt.differ.strip()
    if not differ:
        return _md(excerpt.before + excerpt.after)
    # Emphasis markers must touch the text, so surrounding spaces stay outside them.
    lead = excerpt.differ[: len(excerpt.differ) - len(excerpt.differ.lstrip())]
    trail = excerpt.differ[len(excerpt.differ.rstrip()) :]
    return f"{_md(excerpt.before + lead)}**{_md(differ)}**{_md(trail + excerpt.after)}"


def render_markdown(report: Report) -> str:
    lines = ["# safer-audit report", ""]
    lines += [f"- **{heading}**: {_md(value)}" for heading, value in summary_lines(report)]
    lines += ["", "| category | pairs | meaning |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {report.run.counts.get(name, 0):,} | {CATEGORY_DESCRIPTIONS[name]} |" for name in CATEGORIES]
    suspects = report.suspects()
    lines += ["", f"## Suspects ({len(suspects):,}, most suspicious first)", ""]
    if not suspects:
        lines.append("Every pair is clean.")
    else:
        lines += [
            "| rank | pair | line | category | score_safe | reward margin | features | chosen | rejected |",
            "| ---: | --- | ---: | --- | ---: | ---: | --- | --- | --- |",
        ]
        for f in suspects:
            chosen, rejected = diff_excerpts(f.chosen, f.rejected)
            category = f.category + (f" ({', '.join(f.quality)})" if f.quality else "")
            features = "; ".join(_md(format_feature(c)) for c in f.top_features[:3])
            cells = [
                str(f.rank),
                _md(f.pair_id),
                str(f.line),
                _md(category),
                format_number(f.score_safe),
                format_number(f.reward_margin),
                features,
                _md_excerpt(chosen),
                _md_excerpt(rejected),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _SCORE_SAFE_NOTE, ""]
    return "\n".join(lines)


def export_markdown(report: Report, path: Path) -> None:
    write_atomic(path, render_markdown(report))


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 90rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .5rem; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
td.features { white-space: nowrap; font-size: .9em; }
td.texts { min-width: 22em; }
td.loc { white-space: normal; word-break: break-all; max-width: 12em; }
table.sortable th { cursor: pointer; user-select: none; background: #f4f4f4; position: sticky; top: 0; }
th[data-order=asc]::after { content: " \\25B2"; } th[data-order=desc]::after { content: " \\25BC"; }
mark { background: #ffe08a; }
.flipped { color: #b00020; font-weight: 600; } .noisy { color: #8a5a00; } .quality { color: #555; }
.excerpt { margin: 0 0 .2rem; } .side { font-weight: 600; }
pre { white-space: pre-wrap; word-break: break-word; background: #f8f8f8; padding: .5rem; margin: .3rem 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); gap: 1rem; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem 1rem; }
.card h3 { font-size: 1rem; margin: .3rem 0; } .card ol { padding-left: 1.2rem; }
"""

# Sorts a table by the clicked header: numbers by value (data-v), text alphabetically.
_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
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
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = numeric ? (x < y ? -1 : x > y ? 1 : 0) : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""

# Only this exact script may run: even a piece of dataset text that slipped past escaping
# could not execute.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()}'"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_excerpt(side: str, excerpt: Excerpt) -> str:
    return (
        f'<p class="excerpt"><span class="side">{side}</span> {_e(excerpt.before)}'
        f"<mark>{_e(excerpt.differ)}</mark>{_e(excerpt.after)}</p>"
    )


def _num_cell(value: float | None) -> str:
    v = "" if value is None else repr(float(value))
    return f'<td class="num" data-v="{v}">{_e(format_number(value))}</td>'


def _finding_row(f: Finding) -> str:
    chosen, rejected = diff_excerpts(f.chosen, f.rejected, width=120)
    features = "<br>".join(_e(format_feature(c)) for c in f.top_features)
    quality = f"<br>{_e(', '.join(f.quality))}" if f.quality else ""
    full = (
        "<details><summary>full texts</summary>"
        f"<div class=\"side\">context</div><pre>{_e(f.context)}</pre>"
        f"<div class=\"side\">chosen</div><pre>{_e(f.chosen)}</pre>"
        f"<div class=\"side\">rejected</div><pre>{_e(f.rejected)}</pre></details>"
    )
    return (
        "<tr>"
        f'<td class="num" data-v="{f.rank}">{f.rank}</td>'
        f"<td>{_e(f.pair_id)}</td>"
        f'<td class="num loc" data-v="{f.line}">{_e(f.source)}:{f.line}</td>'
        f'<td><span class="{_e(f.category)}">{_e(f.category)}</span>{quality}</td>'
        f"{_num_cell(f.suspicion)}{_num_cell(f.score_safe)}{_num_cell(f.reward_margin)}{_num_cell(f.sae_margin)}"
        f'<td class="features">{features}</td>'
        f'<td class="texts">{_html_excerpt("chosen", chosen)}{_html_excerpt("rejected", rejected)}{full}</td>'
        "</tr>"
    )


def _feature_card(card: FeatureCard) -> str:
    side = "chosen (F+)" if card.sign == "+" else "rejected (F-)"
    tokens = ", ".join(f"<code>{_e(token)}</code> ×{count}" for token, count in card.top_tokens) or "none recorded"
    contexts = "".join(
        f'<li><span class="side">{_e(c.side)}</span> {_e(c.pair_id)}: '
        f"…{_e(c.text_before)}<mark>{_e(c.token)}</mark>{_e(c.text_after)}… ({c.value:.3g})</li>"
        for c in card.contexts
    )
    label = f" — {_e(card.label)}" if card.label else ""
    return (
        '<article class="card">'
        f"<h3>latent {card.latent}{label}</h3>"
        f"<p>salience {card.salience:+.3f}, fires more on {side}; "
        f"C {card.chosen_total:.4g}, R {card.rejected_total:.4g}; active at {card.fire_rate:.2%} of positions</p>"
        f"<p>fires most on: {tokens}</p>"
        f"<ol>{contexts}</ol>"
        "</article>"
    )


def render_html(report: Report) -> str:
    """One self-contained page: summary, sortable suspects table, feature cards."""
    summary = "".join(f"<dt>{_e(heading)}</dt><dd>{_e(value)}</dd>" for heading, value in summary_lines(report))
    counts = "".join(
        f'<tr><td><span class="{name}">{name}</span></td>'
        f'<td class="num">{report.run.counts.get(name, 0):,}</td><td>{_e(CATEGORY_DESCRIPTIONS[name])}</td></tr>'
        for name in CATEGORIES
    )
    suspects = report.suspects()
    headers = "".join(
        f'<th class="num">{name}</th>' if numeric else f"<th>{name}</th>"
        for name, numeric in (
            ("rank", True),
            ("pair", False),
            ("source:line", True),
            ("category", False),
            ("suspicion", True),
            ("score_safe", True),
            ("reward margin", True),
            ("SAE margin", True),
            ("top features", False),
            ("chosen / rejected, from the first difference", False),
        )
    )
    rows = "".join(_finding_row(f) for f in suspects)
    table = (
        f'<table class="sortable"><thead><tr>{headers}</tr></thead><tbody>{rows}</tbody></table>'
        if suspects
        else "<p>Every pair is clean.</p>"
    )
    cards = "".join(_feature_card(card) for card in report.features)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>safer-audit report: {_e(report.run.data_source)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>safer-audit report</h1>
<section id="summary"><dl>{summary}</dl>
<table><thead><tr><th>category</th><th class="num">pairs</th><th>meaning</th></tr></thead>
<tbody>{counts}</tbody></table>
</section>
<section id="suspects"><h2>Suspects ({len(suspects):,} of {report.run.pairs:,} pairs; click a header to sort)</h2>
<p>{_SCORE_SAFE_NOTE}
Top features: latent, label and its share of score_safe.</p>
{table}
</section>
<section id="features"><h2>Features ({len(report.features)})</h2>
<div class="cards">{cards}</div>
</section>
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
