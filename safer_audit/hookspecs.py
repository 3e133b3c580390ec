"""The plugin contract: one hook per kind of backend, each taking a ``register`` callback.

A plugin is a module (or object) with functions marked ``@hookimpl``; built-in backends
in ``safer_audit.backends`` use exactly these hooks, third-party ones arrive through the
``safer_audit`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    import torch

hookspec = HookspecMarker("safer_audit")
hookimpl = HookimplMarker("safer_audit")


@runtime_checkable
class ModelBackend(Protocol):
    """What a model backend gives the pipeline: rendering, tokenizing and one layer's hidden states.

    ``identity`` and ``fingerprint`` name the model in caches and reports (the fingerprint
    changes when the weights do); ``n_layers`` and ``d_model`` size the read layer;
    ``has_reward_head`` says whether ``forward`` can also return a reward score. Optional:
    ``compute_dtype``, the dtype name the forward pass computes in ("float32" when absent), which keys the
    activation cache; ``identify(model)`` on the factory, the (identity, fingerprint) of a backend for
    ``model`` found without loading it (None when it cannot tell), which keys a cached report.
    """

    identity: str
    fingerprint: str
    n_layers: int
    d_model: int
    has_reward_head: bool

    def render(self, messages: list[dict]) -> tuple[str, int, bool]:
        """(model input text, where the final message starts, whether the text holds special tokens)."""

    def tokenize(self, texts: list[str], *, max_length: int,
                 has_special_tokens: bool) -> tuple[list[list[int]], list[list[tuple[int, int]]], list[list[int]]]:
        """(token ids, character offsets, special-token masks), truncated from the left to ``max_length``."""

    def token_strings(self, ids: list[int]) -> list[str]:
        """The vocabulary strings of token ids, for feature cards."""

    def pad_batch(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of a right-padded batch, on the model's device."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, layer: int,
                want_score: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states after block ``layer`` (1-based) [batch, tokens, d_model], and the reward score if wanted."""


@runtime_checkable
class SaeBackend(Protocol):
    """What an SAE backend gives the pipeline: training on an activation stream, and loading."""

    def train(self, make_batches: Callable[[], Iterable[torch.Tensor]], d_in: int, cfg: Any, *,
              n_tokens: int | None = None, metadata: dict | None = None,
              progress: Callable[[int, int, dict], None] | None = None) -> tuple[Any, Any]:
        """Train on raw hidden states; returns (sae, training stats)."""

    def load(self, directory: str | Path, **options: Any) -> Any:
        """An SAE saved in ``directory``."""


@runtime_checkable
class Executor(Protocol):
    """Who runs a scan's expensive passes when it is not this process: chosen once, at the top of a run,
    and handed down to extraction (which keeps it on the store) and to the SAE pass. Both write the same
    content-addressed caches as the local path, so every engine gives the same report."""

    name: str

    def compute_shards(self, items, shards, config, layer: int, want_score: bool, cache, progress) -> int:
        """Compute the planned activation ``shards`` of ``items`` into ``cache``; the number of texts computed."""

    def encode_missing(self, store, sae, cache, progress) -> int:
        """Encode the texts of ``store`` whose codes ``cache`` lacks, into it; the number encoded."""




@hookspec
def register_model_backends(register):
    """Register model backends: ``register(name, factory)``; ``factory(model, **options)`` returns a ModelBackend."""


@hookspec
def register_sae_backends(register):
    """Register SAE backends: ``register(name, backend)``, where backend is an SaeBackend (``train``, ``load``)."""


@hookspec
def register_exporters(register):
    """Register report exporters: ``register(format_name, extensions, export)``, ``export(report, path)``."""


@hookspec
def register_feature_labellers(register):
    """Register feature labellers: ``register(name, factory)``; ``factory(**options)`` returns a
    ``features.types.Labeller`` whose ``label(requests)`` gives ``{latent: FeatureLabel}``."""


@hookspec
def register_judges(register):
    """Register judges: ``register(name, factory)``; ``factory()`` returns a ``scoring.types.Judge`` (``name``,
    ``description``, ``judge(context)`` -> one signed float per pair that never learnt from that pair's
    label). A judge that costs (an LLM) must send nothing until ``judge`` is called: listing it is free."""


@hookspec
def register_gate_formats(register):
    """Register output formats of the gate: ``register(name, render)``; ``render(result)`` returns the text
    ``safer-audit gate --format NAME`` prints for a workflows.gate.GateResult."""


@hookspec
def register_engines(register):
    """Register execution engines: ``register(name, factory)``; ``factory(config)`` returns an Executor
    (``config``: the scan's ActivationConfig). The local engine is the pipeline itself and is not registered."""


@hookspec
def register_commands(cli):
    """Add extra commands to the ``safer-audit`` click group."""
