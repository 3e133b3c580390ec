"""Feature salience, feature selection and feature cards (docs/method.md sections 3 and 4).

One streamed pass of the SAE over the activation store gives, per text, the mean code
over its read positions. Everything later is a function of those means: the totals
C_j and R_j are mean times number of positions summed over chosen / rejected texts,
and V(t) of docs/method.md section 5 is a signed sum of the mean codes of the features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FeaturesFileError

TOP_ACTIVATIONS = 50  # strongest activations kept per latent: contexts and top tokens come from these
CONTEXT_TOKENS = 64  # tokens either side of a firing token in a feature card (docs/method.md section 4)


STREAM_PAIRS = 4096  # pairs per row range when a pass reads the per-text code means (HH: one range)


@dataclass
class CodeStats:
    """Per-text SAE code statistics of one dataset (text 2i chosen, 2i+1 rejected).

    The per-text code means (and pooled activations) are TextRows: read in ranges of
    STREAM_PAIRS pairs (``pair_batches``), so passes over them hold one range at a time. Data of
    at most STREAM_PAIRS pairs is one range, and every pass computes exactly what one dense
    matrix gave. ``mean_codes`` and ``pooled`` give the whole matrix, for small data only.
    """

    codes: Any  # codes.TextRows (or a tensor, wrapped) [n_texts, n_latents] mean of z over read positions, 0 if none
    n_positions: torch.Tensor  # [n_texts] read positions per text
    fire_counts: torch.Tensor  # [n_latents] positions where z_j > 0
    top_values: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] strongest activations
    top_texts: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] their text index
    top_positions: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] their token index in the text
    top_tokens: torch.Tensor  # [TOP_ACTIVATIONS, n_latents] their token id
    fvu: float = float("nan")  # the SAE's fraction of variance unexplained on this data
    token_counts: torch.Tensor | None = None  # [vocab seen] read positions per token id (keyword contrast)
    # TextRows (or a tensor) [n_texts, d_model] mean activation per text (ActivationStore.pooled_mean)
    pooled_rows: Any = None
    scores: torch.Tensor | None = None  # [n_texts] reward score per text (ActivationStore.scores)
    n_encoded: int = 0  # texts this pass ran through the SAE (the rest came from the codes cache)

    def __init__(self, codes, n_positions, fire_counts, top_values, top_texts, top_positions, top_tokens,
                 fvu: float = float("nan"), token_counts=None, pooled=None, scores=None, n_encoded: int = 0):
        from .codes import TextRows

        self.codes = TextRows.of(codes)
        self.n_positions, self.fire_counts = n_positions, fire_counts
        self.top_values, self.top_texts, self.top_positions, self.top_tokens = (top_values, top_texts,
                                                                                top_positions, top_tokens)
        self.fvu, self.token_counts, self.scores, self.n_encoded = fvu, token_counts, scores, n_encoded
        self.pooled_rows = TextRows.of(pooled)
        self._totals: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def mean_codes(self) -> torch.Tensor:
        """[n_texts, n_latents] in memory: for small data (tests, explain); passes use ``pair_batches``."""
        return self.codes.dense()

    @property
    def pooled(self) -> torch.Tensor | None:
        """[n_texts, d_model] in memory (None when unknown): for small data; the scan reads ``pooled_rows``."""
        return None if self.pooled_rows is None else self.pooled_rows.dense()

    @property
    def n_texts(self) -> int:
        return len(self.n_positions)

    def pair_batches(self, columns: torch.Tensor | None = None, rows=None):
        """``(first pair, codes)``: the code means of STREAM_PAIRS pairs at a time (texts 2p..), in order,
        restricted to ``columns`` when given; ``rows`` reads another TextRows (the pooled activations)."""
        rows = self.codes if rows is None else rows
        n_texts = rows.shape[0]
        for start in range(0, max(n_texts, 1), 2 * STREAM_PAIRS):
            codes = rows.read(start, start + 2 * STREAM_PAIRS)
            yield start // 2, codes if columns is None else codes[:, columns]

    def token_rate(self, token_id: int) -> float:
        """The token's share of all read positions (0 when unknown)."""
        if self.token_counts is None or not 0 <= token_id < len(self.token_counts):
            return 0.0
        return float(self.token_counts[token_id]) / max(self.n_tokens, 1)

    @property
    def n_tokens(self) -> int:
        return int(self.n_positions.sum())

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C and R of docs/method.md section 3: summed codes over chosen and over rejected texts (streamed;
        computed once: salience and the feature cards both read them)."""
        if self._totals is not None:
            return self._totals
        chosen = rejected = None
        for first, codes in self.pair_batches():
            n_positions = self.n_positions[2 * first:2 * first + len(codes)]
            sums = codes * n_positions.unsqueeze(1).to(codes.dtype)
            c, r = sums[0::2].sum(0), sums[1::2].sum(0)
            chosen = c if chosen is None else chosen + c
            rejected = r if rejected is None else rejected + r
        self._totals = chosen, rejected
        return chosen, rejected


def encode_store(store, sae, *, progress=None, cache=None) -> CodeStats:
    """One pass of ``sae`` over every read position of ``store`` (codes.encode_store).

    With ``cache`` (a codes.CodeCache), texts encoded before are read back and only the
    others run through the SAE; the result is the same either way.
    """
    from .codes import encode_store as encode

    return encode(store, sae, progress=progress, cache=cache)


def _rank_within_latent(latents: torch.Tensor, n_latents: int) -> torch.Tensor:
    """For entries already grouped by latent (strongest first), each one's rank in its group."""
    counts = torch.bincount(latents, minlength=n_latents)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(latents)) - starts[latents]


