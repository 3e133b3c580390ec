"""Evidence in the text and the why line: offsets that are exact slices (multi-byte characters, texts the
model saw only the end of), spans that add up to score_safe, and span text that stays text in every view."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, replace

import numpy as np
import polars as pl
import pytest
import torch
from rich.console import Console

from safer_audit.backends.exporters import render_html, render_markdown
from safer_audit.data.transcripts import render_transcript
from safer_audit.errors import ConfigError
from safer_audit.features.evidence import EvidenceSpan, Share, flip, pair_evidence, position_shares, texts_shares
from safer_audit.model.activations import read_positions
from safer_audit.model.texts import PreparedText
from safer_audit.report.types import Report, export_report, finding_from_dict, findings_from_frame
from safer_audit.report.view import print_report
from safer_audit.report.why import explain_suspects, low_percentiles, quoted, why_line
from safer_audit.workflows.explain import Explanation, FeatureFiring, explain_from_report, print_explanation
from safer_audit.workflows.review import show_finding

from .conftest import FIXTURES, tiny_scan_config
from .test_report import make_report

SAMPLE = FIXTURES / "hh-harmless-300.jsonl"


def _prepared(context: str, response: str) -> PreparedText:
    text, start = render_transcript([{"role": "user", "content": context}, {"role": "assistant", "content": response}])
    return PreparedText(text, start, False)


def _exact(spans, chosen: str, rejected: str) -> bool:
    responses = {"chosen": chosen, "rejected": rejected}
    return all(responses[s.side][s.start:s.end] == s.text and s.text.strip() == s.text for s in spans)


# -- offsets ------------------------------------------------------------------------------


def test_offsets_of_byte_pieces_of_one_character_land_on_that_character():
    """A byte-level tokenizer splits a multi-byte character into tokens that all claim it: each read position
    still lands on its characters, and a span is a slice of the string, never of its bytes."""
    response = "Use a knife 🔪 or café 日本"
    prepared = _prepared("How?", response)
    base = prepared.response_start
    knife = response.index("🔪")
    # tokens (start, end) in the rendered text: "Use", " a", " knife", two byte pieces of the emoji, " or", ...
    words = [(0, 3), (3, 5), (5, 11), (knife, knife + 1), (knife, knife + 1), (knife + 1, knife + 4),
             (knife + 4, knife + 9), (knife + 9, knife + 11), (knife + 11, knife + 12)]
    offsets = [(s + base, e + base) for s, e in words]
    terms = [[(7, -1.0)] if i in (2, 3, 4) else [(7, 0.05)] for i in range(len(offsets))]
    shares = position_shares(prepared, response, offsets, list(range(len(offsets))), terms, 0.5)
    # both byte pieces kept, each on the emoji (the first with the space since the previous token)
    assert [(s.start, s.end) for s in shares][3:5] == [(knife - 1, knife + 1), (knife, knife + 1)]
    assert sum(s.share for s in shares) == pytest.approx(0.5 * (-3 + 6 * 0.05))
    (span,) = pair_evidence(response, "fine", shares, [], score_safe=-1.0)
    assert span.text == "knife 🔪" and response[span.start:span.end] == span.text
    assert span.weight == pytest.approx(-1.5) and span.latents == [7]


def test_left_truncated_text_places_positions_on_the_visible_end(tiny_llama_dir):
    """The model saw only the end of a long conversation (truncated from the left): its positions index the
    full text, so spans land on the end of the response that the model read, as exact slices."""
    from safer_audit.backends.hf import HFModelBackend

    backend = HFModelBackend(str(tiny_llama_dir))
    response = " ".join(["The café owner said naïve things about 日本 and 🙂 knives."] * 12)
    prepared = _prepared("tell me " * 200, response)
    (ids,), (offsets,), (special,) = backend.tokenize([prepared.text], max_length=64, has_special_tokens=False)
    assert len(ids) == 64 and offsets[-1][1] == len(prepared.text)  # left-truncated: the end kept
    positions = read_positions(prepared.text, offsets, special, prepared.response_start, "response")
    terms = [[(1, -1.0 - (p % 3))] for p in positions]
    shares = position_shares(prepared, response, offsets, positions, terms, 1 / len(positions))
    assert sum(s.share for s in shares) == pytest.approx(sum(t[0][1] for t in terms) / len(positions))
    seen_from = offsets[positions[0]][0] - prepared.response_start
    assert seen_from > len(response) // 2  # the model read only the end of the response
    spans = pair_evidence(response, "x", shares, [], score_safe=-1.0)
    assert spans and _exact(spans, response, "x")
    assert all(s.start >= seen_from - len("knives.") for s in spans)


def test_a_span_is_widened_to_whole_words_apostrophes_included():
    response = "I’m afraid I don’t know, it's late"
    at = response.index("don")
    know, it = response.index("know"), response.index("it")
    shares = [Share(at, at + 3, -1.0), Share(know, know + 5, 0.01), Share(it, it + 2, -0.9)]
    spans = pair_evidence(response, "x", shares, [], score_safe=-1.0)
    assert sorted(s.text for s in spans) == ["don’t", "it's"] and _exact(spans, response, "x")


def test_a_response_not_in_the_model_text_gets_no_shares():
    prepared = PreparedText("\n\nHuman: a\n\nAssistant: something else", 24, False)
    assert position_shares(prepared, "the response", [(24, 33)], [0], [[(1, -1.0)]], 1.0) == []


def test_spans_follow_the_score_and_stop_at_the_sentence():
    response = "I can help. You could hurt him with a gun. Stay safe."
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", response)]
    pull = {"hurt": -1.0, "him": -0.6, "with": -0.5, "a": -0.4, "gun.": -0.9, "Stay": -0.5, "help.": 0.8}
    shares = [Share(s, e, pull.get(response[s:e], 0.01), ((3, pull.get(response[s:e], 0.01)),)) for s, e in words]
    spans = pair_evidence(response, "no", shares, [], score_safe=-2.0)
    assert spans[0].text == "hurt him with a gun."  # grown over its neighbours, not past the full stop
    assert all(s.weight < 0 for s in spans) and _exact(spans, response, "no")
    positive = pair_evidence(response, "no", shares, [], score_safe=+2.0)  # the score went the other way
    assert [s.text for s in positive] == ["help."]
    assert flip(shares)[0].share == -shares[0].share and flip(shares)[0].terms == ((3, -shares[0].terms[0][1]),)


# -- the why line -----------------------------------------------------------------------


def test_why_line_names_the_judges_their_percentiles_and_the_strongest_span():
    span = EvidenceSpan("chosen", 10, 31, "with a gun or a knife", -0.5)
    judges = [("score_safe", -3.0, 0.02), ("reward_margin", -0.4, 0.05)]
    assert why_line("flipped", judges, [], [span]) == (
        'both judges prefer the rejected response (score_safe lowest 2%, reward margin lowest 5%); '
        'strongest evidence in chosen: "with a gun or a knife"')
    mixed = why_line("noisy", [("score_safe", 0.2, 0.3), ("reward_margin", -1.0, 0.004)], [], [])
    assert mixed == "reward margin prefers the rejected response (lowest 1%); score_safe prefers the chosen one (lowest 30%)"
    three = why_line("noisy", [("score_safe", 0.2, 0.3), ("reward_margin", -1.0, 0.01), ("x/score_safe", -2.0, 0.02)],
                     [], [])
    assert three == ("reward margin and x/score_safe prefer the rejected response (reward margin lowest 1%, "
                     "x/score_safe lowest 2%); score_safe prefers the chosen one (lowest 30%)")
    assert why_line("quality", [("score_safe", None, None)], ["identical"], []) == "a data problem: identical"
    assert why_line("noisy", [("score_safe", 0.1, 0.08)], [], []).startswith("no judge prefers the rejected")


def test_why_quotes_span_text_inert_on_one_line_and_short():
    assert quoted("kill\x1b[31m them\nnow\u202e") == '"kill\\x1b[31m them now\\u202e"'
    long = quoted("word " * 40)
    assert len(long) <= 62 and long.endswith('…"') and "\n" not in long


def test_low_percentiles_count_from_the_lowest():
    import torch

    pct = low_percentiles(torch.tensor([3.0, -1.0, float("nan"), 0.0]))
    assert pct[:2].tolist() == [1.0, 1 / 3] and pct[2].isnan() and pct[3] == pytest.approx(2 / 3)


# -- reports: fields, round trips, refusal --------------------------------------------------

HOSTILE_SPAN = '<script>alert(1)</script> | **x** =1+1 [bold]no[/bold] \x1b[31m'


def evidence_report() -> Report:
    """make_report with evidence and a why on its flipped and noisy findings; hostile text in a span."""
    report = make_report()
    first = report.findings[0]
    chosen = first.chosen + " " + HOSTILE_SPAN
    start = chosen.index("<script>alert(1)")
    spans = [EvidenceSpan("chosen", start, len(chosen), chosen[start:], -0.75, [412]),
             EvidenceSpan("rejected", 6, 18, first.rejected[6:18], 0.25, [9])]
    report.findings[0] = replace(first, chosen=chosen, evidence=spans,
                                 why=why_line("flipped", [("score_safe", -0.8, 0.01)], [], spans))
    second = report.findings[1]
    report.findings[1] = replace(second, evidence=[EvidenceSpan("rejected", 0, 3, second.rejected[:3], -0.1)],
                                 why="reward margin prefers the rejected response")
    return report


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_evidence_and_why_read_back_equal(tmp_path, suffix):
    report = evidence_report()
    path = tmp_path / f"report{suffix}"
    export_report(report, path)
    if suffix == ".json":
        back = Report.from_dict(json.loads(path.read_text(encoding="utf-8"))).findings
    elif suffix == ".csv":
        back = findings_from_frame(pl.read_csv(path, schema_overrides={"pair_id": pl.String}))
    else:
        back = findings_from_frame(pl.read_parquet(path))
    by_rank = sorted(report.findings, key=lambda f: f.rank)
    assert sorted(back, key=lambda f: f.rank) == by_rank
    assert by_rank[0].evidence[0].text == HOSTILE_SPAN


def test_csv_evidence_cell_is_json_and_no_cell_runs_as_a_formula(tmp_path):
    path = tmp_path / "report.csv"
    report = evidence_report()
    report.findings[1].why = '=HYPERLINK("x") why'
    export_report(report, path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = {row["pair_id"]: row for row in csv.DictReader(handle)}
    assert json.loads(rows["hh-17"]["evidence"])[0]["text"] == HOSTILE_SPAN
    assert rows["hh-3"]["why"].startswith("'=HYPERLINK")  # quoted: a spreadsheet shows it as text
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows.values()
               for name, cell in row.items() if name in ("why", "evidence"))


def test_parquet_evidence_is_a_list_of_structs(tmp_path):
    path = tmp_path / "report.parquet"
    export_report(evidence_report(), path)
    schema = pl.read_parquet_schema(path)
    assert schema["evidence"] == pl.List(pl.Struct({"side": pl.String, "start": pl.Int64, "end": pl.Int64,
                                                    "text": pl.String, "weight": pl.Float64,
                                                    "latents": pl.List(pl.Int64)}))


def test_a_span_whose_text_is_not_its_slice_is_refused():
    finding = evidence_report().findings[0]
    data = asdict(finding)
    data["evidence"][0]["start"] += 1
    with pytest.raises(ConfigError, match=r"evidence\[0\]: text is not the chosen response's characters"):
        finding_from_dict(data)
    data["evidence"][0].update(start=0, side="context")
    with pytest.raises(ConfigError, match="side must be one of chosen, rejected"):
        finding_from_dict(data)


# -- every view: the why first, span text escaped -------------------------------------------


def test_html_marks_evidence_inline_escaped_and_shows_only_the_cards_it_names():
    report = evidence_report()
    page = render_html(report)
    row = page[page.index('<tr data-digest="' + report.findings[0].digest):]
    row = row[:row.index("</tr>")]
    assert row.index('<p class="why">') < row.index('<p class="response">')  # the why line leads
    mark = re.search(r'<mark class="ev neg l4" title="([^"]*)">(.*?)</mark>', row)
    assert mark.group(2) == ('&lt;script&gt;alert(1)&lt;/script&gt; | **x** =1+1 [bold]no[/bold] \\x1b[31m')
    assert mark.group(1) == "share of score_safe -0.75; features #412"
    assert re.search(r'<mark class="ev pos l2"[^>]*>I can&#x27;t help</mark>', row)
    assert "<script>alert" not in page and page.count("<script") == 3  # two data blocks and the page's own script
    assert "\x1b" not in row
    cards = re.findall(r"<h3>(?:\S+ )?latent (\d+)", page)
    assert sorted(int(c) for c in cards) == sorted({412, 9} & {card.latent for card in report.features})


def test_markdown_shows_the_why_and_the_strongest_span_of_each_side_escaped():
    text = render_markdown(evidence_report())
    (row,) = [line for line in text.splitlines() if line.startswith("| 1 |")]
    cells = re.split(r"(?<!\\)\|", row)
    assert len(cells) == 10 + 2
    assert cells[5].strip() == ('the judge prefers the rejected response (score\\_safe lowest 1%); strongest evidence '
                                'in chosen: "&lt;script&gt;alert(1)&lt;/script&gt; \\| \\*\\*x\\*\\* =1+1 \\[bold\\]no'
                                '\\[/bold\\]…"')  # cut at a word: the why quotes at most 60 characters
    assert "**&lt;script&gt;alert(1)&lt;/script&gt; \\| \\*\\*x\\*\\*" in cells[9]
    assert "<script>" not in text and "\x1b" not in text


def _console(width=160) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=False, color_system=None), out


def test_terminal_table_shows_the_why_and_top_spans_inert():
    console, out = _console()
    print_report(evidence_report(), console)
    text = out.getvalue()
    assert "\x1b" not in text and "[bold]no[/bold]" in re.sub(r"\s*│\s*", "", text)
    flat = re.sub(r"\s+", " ", re.sub(r"[│┃]", " ", text))
    assert "the judge prefers the rejected response" in flat
    assert "»<script>alert(1)</script>" in flat.replace("» ", "»") or "»<script>alert(1)" in flat
    assert "\\x1b[31m" in text.replace("\n", "").replace(" ", "")


def test_review_and_explain_lead_with_the_why_and_mark_the_spans():
    report = evidence_report()
    finding = report.findings[0]
    console, out = _console()
    show_finding(finding, console, index=1, total=1, where="data.jsonl:17")
    lines = [line.strip("│ ") for line in out.getvalue().splitlines() if line.strip("│ ╭─╮")]
    assert lines[0].startswith("the judge prefers the rejected response")
    assert "»<script>alert(1)</script>" in out.getvalue() and "\x1b" not in out.getvalue()
    console, out = _console()
    print_explanation(Explanation(finding, [FeatureFiring(412, "refusal", 1, 0.1, 0.7)]), console)
    assert out.getvalue().splitlines()[0].startswith("the judge prefers the rejected response")
    assert "»<script>alert(1)</script>" in out.getvalue() and "\x1b" not in out.getvalue()


def test_explain_from_a_report_shows_labels_and_where_features_pull():
    report = evidence_report()
    report.features[0].latent, report.features[0].label, report.features[0].category = 412, "weapons", "violence"
    finding = report.findings[0]
    row = {"pair_id": finding.pair_id, "source": "d.jsonl", "line": 1, "context": finding.context,
           "chosen": finding.chosen, "rejected": finding.rejected}
    explanation = explain_from_report(report, row, "r.json")
    firing = next(f for f in explanation.features if f.latent == 412)
    assert firing.chosen_tokens == [(HOSTILE_SPAN.strip(), -0.75)]
    console, out = _console(200)
    print_explanation(explanation, console)
    assert "[violence]" in out.getvalue() and "\x1b" not in out.getvalue()


# -- the committed sample, scanned with the tiny model -------------------------------------


@pytest.fixture(scope="module")
def sample_scan(tiny_llama_dir, tmp_path_factory):
    from safer_audit.pipeline.scan import run_scan

    cache = tmp_path_factory.mktemp("evidence-cache")
    return run_scan(str(SAMPLE), tiny_scan_config(tiny_llama_dir, cache, labeller="none"))


def test_every_flagged_finding_of_the_sample_has_a_why_and_exact_evidence(sample_scan, tmp_path):
    path = tmp_path / "report.json"
    export_report(sample_scan.report, path)
    findings = json.loads(path.read_text(encoding="utf-8"))["findings"]
    flagged = [f for f in findings if f["category"] in ("flipped", "noisy")]
    assert len(flagged) >= 25
    for f in flagged:
        assert f["why"] and ("prefer" in f["why"] or "ranks low" in f["why"])
        assert f["evidence"], f["pair_id"]
        for span in f["evidence"]:
            assert f[span["side"]][span["start"]:span["end"]] == span["text"] != ""
        assert f"strongest evidence in {f['evidence'][0]['side']}" in f["why"]
    assert all(not f["evidence"] for f in findings if f["category"] == "clean")
    assert sample_scan.report.run.timings["evidence"] >= 0


def flagged_texts(result, n: int):
    """A scan's first ``n`` flagged pairs, each pair's table index, and their texts' indices -> responses."""
    flagged = [f for f in result.report.findings if f.category in ("flipped", "noisy")][:n]
    index = {pair_id: i for i, pair_id in enumerate(result.pairs["pair_id"].to_list())}
    wanted = {}
    for f in flagged:
        wanted.update({2 * index[f.pair_id]: f.chosen, 2 * index[f.pair_id] + 1: f.rejected})
    return flagged, index, wanted


