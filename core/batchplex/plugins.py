"""Plugin discovery and the adapter registry: the one place that builds the plugin manager and calls its hooks.

Order of registration: the hookspecs, the built-in plugin, installed plugins found through the entry-point group
``batchplex`` (unless switched off), then run-time plugins given by the caller; `check_pending` last, so a
misspelled hook fails loudly instead of being ignored.

Environment switches (read when a plugin manager is built, never at import):

* ``BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD=1``: load no installed plugin (built-in and run-time plugins still load);
* ``BATCHPLEX_LOAD_PLUGINS=vision,nlp``: load only these installed plugins; the others are blocked by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import builtin_adapters, hookspecs
from .adapter import Adapter
from .errors import DuplicateAdapterError, PluginError, UnknownAdapterError
from .hookspecs import PROJECT

__all__ = ["PROJECT", "PluginHost", "InstalledPlugin", "get_plugin_manager", "installed_plugins"]

BUILTIN_PLUGIN_NAME = "batchplex.builtin"
DISABLE_AUTOLOAD_ENV = "BATCHPLEX_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_LIST_ENV = "BATCHPLEX_LOAD_PLUGINS"


@dataclass(frozen=True)
class InstalledPlugin:
    """An entry point of the ``batchplex`` group and what became of it."""

    name: str
    value: str
    distribution: str
    version: str
    blocked: bool


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def installed_plugins() -> list[InstalledPlugin]:
    """Every installed entry point of the group, with ``blocked`` set by the environment switches."""
    allowed = _allow_list()
    disabled = _autoload_disabled()
    found = []
    for ep in metadata.entry_points(group=PROJECT):
        dist = ep.dist
        found.append(InstalledPlugin(
            name=ep.name, value=ep.value,
            distribution=dist.metadata["Name"] if dist else "?", version=dist.version if dist else "?",
            blocked=disabled or (allowed is not None and ep.name not in allowed)))
    return sorted(found, key=lambda p: p.name)


def get_plugin_manager(plugins: Iterable[object] = (), autoload: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-in plugin, installed plugins and ``plugins`` registered."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_adapters, name=BUILTIN_PLUGIN_NAME)
    if autoload and not _autoload_disabled():
        for plugin in installed_plugins():
            if plugin.blocked:
                pm.set_blocked(plugin.name)
        try:
            pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # an installed plugin failed to import: say which one, keep the cause
            raise PluginError(f"an installed batchplex plugin failed to load: {exc!r} (block it with "
                              f"{ALLOW_LIST_ENV}=<the others> or {DISABLE_AUTOLOAD_ENV}=1)") from exc
    for plugin in plugins:
        pm.register(plugin, name=_plugin_name(plugin))
    pm.check_pending()
    return pm


def _plugin_name(plugin: object) -> str:
    name = getattr(plugin, "__name__", None) or type(plugin).__name__
    return f"{name}-{id(plugin):x}"


class PluginHost:
    """Owns the plugin manager and the adapter registry built from its ``register_adapters`` hook."""

    def __init__(self, plugins: Iterable[object] = (), autoload: bool = True) -> None:
        self.pm = get_plugin_manager(plugins, autoload)
        self._adapters: dict[str, tuple[Adapter, str]] = {}
        for plugin_name in self._plugins_with("register_adapters"):
            self._collect(plugin_name)
        self._batch_observers = bool(self.pm.hook.batch_finished.get_hookimpls())

    def _plugins_with(self, hook_name: str) -> list[str]:
        caller = getattr(self.pm.hook, hook_name)
        return [impl.plugin_name for impl in reversed(caller.get_hookimpls())]

    def _collect(self, plugin_name: str) -> None:
        def register(adapter: Adapter) -> None:
            self._add_adapter(adapter, plugin_name)

        caller = self.pm.subset_hook_caller(
            "register_adapters", remove_plugins=[p for n, p in self.pm.list_name_plugin() if n != plugin_name])
        caller(register=register)

    def _add_adapter(self, adapter: Adapter, plugin_name: str) -> None:
        if not isinstance(adapter, Adapter):
            raise PluginError(f"plugin {plugin_name!r} registered {adapter!r}, which is not a batchplex.Adapter")
        if not adapter.name:
            raise PluginError(f"plugin {plugin_name!r} registered {type(adapter).__name__} without a name; "
                              f"set the class attribute `name`")
        if adapter.name in self._adapters:
            _, owner = self._adapters[adapter.name]
            raise DuplicateAdapterError(
                f"adapter name {adapter.name!r} is registered by both plugin {owner!r} and plugin "
                f"{plugin_name!r}; rename one adapter or block one plugin ({ALLOW_LIST_ENV})")
        self._adapters[adapter.name] = (adapter, plugin_name)

    def register_plugin(self, plugin: object) -> None:
        """Register a plugin at run time and collect its adapters."""
        name = _plugin_name(plugin)
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        if name in self._plugins_with("register_adapters"):
            self._collect(name)
        self._batch_observers = bool(self.pm.hook.batch_finished.get_hookimpls())

    def register_adapter(self, adapter: Adapter, owner: str = "run-time") -> None:
        """Register one adapter object directly (no plugin needed)."""
        self._add_adapter(adapter, owner)

    def adapter(self, name: str) -> Adapter:
        try:
            return self._adapters[name][0]
        except KeyError:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise UnknownAdapterError(
                f"no adapter named {name!r} is registered (known: {known}); install the plugin that provides it "
                f"or register it with Scheduler.register_adapter()") from None

    def adapters(self) -> dict[str, str]:
        """Adapter name -> name of the plugin that registered it."""
        return {name: owner for name, (_, owner) in sorted(self._adapters.items())}

    def example_workloads(self, device: Any) -> list[Any]:
        """Every installed plugin's example workloads for ``device``, in registration order."""
        return [workload for offered in reversed(self.pm.hook.example_workloads(device=device))
                for workload in offered]

    def batch_finished(self, record: Any) -> None:
        if self._batch_observers:
            self.pm.hook.batch_finished(record=record)
