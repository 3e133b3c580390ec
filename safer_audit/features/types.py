"""What a feature is described by: its card as a report holds it, and what a labeller is asked and answers.

Plain data, no tensors: the report (report.types), every exporter and every labeller read it without the
stages that made it (features.cards builds cards, features.labels runs labellers), so a labeller plugin
loads without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable


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


NOT_SAFETY = "not safety related"
NO_CATEGORY = "none"  # the labeller's evidence is too weak to name a category: the label is only its pattern


@dataclass(frozen=True)
class LabelContext:
    """One text window where the latent fires: ``before`` + ``token`` + ``after``."""

    side: str  # "chosen" or "rejected"
    before: str
    token: str  # the activating token, as text
    after: str
    value: float  # the latent's activation there
    pair_id: str = ""  # the pair the window comes from ("" when unknown): keywords must recur across pairs
    sample: str = "top"  # "top": among the strongest activations; "p50" / "p25": from lower quantiles

    def marked(self, left: str = "<<", right: str = ">>") -> str:
        """The window with the activating token between markers."""
        return f"{self.before}{left}{self.token}{right}{self.after}"


@dataclass(frozen=True)
class LabelRequest:
    """What a labeller sees of one latent."""

    latent: int
    salience: float
    contexts: tuple[LabelContext, ...]  # strongest first, at most one per pair
    top_tokens: tuple[tuple[str, float], ...] = ()  # (token, activation mass), strongest first
    token_rates: tuple[float, ...] = ()  # per top token: its share of all read tokens of the data (contrast)


@dataclass(frozen=True)
class FeatureLabel:
    """A labeller's answer for one latent, with its provenance."""

    latent: int
    label: str  # short: "weapons: gun, knife, shoot"
    relevance: float  # safety relevance in [0, 1]
    category: str  # a taxonomy category, NOT_SAFETY, or NO_CATEGORY when the evidence cannot name one
    labeller: str  # the labeller's registered name
    model: str | None = None  # the model that produced it, if any
    version: str = "1"  # the labeller's version: a new version labels again
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not 0.0 <= self.relevance <= 1.0:
            raise ValueError(f"relevance must be in [0, 1], not {self.relevance!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Labeller(Protocol):
    """``label(requests)`` returns a FeatureLabel per latent it could label."""

    name: str
    version: str

    def label(self, requests: Sequence[LabelRequest]) -> dict[int, FeatureLabel]: ...


SIDES = ("chosen", "rejected")


@dataclass
class EvidenceSpan:
    """A stretch of one response and its share of score_safe."""

    side: str  # "chosen" or "rejected"
    start: int  # character offsets into that response (Python string indices): text is response[start:end]
    end: int
    text: str
    weight: float  # its read positions' summed share of score_safe: < 0 pulls toward the rejected response
    latents: list[int] = field(default_factory=list)  # the selected features that pull it most, strongest first
