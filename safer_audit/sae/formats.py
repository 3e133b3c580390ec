"""Saving and loading SAEs. On disk (``TopKSAE.save``): ``DIR/cfg.json`` + ``DIR/sae_weights.safetensors``, the SAELens
layout. ``cfg.json`` holds the SAELens keys (``architecture`` "topk", ``d_in``, ``d_sae``,
``k``, ``normalize_activations``, ``apply_b_dec_to_input`` true, ``dtype``, ``device``)
and ours under ``"safer_audit"`` (format version, normalisation epsilon, metadata: model
identity, layer, positions, training configuration and figures). The tensors are
``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in];
``b_dec`` is our ``b_pre``.

``TopKSAE.load(DIR)`` reads three layouts, from safetensors only (never pickles):

- ours: the SAELens layout with a ``"safer_audit"`` key in ``cfg.json``.
- SAELens (``cfg.json`` + ``sae_weights.safetensors``): ``architecture`` "topk" with ``k``
  (SAELens >= 6), or ``activation_fn_str`` "topk" with ``activation_fn_kwargs.k`` (older
  releases); ``d_sae`` -> n_latents; tensors map by name, ``b_dec`` -> ``b_pre``.
  ``normalize_activations`` "layer_norm" -> our "layer_norm" (SAELens divides by
  ``std + 1e-5`` where we use ``1e-6``: a relative difference of about 1e-5 / std),
  "none" -> "none"; other normalisations are refused. With ``apply_b_dec_to_input``
  false the encoder sees ``x`` rather than ``x - b_dec``; we fold that exactly into the
  encoder bias: ``b_enc + b_dec @ W_enc``. SAELens's ``layer_norm`` also maps its output
  back to the raw scale; ours stays in the normalised space (FVU is measured there).
- EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``): ``num_latents`` (or
  ``expansion_factor * d_in``) -> n_latents, ``k`` -> k; ``encoder.weight``
  [n_latents, d_in] -> ``W_enc`` transposed, ``encoder.bias`` -> ``b_enc``, ``W_dec`` ->
  ``W_dec``, ``b_dec`` -> ``b_pre``. sparsify trains on raw hidden states, so
  normalisation is "none"; its ReLU-then-top-k gives the same codes as our
  top-k-then-ReLU. Transcoders, skip connections and group-max activations are refused.

Loaded decoders are kept as they are (not renormalised): rescaling a latent would change
which k latents win, so the loaded SAE would no longer be the one that was trained.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..common.files import read_bounded
from ..config import MAX_SAE_CONFIG_BYTES, MAX_SAE_WEIGHTS_BYTES
from ..errors import SaeFormatError
from .config import (
    CFG_FILE,
    DIGEST_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    NORMALIZATIONS,
    SaeConfig,
)

MAX_CFG_DEPTH = 32  # nesting of cfg.json; ours is 3 deep plus free-form metadata


def write_json(data: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)  # free-form metadata may hold paths
        f.write("\n")


def read_json(path: Path) -> dict:
    raw = read_bounded(path, MAX_SAE_CONFIG_BYTES, lambda message: SaeFormatError(f"{path}: {message}"))
    try:
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise SaeFormatError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise SaeFormatError(f"{path}: nested too deeply (more than {MAX_CFG_DEPTH} levels)") from None
    except UnicodeDecodeError as exc:
        raise SaeFormatError(f"{path}: cannot read: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict):
        raise SaeFormatError(f"{path}: expected a JSON object")
    deep = _too_deep(data, MAX_CFG_DEPTH)
    if deep is not None:
        raise SaeFormatError(f'{path}: field "{deep}" is nested too deeply (more than {MAX_CFG_DEPTH} levels)')
    return data


def _too_deep(data, limit: int) -> str | None:
    """The dotted name of the first value nested more than ``limit`` levels down, else None.

    Iterative, so a hostile file cannot exhaust the stack here, and later json.dumps of the
    metadata (reports, baselines) never meets a depth it cannot handle.
    """
    stack = [(data, "", 0)]
    while stack:
        value, name, depth = stack.pop()
        if depth > limit:
            return name.lstrip(".") or "(top level)"
        if isinstance(value, dict):
            stack.extend((v, f"{name}.{k}", depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{name}[{i}]", depth + 1) for i, v in enumerate(value))
    return None


_KINDS = {int: "an integer", str: "a string", bool: "true or false", dict: "an object", float: "a finite number"}


def _field(cfg: dict, name: str, path: Path, kind: type = int, *, positive: bool = False, default=...,
           prefix: str = ""):
    """``cfg[name]`` checked by type (and for ``positive``, > 0); ``default`` when absent, if given."""
    if name not in cfg:
        if default is not ...:
            return default
        raise SaeFormatError(f'{path}: field "{prefix}{name}" is missing')
    value = cfg[name]
    if kind is float:  # any finite JSON number
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise SaeFormatError(f'{path}: field "{prefix}{name}" must be {_KINDS[kind]}, not {_shown(value)}')
    if positive and not value > 0:
        raise SaeFormatError(f'{path}: field "{prefix}{name}" must be positive, not {value!r}')
    return value


def _shown(value) -> str:
    """A short repr for an error line: a whole nested config would not fit on one."""
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _read_tensors(path: Path, shapes: dict[str, tuple[int, ...]], optional: tuple[str, ...] = (), *,
                  sha256: str | None = None) -> dict:
    """Read a safetensors file and check that it holds exactly ``shapes`` (plus ``optional``),
    that it has the ``sha256`` recorded for it (when one is), and that every weight is finite."""
    data = read_bounded(path, MAX_SAE_WEIGHTS_BYTES, lambda message: SaeFormatError(f"{path}: {message}"))
    try:
        tensors = load_safetensors(data)
    except SafetensorError as exc:
        raise SaeFormatError(f"{path}: not a readable safetensors file: {exc}") from None
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise SaeFormatError(f"{path}: sha256 {actual[:16]}... differs from the {sha256[:16]}... recorded in "
                                 f"{CFG_FILE}: the weights are corrupt or were changed")
    for name, shape in shapes.items():
        if name not in tensors:
            raise SaeFormatError(f'{path}: tensor "{name}" is missing')
        if tuple(tensors[name].shape) != shape:
            raise SaeFormatError(f'{path}: tensor "{name}" has shape {list(tensors[name].shape)}, expected {list(shape)}')
    extra = sorted(set(tensors) - set(shapes) - set(optional))
    if extra:
        raise SaeFormatError(f"{path}: unexpected tensors {', '.join(extra)} (not a plain TopK SAE)")
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise SaeFormatError(f'{path}: tensor "{name}" has dtype {tensor.dtype}, expected floating point')
        tensor = tensor.float()
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            # NaN or Inf weights would give NaN scores for every pair, found only when the report fails
            raise SaeFormatError(f'{path}: tensor "{name}" has {bad} NaN or infinite values')
        out[name] = tensor
    return out


def _optional(raw: dict, path: Path, kinds: dict[str, type]) -> None:
    """Fields a file may leave out, but that must have the right type when present."""
    for name, kind in kinds.items():
        if raw.get(name) is not None:
            _field(raw, name, path, kind)


def from_saelens(raw: dict, cfg_path: Path, weights_path: Path) -> tuple[SaeConfig, dict]:
    """Our format and SAELens's: same tensors, our metadata under ``"safer_audit"``."""
    _optional(raw, cfg_path, {"architecture": str, "activation_fn_str": str, "activation_fn_kwargs": dict,
                              "apply_b_dec_to_input": bool, "dtype": str, "device": str,
                              "normalize_activations": str, "reshape_activations": str})
    architecture = raw.get("architecture")
    if architecture == "topk":
        k = _field(raw, "k", cfg_path)
    elif raw.get("activation_fn_str") == "topk":  # SAELens before version 6
        k = _field(raw.get("activation_fn_kwargs") or {}, "k", cfg_path, prefix="activation_fn_kwargs.")
    else:
        raise SaeFormatError(f'{cfg_path}: field "architecture" is {_shown(architecture)}; only TopK SAEs load')
    d_in = _field(raw, "d_in", cfg_path, positive=True)
    d_sae = _field(raw, "d_sae", cfg_path, positive=True)
    normalize = raw.get("normalize_activations")
    normalize = "none" if normalize is None else normalize
    if normalize not in NORMALIZATIONS:
        raise SaeFormatError(
            f'{cfg_path}: field "normalize_activations" is {normalize!r}; supported: {", ".join(NORMALIZATIONS)}'
        )
    if raw.get("reshape_activations", "none") != "none":
        raise SaeFormatError(f'{cfg_path}: field "reshape_activations" must be "none"')
    sha256 = None
    if FORMAT_KEY in raw:
        ours = _field(raw, FORMAT_KEY, cfg_path, dict)
        prefix = f"{FORMAT_KEY}."
        version = _field(ours, "format_version", cfg_path, positive=True, prefix=prefix)
        if version > FORMAT_VERSION:
            raise SaeFormatError(f'{cfg_path}: field "{FORMAT_KEY}.format_version" is newer than this safer-audit reads')
        _field(ours, "layer_norm_eps", cfg_path, float, positive=True, default=None, prefix=prefix)
        metadata = dict(_field(ours, "metadata", cfg_path, dict, default={}, prefix=prefix))
        sha256 = _field(ours, DIGEST_KEY, cfg_path, str, default=None, prefix=prefix)
        if sha256 is not None and not _is_sha256(sha256):
            raise SaeFormatError(f'{cfg_path}: field "{prefix}{DIGEST_KEY}" must be 64 lowercase hex digits, '
                                 f"not {_shown(sha256)}")
    else:
        metadata = {"source": "saelens"}
        for key in ("model_name", "hook_name", "hook_layer", "context_size"):
            if key in raw:
                metadata[key] = raw[key]
    cfg = _checked_config(cfg_path, d_in=d_in, n_latents=d_sae, k=k, normalize=normalize, metadata=metadata)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    t = _read_tensors(weights_path, shapes, sha256=sha256)
    b_enc = t["b_enc"]
    if raw.get("apply_b_dec_to_input", True) is False:
        b_enc = b_enc + t["b_dec"] @ t["W_enc"]  # exact: W_enc x + b_enc == W_enc (x - b_dec) + this
    return cfg, {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_enc": b_enc, "b_pre": t["b_dec"]}


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def from_sparsify(raw: dict, cfg_path: Path, weights_path: Path) -> tuple[SaeConfig, dict]:
    """An EleutherAI sparsify ``SparseCoder`` saved with ``save_to_disk``."""
    d_in = _field(raw, "d_in", cfg_path, positive=True)
    k = _field(raw, "k", cfg_path)
    if raw.get("num_latents"):  # sparsify writes 0 when expansion_factor decides
        n_latents = _field(raw, "num_latents", cfg_path, positive=True)
    else:
        n_latents = d_in * _field(raw, "expansion_factor", cfg_path, positive=True)
    _optional(raw, cfg_path, {"activation": str, "transcode": bool, "skip_connection": bool})
    for name, allowed in (("activation", "topk"), ("transcode", False), ("skip_connection", False)):
        if raw.get(name, allowed) != allowed:
            raise SaeFormatError(f'{cfg_path}: field "{name}" is {raw[name]!r}; only plain TopK SAEs load')
    cfg = _checked_config(
        cfg_path, d_in=d_in, n_latents=n_latents, k=k, normalize="none", metadata={"source": "sparsify"}
    )
    shapes = {"encoder.weight": (n_latents, d_in), "encoder.bias": (n_latents,), "W_dec": (n_latents, d_in), "b_dec": (d_in,)}
    t = _read_tensors(weights_path, shapes)
    return cfg, {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_pre": t["b_dec"]}


def _checked_config(cfg_path: Path, **fields) -> SaeConfig:
    try:
        return SaeConfig(**fields)
    except ValueError as exc:
        raise SaeFormatError(f"{cfg_path}: {exc}") from None
