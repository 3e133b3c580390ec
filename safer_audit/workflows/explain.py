"""One pair in full: its scores, each selected feature's share on each side, and where it fires."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..common.terminal import inert, plain
from ..config import PROFILES
from ..data import pair_digest
from ..errors import UnknownPairError
from ..features.evidence import EvidenceSpan, flip, pair_evidence, texts_shares
from ..pipeline.scan import ScanResult
from ..report.types import Finding, Report
from ..report.view import format_number, highlighted
from ..scoring.heads import feature_contributions


@dataclass
class FeatureFiring:
    latent: int
    label: str | None  # a features file's label, else the labeller's
    sign: int
    chosen: float  # the feature's signed term in V(chosen)
    rejected: float  # and in V(rejected)
    chosen_tokens: list[tuple[str, float]] = field(default_factory=list)  # where it fires, strongest first
    rejected_tokens: list[tuple[str, float]] = field(default_factory=list)
    category: str | None = None  # the labeller's safety category


@dataclass
class Explanation:
    finding: Finding
    features: list[FeatureFiring]
    note: str | None = None  # shown under the feature table
    ranking: str | None = None  # the scan's profile and what its ranking combines (run.profile, run.ranking)


# -- naming a pair the way a person does ---------------------------------------------------

_SHOWN_CANDIDATES = 10


def find_pair(rows: Iterable[dict], key: str, data: str) -> dict:
    """The row (pair_id, source, line, ...) that ``key`` names, as a person names a pair:
    its id, a unique prefix of it (like git), ``FILE:LINE``, or a bare line number.

    An exact id wins over everything (ids may be numbers); an ambiguous prefix is an error
    listing the candidates.
    """
    rows = list(rows)
    exact = [row for row in rows if row["pair_id"] == key]
    if exact:
        return exact[0]
    file_part, _, line_part = key.rpartition(":")
    if line_part.isdigit():  # a bare number is a line number when a pair starts on that line
        line = int(line_part)
        at = [row for row in rows if row["line"] == line and (not file_part or _same_source(file_part, row["source"]))]
        if len(at) == 1:
            return at[0]
        if len(at) > 1:  # several files given, or a JSON array with several records on a line
            raise UnknownPairError(f'"{key}" names {len(at)} pairs: ' + _candidates(at))
        if file_part:
            sources = list(dict.fromkeys(row["source"] for row in rows))
            if not any(_same_source(file_part, source) for source in sources):  # the name is wrong, not the line
                shown = " or ".join(f"{source}:{line}" for source in sources[:_SHOWN_CANDIDATES])
                raise UnknownPairError(f'{key}: "{file_part}" is not a file of {data}; its pairs come from '
                                       f"{', '.join(sources[:_SHOWN_CANDIDATES])}: write {shown}, or {line}")
            raise UnknownPairError(f"{key}: no pair starts on line {line} of {file_part} "
                                   f"({len(rows)} pairs in {data})")
    matches = [row for row in rows if row["pair_id"].startswith(key)] if key else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UnknownPairError(f'pair id prefix "{key}" is ambiguous: {len(matches)} pairs start with it: '
                               + _candidates(matches))
    what = "line" if key.isdigit() else "pair id"
    raise UnknownPairError(f'{what} "{key}" is not in {data} ({len(rows)} pairs; ids are listed in scan reports; '
                           "give an id, a unique prefix of one, FILE:LINE or a line number)")


def _same_source(named: str, source: str) -> bool:
    if named == source:
        return True
    try:
        return os.path.samefile(named, source)
    except OSError:
        return Path(named).name == Path(source).name and Path(named).resolve() == Path(source).resolve()


def _candidates(rows: list[dict]) -> str:
    shown = ", ".join(f"{row['pair_id']} ({row['source']}:{row['line']})" for row in rows[:_SHOWN_CANDIDATES])
    return shown + (f" and {len(rows) - _SHOWN_CANDIDATES} more" if len(rows) > _SHOWN_CANDIDATES else "")


def explain_from_report(report: Report, row: dict, origin: str) -> Explanation:
    """The explanation a report holds for the pair in ``row`` (a data row), without rescanning.

    The pair is matched by content digest, so a report of the same data reordered still
    serves; a report without the pair's text is an error. Where the features fire is not in
    a report: only their shares of score_safe are shown.
    """

    digest = pair_digest(row["context"], row["chosen"], row["rejected"])
    found = [f for f in report.findings if f.digest == digest]
    if not found:
        raise UnknownPairError(f"{origin}: holds no pair with the text of {row['source']}:{row['line']} "
                               f"(pair {row['pair_id']}); the data changed since the scan, or it is a report of "
                               "other data")
    finding = next((f for f in found if f.pair_id == row["pair_id"]), found[0])
    finding = replace(finding, pair_id=row["pair_id"], source=row["source"], line=row["line"])  # where it is now
    others = {model.prefix for model in PROFILES.get(report.run.profile, ())}  # the profile's other models
    # a finding's top features are the first model's latents; the other models' cards number their own
    signs = {card.latent: 1 if card.sign == "+" else -1 for card in report.features if card.model not in others}
    labels = {card.latent: (card.label, card.category) for card in report.features if card.model not in others}
    firings = []
    for c in finding.top_features:
        label, category = labels.get(c.latent, (None, None))
        # a report's evidence spans name the features that pull them: where each feature fires, as far as it knows
        spans = [[(span.text, span.weight) for span in finding.evidence if span.side == side and c.latent in span.latents]
                 for side in ("chosen", "rejected")]
        firings.append(FeatureFiring(c.latent, c.label or label, signs.get(c.latent, 1 if c.net >= 0 else -1),
                                     c.chosen, c.rejected, *spans, category=c.category or category))
    return Explanation(finding, firings, note=f"from {origin}: the features' shares of score_safe, and the evidence "
                                              "spans each pulls; run explain without --report to see every token "
                                              "each fires on",
                       ranking=_ranking(report))


@torch.inference_mode()
def explain_pair(result: ScanResult, pair_id: str, *, n_features: int = 10, n_tokens: int = 8) -> Explanation:
    """The features that move ``pair_id``'s score_safe most, with the tokens they fire on."""
    ids = result.pairs["pair_id"].to_list()
    try:
        index = ids.index(pair_id)
    except ValueError:
        raise UnknownPairError(f'pair id "{pair_id}" is not in {result.report.run.data_source} '
                               f"({len(ids)} pairs; ids are listed in scan reports)") from None
    finding = next(f for f in result.report.findings if f.pair_id == pair_id)
    if not finding.evidence:  # a pair the scan did not flag: its evidence is computed here, for it alone
        finding = replace(finding, evidence=pair_evidence_of(result, index, finding))
    chosen_terms, rejected_terms = feature_contributions(result.stats, result.features, index)
    order = torch.argsort((chosen_terms - rejected_terms).abs(), descending=True, stable=True)[:n_features]
    shown = [result.features.features[j].latent for j in order.tolist()]
    # the labeller's labels (made by the scan, or now for these few latents); a features file's label wins
    labels = result.labelling.label(shown) if result.labelling is not None else {}
    codes = []
    for text_index in (2 * index, 2 * index + 1):
        item = result.store.text(text_index)
        device = next(result.sae.parameters()).device
        out = result.sae(item.acts.to(device)) if len(item.acts) else None
        z = (torch.zeros(len(item.acts), result.sae.cfg.n_latents).scatter_(1, out.top_idx.cpu(), out.top_vals.cpu())
             if out is not None else torch.zeros(0, result.sae.cfg.n_latents))
        codes.append((z, result.backend.token_strings(item.token_ids.tolist())))
    firings = []
    for j in order.tolist():
        feature = result.features.features[j]
        tokens = []
        for z, strings in codes:
            column = z[:, feature.latent]
            top = torch.argsort(column, descending=True, stable=True)[:n_tokens]
            tokens.append([(strings[p], float(column[p])) for p in top.tolist() if column[p] > 0])
        label = labels.get(feature.latent)
        firings.append(FeatureFiring(feature.latent, feature.label or (label.label if label else None), feature.sign,
                                     float(chosen_terms[j]), float(rejected_terms[j]), tokens[0], tokens[1],
                                     category=label.category if label else None))
    return Explanation(finding, firings, ranking=_ranking(result.report))


