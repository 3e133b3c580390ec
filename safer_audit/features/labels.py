"""Choosing a feature labeller and caching its labels, so a re-scan never labels twice.

Labels are kept in one JSON file per (SAE hash, labeller name, labeller version, labeller
cache key -- the taxonomy's hash for the offline labeller), mapping latent -> label. The
file sits beside the cached SAE, or, for a user's --sae, under the cache directory keyed
by the SAE's hash. Writes are atomic; a concurrent writer's labels are merged, not lost.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.files import read_bounded, write_atomic
from ..config import NO_LABELLER, ScanConfig
from ..errors import ConfigError, PluginError
from ..model.texts import PreparedText
from ..plugins import lookup
from ..sae import TopKSAE
from ..sae.stats import CodeStats
from .cards import feature_cards, render_cards
from .salience import Feature, FeatureSet
from .types import NO_CATEGORY, NOT_SAFETY, FeatureCard, FeatureLabel, LabelContext, Labeller, LabelRequest  # noqa: F401 (re-exported)


def labeller_for(config: ScanConfig):
    """The scan's labeller (None for ``none``); --select safety needs one."""
    options = dict(config.labeller_options)
    labeller = make_labeller(config.labeller, options)
    if labeller is None and config.select == "safety":
        raise ConfigError("--select safety rates features with a labeller; --labeller none leaves nothing to rate")
    return labeller


def label_cache_file(config: ScanConfig, sae_dir: Path, labeller) -> Path | None:
    """Beside a cached SAE; for a user's SAE, under the cache directory by the SAE's hash."""
    if labeller is None:
        return None
    sae_hash = TopKSAE.file_hash(sae_dir)
    if config.sae_path is None:
        directory = Path(sae_dir) / "labels"
    else:
        directory = Path(config.activations.cache_dir) / "labels" / sae_hash
    return cache_path(directory, sae_hash, labeller)


@dataclass
class Labelling:
    """Labels latents on demand: cached ones are read, the others get cards and go to the labeller."""

    labeller: object
    stats: CodeStats
    texts: Sequence[PreparedText]  # SpooledTexts in a scan: read back from a temporary file by index
    pair_ids: list[str]
    backend: object
    max_length: int
    salience: torch.Tensor
    cache_file: Path | None
    labels: dict[int, FeatureLabel] = field(default_factory=dict)

    def label(self, latents: list[int]) -> dict[int, FeatureLabel]:
        if self.labeller is None or not latents:
            return {}
        wanted = [latent for latent in dict.fromkeys(latents) if latent not in self.labels]
        if wanted:
            def requests(missing: list[int]) -> list[LabelRequest]:
                features = FeatureSet([Feature(j, 1 if self.salience[j] >= 0 else -1, float(self.salience[j]))
                                       for j in missing], "labelling")
                data = feature_cards(self.stats, features)
                cards = render_cards(data, self.texts, self.pair_ids, self.backend, self.max_length, len(data))
                return [label_request(card, d, self.backend) for card, d in zip(cards, data, strict=True)]

            self.labels.update(label_features(wanted, requests, self.labeller, self.cache_file))
        return {latent: self.labels[latent] for latent in latents if latent in self.labels}


def label_request(card: FeatureCard, data, backend) -> LabelRequest:
    """What a labeller sees of one rendered card: its contexts and its tokens by activation mass."""
    tokens = backend.token_strings([t for t, _ in data.token_mass])
    return LabelRequest(
        latent=card.latent, salience=card.salience,
        contexts=tuple(LabelContext(c.side, c.text_before, c.token, c.text_after, c.value, c.pair_id, c.sample)
                       for c in card.contexts),
        top_tokens=tuple((tok, mass) for tok, (_, mass) in zip(tokens, data.token_mass, strict=True)),
        token_rates=tuple(data.token_rates))


def make_labeller(name: str | None, options: dict | None = None):
    """The labeller registered as ``name`` (built from ``options``), or None for ``none``."""
    if name in (None, NO_LABELLER):
        return None
    return lookup("labeller", name, also=(NO_LABELLER,))(**{k: v for k, v in (options or {}).items() if v is not None})


def cache_path(directory: Path, sae_hash: str, labeller) -> Path:
    key = getattr(labeller, "cache_key", "") or ""
    digest = hashlib.sha256(json.dumps([sae_hash, labeller.name, str(labeller.version), str(key)]).encode())
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{labeller.name}-v{labeller.version}")[:60]
    return Path(directory) / f"{safe}-{digest.hexdigest()[:16]}.json"


