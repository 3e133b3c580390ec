"""How a report reads: the terminal view of a scan (``print_report``, ``print_feature_cards``) and the
text helpers the Markdown and HTML exporters (exporters.py) share with it.

Not a plugin: the report types are in ``safer_audit.report.types``; this module only renders them, and
every piece of dataset or model text goes through ``inert`` before a terminal.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import NamedTuple

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..common.domain import Category
from ..common.terminal import inert, plain
from ..features.types import EvidenceSpan
from .types import CATEGORY_DESCRIPTIONS, FeatureCard, FeatureContribution, Finding, Report, few_pairs_warning

# -- shared rendering helpers ----------------------------------------------------------


class Excerpt(NamedTuple):
    """A short window of a response: text before the first difference, the differing span, after."""

    before: str
    differ: str
    after: str


_TOKEN = re.compile(r"\s+|\w+(?:['’]\w+)*|[^\w\s]")  # "can't" is one word
_RESYNC_WORDS = 3  # shared words (and punctuation) in a row that end a differing span


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _excerpt(tokens: list[str], start: int, end: int, width: int) -> Excerpt:
    before, differ, after = (_squash("".join(part)) for part in (tokens[:start], tokens[start:end], tokens[end:]))
    lead = width // 4
    if len(before) > lead:
        before = "…" + before[len(before) - lead + 1 :]
    room = width - len(before)
    if len(differ) > room:
        return Excerpt(before, differ[: max(room - 1, 1)] + "…", "")
    room -= len(differ)
    if len(after) > room:
        after = after[: max(room - 1, 0)] + "…" if room > 0 else ""
    return Excerpt(before, differ, after)


def diff_excerpts(chosen: str, rejected: str, width: int = 60) -> tuple[Excerpt, Excerpt]:
    """Excerpts of both responses around the first place where they differ.

    Word-level, so that two unrelated answers show one differing span rather than
    scattered shared letters. Identical responses give an empty ``differ``.
    """
    a, b = _TOKEN.findall(chosen), _TOKEN.findall(rejected)
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    # Every token shows as at least one character, so past `width` tokens nothing more is
    # shown; the slack lets a run of shared words end the span just past the edge.
    stop_a, stop_b = min(len(a), common + 2 * width), min(len(b), common + 2 * width)
    matcher = difflib.SequenceMatcher(None, a[common:stop_a], b[common:stop_b], autojunk=False)
    i2 = j2 = 0
    for tag, _, end_a, _, end_b in matcher.get_opcodes():
        # Two different sentences share spaces and small words; only a real run of shared
        # words ends the differing span.
        if tag == "equal" and sum(not t.isspace() for t in a[common + i2 : common + end_a]) >= _RESYNC_WORDS:
            break
        i2, j2 = end_a, end_b
    return _excerpt(a, common, common + i2, width), _excerpt(b, common, common + j2, width)


def top_span(finding: Finding, side: str) -> EvidenceSpan | None:
    """The strongest evidence span of one side of a finding (its evidence is strongest first), or None."""
    return next((span for span in finding.evidence if span.side == side), None)


def span_excerpt(response: str, span: EvidenceSpan, width: int = 60) -> Excerpt:
    """An excerpt of ``response`` around ``span``: a little text before it, the span, what follows."""
    return _excerpt([response[:span.start], response[span.start:span.end], response[span.end:]], 1, 2, width)


def pieces(response: str, spans: Iterable[EvidenceSpan]) -> list[tuple[str, EvidenceSpan | None]]:
    """``response`` cut at its evidence spans: (text, the span it is, or None), in order, covering it all.

    Spans of one side never overlap (features.evidence merges them); one that would is skipped, never cut
    into, so every piece is an exact slice.
    """
    out, at = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < at or span.end > len(response):
            continue
        if span.start > at:
            out.append((response[at:span.start], None))
        out.append((response[span.start:span.end], span))
        at = span.end
    if at < len(response) or not out:
        out.append((response[at:], None))
    return out


def format_number(value: float | None) -> str:
    """Three significant digits with a sign; a dash for a missing value; zero (also -0.0) as ``0``."""
    if value is None:
        return "—"
    return "0" if value == 0 else f"{value:+.3g}"  # never "-0" (a -0.0 from a subtraction) or "+0"


def format_feature(contribution: FeatureContribution) -> str:
    """``label +0.61 (#2971)`` when labelled, else ``#2971 +0.61``."""
    if contribution.label:
        return f"{contribution.label} {format_number(contribution.net)} (#{contribution.latent})"
    return f"#{contribution.latent} {format_number(contribution.net)}"


# what ``flipped`` meant in a report, by its run's flipped_rule (scoring.categories)
FLIPPED_RULES = {"harm": "flipped: the harm judge and a ranked judge find the chosen reply worse",
                 "judges": "flipped: among the most suspicious, every ranked judge prefers the rejected reply"}


def summary_lines(report: Report) -> list[tuple[str, str]]:
    """The summary as (heading, value) pairs, shared by the terminal, Markdown and HTML."""
    run = report.run
    model = run.model + (f" (sha256 {run.model_hash[:12]})" if run.model_hash else "")
    sae = run.sae_path + (f" (sha256 {run.sae_hash[:12]})" if run.sae_hash else "")
    fvu = "unknown" if run.sae_fvu is None else f"{run.sae_fvu:.3f}"
    thresholds = ", ".join(f"{name} {value:g}" for name, value in run.thresholds.items()) or "none"
    timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in run.timings.items()) or "not recorded"
    return [
        ("pairs scanned", f"{run.pairs:,} from {run.data_source}"),
        ("model", f"{model}, layer {run.layer}, positions {run.positions}, max length {run.max_length}"),
        ("SAE", f"{sae}, FVU {fvu}, {run.n_features} features"),
        ("ranking", f"{run.ranking}; thresholds: {thresholds}"),
        ("categories", ", ".join(f"{name} {run.counts.get(name, 0):,}" for name in Category)
         + (f" ({FLIPPED_RULES[run.flipped_rule]})" if run.flipped_rule in FLIPPED_RULES else "")),
        *([("flip probability", run.flip_probability_note)] if run.flip_probability_note else []),
        ("time", timings),
        ("created", f"{run.created} by safer-audit {run.tool_version}"),
    ] + ([("warning", warning)] if (warning := few_pairs_warning(run.pairs)) else [])


