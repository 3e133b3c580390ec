"""Built-in SAE backend ``topk``: the TopK sparse autoencoder of :mod:`safer_audit.sae`."""

from __future__ import annotations

from safer_audit.hookspecs import hookimpl
from safer_audit.sae import TopKSAE, train_sae


class TopKBackend:
    """``train(make_batches, d_in, cfg, *, n_tokens, metadata, progress) -> (sae, stats)``; ``load(dir) -> sae``."""

    name = "topk"
    train = staticmethod(train_sae)
    load = staticmethod(TopKSAE.load)


@hookimpl
def register_sae_backends(register):
    register(TopKBackend.name, TopKBackend())