def test_the_shares_of_a_pair_add_up_to_its_score_safe(sample_scan):
    """Each read position's share is v(p) / |P(t)|, so a pair's shares over both responses are score_safe
    (positions are the final turn's, and every one lands on the response)."""
    result = sample_scan
    flagged, index, wanted = flagged_texts(result, 8)
    shares = texts_shares(result.store, result.texts, result.sae, result.features, result.backend,
                          result.report.run.max_length, wanted)
    for f in flagged:
        i = index[f.pair_id]
        total = sum(s.share for s in shares[2 * i]) - sum(s.share for s in shares[2 * i + 1])
        assert total == pytest.approx(f.score_safe, rel=1e-3, abs=1e-4)


def test_explain_suspects_gives_lazy_findings_their_evidence_as_made(sample_scan):
    result = sample_scan
    report = result.report
    before = {f.pair_id: (f.evidence, f.why) for f in report.findings if f.category != "clean"}
    explain_suspects(report, result.pairs["pair_id"].to_list(), result.texts, result.store, result.sae,
                     result.features, result.backend, report.run.max_length, result.signals,
                     {"score_safe": 1.0, "reward_margin": 1.0})
    assert {f.pair_id: (f.evidence, f.why) for f in report.findings if f.category != "clean"} == before


def test_explain_without_a_report_shows_labels_and_the_evidence_of_a_pair_not_flagged(sample_scan, monkeypatch):
    from types import SimpleNamespace

    from safer_audit.features.labels import FeatureLabel
    from safer_audit.workflows.explain import explain_pair

    result = sample_scan
    clean = next(f for f in result.report.findings if f.category == "clean")
    assert not clean.evidence and clean.why is None

    def label(latents):
        return {latent: FeatureLabel(latent, f"label {latent}", 0.9, "violence", "stub") for latent in latents}

    monkeypatch.setattr(result, "labelling", SimpleNamespace(label=label))
    explanation = explain_pair(result, clean.pair_id)
    assert explanation.features
    assert all(f.label == f"label {f.latent}" and f.category == "violence" for f in explanation.features)
    assert explanation.finding.evidence and _exact(explanation.finding.evidence, clean.chosen, clean.rejected)
    console, out = _console(200)
    print_explanation(explanation, console)
    assert "label " in out.getvalue() and "[violence]" in out.getvalue()


