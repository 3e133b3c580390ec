"""A feature card as a report holds it: what a selected latent fires on, in words and windows of text.

Plain data, no tensors: the report (report.types) and every exporter read it without the stages that made it
(features.cards builds it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FeatureContext:
    """A window of text around one position where a latent fires."""

    pair_id: str
    side: str  # "chosen" or "rejected"
    text_before: str
    token: str
    text_after: str
    value: float
    sample: str = "top"  # "top": among the latent's strongest activations; "p50" / "p25": from lower quantiles


@dataclass
class FeatureCard:
    """A selected latent: its salience, how it fires, and where it fires most."""

    latent: int
    label: str | None
    salience: float
    chosen_total: float  # C_j
    rejected_total: float  # R_j
    fire_rate: float  # fraction of read positions where the latent is active
    sign: str  # "+": in F+, "-": in F-
    top_tokens: list[tuple[str, int]]  # (token, how often the latent fires on it)
    contexts: list[FeatureContext]
    relevance: float | None = None  # the labeller's safety relevance in [0, 1]
    category: str | None = None  # the labeller's safety category
    labelled_by: dict | None = None  # provenance: labeller, model, version, and the labeller's own label
    # what a reader needs to judge the feature; defaults so older reports still load
    chosen_fires: float | None = None  # fraction of chosen texts where its mean code is > 0
    rejected_fires: float | None = None  # and of rejected texts
    histogram: dict | None = None  # per-text mean activation where > 0: {"edges", "chosen", "rejected"} counts
    length_correlation: float | None = None  # Pearson r of the per-text mean code with the text's read positions
    length_driven: bool = False  # |length_correlation| >= salience.LENGTH_DRIVEN
    contribution: float = 0.0  # its share of the flagged pairs' summed |feature terms|
    flagged_pairs: int = 0  # flagged (flipped / noisy) pairs it is a top feature of
    featured: bool = True  # among the top --cards by contribution: the HTML shows it, with examples
    model: str | None = None  # which model of the scan's profile the latent belongs to (its judges' prefix)
