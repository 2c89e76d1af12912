"""The aggregator seam: how the server turns a round's client updates into the new global model.

An :class:`Aggregator` lives for a whole run (it may keep server-side state, e.g. a server
optimiser's moments, saved in the checkpoint through :meth:`Aggregator.state_dict`); each round
it opens a :class:`RoundAggregate` that takes the accepted updates one at a time, so a backend
never holds more than one client update. Register a new rule with :func:`register_aggregator`.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from nni_fedexit.components import ComponentParams, params_for
from nni_fedexit.registry import Registry

__all__ = ["AGGREGATORS", "Aggregator", "RoundAggregate", "register_aggregator", "make_aggregator", "aggregator_names"]

State = Mapping[str, torch.Tensor]


class RoundAggregate(Protocol):
    """One round's aggregation: ``add`` each accepted update, then take ``result``."""

    #: updates added so far
    count: int

    def add(self, update: State, weight: float) -> None:
        """Add a client's update (its branch's entries) with its weight; raise ``UpdateRejected`` to refuse it."""

    def result(self) -> dict[str, torch.Tensor]:
        """The new global state (every entry of the global model)."""


class Aggregator:
    """A server aggregation rule. Subclasses implement :meth:`begin`; stateful ones the state methods.

    A rule with parameters declares them as a nested ``Params`` model (its defaults and their
    documentation, once); the run config sets them in its section (``aggregator: {name: ..., ...}``)
    and the rule reads them from ``self.params``."""

    Params = ComponentParams

    def __init__(self, settings: Any = None, params: ComponentParams | None = None):
        self.settings = settings
        self.params = params_for(type(self), "aggregator", settings, params)

    def begin(self, global_state: State) -> RoundAggregate:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side state to checkpoint (tensors by name; empty for a stateless rule)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (a resumed run)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state, but the checkpoint holds {sorted(state)[:3]}")


AGGREGATORS = Registry("aggregator", {
    "fedavg": "nni_fedexit.federated.aggregators.fedavg:FedAvg",
    "fedavgm": "nni_fedexit.federated.aggregators.server_opt:FedAvgM",
    "fedadam": "nni_fedexit.federated.aggregators.server_opt:FedAdam",
    "fedyogi": "nni_fedexit.federated.aggregators.server_opt:FedYogi",
})
#: class decorator: ``@register_aggregator("name")`` makes an Aggregator subclass ``federated.aggregator: name``
register_aggregator = AGGREGATORS.register
aggregator_names = AGGREGATORS.names


def make_aggregator(settings: Any) -> Aggregator:
    """The aggregator ``settings.aggregator`` names, built for this run (``settings``: its FederatedSettings)."""
    return AGGREGATORS.build(settings)
