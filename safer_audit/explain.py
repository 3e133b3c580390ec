"""One pair in full: its scores, each selected feature's share on each side, and where it fires."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .errors import UnknownPairError
from .report import Finding, format_number
from .scan import ScanResult
from .scoring import feature_contributions
from .terminal import inert, plain


@dataclass
class FeatureFiring:
    latent: int
    label: str | None
    sign: int
    chosen: float  # the feature's signed term in V(chosen)
    rejected: float  # and in V(rejected)
    chosen_tokens: list[tuple[str, float]] = field(default_factory=list)  # where it fires, strongest first
    rejected_tokens: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Explanation:
    finding: Finding
    features: list[FeatureFiring]


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
    chosen_terms, rejected_terms = feature_contributions(result.stats, result.features, index)
    order = torch.argsort((chosen_terms - rejected_terms).abs(), descending=True, stable=True)[:n_features]
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
        firings.append(FeatureFiring(feature.latent, feature.label, feature.sign, float(chosen_terms[j]),
                                     float(rejected_terms[j]), tokens[0], tokens[1]))
    return Explanation(finding, firings)


def print_explanation(explanation: Explanation, console: Console) -> None:
    f = explanation.finding
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for name, value in [("pair", f.pair_id), ("source", f"{f.source}:{f.line}"), ("rank", str(f.rank)),
                        ("category", f.category), ("suspicion", format_number(f.suspicion)),
                        ("score_safe", format_number(f.score_safe)),
                        ("reward margin", format_number(f.reward_margin)),
                        ("SAE-head margin", format_number(f.sae_margin)),
                        ("quality", ", ".join(f.quality) or "none")]:
        head.add_row(name, plain(value))
    console.print(Panel(head, title="safer-audit explain", expand=False))
    for side, text in (("chosen", f.chosen), ("rejected", f.rejected)):
        # In full, newlines kept; every other control character shown as an escape
        console.print(Panel(plain(text, multiline=True), title=f"final {side} response", title_align="left"))
    table = Table(title="Selected features that move score_safe most", show_lines=True)
    for column in ("latent", "label", "set", "chosen", "rejected", "net", "fires on (chosen | rejected)"):
        table.add_column(column, overflow="fold")
    for item in explanation.features:
        where = Group(Text(_tokens(item.chosen_tokens) or "-"), Text(_tokens(item.rejected_tokens) or "-", style="dim"))
        table.add_row(str(item.latent), plain(item.label or ""), "F+" if item.sign > 0 else "F-",
                      format_number(item.chosen), format_number(item.rejected),
                      format_number(item.chosen - item.rejected), where)
    console.print(table)


def _tokens(tokens: list[tuple[str, float]]) -> str:
    return " ".join(f"{inert(tok)}({value:.2f})" for tok, value in tokens)
