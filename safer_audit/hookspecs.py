"""The plugin contract: one hook per kind of backend, each taking a ``register`` callback.

A plugin is a module (or object) with functions marked ``@hookimpl``; built-in backends
in ``safer_audit.backends`` use exactly these hooks, third-party ones arrive through the
``safer_audit`` entry-point group.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("safer_audit")
hookimpl = HookimplMarker("safer_audit")


@hookspec
def register_model_backends(register):
    """Register model backends: ``register(name, factory)``, ``factory(model, **options)`` returns a ModelBackend."""


@hookspec
def register_sae_backends(register):
    """Register SAE backends: ``register(name, backend)``, where backend has ``train`` and ``load``."""


@hookspec
def register_exporters(register):
    """Register report exporters: ``register(format_name, extensions, export)``, ``export(report, path)``."""


@hookspec
def register_feature_labellers(register):
    """Register feature labellers: ``register(name, factory)``; ``factory(**options)`` returns a
    ``labelling.Labeller`` whose ``label(requests)`` gives ``{latent: FeatureLabel}``."""


@hookspec
def register_commands(cli):
    """Add extra commands to the ``safer-audit`` click group."""
