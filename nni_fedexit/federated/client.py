"""S5: one edge client's local training of its branch model (claim 1, S5; claims 6 and 7).

E local epochs of SGD with momentum on the client's own partition, minimising the run's client
objective (``multi_exit`` by default: the weighted sum of cross-entropies over the exits the
branch holds). Returns only the branch's entries. Every backend calls :func:`train_local`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from nni_fedexit.data import ImageData
from nni_fedexit.exits import BranchModel
from nni_fedexit.federated.batchnorm import keep_local_bn, restore_local_bn
from nni_fedexit.federated.objectives import ClientObjective, MultiExitObjective, ObjectiveContext
from nni_fedexit.training import TrainSettings, train_classifier

__all__ = ["LocalSettings", "ClientUpdate", "train_local"]


@dataclass
class LocalSettings:
    epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: FedBN: the client keeps its BatchNorm layers across rounds and does not send them
    local_bn: bool = False


@dataclass
class ClientUpdate:
    """What a client sends back: its branch's state dict, its sample count, its training loss.

    ``client_state`` is the objective's per-client state after this round; it stays with the
    client (it is never averaged).
    """

    client: int
    depth: int
    state: dict[str, torch.Tensor]
    num_samples: int
    loss: float
    client_state: dict[str, torch.Tensor] = field(default_factory=dict)


def train_local(
    client: int, branch: BranchModel, data: ImageData, settings: LocalSettings, lr: float, seed: int,
    objective: ClientObjective | None = None, global_state: Mapping[str, torch.Tensor] | None = None,
    client_state: dict[str, torch.Tensor] | None = None, round: int = 0,
) -> ClientUpdate:
    """Train ``branch`` in place on ``data``; return a copy of its state dict on the CPU.

    ``global_state`` is the round's global model as the server sent it (default: the branch's
    weights before training); ``objective`` defaults to the multi-exit loss. With
    ``settings.local_bn`` the client's own BatchNorm layers (kept in ``client_state``) replace the
    global ones before training, and stay out of the update.
    """
    objective = objective or MultiExitObjective()
    client_state = dict(client_state or {})
    if settings.local_bn:
        restore_local_bn(branch, client_state)
    if global_state is None:
        global_state = {k: v.detach().clone() for k, v in branch.state_dict().items()}
    ctx = ObjectiveContext(branch, global_state, client_state, round, client)
    objective.begin(ctx)
    losses = train_classifier(
        branch, data,
        TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size, lr=lr, momentum=settings.momentum,
                      weight_decay=settings.weight_decay, seed=seed, schedule="constant"),
        loss_fn=lambda outputs, y: objective.loss(ctx, outputs, y),
    )
    objective.end(ctx)
    state = {k: v.detach().to("cpu", copy=True) for k, v in branch.state_dict().items()}
    if settings.local_bn:
        keep_local_bn(branch, state, ctx.client_state)
    return ClientUpdate(client, branch.depth, state, len(data), losses[-1], ctx.client_state)
