"""The SAE a scan reads with: the user's, or one trained on the scan's activations and cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from filelock import FileLock

from ..common.digests import sha256_text, short_digest
from ..config import ScanConfig
from ..errors import ConfigError, ScanError
from ..model.activations import ActivationStore
from ..plugins import lookup
from . import TopKSAE

TRAINING_CHUNK = 65_536  # tokens per chunk handed to the trainer (it re-batches and shuffles them)


def _dataset_fingerprint(keys: list[str]) -> str:
    return short_digest(sha256_text("\n".join(sorted(set(keys)))))


def sae_backend(name: str = "topk"):
    """The SAE backend registered under ``name`` (``train`` and ``load``)."""
    return lookup("sae", name)


# bump when training (the trainer, the token sample, the initialisation) changes what it gives for the same tokens
# and configuration: the key then misses, and an SAE trained by the older code is never served
SAE_TRAIN_FORMAT = 1


def train_on_store(store: ActivationStore, train_config, backend, config, layer: int, steps,
                   sae_backend_name: str = "topk"):
    """Train an SAE on the activations of ``store`` (up to ``train_config.max_tokens``), with a progress bar.

    The tokens come in an order fixed by the data (ActivationStore.training_tokens), so
    the SAE does not depend on how the cache grouped them into shards or named them.
    """
    metadata = {"model": backend.identity, "model_hash": backend.fingerprint, "layer": layer,
                "positions": config.positions, "max_length": config.max_length}
    if train_config.max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive, not {train_config.max_tokens}")
    tokens = store.training_tokens(train_config.seed, train_config.max_tokens)

    def make_batches():
        return tokens.split(TRAINING_CHUNK)

    with steps("Training SAE", "steps") as update:
        return sae_backend(sae_backend_name).train(make_batches, backend.d_model, train_config, n_tokens=len(tokens),
                                   metadata=metadata,
                                   progress=lambda step, total, figures: update(
                                       step, total, fvu=figures["fvu"], dead=figures["dead_fraction"]))


def get_sae(store: ActivationStore, config: ScanConfig, backend, layer: int, steps) -> tuple[TopKSAE, Path]:
    """The SAE to read the activations with: the given one, or one trained on them.

    A trained SAE is cached next to the activations, keyed by the exact set of texts and
    the training configuration, so a warm re-run does not train again.
    """
    if config.sae_path is not None:
        sae = sae_backend(config.sae_backend).load(config.sae_path)
        if sae.cfg.d_in != backend.d_model:
            raise ScanError(f"SAE {config.sae_path} reads width {sae.cfg.d_in}, but layer {layer} of "
                            f"{backend.identity} has width {backend.d_model}")
        return sae, Path(config.sae_path)
    trained = [_dataset_fingerprint(store.keys), config.sae_train.to_dict(), SAE_TRAIN_FORMAT]
    if config.sae_backend != "topk":  # another trainer, another SAE; the built-in's keys stay as they were
        trained.append(config.sae_backend)
    key = short_digest(sha256_text(json.dumps(trained, sort_keys=True)))
    directory = store.cache.directory / "saes" / key
    cached = _load_cached_sae(directory, config.sae_backend)
    if cached is not None:
        return cached, directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # one trainer per SAE: a concurrent scan of the same data waits here, then loads this one's SAE
    with FileLock(str(directory.parent / f"{key}.lock")):
        cached = _load_cached_sae(directory, config.sae_backend)
        if cached is not None:
            return cached, directory
        if directory.exists():  # an unreadable cached SAE is trained again
            shutil.rmtree(directory)
        sae, _stats = train_on_store(store, config.sae_train, backend, config.activations, layer, steps,
                                     config.sae_backend)
        sae.save(directory)
    return sae, directory


def _load_cached_sae(directory: Path, name: str = "topk") -> TopKSAE | None:
    if not (directory / "cfg.json").exists():
        return None
    try:
        return sae_backend(name).load(directory)
    except ValueError:
        return None
