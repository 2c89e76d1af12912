"""S5 backends, by name (``federated.backend``): where the clients of a federated run train.

simulation.py  ``simulation``: clients trained in this process, one after another (the default)
flower/        ``flower``: the SuperNodes of a Flower SuperLink (real edge devices)

A backend is a function ``run(model, settings, data, costs, on_record, **options) -> RunOutcome``
that drives :class:`~nni_fedexit.federated.rounds.RoundEngine` (in this process, or in a Flower
ServerApp) and returns what the rounds produced. Register one with :func:`register_backend`;
the registry imports a backend's module only when a run uses it (so ``flwr`` stays optional).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["register_backend", "get_backend", "backend_names"]

_BACKENDS: dict[str, Callable[..., Any] | str] = {
    "simulation": "nni_fedexit.federated.backends.simulation:run_simulation",
    "flower": "nni_fedexit.federated.backends.flower.submit:run_on_flower",
}


def register_backend(name: str, run: Callable[..., Any] | str) -> None:
    """Make ``run`` (a function, or ``"module:function"`` imported on first use) the backend ``name``."""
    _BACKENDS[name] = run


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Callable[..., Any]:
    """The run function of backend ``name``."""
    try:
        run = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend: must be one of {backend_names()}, got {name!r}") from None
    if isinstance(run, str):
        module, _, attr = run.partition(":")
        run = getattr(importlib.import_module(module), attr)
        _BACKENDS[name] = run
    return run
