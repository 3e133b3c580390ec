"""The domain's words, named once: the categories of a pair and the names of the signals.

Kept free of torch and the other heavy imports, so that every module (report, exporters,
the gate's baseline reader) can use them.
"""

from __future__ import annotations

from enum import StrEnum


class Category(StrEnum):
    """What a scan or the gate calls a pair. A StrEnum: the members are the strings written
    in JSON, CSV and baselines, and compare equal to them."""

    FLIPPED = "flipped"
    NOISY = "noisy"
    QUALITY = "quality"
    CLEAN = "clean"


# Per-pair signals, in the order every table, report and baseline lists them.
SIGNALS = ("score_safe", "reward_margin", "sae_margin")
# The signals that come from a Bradley-Terry head (cross-fitted in a scan, frozen in a baseline).
MARGIN_SIGNALS = ("reward_margin", "sae_margin")
