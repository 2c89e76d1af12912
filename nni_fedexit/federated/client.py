"""S5: one edge client's local training of its branch model (claim 1, S5; claims 6 and 7).

E local epochs of SGD with momentum on the client's own partition; the loss is the weighted sum
of cross-entropies over the exits the branch holds. Returns only the branch's entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nni_fedexit.data import ImageData
from nni_fedexit.exits import BranchModel, multi_exit_loss
from nni_fedexit.training import TrainSettings, train_classifier

__all__ = ["LocalSettings", "ClientUpdate", "train_local"]


@dataclass
class LocalSettings:
    epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class ClientUpdate:
    """What a client sends back: its branch's state dict, its sample count, its training loss."""

    client: int
    depth: int
    state: dict[str, torch.Tensor]
    num_samples: int
    loss: float


def train_local(
    client: int, branch: BranchModel, data: ImageData, settings: LocalSettings, lr: float, seed: int
) -> ClientUpdate:
    """Train ``branch`` in place on ``data``; return a copy of its state dict on the CPU."""
    losses = train_classifier(
        branch, data,
        TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size, lr=lr, momentum=settings.momentum,
                      weight_decay=settings.weight_decay, seed=seed, schedule="constant"),
        loss_fn=lambda outputs, y: multi_exit_loss(outputs, y, branch.loss_weights),
    )
    state = {k: v.detach().to("cpu", copy=True) for k, v in branch.state_dict().items()}
    return ClientUpdate(client, branch.depth, state, len(data), losses[-1])
