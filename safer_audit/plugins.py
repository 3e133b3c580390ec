"""The plugin manager: built-in backends from DEFAULT_PLUGINS, others from entry points.

``SAFER_AUDIT_LOAD_PLUGINS`` limits which third-party plugins load: a comma-separated
list of entry-point names (an empty string loads none). Built-in backends always load.
A plugin that implements a hook that does not exist is an error, not silently ignored.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginError
from .version import __version__

DEFAULT_PLUGINS = (
    "safer_audit.backends.hf",
    "safer_audit.backends.topk",
    "safer_audit.backends.exporters",
    "safer_audit.backends.labellers",
    "safer_audit.backends.judges",
    "safer_audit.backends.harm",
    "safer_audit.backends.engines",
    "safer_audit.backends.gate_formats",
)

ENTRY_POINT_GROUP = "safer_audit"
LOAD_PLUGINS_ENV = "SAFER_AUDIT_LOAD_PLUGINS"

class PluginWarning(UserWarning):
    """Plugin loading went on, but not as the user may have meant."""


pm = pluggy.PluginManager("safer_audit")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in and the allowed third-party plugins, once.

    Only a successful load counts: after a PluginError every call raises it again.
    """
    global _loaded
    if _loaded:
        return pm
    for name in DEFAULT_PLUGINS:
        if pm.get_plugin(name) is None:
            pm.register(importlib.import_module(name), name)
    allowed = os.environ.get(LOAD_PLUGINS_ENV)
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    installed = metadata.entry_points(group=ENTRY_POINT_GROUP)
    unknown = sorted((allowed_names or set()) - {ep.name for ep in installed})
    if unknown:  # a misspelt name would otherwise quietly load nothing
        known = ", ".join(sorted({ep.name for ep in installed})) or "none"
        warnings.warn(PluginWarning(f"{LOAD_PLUGINS_ENV} names {', '.join(map(repr, unknown))}, which "
                                    f"no installed plugin is called (installed: {known})"), stacklevel=2)
    for ep in installed:
        if allowed_names is not None and ep.name not in allowed_names:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must name itself
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            pm._plugin_distinfo.append((plugin, ep.dist))  # so list_name_plugin() knows its version
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    _loaded = True
    return pm


def _collect(hook_name: str, plugin=None) -> list[tuple]:
    """Call one registration hook and return what was registered, as argument tuples."""
    load_plugins()
    registered: list[tuple] = []

    def register(*args):
        registered.append(args)

    hook = getattr(pm.hook, hook_name)
    if plugin is None:
        hook(register=register)
    else:
        for impl in hook.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(register=register)
    return registered


# kind -> (the registration hook, what one is called in messages, what `safer-audit plugins` calls them)
KINDS = {
    "model": ("register_model_backends", "model backend", "models"),
    "sae": ("register_sae_backends", "SAE backend", "saes"),
    "exporter": ("register_exporters", "format", "exporters"),
    "labeller": ("register_feature_labellers", "labeller", "labellers"),
    "judge": ("register_judges", "judge", "judges"),
    "engine": ("register_engines", "engine", "engines"),
    "gate_format": ("register_gate_formats", "gate format", "gate formats"),
}


@dataclass(frozen=True)
class Exporter:
    name: str
    extensions: tuple[str, ...]
    export: object  # callable(report, path) -> None


def registry(kind: str) -> dict:
    """What the plugins registered of one kind (see KINDS), by name; a name registered twice is an error."""
    hook, what, _ = KINDS[kind]
    found: dict = {}
    for name, *rest in _collect(hook):
        if name in found:
            raise PluginError(f"{what} {name!r} is registered twice")
        found[name] = Exporter(name, tuple(rest[0]), rest[1]) if kind == "exporter" else rest[0]
    return found


def lookup(kind: str, name: str, *, also: tuple[str, ...] = (), hint: str = "see safer-audit plugins"):
    """The ``kind`` registered as ``name``; ConfigError naming the known ones (and ``also``, names the caller
    handles itself) otherwise."""
    found = registry(kind)
    if name not in found:
        known = ", ".join([*sorted(found), *also])
        raise ConfigError(f"unknown {KINDS[kind][1]} {name!r} (known: {known}; {hint})")
    return found[name]


def model_backends() -> dict:
    """Model backend factories by name."""
    return registry("model")


def sae_backends() -> dict:
    """SAE backends by name."""
    return registry("sae")


def exporters() -> dict[str, Exporter]:
    """Exporters by format name."""
    return registry("exporter")


def feature_labellers() -> dict:
    """Feature labellers by name."""
    return registry("labeller")


def judges() -> dict:
    """Judge factories by name (``factory()`` returns a scoring.types.Judge)."""
    return registry("judge")


@dataclass
class PluginInfo:
    name: str
    version: str | None
    hooks: list[str]
    registers: dict[str, list[str]] = field(default_factory=dict)


def plugin_info() -> list[PluginInfo]:
    """What is loaded: each plugin with its version, its hooks and what it registers."""
    load_plugins()
    versions = {id(plugin): dist.version for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = sorted(impl.name for impl in pm.get_hookcallers(plugin) or [])
        registers = {}
        for hook_name, _, label in KINDS.values():
            if hook_name in hooks:
                registers[label] = [str(args[0]) for args in _collect(hook_name, plugin)]
        version = versions.get(id(plugin))
        if version is None and name.startswith("safer_audit."):
            version = __version__
        infos.append(PluginInfo(name, version, hooks, registers))
    return infos
