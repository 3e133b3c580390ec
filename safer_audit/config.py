"""Every default in one place: the configuration of activations, the SAE and a scan."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError

POSITIONS = ("all", "response", "punctuation")  # the position sets a model's activations are read at
DEFAULT_POSITIONS = "response"  # measured: response > all >> punctuation on HH with MiniLM
# evaluate's default: every position set, the default first (its run also measures the margins)
EVALUATE_POSITIONS = (DEFAULT_POSITIONS, *(p for p in POSITIONS if p != DEFAULT_POSITIONS))
CACHE_DTYPES = ("float32", "float16", "bfloat16")
ENGINES = ("local", "ray")
SELECTIONS = ("salience", "safety")


def default_cache_dir() -> Path:
    """``$SAFER_AUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/safer-audit``, else ``~/.cache/safer-audit``."""
    explicit = os.environ.get("SAFER_AUDIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "safer-audit"


@dataclass
class ActivationConfig:
    """Which activations to read, and how to compute them."""

    model: str | None = None  # None: the embedded MiniLM-L6 default
    backend: str = "hf"
    layer: int = 3  # measured: layer 3 of 6 separates chosen/rejected best on HH with MiniLM
    positions: str = DEFAULT_POSITIONS
    max_length: int = 512
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_dtype: str = "float32"  # how cached activations are stored: float32, float16 or bfloat16
    engine: str = "local"  # who runs the forward passes: this process, or a Ray cluster
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or ray://host:port to join one
    ray_workers: int | None = None  # actors of the extraction pool; None: one per GPU, else per 2 CPUs

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, not {self.cache_dtype!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if "://" in str(self.cache_dir):
            raise ConfigError(f"cache directory {self.cache_dir}: fsspec URLs are not supported; use a local "
                              "directory, or for a Ray cluster a shared filesystem mounted at the same path "
                              "on every node (NFS, Lustre, or object storage through a FUSE mount)")
        self.cache_dir = Path(self.cache_dir)


@dataclass
class SaeTrainConfig:
    """TopK SAE training (METHOD.md section 2)."""

    expansion: int = 8
    n_latents: int | None = None  # None: expansion * d_in
    k: int = 32
    epochs: int = 1
    batch_size: int = 1024  # tokens per step
    lr: float | None = None  # None: 2e-4 / sqrt(n_latents / 2**14), as in Gao et al.
    warmup_fraction: float = 0.05
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 20_000  # silent this long = dead, revived by AuxK (200k never triggered within 1 HH epoch)
    seed: int = 0
    # tokens trained on, a seeded hash sample when there are more; held in memory (~1.5 kB each at
    # width 384): all of the 2,312-pair HH file (~200k) fits
    max_tokens: int = 1_000_000

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScanConfig:
    """A scan: which data, which activations, which SAE and features, how pairs are ranked."""

    activations: ActivationConfig = field(default_factory=ActivationConfig)
    sae_train: SaeTrainConfig = field(default_factory=SaeTrainConfig)
    sae_path: Path | None = None  # None: train one on the scanned data (cached)
    n_features: int = 1024  # top-N latents by |salience|; see README "Defaults"
    features_file: Path | None = None
    salience_from: str | None = None  # a reference dataset for salience, else the scanned one
    folds: int = 5  # cross-fitting folds of the reward heads
    margin_l2: float = 1.0  # ridge of the Bradley-Terry head on pooled activations (measured, BENCHMARKS.md)
    sae_l1: float = 2e-2  # L1 of the sparse Bradley-Terry head on SAE codes (measured)
    sae_l2: float = 1e-4  # and its ridge
    # which signals the suspicion ranking averages: measured best on HH flips (BENCHMARKS.md);
    # sae_margin is still computed and reported, but adding it did not help
    ranking: dict[str, float] = field(default_factory=lambda: {
        "score_safe": 1.0, "reward_margin": 1.0, "sae_margin": 0.0})
    # the judges the ranking combines (safer_audit.judges; None: the built-in signals weighted by
    # ``ranking``) and how: mean percentile rank (measured, BENCHMARKS.md) or the cross-fitted stack
    judges: tuple[str, ...] | None = None
    aggregation: str = "mean-rank"
    flipped_fraction: float = 0.04  # the paper's best drop ratio (METHOD.md section 6)
    noisy_fraction: float = 0.10
    top_features_per_pair: int = 5
    cards_with_contexts: int = 32  # feature cards (largest |salience| first) that show text contexts
    # feature labels (issue 12): which labeller, its options, and how features are selected
    labeller: str = "offline"  # a registered labeller (safer-audit plugins), or "none"
    labeller_options: dict = field(default_factory=dict)  # passed to the labeller's factory (url, taxonomy, ...)
    select: str = "salience"  # "salience": top n_features by |salience|; "safety": of those, the safety-relevant
    relevance_threshold: float = 0.5  # --select safety keeps candidates with relevance >= this
    labels_for_findings: int = 256  # at most this many latents labelled in all (cards first, then suspects')
    seed: int = 0
    # data options, passed to the data layer
    schema: str | None = None
    split: str | None = None
    preference: str = "better"
    skip_invalid: bool = False
    max_record_bytes: int = 16 << 20  # data.MAX_RECORD_BYTES (not imported: config stays free of polars)

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {', '.join(SELECTIONS)}, not {self.select!r}")
        if not 0.0 <= self.relevance_threshold <= 1.0:
            raise ConfigError(f"relevance threshold must be in [0, 1], not {self.relevance_threshold!r}")
