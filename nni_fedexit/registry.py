"""Named implementations chosen from a run config: aggregators, client objectives, backends.

A :class:`Registry` maps names to classes or functions, or to ``"module:attribute"`` strings that
are imported on first use (so a backend's heavy dependency, e.g. flwr, loads only when a run
uses it). An unknown name is a ``ValueError`` that names the settings key and the choices.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Registry"]


class Registry:
    """Names -> implementations of one kind; ``key`` is the settings field that picks one."""

    def __init__(self, key: str, entries: dict[str, Any] | None = None):
        self.key = key
        self.entries: dict[str, Any] = dict(entries or {})

    def register(self, name: str, value: Any = None) -> Any:
        """``register(name, value)``, or ``@register(name)`` as a class or function decorator."""
        if value is not None:
            self.entries[name] = value
            return value

        def decorator(obj: Any) -> Any:
            self.entries[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Any:
        """The implementation registered as ``name`` (imported now if it was registered by path)."""
        try:
            value = self.entries[name]
        except KeyError:
            raise ValueError(f"{self.key}: must be one of {self.names()}, got {name!r}") from None
        if isinstance(value, str):
            module, _, attr = value.partition(":")
            value = self.entries[name] = getattr(importlib.import_module(module), attr)
        return value

