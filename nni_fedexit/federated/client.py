"""S5: one edge client's local training of its branch model (claim 1, S5; claims 6 and 7).

E local epochs of SGD with momentum on the client's own partition, minimising the run's client
objective (claim 6's weighted sum of cross-entropies over the exits trained, by default on logits
shifted by the client's label prior). In ``branch`` mode (the patent's) the client trains its branch and returns only
its entries; in ``depthwise`` mode it trains every stage, in segments that fit its branch's
memory (depthwise.py), and returns the whole model. Every backend calls :func:`train_local`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn

from nni_fedexit.data import ImageData
from nni_fedexit.exits import BranchModel
from nni_fedexit.federated.batchnorm import keep_local_bn, restore_local_bn
from nni_fedexit.federated.depthwise import CLIENT_TRAINING, SEGMENT_DATA, depthwise_segments
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
    #: "branch": train the branch model given; "depthwise": every stage, in segments within its memory
    mode: str = "branch"
    #: depthwise: "all" (each segment trains on all the client's data: a pass costs more than the
    #: branch's) or "split" (the data is dealt out among the segments: a pass costs about one branch pass)
    segment_data: str = "all"


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
    """Train ``branch`` in place on ``data``; return a copy of what it trained on the CPU.

    ``global_state`` is the round's global model as the server sent it (default: the weights
    before training); ``objective`` defaults to the multi-exit loss. With ``settings.local_bn``
    the client's own BatchNorm layers (kept in ``client_state``) replace the global ones before
    training, and stay out of the update. With ``settings.mode == "depthwise"`` the parts
    trained are the segments of :func:`~nni_fedexit.federated.depthwise.depthwise_segments`, one
    after the other, each for ``settings.epochs`` epochs on all of ``data`` or, with
    ``segment_data="split"``, on its own share of it (a seeded split into equal parts); the
    reported loss is the sum of their last epochs' losses (every exit's loss once).
    """
    objective = objective or MultiExitObjective()
    client_state = dict(client_state or {})
    model: nn.Module = branch
    parts, micro = [branch], [1]
    if settings.mode == "depthwise":
        model = full = branch.full_model
        device = next(full.parameters()).device
        segments = depthwise_segments(full, branch.depth, data.images[: settings.batch_size].to(device))
        parts = [full.segment(seg.first, seg.last) for seg in segments]
        micro = [seg.micro_batches for seg in segments]
    elif settings.mode not in CLIENT_TRAINING:
        raise ValueError(f"client training mode must be one of {list(CLIENT_TRAINING)}, got {settings.mode!r}")
    if settings.segment_data not in SEGMENT_DATA:
        raise ValueError(f"segment_data must be one of {list(SEGMENT_DATA)}, got {settings.segment_data!r}")
    shares = [data] * len(parts)
    if settings.segment_data == "split" and len(parts) > 1:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        shares = [data.subset(idx) for idx in order.tensor_split(len(parts))]
    if settings.local_bn:
        restore_local_bn(model, client_state)
    if global_state is None:
        global_state = {k: v.detach().clone() for part in parts for k, v in part.state_dict().items()}
    counts = torch.bincount(data.labels, minlength=branch.full_model.num_classes)
    loss = 0.0
    for k, part in enumerate(parts):
        ctx = ObjectiveContext(part, global_state, client_state, round, client, class_counts=counts, part=k,
                               parts=len(parts))
        objective.begin(ctx)
        losses = train_classifier(
            part, shares[k],
            TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size, lr=lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, seed=seed + k, schedule="constant",
                          micro_batches=micro[k]),
            loss_fn=lambda outputs, y, ctx=ctx: objective.loss(ctx, outputs, y),
        )
        objective.end(ctx)
        client_state = ctx.client_state
        loss += losses[-1]
    state = {k: v.detach().to("cpu", copy=True) for part in parts for k, v in part.state_dict().items()}
    if settings.local_bn:
        keep_local_bn(model, state, client_state)
    return ClientUpdate(client, branch.depth, state, len(data), loss, client_state)
