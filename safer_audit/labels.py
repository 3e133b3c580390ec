"""Choosing a feature labeller and caching its labels, so a re-scan never labels twice.

Labels are kept in one JSON file per (SAE hash, labeller name, labeller version, labeller
cache key -- the taxonomy's hash for the offline labeller), mapping latent -> label. The
file sits beside the cached SAE, or, for a user's --sae, under the cache directory keyed
by the SAE's hash. Writes are atomic; a concurrent writer's labels are merged, not lost.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConfigError, PluginError
from .files import write_atomic
from .labelling import FeatureLabel, LabelRequest

NO_LABELLER = "none"


def make_labeller(name: str | None, options: dict | None = None):
    """The labeller registered as ``name`` (built from ``options``), or None for ``none``."""
    from .plugins import feature_labellers

    if name in (None, NO_LABELLER):
        return None
    known = feature_labellers()
    if name not in known:
        raise ConfigError(f"unknown labeller {name!r} (known: {', '.join(sorted(known) + [NO_LABELLER])}; "
                          "see safer-audit plugins)")
    return known[name](**{k: v for k, v in (options or {}).items() if v is not None})


def cache_path(directory: Path, sae_hash: str, labeller) -> Path:
    key = getattr(labeller, "cache_key", "") or ""
    digest = hashlib.sha256(json.dumps([sae_hash, labeller.name, str(labeller.version), str(key)]).encode())
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{labeller.name}-v{labeller.version}")[:60]
    return Path(directory) / f"{safe}-{digest.hexdigest()[:16]}.json"


def _read(path: Path) -> dict[int, FeatureLabel]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(latent): FeatureLabel(**entry) for latent, entry in data["labels"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # an unreadable cache is made again, not trusted


def _check(label, latent: int, labeller) -> FeatureLabel:
    if not isinstance(label, FeatureLabel) or label.latent != latent or not isinstance(label.label, str) \
            or not isinstance(label.category, str):
        raise PluginError(f"labeller {labeller.name!r} returned {type(label).__name__} for latent {latent}, "
                          "not a FeatureLabel of that latent")
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
