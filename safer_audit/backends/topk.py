"""Built-in SAE backend ``topk``: the TopK sparse autoencoder of :mod:`safer_audit.sae`.

:mod:`safer_audit.sae` (and torch) is imported on first use, not when plugins load:
commands that train or read no SAE should not pay for it.
"""

from __future__ import annotations

from safer_audit.hookspecs import hookimpl


class TopKBackend:
    """``train(make_batches, d_in, cfg, *, n_tokens, metadata, progress) -> (sae, stats)``; ``load(dir) -> sae``."""

    name = "topk"

    @staticmethod
    def train(*args, **kwargs):
        from safer_audit.sae import train_sae

        return train_sae(*args, **kwargs)

    @staticmethod
    def load(directory, **kwargs):
        from safer_audit.sae import TopKSAE

        return TopKSAE.load(directory, **kwargs)


@hookimpl
def register_sae_backends(register):
    register(TopKBackend.name, TopKBackend())
