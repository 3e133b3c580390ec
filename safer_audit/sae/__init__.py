"""The TopK sparse autoencoder: the module (model), its training (train), and its files (formats).

``TopKSAE`` reads raw hidden states and normalises them itself; ``train_sae`` fits one on
a stream of activation batches; ``TopKSAE.save`` / ``TopKSAE.load`` write our layout (the
SAELens one) and read ours, SAELens's and sparsify's, from safetensors only.
See docs/method.md section 2.
"""

import importlib

from ..errors import SaeFormatError
from .config import (
    CFG_FILE,
    DIGEST_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    LAYER_NORM_EPS,
    NORMALIZATIONS,
    SPARSIFY_WEIGHTS_FILE,
    WEIGHTS_FILE,
    SaeConfig,
    weights_hash,
)

# the module and its training load torch: they are imported on first use, so sae.config (and the gate on
# unchanged data, which only hashes the SAE's file) loads without it
_LAZY = {"ForwardOutput": "model", "TopKSAE": "model", "SHUFFLE_BUFFER_TOKENS": "train", "TrainStats": "train",
         "default_lr": "train", "evaluate_sae": "train", "shuffled_batches": "train", "train_sae": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CFG_FILE", "DIGEST_KEY", "FORMAT_KEY", "FORMAT_VERSION", "LAYER_NORM_EPS", "NORMALIZATIONS",
    "SHUFFLE_BUFFER_TOKENS", "SPARSIFY_WEIGHTS_FILE", "WEIGHTS_FILE", "ForwardOutput", "SaeConfig",
    "SaeFormatError", "TopKSAE", "TrainStats", "default_lr", "evaluate_sae", "shuffled_batches", "train_sae",
    "weights_hash",
]
