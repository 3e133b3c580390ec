"""The feature-labelling contract: what a labeller is given and what it gives back.

A labeller (registered through ``register_feature_labellers``) reads feature cards (a
latent's strongest contexts with the activating token marked, on both sides, and the
tokens it fires on) and returns, per latent, a short human-readable label, a safety
relevance in [0, 1], a category from the safety taxonomy, and where the label came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

NOT_SAFETY = "not safety related"


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
    category: str  # a taxonomy category, or NOT_SAFETY
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