# -- terminal --------------------------------------------------------------------------


def excerpt_text(label: str, excerpt: Excerpt, marks: bool, style: str = "bold reverse") -> Text:
    text = Text(f"{label} ", style="bold")
    text.append(inert(excerpt.before))
    # Without styles the differing span must still show, so it gets visible marks.
    if excerpt.differ:
        differ = inert(excerpt.differ)
        text.append(f"»{differ}«" if marks else differ, style=style)
    text.append(inert(excerpt.after))
    return text


SPAN_STYLES = {True: "bold reverse red", False: "bold reverse blue"}  # by weight < 0: pulls toward the rejected


def span_style(span: EvidenceSpan) -> str:
    return SPAN_STYLES[span.weight < 0]


def evidence_lines(finding: Finding, marks: bool, width: int = 90) -> list[Text]:
    """The why line, then the strongest evidence span of each side with a little of the text around it; a finding
    without evidence (a data problem, or a report made before evidence) shows where its responses first differ."""
    lines = [plain(finding.why or CATEGORY_DESCRIPTIONS[finding.category], style="bold")]
    if not finding.evidence:
        chosen, rejected = diff_excerpts(finding.chosen, finding.rejected, width=width)
        return lines + [excerpt_text("C", chosen, marks), excerpt_text("R", rejected, marks)]
    for side in ("chosen", "rejected"):
        span = top_span(finding, side)
        if span is None:
            lines.append(Text(f"{side[0].upper()} (no strong evidence)", style="dim"))
        else:
            lines.append(excerpt_text(side[0].upper(), span_excerpt(getattr(finding, side), span, width), marks,
                                      style=span_style(span)))
    return lines


def highlighted(response: str, spans: Iterable[EvidenceSpan], marks: bool) -> Text:
    """A whole response (newlines kept, control characters escaped) with its evidence spans styled, or
    between »« marks on a terminal without styles."""
    text = Text()
    for piece, span in pieces(response, spans):
        shown = inert(piece, multiline=True)
        if span is None:
            text.append(shown)
        else:
            text.append(f"»{shown}«" if marks else shown, style=span_style(span))
    return text


NARROW = 140  # columns under which a features column would fold its labels: they go under the responses


