"""S5 backends, by name (``federated.backend``): where the clients of a federated run train.

simulation.py  ``simulation``: clients trained in this process, one after another (the default)
flower/        ``flower``: the SuperNodes of a Flower SuperLink (real edge devices);
               ``flower-simulation``: the same ServerApp and ClientApp on virtual SuperNodes of
               Flower's simulation engine (Ray: this machine, or a Ray cluster)

A backend is a function ``run(model, settings, data, costs, on_record, **options) -> RunOutcome``
that drives :class:`~nni_fedexit.federated.rounds.RoundEngine` (in this process, or in a Flower
ServerApp) and returns what the rounds produced. Register one with :func:`register_backend`;
the registry imports a backend's module only when a run uses it (so ``flwr`` stays optional).
"""

from __future__ import annotations

from nni_fedexit.registry import Registry

__all__ = ["BACKENDS", "register_backend", "get_backend", "backend_names"]

BACKENDS = Registry("backend", {
    "simulation": "nni_fedexit.federated.backends.simulation:run_simulation",
    "flower": "nni_fedexit.federated.backends.flower.submit:run_on_flower",
    "flower-simulation": "nni_fedexit.federated.backends.flower.simulation_engine:run_on_flower_simulation",
})
#: ``register_backend(name, run)``: ``run`` a function, or ``"module:function"`` imported on first use
register_backend = BACKENDS.register
backend_names = BACKENDS.names
#: the run function of a backend, by name
get_backend = BACKENDS.get
