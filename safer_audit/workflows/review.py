"""The review loop: walk a scan's suspects one by one and record a decision for each.

``review_findings`` is the library function; ``safer-audit review`` wraps it with a key
reader (single keys on a terminal, lines from a pipe). Each decision is saved at once
(decisions.update_decisions: atomic, and merged under a lock with what another session wrote
meanwhile), so quitting, Ctrl-C or a kill loses nothing, and pairs already decided are skipped,
so a review resumes where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from ..common.terminal import inert, plain
from ..data import pair_digest
from ..errors import ConfigError
from ..report.types import Finding
from ..report.view import evidence_lines, format_feature, format_number, highlighted
from .decisions import Decisions, Verdict, decide, read_decisions, update_decisions

KEYS = {"f": Verdict.FLIPPED, "n": Verdict.NOISY, "o": Verdict.OK}
PROMPT = "[f] flipped  [n] noisy  [o] ok (F N O: with a note)  [s] skip  [q] quit > "
_CONTEXT_CHARS = 800  # of the conversation before the final turn: its end holds the request
_RESPONSE_CHARS = 1200


@dataclass
class ReviewOutcome:
    """How a review session went."""

    path: Path  # the decisions file
    suspects: int  # suspects in the report
    decided: int  # decisions made in this session
    skipped: int  # suspects passed over with [s]
    already: int  # suspects decided before (not shown again without review_all)
    quit: bool  # stopped early with [q] or end of input
    remaining: int = 0  # suspects without a decision in the file at the end (whoever wrote them)
    interrupted: bool = False  # stopped by Ctrl-C; every decision made before it is saved


def locate(findings: Iterable[Finding], rows: Iterable[dict], origin: str, data: str) -> dict[str, str]:
    """``source:line`` in the data for each finding's digest; a finding not in the data is an error.

    So a report of other (or since edited) data is refused before a decision names a pair it
    does not hold, and a reordered dataset still shows where each pair is now.
    """

    where = {}
    for row in rows:
        where.setdefault(pair_digest(row["context"], row["chosen"], row["rejected"]), f"{row['source']}:{row['line']}")
    for finding in findings:
        if finding.digest not in where:
            raise ConfigError(f"{origin}: pair {finding.pair_id} (line {finding.line}) is not in {data} with the "
                              "same text; the data changed since the scan, or it is a report of other data")
    return where


def show_finding(finding: Finding, console: Console, *, index: int, total: int, where: str,
                 previous: str | None = None) -> None:
    """One suspect: why it is one (first), where it is, its scores, the request, the strongest evidence span
    of each response, both responses with their evidence marked, and the features that moved its score most."""
    marks = not console.is_terminal or console.color_system is None
    head = Text(f"{index}/{total}  rank {finding.rank}  ", style="bold")
    head.append(inert(finding.category), style="bold red" if finding.category == "flipped" else "bold")
    head.append(f"  pair {inert(finding.pair_id)}  {inert(where)}")
    if previous:
        head.append(f"  (decided before: {inert(previous)})", style="dim")
    scores = Text(f"suspicion {format_number(finding.suspicion)}  score_safe {format_number(finding.score_safe)}  "
                  f"reward margin {format_number(finding.reward_margin)}  "
                  f"SAE-head margin {format_number(finding.sae_margin)}  "
                  f"quality: {inert(', '.join(finding.quality) or 'none')}")
    context = finding.context.strip()
    if len(context) > _CONTEXT_CHARS:
        context = "…" + context[-_CONTEXT_CHARS:]
    why, *evidence = evidence_lines(finding, marks, width=100)
    parts = [why, head, Text("the request (conversation before the final turn):", style="bold"),
             plain(context or "(none: the responses have no context)", multiline=True),
             Text("strongest evidence:" if finding.evidence else "first difference:", style="bold"), *evidence]
    for side, text in (("chosen", finding.chosen), ("rejected", finding.rejected)):
        shown = text if len(text) <= _RESPONSE_CHARS else text[:_RESPONSE_CHARS]
        body = highlighted(shown, [s for s in finding.evidence if s.side == side and s.end <= len(shown)], marks)
        if len(shown) < len(text):
            body.append("…")
        parts += [Text(f"{side}:", style="bold"), body]
    features = ", ".join(format_feature(c) for c in finding.top_features[:5]) or "none recorded"
    parts.append(Text(f"top features (latent label share of score_safe): {inert(features)}"))
    # the scores last, with the pair named again: right above the prompt, where a short terminal still shows
    # them once the responses have scrolled the top away
    parts += [head, scores]
    console.print(Panel(Group(*parts), expand=True))


def review_findings(findings: list[Finding], decisions_path: str | os.PathLike, *, ask: Callable[[str], str],
                    console: Console, reviewer: str, where: dict[str, str] | None = None,
                    review_all: bool = False, protect: Iterable[str | os.PathLike] = ()) -> ReviewOutcome:
    """Show each non-clean finding, most suspicious first, and record the key ``ask`` returns.

    ``ask(prompt)`` returns a key or a line: ``f``, ``n``, ``o`` decide (the rest of a line is
    the note), ``s`` skips, ``q`` (or EOFError) stops. Pairs decided before are skipped
    unless ``review_all``. Every decision is written to ``decisions_path`` at once.
    """
    path = Path(decisions_path)
    decisions: Decisions = read_decisions(path, missing_ok=True)
    suspects = sorted((f for f in findings if f.category != "clean"), key=lambda f: f.rank)
    already = sum(1 for f in suspects if f.digest in decisions)
    outcome = ReviewOutcome(path, len(suspects), 0, 0, 0 if review_all else already, False)
    todo = suspects if review_all else [f for f in suspects if f.digest not in decisions]
    if not todo:
        console.print(plain(f"Nothing to review: all {len(suspects)} suspects have a decision in {path}."))
    elif outcome.already:
        console.print(plain(f"Resuming: {outcome.already} of {len(suspects)} suspects already decided in {path}."))
    try:
        decisions = _walk(todo, decisions, path, outcome, ask=ask, console=console, reviewer=reviewer,
                          where=where or {}, protect=protect)
    except KeyboardInterrupt:  # Ctrl-C: what was decided is saved; the caller says so
        outcome.interrupted = outcome.quit = True
        decisions = read_decisions(path, missing_ok=True)
    outcome.remaining = sum(1 for f in suspects if f.digest not in decisions)
    return outcome


def _walk(todo: list[Finding], decisions: Decisions, path: Path, outcome: ReviewOutcome, *, ask, console, reviewer,
          where: dict[str, str], protect) -> Decisions:
    """Show each finding of ``todo`` and act on the answer; returns the decisions as last saved."""
    for n, finding in enumerate(todo, 1):
        place = where.get(finding.digest, f"{finding.source}:{finding.line}")
        known = decisions.get(finding.digest)
        show_finding(finding, console, index=n, total=len(todo), where=place,
                     previous=f"{known.verdict} by {known.reviewer}" if known else None)
        while True:
            try:
                answer = ask(PROMPT)
            except EOFError:
                outcome.quit = True
                return decisions
            key, note = (answer.strip()[:1].lower(), answer.strip()[1:].strip())
            if key in KEYS:
                mine: Decisions = {}
                decide(mine, finding.digest, KEYS[key], reviewer=reviewer, note=note,
                       pair_id=finding.pair_id, where=place)
                # at once, so a kill loses nothing; merged with what another session saved meanwhile
                decisions = update_decisions(path, mine, protect=protect)
                outcome.decided += 1
                console.print(plain(f"marked {KEYS[key].value}"), style="dim")
                break
            if key == "s":
                outcome.skipped += 1
                break
            if key == "q":
                outcome.quit = True
                return decisions
            console.print(plain(f"{answer.strip()!r} is not a key here; {PROMPT.rstrip(' >')}"))
    return decisions
