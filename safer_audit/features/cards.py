"""Feature cards: what a feature fires on, with contexts, top tokens, histograms and length correlation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..model.texts import PreparedText
from ..sae.stats import CodeStats, stream_pairs
from .salience import Feature, FeatureSet
from .types import FeatureCard, FeatureContext

CONTEXT_TOKENS = 64  # tokens either side of a firing token in a feature card (docs/method.md section 4)


HISTOGRAM_BINS = 12  # bins of a card's per-text activation histogram


LENGTH_DRIVEN = 0.5  # |Pearson r| of a latent's per-text mean code with the text's length that flags it


QUANTILE_SAMPLES = (("p50", 0.5), ("p25", 0.75))  # lower-activation examples: where in the strongest list


@dataclass
class CardContext:
    text_index: int
    position: int  # token index in the truncated model input
    token_id: int
    value: float
    sample: str = "top"  # "top": among the strongest; "p50" / "p25": from that quantile of the strongest


@dataclass
class CardData:
    """What a feature card shows, before it is rendered (report.FeatureCard)."""

    feature: Feature
    chosen_total: float
    rejected_total: float
    fire_rate: float
    top_tokens: list[tuple[int, int]] = field(default_factory=list)  # (token id, count)
    contexts: list[CardContext] = field(default_factory=list)  # one per pair; the strongest, then quantile samples
    token_mass: list[tuple[int, float]] = field(default_factory=list)  # (token id, activation sum), strongest first
    token_rates: list[float] = field(default_factory=list)  # each token_mass token's share of all read tokens
    chosen_fires: float = 0.0  # fraction of chosen texts whose mean code is > 0
    rejected_fires: float = 0.0  # and of rejected texts
    histogram: dict = field(default_factory=dict)  # {"edges", "chosen", "rejected"}: per-text mean codes where > 0
    length_correlation: float | None = None  # Pearson r of the per-text mean code with read positions

    def to_dict(self) -> dict:
        return asdict(self)


def _pick_contexts(stats: CodeStats, j: int, n_contexts: int, columns=None) -> list[CardContext]:
    """The strongest activations of latent ``j``, at most one per pair, then a few from lower quantiles.

    One pair can hold many of a latent's strongest activations (a long answer that repeats
    a phrase); a card that shows it six times shows one example, not six. Candidates beyond
    ``n_contexts`` are kept so the renderer can still fill the card after it drops windows
    of identical text. ``columns``: latent j's (values, texts, positions, tokens) as lists, when
    the caller has them (feature_cards takes every card's at once).
    """
    if columns is None:
        columns = [t[:, j].tolist() for t in (stats.top_values, stats.top_texts, stats.top_positions,
                                              stats.top_tokens)]
    values, texts, positions, tokens = columns
    ranks = [r for r, v in enumerate(values) if v > 0]

    def context(r: int, sample: str) -> CardContext:
        return CardContext(texts[r], positions[r], tokens[r], values[r], sample)

    seen: set[int] = set()
    first_of_pair = []
    for r in ranks:
        pair = texts[r] // 2
        if pair not in seen:
            seen.add(pair)
            first_of_pair.append(r)
    top = first_of_pair[:2 * n_contexts]
    shown = set(first_of_pair[:n_contexts])
    out = [context(r, "top") for r in top]
    used = {texts[r] // 2 for r in shown}
    for sample, where in QUANTILE_SAMPLES:
        # the first activation at or below that quantile of the strongest list from a pair not shown yet
        for r in ranks[int(where * len(ranks)):]:
            pair = texts[r] // 2
            if pair not in used and r not in shown:
                used.add(pair)
                out.append(context(r, sample))
                break
    return out


def bin_counts(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[n_columns, HISTOGRAM_BINS]: per column of ``values``, its values > 0 counted in HISTOGRAM_BINS bins from 0
    to ``top`` (that column's maximum, or more). What torch.histc(column[column > 0], bins, min=0, max=top) counts,
    for every column at once: histc's bin is ((x - min) * bins) / (max - min) in the values' dtype, truncated,
    the top edge in the last bin (tests/test_feature_card_speed.py checks it against histc)."""
    n_columns = values.shape[1]
    firing = values > 0
    safe_top = torch.where(top > 0, top, torch.ones_like(top)).to(values.dtype)
    bins = ((values - 0) * HISTOGRAM_BINS / safe_top).long().clamp(0, HISTOGRAM_BINS - 1)
    index = (torch.arange(n_columns) * HISTOGRAM_BINS + bins)[firing]
    return torch.bincount(index, minlength=n_columns * HISTOGRAM_BINS).view(n_columns, HISTOGRAM_BINS)


def _histograms(codes: torch.Tensor) -> list[dict]:
    """Per feature (column of ``codes``, text 2i chosen, 2i+1 rejected): HISTOGRAM_BINS bins from 0 to the
    largest per-text mean code, counting the texts where it fires on each side."""
    n_columns = codes.shape[1]
    top = codes.max(0).values if len(codes) else torch.zeros(n_columns)
    chosen, rejected = bin_counts(codes[0::2], top).tolist(), bin_counts(codes[1::2], top).tolist()
    out = []
    for n, peak in enumerate(top.tolist()):
        if peak <= 0:
            out.append({"edges": [], "chosen": [], "rejected": []})
            continue
        edges = torch.linspace(0, peak, HISTOGRAM_BINS + 1)
        out.append({"edges": [round(e, 6) for e in edges.tolist()], "chosen": chosen[n], "rejected": rejected[n]})
    return out


def _length_correlations(codes: torch.Tensor, lengths: torch.Tensor) -> list[float | None]:
    """Pearson r of each column of ``codes`` with ``lengths`` over texts with read positions
    (None where either does not vary)."""
    read = lengths > 0
    x, y = codes[read].double(), lengths[read].double()
    if len(y) < 3:
        return [None] * codes.shape[1]
    x, y = x - x.mean(0), y - y.mean()
    sx, sy = x.norm(dim=0), y.norm()
    r = (x * y.unsqueeze(1)).sum(0) / (sx * sy)
    return [None if s <= 1e-12 or float(sy) <= 1e-12 else round(v, 6)
            for v, s in zip(r.tolist(), sx.tolist(), strict=True)]


def _column_summaries(stats: CodeStats, latents: torch.Tensor):
    """Per selected latent: the fraction of chosen and of rejected texts where it fires, its histogram
    and its length correlation. One range of pairs: from the dense columns; more: streamed in two
    passes (maxima and means, then counts and centred sums), holding one range at a time."""
    batches = list(range(0, stats.n_texts, 2 * stream_pairs()))
    if len(batches) <= 1:
        codes = next(stats.pair_batches(latents))[1].float() if len(latents) else torch.zeros(stats.n_texts, 0)
        chosen_fires = (codes[0::2] > 0).float().mean(0) if len(codes[0::2]) else torch.zeros(len(latents))
        rejected_fires = (codes[1::2] > 0).float().mean(0) if len(codes[1::2]) else torch.zeros(len(latents))
        return chosen_fires, rejected_fires, _histograms(codes), _length_correlations(codes, stats.n_positions)
    n_columns = len(latents)
    top = torch.zeros(n_columns)
    fires = torch.zeros(2, n_columns, dtype=torch.float64)
    read = stats.n_positions > 0
    x_sum = torch.zeros(n_columns, dtype=torch.float64)
    for first, codes in stats.pair_batches(latents):
        codes = codes.float()
        top = torch.maximum(top, codes.max(0).values)
        fires[0] += (codes[0::2] > 0).double().sum(0)
        fires[1] += (codes[1::2] > 0).double().sum(0)
        x_sum += codes[read[2 * first:2 * first + len(codes)]].double().sum(0)
    n_read = int(read.sum())
    y = stats.n_positions[read].double()
    x_mean, y_mean = x_sum / max(n_read, 1), y.mean() if n_read else torch.tensor(0.0, dtype=torch.float64)
    counts = torch.zeros(2, n_columns, HISTOGRAM_BINS, dtype=torch.long)
    sxy = torch.zeros(n_columns, dtype=torch.float64)
    sxx = torch.zeros(n_columns, dtype=torch.float64)
    for first, codes in stats.pair_batches(latents):
        codes = codes.float()
        for side in (0, 1):
            counts[side] += bin_counts(codes[side::2], top)
        where = read[2 * first:2 * first + len(codes)]
        x = codes[where].double() - x_mean
        yc = stats.n_positions[2 * first:2 * first + len(codes)][where].double() - y_mean
        sxy += (x * yc.unsqueeze(1)).sum(0)
        sxx += (x * x).sum(0)
    n_pairs = stats.n_texts // 2
    histograms = []
    for n in range(n_columns):
        if top[n] <= 0:
            histograms.append({"edges": [], "chosen": [], "rejected": []})
            continue
        edges = torch.linspace(0, float(top[n]), HISTOGRAM_BINS + 1)
        histograms.append({"edges": [round(float(e), 6) for e in edges], "chosen": counts[0, n].tolist(),
                           "rejected": counts[1, n].tolist()})
    sy = float(((y - y_mean) ** 2).sum()) ** 0.5
    if n_read < 3:
        correlations = [None] * n_columns
    else:
        sx = sxx.sqrt()
        correlations = [None if float(sx[n]) <= 1e-12 or sy <= 1e-12 else round(float(sxy[n] / (sx[n] * sy)), 6)
                        for n in range(n_columns)]
    return (fires[0] / max(n_pairs, 1)).float(), (fires[1] / max(n_pairs, 1)).float(), histograms, correlations


def feature_cards(stats: CodeStats, features: FeatureSet, *, n_contexts: int = 10) -> list[CardData]:
    """Card data for every selected feature: totals, firing rates, histogram, length correlation,
    top tokens and example contexts (all from CodeStats: no pass over the data)."""
    chosen_totals, rejected_totals = stats.totals()
    n_tokens = max(stats.n_tokens, 1)
    latents = features.latents
    chosen_fires, rejected_fires, histograms, correlations = _column_summaries(stats, latents)
    # every card's numbers as Python lists at once: indexing tensors element by element cost most of a warm report
    chosen_list, rejected_list = chosen_totals[latents].tolist(), rejected_totals[latents].tolist()
    fire_list = stats.fire_counts[latents].tolist()
    columns = [t[:, latents].T.tolist() for t in (stats.top_values, stats.top_texts, stats.top_positions,
                                                  stats.top_tokens)]
    token_counts = stats.token_counts.tolist() if stats.token_counts is not None else []

    def rate(token_id: int) -> float:  # CodeStats.token_rate, with the counts and their total read once
        return float(token_counts[token_id]) / n_tokens if 0 <= token_id < len(token_counts) else 0.0

    cards = []
    for n, feature in enumerate(features.features):
        j = feature.latent
        valid = stats.top_values[:, j] > 0
        tokens = stats.top_tokens[valid, j]
        ids, inverse, counts = torch.unique(tokens, return_inverse=True, return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)[:10].tolist()
        mass = torch.zeros(len(ids)).index_add_(0, inverse, stats.top_values[valid, j])
        by_mass = torch.argsort(mass, descending=True, stable=True)[:20].tolist()
        ids, counts, mass = ids.tolist(), counts.tolist(), mass.tolist()
        cards.append(CardData(feature, chosen_list[n], rejected_list[n], float(fire_list[n]) / n_tokens,
                              [(ids[i], counts[i]) for i in order],
                              _pick_contexts(stats, j, n_contexts, [c[n] for c in columns]),
                              [(ids[i], round(mass[i], 6)) for i in by_mass], [rate(ids[i]) for i in by_mass],
                              round(float(chosen_fires[n]), 6), round(float(rejected_fires[n]), 6),
                              histograms[n], correlations[n]))
    return cards


def render_cards(cards, texts: Sequence[PreparedText], pair_ids: list[str], backend, max_length: int,
                  with_contexts: int, n_contexts: int = 10) -> list[FeatureCard]:
    """Turn token ids and positions into strings and marked windows of text.

    Contexts are rendered for the first ``with_contexts`` cards (the report's are in order of
    contribution; those are "featured"): they hold ~130 tokens of text each, and a report with
    1024 features x 10 contexts would be megabytes of text nobody reads. A card shows at most
    one window per pair and no window twice: ``n_contexts`` of the strongest, then the
    lower-quantile samples.
    """
    tokenized: dict[int, tuple] = {}

    def tokenize(indices) -> None:
        needed = sorted(set(indices) - tokenized.keys())
        for special in (False, True):
            group = [i for i in needed if texts[i].has_special_tokens == special]
            if group:
                # the same left-truncated tokenization as extraction, so positions index it directly
                ids, offsets, specials = backend.tokenize([texts[i].text for i in group], max_length=max_length,
                                                          has_special_tokens=special)
                tokenized.update({i: (o, sp) for i, o, sp in zip(group, offsets, specials, strict=True)})

    # the texts shown unless a window repeats (the spare candidates are tokenized only when one does), in one call
    likely = []
    for card in cards[:with_contexts]:
        pairs_taken: set[int] = set()
        n_top = 0
        for ctx in card.contexts:
            if ctx.text_index // 2 not in pairs_taken and (ctx.sample != "top" or n_top < n_contexts):
                pairs_taken.add(ctx.text_index // 2)
                n_top += ctx.sample == "top"
                likely.append(ctx.text_index)
    tokenize(likely)
    out = []
    for n, card in enumerate(cards):
        contexts = []
        pairs_shown: set[int] = set()
        windows_shown: set[str] = set()
        for ctx in card.contexts if n < with_contexts else []:
            if ctx.text_index // 2 in pairs_shown or (ctx.sample == "top" and
                                                      sum(c.sample == "top" for c in contexts) >= n_contexts):
                continue
            text = texts[ctx.text_index].text
            if ctx.text_index not in tokenized:
                tokenize([ctx.text_index])
            offsets, special = tokenized[ctx.text_index]
            window = [i for i in range(max(ctx.position - CONTEXT_TOKENS, 0),
                                       min(ctx.position + CONTEXT_TOKENS + 1, len(offsets))) if not special[i]]
            s, e = offsets[ctx.position]
            lo, hi = offsets[window[0]][0], offsets[window[-1]][1]
            seen_text = " ".join(text[lo:hi].split())
            if seen_text in windows_shown:  # the same text in another pair (a template answer): shown once
                continue
            windows_shown.add(seen_text)
            pairs_shown.add(ctx.text_index // 2)
            contexts.append(FeatureContext(pair_ids[ctx.text_index // 2], ("chosen", "rejected")[ctx.text_index % 2],
                                           text[lo:s], text[s:e], text[e:hi], ctx.value, ctx.sample))
        tokens = backend.token_strings([t for t, _ in card.top_tokens])
        f = card.feature
        out.append(FeatureCard(latent=f.latent, label=f.label, salience=f.salience, chosen_total=card.chosen_total,
                               rejected_total=card.rejected_total, fire_rate=card.fire_rate,
                               sign="+" if f.sign > 0 else "-",
                               top_tokens=[(tok, c) for tok, (_, c) in zip(tokens, card.top_tokens, strict=True)],
                               contexts=contexts, chosen_fires=card.chosen_fires, rejected_fires=card.rejected_fires,
                               histogram=card.histogram, length_correlation=card.length_correlation,
                               length_driven=card.length_correlation is not None
                               and abs(card.length_correlation) >= LENGTH_DRIVEN,
                               featured=n < with_contexts))
    return out


