"""An SAE's configuration: its shape, its sparsity and how it normalises its input."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..common.digests import sha256_file, short_digest
from ..errors import ConfigError, SaeFormatError

# the files of an SAE directory and the cfg.json section that is ours (sae.formats reads and writes them)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"  # ours and SAELens
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
FORMAT_KEY = "safer_audit"
FORMAT_VERSION = 1
DIGEST_KEY = "weights_sha256"  # under FORMAT_KEY: sha256 of the weights file, checked on load

NORMALIZATIONS = ("layer_norm", "none")


def weights_hash(directory: str | os.PathLike) -> str:
    """A short, stable hash of the weights file in ``directory`` (TopKSAE.file_hash), read without torch:
    the gate checks it before it knows whether any pair needs the SAE."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        path = directory / SPARSIFY_WEIGHTS_FILE
    if not path.is_file():
        raise SaeFormatError(f"{directory}: no {WEIGHTS_FILE} or {SPARSIFY_WEIGHTS_FILE}")
    return short_digest(sha256_file(path))


LAYER_NORM_EPS = 1e-6


@dataclass
class SaeConfig:
    """The shape and input normalisation of a TopK SAE, plus free-form metadata."""

    d_in: int
    n_latents: int
    k: int
    normalize: str = "layer_norm"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        # types first: a string or a bool from a hand-edited cfg.json must not reach a comparison
        for name in ("d_in", "n_latents", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, not {value!r}")
        if not isinstance(self.normalize, str):
            raise ConfigError(f"normalize must be a string, not {self.normalize!r}")
        if not isinstance(self.metadata, dict):
            raise ConfigError(f"metadata must be an object, not {type(self.metadata).__name__}")
        if self.n_latents <= 0:
            raise ConfigError(f"n_latents must be positive, not {self.n_latents}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {self.normalize!r}")
        if not 0 < self.k <= self.n_latents:
            raise ConfigError(f"k must be in 1..n_latents ({self.n_latents}), not {self.k}")
        if self.d_in <= 0:
            raise ConfigError(f"d_in must be positive, not {self.d_in}")

    def to_cfg_json(self) -> dict:
        """The SAELens-compatible ``cfg.json`` content, with our fields under ``"safer_audit"``."""
        return {
            "architecture": "topk",
            "d_in": self.d_in,
            "d_sae": self.n_latents,
            "k": self.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": self.normalize,
            "reshape_activations": "none",
            FORMAT_KEY: {
                "format_version": FORMAT_VERSION,
                "layer_norm_eps": LAYER_NORM_EPS,
                "metadata": self.metadata,
            },
        }