def _float_order(values: torch.Tensor) -> torch.Tensor:
    """float32 values -> int64 keys in the same order (-0.0 and 0.0 equal, as comparisons have them); no NaN."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 becomes 0.0
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # negative floats: larger magnitude, smaller key


def _latent_value_key(latents: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One int64 key per entry that sorts ascending as (latent ascending, value descending)."""
    return latents.long() * (1 << 33) + ((1 << 32) - _float_order(values))


def _pack_ascending(major: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:
    """One int64 key per entry that sorts ascending as (major, minor), both non-negative integers."""
    major, minor = major.long(), minor.long()
    if not len(minor):
        return major
    width = int(minor.max()) + 1
    if int(major.max()) >= (1 << 62) // width:
        raise ValueError("keys too large to pack")  # not for any real text index and position
    return major * width + minor


def _keep_strongest(entries: dict[str, torch.Tensor], n_latents: int) -> dict[str, torch.Tensor]:
    """The TOP_ACTIVATIONS strongest entries of each latent, grouped by latent, strongest first.

    Ties go to the earlier text, then position: by the data, not by the order the cache
    served the shards in.
    """
    # two stable sorts on packed keys, (text, position) then (latent, value descending): the order the four
    # single-key sorts gave, ties included (issue 15: these sorts were most of the cold SAE pass's bookkeeping)
    order = torch.argsort(_pack_ascending(entries["text"], entries["position"]), stable=True)
    order = order[torch.argsort(_latent_value_key(entries["latent"][order], entries["value"][order]), stable=True)]
    grouped = {name: values[order] for name, values in entries.items()}
    keep = _rank_within_latent(grouped["latent"], n_latents) < TOP_ACTIVATIONS
    return {name: values[keep] for name, values in grouped.items()}


def feature_salience(chosen_totals: torch.Tensor, rejected_totals: torch.Tensor) -> torch.Tensor:
    """s_j = (C_j - R_j) / (C_j + R_j + 2m), m the mean of all 2 x n_latents totals."""
    m = torch.cat([chosen_totals, rejected_totals]).double().mean()
    c, r = chosen_totals.double(), rejected_totals.double()
    return ((c - r) / (c + r + 2 * m)).float()


# --------------------------------------------------------------------- feature selection

@dataclass
class Feature:
    """One selected latent: its sign in V (+1 for F+, -1 for F-), label and why it is in."""

    latent: int
    sign: int
    salience: float
    label: str | None = None
    note: str | None = None
    pinned: bool = False


@dataclass
class FeatureSet:
    features: list[Feature]
    source: str  # "top-n" or the features file

    @property
    def latents(self) -> torch.Tensor:
        return torch.tensor([f.latent for f in self.features], dtype=torch.long)

    @property
    def signs(self) -> torch.Tensor:
        return torch.tensor([float(f.sign) for f in self.features])

    def label(self, latent: int) -> str | None:
        return next((f.label for f in self.features if f.latent == latent), None)


def select_features(salience: torch.Tensor, n_features: int, *, features_file: Path | None = None) -> FeatureSet:
    """The top ``n_features`` latents by |salience|, adjusted by a reviewed features file.

    In the file, ``include: true`` pins a latent in (its sign follows its salience unless
    the file gives ``sign``), ``include: false`` excludes it; labels and notes carry over.
    Pinned latents come first, then the highest |salience| until ``n_features``.
    """
    entries = read_features_file(features_file) if features_file else []
    excluded = {e["latent"] for e in entries if e.get("include") is False}
    pinned = [e for e in entries if e.get("include") is True]
    labels = {e["latent"]: (e.get("label"), e.get("note")) for e in entries}
    for i, entry in enumerate(entries, 1):
        if not 0 <= entry["latent"] < len(salience):
            raise FeaturesFileError(f"{features_file}: feature {i}: latent {entry['latent']} is out of range "
                                    f"(the SAE has {len(salience)} latents, 0..{len(salience) - 1})")

    def make(latent: int, is_pinned: bool, sign: int | None = None) -> Feature:
        s = float(salience[latent])
        label, note = labels.get(latent, (None, None))
        return Feature(latent, sign if sign is not None else (1 if s >= 0 else -1), s, label, note, is_pinned)

    chosen = [make(e["latent"], True, e.get("sign")) for e in pinned]
    taken = {f.latent for f in chosen} | excluded
    for latent in torch.argsort(salience.abs(), descending=True, stable=True).tolist():
        if len(chosen) >= n_features:
            break
        if latent not in taken and salience[latent] != 0:
            chosen.append(make(latent, False))
            taken.add(latent)
    return FeatureSet(chosen, str(features_file) if features_file else "top-n")


def read_features_file(path: Path) -> list[dict]:
    """Entries of a features file (YAML or JSON): ``{features: [{latent, label, include, sign, note}]}``."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FeaturesFileError(f"{path}: cannot read the features file ({exc})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise FeaturesFileError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from exc
    except RecursionError:
        raise FeaturesFileError(f"{path}: not a features file (nested too deeply)") from None
    entries = data.get("features") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise FeaturesFileError(f'{path}: expected a top-level "features" list')
    out = []
    first: dict[int, int] = {}
    for i, entry in enumerate(entries, 1):
        where = f"{path}: feature {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("latent"), int) or isinstance(entry.get("latent"), bool):
            raise FeaturesFileError(f'{where}: field "latent" must be an integer')
        if entry["latent"] < 0:  # would index from the end of the SAE: another latent, silently
            raise FeaturesFileError(f"{where}: latent {entry['latent']} is out of range (latents count from 0)")
        if entry["latent"] in first:  # pinned twice it would be counted twice; which label wins is unclear
            raise FeaturesFileError(f"{where}: latent {entry['latent']} is listed again "
                                    f"(first as feature {first[entry['latent']]})")
        first[entry["latent"]] = i
        if "include" in entry and not isinstance(entry["include"], bool):
            raise FeaturesFileError(f'{where}: field "include" must be true or false')
        if entry.get("sign") not in (None, 1, -1):
            raise FeaturesFileError(f'{where}: field "sign" must be 1 or -1')
        for name in ("label", "note"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise FeaturesFileError(f'{where}: field "{name}" must be a string')
        out.append(entry)
    return out


# ------------------------------------------------------------------------- feature cards

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


def _bin_counts(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
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
    chosen, rejected = _bin_counts(codes[0::2], top).tolist(), _bin_counts(codes[1::2], top).tolist()
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
    batches = list(range(0, stats.n_texts, 2 * STREAM_PAIRS))
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
            counts[side] += _bin_counts(codes[side::2], top)
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


def select_by_safety(candidates: FeatureSet, relevance: dict[int, float], threshold: float,
                     n_features: int) -> FeatureSet:
    """The SAFER paper's selection: of the candidates (top |salience| first), those whose safety
    relevance is at least ``threshold``, up to ``n_features``. Pinned latents always stay."""
    kept = [f for f in candidates.features
            if f.pinned or relevance.get(f.latent, 0.0) >= threshold][:n_features]
    return FeatureSet(kept, candidates.source + f", safety >= {threshold:g}")


FEATURES_FILE_HEADER = """\
# safer-audit features file: the selected latents, the ones behind most of the flagged pairs first
# (contribution: share of the flagged pairs' feature scores; flagged_pairs: how many of them it is a
# top feature of). Review each latent (safer-audit features shows its cards), then: include: true
# pins it in, include: false excludes it, label names it (a labeller's label is a suggestion to
# check), note is yours. Use it with: safer-audit scan DATA --features THIS_FILE
"""


def features_file_text(features: FeatureSet, *, json_format: bool = False, cards=None) -> str:
    """A features file listing the selected latents, for a person to review and edit.

    With ``cards`` (the report's FeatureCards), the latents come in the cards' order (by
    contribution to the flagged pairs) with their labels, contribution and flagged-pair count.
    """
    import yaml

    by_latent = {card.latent: card for card in cards or []}
    order = {card.latent: n for n, card in enumerate(cards or [])}
    selected = sorted(features.features, key=lambda f: order.get(f.latent, len(order)))
    entries = []
    for f in selected:
        card = by_latent.get(f.latent)
        label = f.label or (card.label if card is not None else None)
        entry = {"latent": f.latent, "sign": f.sign, "salience": round(f.salience, 6), "label": label}
        if card is not None:
            if not f.label and card.labelled_by and label:
                entry["labelled_by"] = card.labelled_by.get("labeller")
            entry["contribution"] = round(card.contribution, 6)
            entry["flagged_pairs"] = card.flagged_pairs
        if f.pinned:
            entry["include"] = True
        if f.note:
            entry["note"] = f.note
        entries.append(entry)
    if json_format:
        return json.dumps({"features": entries}, indent=2) + "\n"
    return FEATURES_FILE_HEADER + yaml.safe_dump({"features": entries}, sort_keys=False, allow_unicode=True)
