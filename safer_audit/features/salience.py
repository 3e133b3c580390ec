"""Feature salience, feature selection and feature cards (docs/method.md sections 3 and 4).

One streamed pass of the SAE over the activation store gives, per text, the mean code
over its read positions. Everything later is a function of those means: the totals
C_j and R_j are mean times number of positions summed over chosen / rejected texts,
and V(t) of docs/method.md section 5 is a signed sum of the mean codes of the features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.files import read_bounded
from ..config import MAX_FEATURES_BYTES
from ..errors import FeaturesFileError


def feature_salience(chosen_totals: torch.Tensor, rejected_totals: torch.Tensor) -> torch.Tensor:
    """s_j = (C_j - R_j) / (C_j + R_j + 2m), m the mean of all 2 x n_latents totals."""
    m = torch.cat([chosen_totals, rejected_totals]).double().mean()
    c, r = chosen_totals.double(), rejected_totals.double()
    return ((c - r) / (c + r + 2 * m)).float()


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
    raw = read_bounded(path, MAX_FEATURES_BYTES, lambda message: FeaturesFileError(f"{path}: {message}"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeaturesFileError(f"{path}: cannot read the features file (not UTF-8 text: {exc.reason})") from None
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