MAX_LABELS_FILE = 64 * 1024 * 1024  # bytes: ~300 bytes a label, far more latents than any SAE has
MAX_LABEL_TEXT = 500  # characters of a label, its category, labeller, version or model: a longer one is damage
MAX_EXTRA = 4096  # bytes of a label's ``extra`` as JSON
TEXT_FIELDS = ("label", "category", "labeller", "version")


class _Unreadable(Exception):
    """A labels file that cannot be used as a whole: it is made again."""


def _read(path: Path) -> dict[int, FeatureLabel]:
    """The usable labels of a cache file: one that cannot be read (missing, too large, not JSON) gives none; an
    entry that is not a label a labeller could have made (label_problem) is left out, to be made again."""
    try:
        data = json.loads(read_bounded(path, MAX_LABELS_FILE, _Unreadable))
        entries = data["labels"]
        if not isinstance(entries, dict):
            raise _Unreadable("labels is not an object")
    except (_Unreadable, ValueError, TypeError, KeyError):
        return {}  # an unreadable cache is made again, not trusted
    labels = {}
    for key, entry in entries.items():
        label = _cached_label(key, entry)
        if label is not None:
            labels[label.latent] = label
    return labels


def _cached_label(key: str, entry: object) -> FeatureLabel | None:
    """The FeatureLabel a cache entry holds, or None when it is not one label_problem accepts for latent ``key``."""
    fields = {"latent", "relevance", "model", "extra", *TEXT_FIELDS}
    if not isinstance(entry, dict) or not set(entry) <= fields or not {"latent", "label", "relevance",
                                                                        "category", "labeller"} <= set(entry):
        return None
    if type(entry["latent"]) is not int or key != str(entry["latent"]):
        return None
    try:
        label = FeatureLabel(**entry)
    except (TypeError, ValueError):  # a relevance that is not a number in [0, 1]
        return None
    return None if label_problem(label) else label


def label_problem(label: FeatureLabel) -> str | None:
    """What makes ``label`` unusable (a cached one is made again, a labeller's own is a PluginError): text fields
    that are not strings of at most MAX_LABEL_TEXT characters (what they hold, every output escapes), a relevance
    that is not a number in [0, 1], an ``extra`` that is not a small JSON object. None when it is usable."""
    for name in (*TEXT_FIELDS, "model"):
        value = getattr(label, name)
        if name == "model" and value is None:
            continue
        if not isinstance(value, str):
            return f"its {name} is {type(value).__name__}, not text"
        if len(value) > MAX_LABEL_TEXT:
            return f"its {name} is {len(value):,} characters, more than {MAX_LABEL_TEXT}"
    if isinstance(label.relevance, bool) or not isinstance(label.relevance, (int, float)) \
            or not math.isfinite(label.relevance) or not 0 <= label.relevance <= 1:
        return f"its relevance {label.relevance!r:.40} is not a number in [0, 1]"
    try:
        extra = json.dumps(label.extra)
    except (TypeError, ValueError, RecursionError):
        return "its extra is not JSON"
    if not isinstance(label.extra, dict) or len(extra) > MAX_EXTRA:
        return f"its extra is not a JSON object of at most {MAX_EXTRA} bytes"
    return None


def _check(label, latent: int, labeller) -> FeatureLabel:
    if not isinstance(label, FeatureLabel) or label.latent != latent:
        raise PluginError(f"labeller {labeller.name!r} returned {type(label).__name__} for latent {latent}, "
                          "not a FeatureLabel of that latent")
    problem = label_problem(label)
    if problem:
        raise PluginError(f"labeller {labeller.name!r} returned an unusable label for latent {latent}: {problem}")
    return label


def label_features(latents: Sequence[int], make_requests: Callable[[list[int]], Sequence[LabelRequest]], labeller,
                   cache_file: Path | None) -> dict[int, FeatureLabel]:
    """Labels for ``latents``: from the cache, else from ``labeller`` (then cached).

    ``make_requests(missing)`` builds the requests of the latents the cache lacks, so a
    warm scan renders no contexts and calls the labeller for nothing.
    """
    cached = _read(cache_file) if cache_file is not None else {}
    missing = [latent for latent in dict.fromkeys(latents) if latent not in cached]
    if missing:
        made = labeller.label(list(make_requests(missing)))
        new = {latent: _check(made[latent], latent, labeller) for latent in missing if latent in made}
        if cache_file is not None and new:
            merged = {**_read(cache_file), **cached, **new}
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache_file, json.dumps(
                {"labeller": labeller.name, "version": str(labeller.version),
                 "labels": {str(k): merged[k].to_dict() for k in sorted(merged)}}, indent=1) + "\n")
        cached.update(new)
    return {latent: cached[latent] for latent in latents if latent in cached}