def print_report(report: Report, console: Console, top: int = 20) -> None:
    """The summary panel and the table of the ``top`` suspects, readable at 80 columns and up."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # a long file name folds onto the next line rather than being cut
    for heading, value in summary_lines(report):
        grid.add_row(heading, plain(value))  # paths and model names: never markup
    console.print(Panel(grid, title="safer-audit", title_align="left", box=box.ROUNDED))

    suspects = report.suspects(top)
    shown = len(suspects)
    total = len(report.suspects())
    if not suspects:
        console.print("No suspects: every pair is clean.")
        return
    marks = not console.is_terminal or console.color_system is None
    more = f"; --top {total} shows all" if shown < total else ""
    # under NARROW columns a features column would be a few characters wide, each label folded over many
    # lines: the features go under the responses instead
    narrow = console.width < NARROW
    table = Table(
        title=f"Top {shown} of {total:,} suspects (pairs flagged, most suspicious first{more})",
        box=box.SIMPLE_HEAD,
        show_lines=True,
        expand=True,
        title_justify="left",
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("pair", overflow="fold", max_width=16)
    if not narrow:
        table.add_column("safe", justify="right", no_wrap=True)
        table.add_column("margin", justify="right", no_wrap=True)
        table.add_column("features", ratio=2)
    table.add_column("why, and the strongest evidence in chosen (C) and rejected (R)" + (", features" if narrow else ""),
                     ratio=5)
    for finding in suspects:
        pair = Text(f"{inert(finding.pair_id)}\nline {finding.line}\n")
        pair.append(inert(finding.category), style="bold red" if finding.category == "flipped" else "bold")
        if finding.quality:
            pair.append("\n" + inert(", ".join(finding.quality)))
        features = [inert(format_feature(c)) for c in finding.top_features[:3]]
        texts = evidence_lines(finding, marks)
        scores = [format_number(finding.score_safe), format_number(finding.reward_margin)]
        if narrow:  # the scores under the pair, each feature on a line of its own under the evidence
            pair.append(f"\nsafe {scores[0]}\nmargin {scores[1]}")
            texts += [Text(feature, style="dim") for feature in features]
            table.add_row(str(finding.rank), pair, Group(*texts))
        else:
            table.add_row(str(finding.rank), pair, *scores, Text("\n".join(features)), Group(*texts))
    console.print(table)
    console.print(
        "safe: score_safe = V(chosen) - V(rejected), low or negative is suspicious; margin: reward margin; "
        "features: label (or latent), share of score_safe, latent number. Evidence: the words whose features "
        "pull score_safe most" + (", between » «." if marks else " (red: toward the rejected response).")
    )


def print_feature_cards(cards: list[FeatureCard], console: Console) -> None:
    """One panel per feature: label and its provenance, contribution, salience, totals, firing on each
    side, length correlation, top tokens, the strongest contexts and a few weaker ones."""
    marks = not console.is_terminal or console.color_system is None
    for card in cards:
        head = Text(f"salience {format_number(card.salience)}  ({'F+' if card.sign == '+' else 'F-'}: fires more on "
                    f"{'chosen' if card.sign == '+' else 'rejected'})  C {card.chosen_total:,.1f}  "
                    f"R {card.rejected_total:,.1f}  fires on {card.fire_rate:.2%} of read tokens")
        lines = [head]
        lines.append(Text(f"contribution {card.contribution:.1%} of the flagged pairs' feature scores; "
                          f"a top feature of {card.flagged_pairs:,} flagged pair(s)"))
        if card.chosen_fires is not None and card.rejected_fires is not None:
            fires = Text(f"fires in {card.chosen_fires:.0%} of chosen texts, {card.rejected_fires:.0%} of rejected")
            if card.length_correlation is not None:
                fires.append(f"; length r {card.length_correlation:+.2f}")
                if card.length_driven:
                    fires.append(" LENGTH-DRIVEN", style="bold red")
            lines.append(fires)
        lines.append(Text("top tokens: " + (", ".join(f"{inert(tok)} ({n})" for tok, n in card.top_tokens) or "-")))
        for ctx in card.contexts:
            tag = "" if ctx.sample == "top" else f" {inert(ctx.sample)}"
            line = Text(f"{ctx.value:5.2f} {inert(ctx.side[:1].upper())}{tag} {inert(ctx.pair_id)}  ", style="dim")
            line.append("…" + inert(_squash(ctx.text_before)[-80:]))
            token = inert(_squash(ctx.token))
            line.append(f"[{token}]" if marks else token, style="bold reverse")
            line.append(inert(_squash(ctx.text_after)[:80]) + "…")
            lines.append(line)
        # A Text title: a str title would be parsed as markup, and labels are the user's text
        rating = f" [{card.category}, relevance {card.relevance:.2f}]" if card.relevance is not None else ""
        model = f"{card.model} " if card.model else ""  # a profile's cards come from several models
        title = plain(f"{model}latent {card.latent}: " + (card.label or "unlabelled") + rating)
        if card.labelled_by and card.labelled_by.get("label") == card.label:
            lines.insert(1, plain(f"labelled by {card.labelled_by.get('labeller')} "
                                  f"v{card.labelled_by.get('version')} ({card.labelled_by.get('model') or 'no model'})",
                                  style="dim"))
        elif card.label:
            lines.insert(1, plain("label from the features file", style="dim"))
        console.print(Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED))
