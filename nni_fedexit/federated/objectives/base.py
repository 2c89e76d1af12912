"""The client-objective seam: what an edge client minimises when it trains its branch model.

An objective sees the branch (or, in depth-wise training, each segment the client trains in
turn: :meth:`ClientObjective.begin` and :meth:`ClientObjective.end` run once per part), its exit
outputs, the labels, the round's global weights, the client's class counts and its own state (kept from round to round: by the simulation backend, in its checkpoint; on a
Flower SuperNode, in the node's ``context.state``), so FedProx-, FedDyn- or distillation-style
objectives are one file each. Register a new one with :func:`register_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from nni_fedexit.components import ComponentParams, params_for
from nni_fedexit.exits import BranchModel
from nni_fedexit.registry import Registry

__all__ = ["OBJECTIVES", "ClientObjective", "ObjectiveContext", "register_objective", "make_objective", "objective_names"]


@dataclass
class ObjectiveContext:
    """What an objective may look at during one client's local training in one round."""

    branch: BranchModel
    #: the global model's entries as the server sent them this round (the branch's keys at least)
    global_state: Mapping[str, torch.Tensor]
    #: this client's own state: tensors by name, kept across rounds (the objective updates it in place)
    client_state: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = 0
    client: int | None = None
    #: the objective's working values for this one local training (e.g. the global weights on the device)
    scratch: dict[str, Any] = field(default_factory=dict)
    #: how many examples of each class the client's data holds (None: not known)
    class_counts: torch.Tensor | None = None
    #: which part of this local training ``branch`` is, of how many: a client trains its branch
    #: (one part) or, depth-wise, its branch and then each deeper segment (federated/depthwise.py)
    part: int = 0
    parts: int = 1


class ClientObjective:
    """A client's training objective. Subclasses implement :meth:`loss`; stateful ones :meth:`end`."""

    #: the objective's parameters, declared once as a nested model (the run config sets them in
    #: its section: ``objective: {name: ..., ...}``); read from ``self.params``
    Params = ComponentParams

    def __init__(self, settings: Any = None, params: ComponentParams | None = None):
        self.settings = settings
        self.params = params_for(type(self), "objective", settings, params)

    def begin(self, ctx: ObjectiveContext) -> None:
        """Called before each part's local epochs (e.g. to snapshot the global weights of its parameters)."""

    def loss(self, ctx: ObjectiveContext, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The loss of one batch: ``outputs`` are the logits of the branch's exits, in order."""
        raise NotImplementedError

    def end(self, ctx: ObjectiveContext) -> None:
        """Called after each part's local epochs: update ``ctx.client_state`` for the next round
        (``ctx.part == ctx.parts - 1``: the client's last part of this round)."""


OBJECTIVES = Registry("objective", {
    "multi_exit": "nni_fedexit.federated.objectives.multi_exit:MultiExitObjective",
    "logit_adjusted": "nni_fedexit.federated.objectives.label_skew:LogitAdjusted",
    "fedprox": "nni_fedexit.federated.objectives.regularised:FedProxObjective",
    "feddyn": "nni_fedexit.federated.objectives.regularised:FedDynObjective",
})
#: class decorator: ``@register_objective("name")`` makes a ClientObjective subclass ``federated.objective: name``
register_objective = OBJECTIVES.register
objective_names = OBJECTIVES.names


def make_objective(settings: Any) -> ClientObjective:
    """The objective ``settings.objective`` names, built for this run (``settings``: its FederatedSettings)."""
    return OBJECTIVES.build(settings)
