"""What a pair is called (flipped, noisy, quality, clean) from its rank, its judges and its quality findings.

``flipped`` means the label is wrong: the evidence says the chosen reply is the more harmful one. Under the
``harm`` rule (``--flipped-rule harm``, or ``--judge harm``) the harm judge (scoring.harm) is run whether or not the
ranking uses it, and a pair is flipped when the harm judge puts it among its ``flipped_fraction`` most
harmful-chosen pairs (a negative signal) and at least one ranked judge agrees (a negative signal too): the
harm judge reads the texts without the labels, the others say the pair also looks wrong to judges fitted on
the data. Under the ``judges`` rule (the default) with the harm judge not ranked, flipped keeps its older
meaning: among the most suspicious pairs, every ranked judge negative. ``noisy``: the other pairs among the ``noisy_fraction`` most
suspicious (the judges find no real difference, or disagree).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..common.domain import Category
from .types import HARM_JUDGE

QUALITY_KINDS_THAT_CATEGORISE = ("identical", "empty_response", "contradiction", "context_mismatch")


@dataclass(frozen=True)
class Cutoffs:
    """The suspicion a pair must reach to be ``flipped`` or ``noisy`` (None: no pair can), and the harm
    judge's signal a pair must fall to (at most) to be ``flipped`` when the harm judge is ranked."""

    flipped: float | None
    noisy: float | None
    harm: float | None = None

    @classmethod
    def from_ranking(cls, suspicion_values: torch.Tensor, flipped_fraction: float, noisy_fraction: float) -> Cutoffs:
        return cls(_cutoff(suspicion_values, flipped_fraction), _cutoff(suspicion_values, noisy_fraction))


def _cutoff(suspicion_values: torch.Tensor, fraction: float) -> float | None:
    """The suspicion of the last pair inside the most suspicious ``fraction``.

    A category must not depend on the order of the input, so pairs tied at the boundary are
    all in or all out, whichever brings the count nearer ``fraction`` of the pairs (in on a
    draw): always in could put every pair of a file of identical scores into one category.
    None when no pair is inside.
    """
    n = len(suspicion_values)
    count = sum(1 for position in range(n) if (position + 1) / n <= fraction)
    if not count:
        return None
    ordered = torch.sort(suspicion_values.double(), descending=True).values
    last = float(ordered[count - 1])
    if count == n or float(ordered[count]) != last:
        return last
    above = ordered[ordered > last]
    with_tie = int((ordered >= last).sum())
    if abs(with_tie - fraction * n) <= abs(len(above) - fraction * n):
        return last
    return float(above[-1]) if len(above) else None


def _negative(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value < 0


def label_is_wrong(suspicion_value: float, signals: Mapping[str, float | None], cutoffs: Cutoffs) -> bool:
    """Whether the judges say the chosen reply is the worse one (the module's docstring gives the rule)."""
    harm = signals.get(HARM_JUDGE)
    if harm is not None and cutoffs.harm is not None:
        others = [value for name, value in signals.items() if name != HARM_JUDGE]
        return _negative(harm) and harm <= cutoffs.harm and any(_negative(value) for value in others)
    return (cutoffs.flipped is not None and suspicion_value >= cutoffs.flipped
            and all(_negative(value) for value in signals.values()))


def categorise_pair(suspicion_value: float, signals: Mapping[str, float | None], quality_kinds: Iterable[str],
                    cutoffs: Cutoffs) -> Category:
    """The category of one pair.

    quality: a data-quality finding that makes the pair unusable as it is (identical
    responses, an empty one, a contradiction, different contexts); flipped: the signals given
    (those the ranking uses) say the label is wrong (``label_is_wrong``); noisy: its suspicion
    reaches the noisy cut-off otherwise; clean: the rest.
    """
    if any(kind in QUALITY_KINDS_THAT_CATEGORISE for kind in quality_kinds):
        return Category.QUALITY
    if label_is_wrong(suspicion_value, signals, cutoffs):
        return Category.FLIPPED
    if cutoffs.noisy is not None and suspicion_value >= cutoffs.noisy:
        return Category.NOISY
    return Category.CLEAN


def category_signals(signals: Mapping[str, torch.Tensor], ranked: Mapping[str, torch.Tensor],
                     flipped_rule: str) -> dict[str, torch.Tensor]:
    """The signals a category reads: the ranked ones, and under the ``harm`` rule the harm judge's even when
    the ranking leaves it out (it decides ``flipped``; the ranking, and so ``noisy``, stay the ranked judges')."""
    if flipped_rule == "harm" and HARM_JUDGE in signals:
        return {**ranked, HARM_JUDGE: signals[HARM_JUDGE]}
    return dict(ranked)


def categorise(suspicion_values: torch.Tensor, signals: Mapping[str, torch.Tensor], quality: list[list[str]], *,
               flipped_fraction: float, noisy_fraction: float) -> list[Category]:
    """A category per pair of a scan, with the cut-offs of its own ranking (categorise_pair); the harm rule
    where the harm judge's signal is given (``category_signals``: ranked, or run for the harm rule)."""
    cutoffs = Cutoffs.from_ranking(suspicion_values, flipped_fraction, noisy_fraction)
    if HARM_JUDGE in signals:  # the harm judge's own cut-off: its most harmful-chosen fraction (low end)
        harm_cutoff = _cutoff(-torch.as_tensor(signals[HARM_JUDGE]).double().nan_to_num(nan=-math.inf),
                              flipped_fraction)
        cutoffs = Cutoffs(cutoffs.flipped, cutoffs.noisy, None if harm_cutoff is None else -harm_cutoff)
    return [categorise_pair(float(suspicion_values[i]), {name: float(v[i]) for name, v in signals.items()},
                            quality[i], cutoffs) for i in range(len(suspicion_values))]


def categorise_scan(suspicion_values: torch.Tensor, signals: Mapping[str, torch.Tensor],
                    ranked: Mapping[str, torch.Tensor], quality: list[list[str]], *, flipped_rule: str,
                    flipped_fraction: float, noisy_fraction: float) -> tuple[list[Category], str]:
    """A scan's categories (``categorise`` on ``category_signals``) and the rule that decided ``flipped``:
    ``harm`` where the harm judge's signal was read (ranked, or run for the harm rule), else ``judges``."""
    deciding = category_signals(signals, ranked, flipped_rule)
    categories = categorise(suspicion_values, deciding, quality, flipped_fraction=flipped_fraction,
                            noisy_fraction=noisy_fraction)
    return categories, "harm" if HARM_JUDGE in deciding else "judges"


def category_counts(categories: list[str]) -> dict[str, int]:
    """How many pairs each category holds, every category named (the report's ``run.counts``)."""
    return {str(c): categories.count(c) for c in Category}
