"""Named implementations chosen from a run config: aggregators, client objectives, backends.

A :class:`Registry` maps names to classes or functions, or to ``"module:attribute"`` strings that
are imported on first use (so a backend's heavy dependency, e.g. flwr, loads only when a run
uses it). Three sources, in this order of precedence:

1. :meth:`Registry.register` in this process (a notebook, a script that runs the stages itself);
2. the package's own implementations (by path, imported when a run names them);
3. the installed distributions' entry points in the registry's group (``nni_fedexit.aggregators``,
   ``nni_fedexit.objectives``, ``nni_fedexit.backends``), read from ``importlib.metadata`` the
   first time a name is looked up, so a plugin is found in every process where training runs (an
   NNI trial, a Flower SuperNode or ServerApp, a Ray actor) without anyone importing it first.

An unknown name is a ``ValueError`` that names the settings key and the choices. A plugin that
takes a built-in name is ignored with a warning (the built-in keeps its meaning).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Mapping

from nni_fedexit.components import SettingsError, choose, component_params

__all__ = ["Registry", "ENTRY_POINT_GROUPS"]

log = logging.getLogger(__name__)

#: the entry-point group of each kind of component a plugin distribution can add
ENTRY_POINT_GROUPS = {
    "aggregator": "nni_fedexit.aggregators",
    "objective": "nni_fedexit.objectives",
    "backend": "nni_fedexit.backends",
}


def _takes_params(component: Any) -> bool:
    """Whether ``component(settings, params=...)`` is a valid call."""
    try:
        signature = inspect.signature(component)
    except (TypeError, ValueError):
        return True
    return any(p.name == "params" or p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


class Registry:
    """Names -> implementations of one kind; ``key`` is the settings field that picks one."""

    def __init__(self, key: str, entries: dict[str, Any] | None = None, group: str | None = None):
        self.key = key
        #: the entry-point group plugins of this kind are announced in (default: the key's, if it has one)
        self.group = group or ENTRY_POINT_GROUPS.get(key)
        self.entries: dict[str, Any] = dict(entries or {})
        self.builtin = frozenset(self.entries)
        #: entry points of ``group``, by name (read once, on the first lookup)
        self.plugins: dict[str, EntryPoint] | None = None

    def register(self, name: str, value: Any = None) -> Any:
        """``register(name, value)``, or ``@register(name)`` as a class or function decorator."""
        if value is not None:
            self.entries[name] = value
            return value

        def decorator(obj: Any) -> Any:
            self.entries[name] = obj
            return obj

        return decorator

    def discover(self) -> dict[str, EntryPoint]:
        """The installed plugins of this kind (entry points of :attr:`group`), read once."""
        if self.plugins is None:
            found: dict[str, EntryPoint] = {}
            for point in entry_points(group=self.group) if self.group else ():
                if point.name in self.builtin:
                    log.warning("%s %r from entry point %s (%s) ignored: %r is built in", self.key, point.name,
                                point.value, self.group, point.name)
                elif point.name in found and found[point.name].value != point.value:
                    log.warning("%s %r: two plugins give it (%s, %s); the first is used", self.key, point.name,
                                found[point.name].value, point.value)
                else:
                    found.setdefault(point.name, point)
            self.plugins = found
        return self.plugins

    def names(self) -> list[str]:
        return sorted(set(self.entries) | set(self.discover()))

    def choose(self, value: Any) -> dict[str, Any]:
        """A settings section choosing one implementation (a name, or ``{name: ..., <parameters>}``)
        as its canonical mapping: the name and every parameter the implementation declares."""
        name = value.get("name") if isinstance(value, Mapping) else value
        if not isinstance(name, str):
            return choose(self.key, value, None)  # the error that names the section
        try:
            component = self.get(name)
        except ValueError as err:
            raise SettingsError(f"{self.key}.name: {str(err).removeprefix(self.key + ': ')}"
                                if isinstance(value, Mapping) else str(err)) from None
        return choose(self.key, value, component)

    def build(self, settings: Any) -> Any:
        """The implementation ``settings.<key>`` chooses, built as ``cls(settings, params=...)``
        with its own validated parameters from that section (a class whose ``__init__`` takes
        no ``params``, written before components declared theirs, is built as ``cls(settings)``)."""
        section = self.choose(getattr(settings, self.key))
        component = self.get(section.pop("name"))
        params = component_params(component)(**section)
        if _takes_params(component):
            return component(settings, params=params)
        built = component(settings)
        if getattr(built, "params", None) is None:
            built.params = params
        return built

    def get(self, name: str) -> Any:
        """The implementation registered as ``name`` (imported now if it was registered by path or
        comes from a plugin's entry point)."""
        if name not in self.entries:
            point = self.discover().get(name) if isinstance(name, str) else None
            if point is None:
                raise ValueError(f"{self.key}: must be one of {self.names()}, got {name!r}")
            try:
                self.entries[name] = point.load()
            except Exception as err:
                dist = point.dist.name if point.dist is not None else "?"
                raise ValueError(f"{self.key}: {name!r} comes from the plugin {dist!r} (entry point {point.value} in "
                                 f"{self.group}), which failed to load: {type(err).__name__}: {err}; fix or "
                                 f"uninstall that distribution") from err
            return self.entries[name]
        value = self.entries[name]
        if isinstance(value, str):
            module, _, attr = value.partition(":")
            value = self.entries[name] = getattr(importlib.import_module(module), attr)
        return value
