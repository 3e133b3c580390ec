"""The TopK sparse autoencoder (METHOD.md section 2): model, training loop, save and load.

The model reads RAW hidden states ``h`` [tokens, d_in] and normalises them itself:

    x     = (h - mean(h)) / (std(h) + 1e-6)          per token, over d_in ("layer_norm")
    pre   = (x - b_pre) @ W_enc + b_enc
    z     = ReLU(the k largest entries of pre), zero elsewhere
    x_hat = z @ W_dec + b_pre                         rows of W_dec have unit norm
    FVU   = mean over tokens of ||x_hat - x||^2 / ||x||^2

Training adds the AuxK loss of Gao et al. (2024): the top ``d_in // 2`` dead latents
reconstruct the residual ``x - x_hat``, so that dead latents get a gradient again.

On disk (``save``): ``DIR/cfg.json`` + ``DIR/sae_weights.safetensors``, the SAELens
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

import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

from .config import SaeTrainConfig
from .digests import sha256_file, short_digest
from .errors import ConfigError, SaeFormatError
from .files import temporary_name, write_atomic

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"  # ours and SAELens
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
FORMAT_KEY = "safer_audit"
FORMAT_VERSION = 1
DIGEST_KEY = "weights_sha256"  # under FORMAT_KEY: sha256 of the weights file, checked on load
MAX_CFG_DEPTH = 32  # nesting of cfg.json; ours is 3 deep plus free-form metadata
NORMALIZATIONS = ("layer_norm", "none")
LAYER_NORM_EPS = 1e-6
SHUFFLE_BUFFER_TOKENS = 65_536
# TrainStats.fvu and .l0 average the last part of training, where the weights have settled.
STATS_WINDOW = 0.1


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


class ForwardOutput(NamedTuple):
    x: torch.Tensor  # the normalised input [tokens, d_in]
    x_hat: torch.Tensor  # its reconstruction [tokens, d_in]
    top_vals: torch.Tensor  # [tokens, k], >= 0
    top_idx: torch.Tensor  # [tokens, k]
    fvu: torch.Tensor  # scalar: mean over tokens of ||x_hat - x||^2 / ||x||^2
    auxk_loss: torch.Tensor  # scalar, 0 without dead latents


class TopKSAE(torch.nn.Module):
    """TopK sparse autoencoder over raw hidden states (normalisation inside)."""

    def __init__(self, cfg: SaeConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        bound = 1 / math.sqrt(cfg.d_in)  # the nn.Linear default, as sparsify uses
        w_enc = torch.empty(cfg.d_in, cfg.n_latents).uniform_(-bound, bound, generator=generator)
        self.W_enc = torch.nn.Parameter(w_enc)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.n_latents))
        # contiguous, not w_enc.T.clone() (which keeps the transposed strides): embedding_bag on a
        # column-major W_dec measured ~60 ms per decode against ~1 ms row-major
        self.W_dec = torch.nn.Parameter(w_enc.T.contiguous())
        self.b_pre = torch.nn.Parameter(torch.zeros(cfg.d_in))
        self.set_decoder_norm_to_unit_norm()

    @property
    def k(self) -> int:
        return self.cfg.k

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Raw hidden states -> the SAE's input space (per-token layer norm, or as is)."""
        h = h.to(self.W_enc.dtype)
        if self.cfg.normalize == "none":
            return h
        centred = h - h.mean(dim=-1, keepdim=True)
        return centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)

    def _pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear runs one fused addmm (bias included) on W_enc as stored, no copy
        return F.linear(x - self.b_pre, self.W_enc.T, self.b_enc)

    def _top_k(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_vals, top_idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return top_vals.relu(), top_idx

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw hidden states [..., d_in] -> (top_vals, top_idx), each [..., k]; values >= 0."""
        return self._top_k(self._pre_activations(self.normalize(h)))

    def encode_dense(self, h: torch.Tensor) -> torch.Tensor:
        """Raw hidden states [..., d_in] -> codes z [..., n_latents], at most k nonzero per row."""
        top_vals, top_idx = self.encode(h)
        z = top_vals.new_zeros(*top_vals.shape[:-1], self.cfg.n_latents)
        return z.scatter_(-1, top_idx, top_vals)

    def _decode_sparse(self, top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        # embedding_bag measured 2x faster than a dense [tokens, n_latents] matmul (train step,
        # n_latents=3072, d_in=384, k=32, 2 CPU threads)
        flat = F.embedding_bag(
            top_idx.reshape(-1, top_idx.shape[-1]),
            self.W_dec,
            per_sample_weights=top_vals.reshape(-1, top_vals.shape[-1]),
            mode="sum",
        )
        return flat.reshape(*top_idx.shape[:-1], self.cfg.d_in)

    def decode(self, top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """(top_vals, top_idx) [..., k] -> reconstruction [..., d_in] in the normalised space."""
        return self._decode_sparse(top_vals, top_idx) + self.b_pre

    def forward(self, h: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """Encode and decode raw hidden states [tokens, d_in]; AuxK over ``dead_mask`` latents.

        The dense pre-activations are computed outside autograd; only the selected entries
        (top k, and the AuxK latents) carry a gradient, through ``_SparseLinear``, so the
        backward pass never builds a dense [tokens, n_latents] gradient.
        """
        x = self.normalize(h)
        centred = x - self.b_pre
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, centred, self.W_enc)
            top_pre, top_idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        aux = self._auxk_latents(pre, dead_mask)
        if aux is None:
            top_vals = _SparseLinear.apply(centred, self.W_enc, self.b_enc, top_idx, top_pre).relu()
        else:  # one sparse pass for both sets of latents: W_enc.T is copied once in the backward
            picked = _SparseLinear.apply(centred, self.W_enc, self.b_enc, torch.cat([top_idx, aux[1]], dim=-1),
                                         torch.cat([top_pre, aux[0]], dim=-1)).relu()
            top_vals, aux_vals = picked.split([self.cfg.k, aux[1].shape[-1]], dim=-1)
        x_hat = self.decode(top_vals, top_idx)
        residual = x - x_hat
        # clamp: an all-zero token (e.g. padding with normalize="none") must not divide by 0
        norm2 = x.pow(2).sum(dim=-1).clamp_min(1e-12)
        fvu = (residual.pow(2).sum(dim=-1) / norm2).mean()
        if aux is None:
            auxk_loss = x.new_zeros(())
        else:
            # Gao et al. (2024) AuxK: the top dead latents reconstruct what the live ones missed
            residual_hat = self._decode_sparse(aux_vals, aux[1])
            auxk_loss = aux[2] * ((residual_hat - residual.detach()).pow(2).sum(dim=-1) / norm2).mean()
        return ForwardOutput(x, x_hat, top_vals, top_idx, fvu, auxk_loss)

    @torch.no_grad()
    def _auxk_latents(self, pre, dead_mask) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The AuxK latents of each token (pre-activations, indices) and the loss scale; None if none is dead."""
        if dead_mask is None:
            return None
        dead = dead_mask.nonzero().squeeze(1)
        n_dead = len(dead)
        if n_dead == 0:
            return None
        k_aux = max(self.cfg.d_in // 2, 1)  # Gao et al., appendix B.1
        scale = min(n_dead / k_aux, 1.0)  # few dead latents: a weaker pull
        # top-k over the dead columns only: cheaper than masking all n_latents when few are dead
        aux_pre, which = pre.index_select(-1, dead).topk(min(k_aux, n_dead), dim=-1, sorted=False)
        return aux_pre, dead[which], scale

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def _remove_gradient_parallel_to_decoder(self) -> None:
        """Keep each decoder row's update tangent to the unit sphere (renormalised after the step)."""
        grad = self.W_dec.grad
        if grad is not None:
            # vecdot + addcmul_: two passes over [n_latents, d_in] and no temporaries
            grad.addcmul_(torch.linalg.vecdot(grad, self.W_dec.data).unsqueeze(1), self.W_dec.data, value=-1)

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The tensors in the SAELens layout (``b_pre`` saved as ``b_dec``), float32 on the CPU."""
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_pre}
        return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}

    def cfg_json(self) -> dict:
        """``cfg.json`` for these weights: the config plus the sha256 of the weights file ``save`` writes.

        ``load`` compares it with the file it reads, so flipped bytes in a cached or shipped
        SAE are an error rather than a silently different ranking (as the activation shards are).
        """
        data = self.cfg.to_cfg_json()
        data[FORMAT_KEY][DIGEST_KEY] = hashlib.sha256(save_safetensors(self.state_for_saving())).hexdigest()
        return data

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors``; no reader ever sees a half-written file."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():
            # an existing directory (perhaps with other files) cannot be swapped whole:
            # replace each file atomically, weights first so cfg.json never points ahead
            write_atomic(directory / WEIGHTS_FILE, lambda p: save_file(self.state_for_saving(), str(p)))
            write_atomic(directory / CFG_FILE, lambda p: _write_json(self.cfg_json(), p))
            return directory
        # a new directory is written whole in a staging directory (named like write_atomic's
        # temporaries, so only a dead writer's is ever cleaned up), then renamed into place
        staging = directory.parent / temporary_name(directory.name)
        staging.mkdir()
        try:
            save_file(self.state_for_saving(), staging / WEIGHTS_FILE)
            _write_json(self.cfg_json(), staging / CFG_FILE)
            try:
                os.rename(staging, directory)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (directory / CFG_FILE).exists():
                    raise
                # another writer saved it meanwhile: keep theirs, so readers never see it change
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> TopKSAE:
        """Load ours, a SAELens or a sparsify SAE from ``directory`` (safetensors only)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise SaeFormatError(f"{directory}: not a directory")
        cfg_path = directory / CFG_FILE
        if not cfg_path.is_file():
            raise SaeFormatError(f"{directory}: no {CFG_FILE}")
        raw = _read_json(cfg_path)
        if (directory / WEIGHTS_FILE).is_file():
            cfg, tensors = _from_saelens(raw, cfg_path, directory / WEIGHTS_FILE)
        elif (directory / SPARSIFY_WEIGHTS_FILE).is_file():
            cfg, tensors = _from_sparsify(raw, cfg_path, directory / SPARSIFY_WEIGHTS_FILE)
        else:
            raise SaeFormatError(f"{directory}: no {WEIGHTS_FILE} (ours, SAELens) or {SPARSIFY_WEIGHTS_FILE} (sparsify)")
        sae = cls(cfg)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(sae, name).copy_(tensor)
        return sae.to(device)

    @staticmethod
    def file_hash(directory: str | os.PathLike) -> str:
        """A short, stable hash of the weights file in ``directory``, for reports."""
        directory = Path(directory)
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            path = directory / SPARSIFY_WEIGHTS_FILE
        if not path.is_file():
            raise SaeFormatError(f"{directory}: no {WEIGHTS_FILE} or {SPARSIFY_WEIGHTS_FILE}")
        return short_digest(sha256_file(path))


class _SparseLinear(torch.autograd.Function):
    """``(x @ W + b)`` at the columns ``idx`` only, given those values already computed.

    forward(x [N, d_in], W [d_in, M], b [M], idx [N, j], values [N, j]) returns ``values``;
    the backward is that of ``(x @ W + b).gather(-1, idx)`` without any dense [N, M] tensor:
    the input gradient is an embedding_bag over W's columns, the weight gradient an
    embedding_bag over the tokens grouped by latent (deterministic, unlike index_add_).
    The same idea as sparsify's fused encoder, which measured 5-8x faster than the dense
    backward at 1024 x 3072, k = 32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, idx, values):
        ctx.save_for_backward(x, weight, idx)
        ctx.mark_non_differentiable(idx)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, weight, idx = ctx.saved_tensors
        grad = grad.to(weight.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight.T.contiguous(), per_sample_weights=grad, mode="sum")
        flat = idx.reshape(-1)
        if ctx.needs_input_grad[1]:
            n_latents = weight.shape[1]
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=n_latents)
            rows = F.embedding_bag(order // idx.shape[-1], x.detach().to(weight.dtype), counts.cumsum(0) - counts,
                                   per_sample_weights=grad.reshape(-1)[order], mode="sum")
            grad_w = rows.T
        if ctx.needs_input_grad[2]:
            grad_b = torch.bincount(flat, grad.reshape(-1), minlength=weight.shape[1]).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def _write_json(data: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)  # free-form metadata may hold paths
        f.write("\n")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SaeFormatError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise SaeFormatError(f"{path}: nested too deeply (more than {MAX_CFG_DEPTH} levels)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SaeFormatError(f"{path}: cannot read: {exc}") from None
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
    try:
        data = path.read_bytes()
        tensors = load_safetensors(data)
    except (SafetensorError, OSError) as exc:
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


def _from_saelens(raw: dict, cfg_path: Path, weights_path: Path) -> tuple[SaeConfig, dict]:
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


def _from_sparsify(raw: dict, cfg_path: Path, weights_path: Path) -> tuple[SaeConfig, dict]:
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


@dataclass
class TrainStats:
    """Training figures (METHOD.md section 2), stored in the SAE's metadata on save.

    ``fvu`` and ``l0`` are token-weighted means over the last tenth of training;
    ``dead_fraction`` counts latents silent over the last ``min(dead_tokens, tokens_seen)``
    training tokens.
    """

    fvu: float
    l0: float
    dead_fraction: float
    tokens_seen: int
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check_batch(batch: torch.Tensor, d_in: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or batch.shape[1] != d_in:
        shape = list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"activation batches must be tensors [tokens, {d_in}], got {shape}")
    return batch


def shuffled_batches(
    chunks: Iterable[torch.Tensor], batch_size: int, generator: torch.Generator, d_in: int
) -> Iterator[torch.Tensor]:
    """Re-batch chunks that come in dataset order, shuffled within a ~64k-token buffer.

    Yields ``ceil(total_tokens / batch_size)`` batches: all full but the last.
    """
    pending: list[torch.Tensor] = []
    n_pending = 0
    for chunk in chunks:
        chunk = _check_batch(chunk, d_in)
        if len(chunk) == 0:
            continue
        pending.append(chunk.float())
        n_pending += len(chunk)
        if n_pending >= max(SHUFFLE_BUFFER_TOKENS, batch_size):
            tokens = _permuted(torch.cat(pending), generator)
            n_full = len(tokens) // batch_size * batch_size
            yield from tokens[:n_full].split(batch_size)
            pending, n_pending = [tokens[n_full:]], len(tokens) - n_full
    if n_pending:
        yield from _permuted(torch.cat(pending), generator).split(batch_size)


def _permuted(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return tokens[torch.randperm(len(tokens), generator=generator).to(tokens.device)]


def _lr_at(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to ``peak``, then linear decay to 0 at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return peak * max(0.0, 1 - (step - warmup_steps) / remaining)


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch has a fused kernel for the device (CPU since torch 2.4).

    The fused step measured ~10x faster than the default foreach one on the SAE's
    2 x 1.2M weights (2 CPU threads); same update up to float rounding.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def default_lr(n_latents: int) -> float:
    """Gao et al.'s scaling rule: 2e-4 at 16,384 latents, times sqrt(16384 / n_latents)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def train_sae(
    make_batches: Callable[[], Iterable[torch.Tensor]],
    d_in: int,
    cfg: SaeTrainConfig,
    *,
    n_tokens: int | None = None,
    metadata: dict | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> tuple[TopKSAE, TrainStats]:
    """Train a TopK SAE on raw hidden states; ``make_batches()`` streams one epoch per call.

    Without ``n_tokens`` one extra pass counts the tokens, to size the LR schedule.
    ``progress(step, total_steps, {"loss", "fvu", "auxk", "dead_fraction", "lr"})`` is
    called after every step. Deterministic for the same inputs, config and seed on CPU.

    b_pre starts at the mean of the first (shuffled) batch rather than METHOD's 0: on
    MiniLM layer-3 response activations of HH-RLHF harmless (203k tokens, defaults) that
    measured FVU 0.281 against 0.295, and 0.0% dead latents against 0.1%.
    """
    start = time.perf_counter()
    if cfg.batch_size <= 0 or cfg.epochs <= 0:
        raise ConfigError(f"batch_size and epochs must be positive, not {cfg.batch_size} and {cfg.epochs}")
    if n_tokens is None:
        n_tokens = sum(len(_check_batch(b, d_in)) for b in make_batches())
    if n_tokens <= 0:
        raise ConfigError("no activations to train the SAE on")
    n_latents = cfg.n_latents or cfg.expansion * d_in
    steps_per_epoch = math.ceil(n_tokens / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, round(cfg.warmup_fraction * total_steps))
    peak_lr = cfg.lr or default_lr(n_latents)
    window_start = total_steps - max(1, round(STATS_WINDOW * total_steps))

    generator = torch.Generator().manual_seed(cfg.seed)
    sae_cfg = SaeConfig(d_in=d_in, n_latents=n_latents, k=cfg.k, metadata=dict(metadata or {}))
    sae = TopKSAE(sae_cfg, generator=generator)
    optimizer: torch.optim.Optimizer | None = None
    since_fired = torch.zeros(n_latents, dtype=torch.long)
    tokens_seen = step = 0
    window = {"tokens": 0, "fvu": 0.0, "l0": 0.0}

    for _ in range(cfg.epochs):
        for h in shuffled_batches(make_batches(), cfg.batch_size, generator, d_in):
            if optimizer is None:  # the first batch tells the device and sets b_pre
                sae.to(h.device)
                with torch.no_grad():
                    sae.b_pre.copy_(sae.normalize(h).mean(0))
                since_fired = since_fired.to(h.device)
                optimizer = _adam(sae.parameters(), peak_lr)
            lr = _lr_at(step, total_steps, peak_lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            dead_mask = since_fired >= cfg.dead_tokens if cfg.auxk_alpha > 0 else None
            out = sae(h, dead_mask=dead_mask)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sae._remove_gradient_parallel_to_decoder()
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()

            with torch.no_grad():
                fired = out.top_idx[out.top_vals > 0]
                since_fired += len(h)
                since_fired[fired] = 0
                if step >= window_start:
                    window["tokens"] += len(h)
                    window["fvu"] += out.fvu.item() * len(h)
                    window["l0"] += float((out.top_vals > 0).sum())
            tokens_seen += len(h)
            step += 1
            if progress is not None:
                dead = float((since_fired >= min(cfg.dead_tokens, tokens_seen)).float().mean())
                figures = {"loss": loss.item(), "fvu": out.fvu.item(), "auxk": out.auxk_loss.item()}
                progress(step, total_steps, {**figures, "dead_fraction": dead, "lr": lr})

    if step == 0:
        raise ConfigError("no activations to train the SAE on")
    denominator = max(window["tokens"], 1)
    stats = TrainStats(
        fvu=window["fvu"] / denominator,
        l0=window["l0"] / denominator,
        dead_fraction=float((since_fired >= min(cfg.dead_tokens, tokens_seen)).float().mean()),
        tokens_seen=tokens_seen,
        steps=step,
        seconds=time.perf_counter() - start,
    )
    sae.cfg.metadata["training"] = {"config": cfg.to_dict(), "lr": peak_lr, **stats.to_dict()}
    return sae, stats


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, batches: Iterable[torch.Tensor]) -> dict:
    """FVU and mean L0 over a stream of raw hidden states; dead = never fired in the stream."""
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=sae.W_enc.device)
    tokens = 0
    fvu_sum = l0_sum = 0.0
    for h in batches:
        h = _check_batch(h, sae.cfg.d_in).to(sae.W_enc.device)
        if len(h) == 0:
            continue
        out = sae(h)
        active = out.top_vals > 0
        fired[out.top_idx[active]] = True
        fvu_sum += float(out.fvu) * len(h)
        l0_sum += float(active.sum())
        tokens += len(h)
    if tokens == 0:
        raise ValueError("no activations to evaluate the SAE on")
    return {
        "fvu": fvu_sum / tokens,
        "l0": l0_sum / tokens,
        "dead_fraction": 1 - float(fired.float().mean()),
        "tokens": tokens,
    }