def test_shares_are_made_when_read_from_compact_terms_in_any_order(sample_scan):
    """A scan's flagged texts hold their terms as arrays (a tuple per code took ~10 GB at 100k pairs) and each
    text's shares are made when read: read in any order, or twice, they are the same."""
    from safer_audit.features.evidence import TextTerms, position_terms

    result = sample_scan
    _flagged, _index, wanted = flagged_texts(result, 6)
    args = (result.store, result.texts, result.sae, result.features, result.backend, result.report.run.max_length)
    in_order = {t: shares for t, shares in texts_shares(*args, wanted).items()}
    backwards = texts_shares(*args, wanted)
    assert {t: backwards[t] for t in reversed(list(wanted))} == in_order
    assert {t: backwards[t] for t in wanted} == in_order  # read again: made again, the same
    assert any(in_order.values())
    terms = position_terms(result.store, result.sae, result.features, wanted)
    signed = torch.zeros(result.sae.cfg.n_latents)
    signed[result.features.latents] = result.features.signs
    for t, text_terms in terms.items():
        assert isinstance(text_terms, TextTerms) and isinstance(text_terms.latents, np.ndarray)
        values, latents = result.sae.encode(result.store.text(t).acts)  # the codes, as the tuples held them
        codes = values.float() * signed[latents.long()]
        expected = [[(latent, value) for latent, value in zip(row_l, row_v, strict=True) if value]
                    for row_l, row_v in zip(latents.tolist(), codes.tolist(), strict=True)]
        assert text_terms.rows() == expected