def pair_evidence_of(result: ScanResult, index: int, finding: Finding) -> list[EvidenceSpan]:
    """The evidence spans of the pair at ``index`` of a scan, computed for it alone."""
    wanted = {2 * index: finding.chosen, 2 * index + 1: finding.rejected}
    shares = texts_shares(result.store, result.texts, result.sae, result.features, result.backend,
                          result.report.run.max_length, wanted)
    return pair_evidence(finding.chosen, finding.rejected, shares[2 * index], flip(shares[2 * index + 1]),
                         finding.score_safe)


def _ranking(report: Report) -> str:
    return f"profile {report.run.profile}: {report.run.ranking}"


def print_explanation(explanation: Explanation, console: Console) -> None:
    f = explanation.finding
    marks = not console.is_terminal or console.color_system is None
    if f.why:  # the first line a person reads: why the pair is a suspect
        console.print(plain(f.why, style="bold"))
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for name, value in [("pair", f.pair_id), ("source", f"{f.source}:{f.line}"), ("rank", str(f.rank)),
                        ("category", f.category), ("suspicion", format_number(f.suspicion)),
                        ("score_safe", format_number(f.score_safe)),
                        ("reward margin", format_number(f.reward_margin)),
                        ("SAE-head margin", format_number(f.sae_margin)),
                        ("flip probability", "—" if f.flip_probability is None else f"{f.flip_probability:.3f}"),
                        ("quality", ", ".join(f.quality) or "none")]:
        head.add_row(name, plain(value))
    console.print(Panel(head, title="safer-audit explain", expand=False))
    # the human's request: what both responses answer
    console.print(Panel(plain(f.context.strip() or "(none: the responses have no context)", multiline=True),
                        title="conversation before the final turn", title_align="left"))
    for side, text in (("chosen", f.chosen), ("rejected", f.rejected)):
        # In full, newlines kept; every other control character shown as an escape; the evidence marked
        spans = [span for span in f.evidence if span.side == side]
        title = f"final {side} response" + (", evidence marked" if spans else "")
        console.print(Panel(highlighted(text, spans, marks), title=title, title_align="left"))
    if f.evidence:
        evidence = Table(title="Evidence: the spans that pull score_safe most (weight: their share of it)",
                         show_lines=False)
        for column in ("side", "weight", "text", "features"):
            evidence.add_column(column, overflow="fold")
        for span in f.evidence:
            evidence.add_row(span.side, format_number(span.weight), plain(span.text),
                             ", ".join(f"#{latent}" for latent in span.latents))
        console.print(evidence)
    table = Table(title="Selected features that move score_safe most", show_lines=True)
    for column in ("latent", "label", "set", "chosen", "rejected", "net", "fires on (chosen | rejected)"):
        table.add_column(column, overflow="fold")
    for item in explanation.features:
        where = Group(Text(_tokens(item.chosen_tokens) or "-"), Text(_tokens(item.rejected_tokens) or "-", style="dim"))
        label = (item.label or "") + (f" [{item.category}]" if item.category else "")
        table.add_row(str(item.latent), plain(label), "F+" if item.sign > 0 else "F-",
                      format_number(item.chosen), format_number(item.rejected),
                      format_number(item.chosen - item.rejected), where)
    console.print(table)
    if explanation.note:
        console.print(plain(explanation.note), style="dim")
    if explanation.ranking:
        console.print(plain(f"ranked by {explanation.ranking}"), style="dim")


def _tokens(tokens: list[tuple[str, float]]) -> str:
    return " ".join(f"{inert(tok)}({value:.2f})" for tok, value in tokens)
