"""S5 server step ``server_steps``: the server corrects each new global model on its own labelled images.

S2 gives the server a labelled training split (used for the search and for BatchNorm statistics).
Unlike the clients' data it holds every class in the data set's proportions, so a few SGD steps on
it after every aggregation pull each exit back towards every class, which label-skewed clients
drift away from. What it adds is labelled data the clients do not have: a run with it is no
longer trained on the clients' data alone (the report says so), and the early-exit guarantee is
then certified on server images it never trained on.

The steps train the full model, every exit, with the multi-exit loss and the self-distillation
between exits (``distill_weight``), at the round's learning rate, from a fresh optimiser each
round (no state to checkpoint), on batches drawn by a generator seeded by the round.
"""

from __future__ import annotations

from typing import Any

import torch

from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.federated.objectives import MultiExitObjective, ObjectiveContext
from nni_fedexit.training import TrainSettings, train_classifier

__all__ = ["server_pass", "server_batches"]


def server_batches(size: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of ``steps`` batches of ``batch_size`` into ``size`` images: seeded permutations,
    one after another, so every image is used once before any is used again."""
    if size <= 0:
        raise ValueError("the server has no labelled images to train on")
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(size, generator=gen) for _ in range(-(-need // size))]
    return torch.cat(perms)[:need]


def server_pass(model: MultiExitNetwork, data: ImageData, settings: Any, lr: float, seed: int) -> float:
    """``settings.server_step_count(len(data))`` SGD steps of the full model on ``data`` (see the
    module doc); their mean loss."""
    steps = settings.server_step_count(len(data))
    if steps <= 0:
        return float("nan")
    idx = server_batches(len(data), steps, settings.batch_size, seed)
    batches = ImageData(data.images[idx], data.labels[idx])
    branch = model.branch(model.num_exits, all_exits=True)
    objective = MultiExitObjective(settings)
    ctx = ObjectiveContext(branch, {})
    # the batches are already in their drawn order: train_classifier's own shuffle is seeded too
    losses = train_classifier(branch, batches, TrainSettings(
        epochs=1, batch_size=settings.batch_size, lr=lr, momentum=settings.momentum,
        weight_decay=settings.weight_decay, seed=seed, schedule="constant"),
        loss_fn=lambda outputs, y: objective.loss(ctx, outputs, y))
    model.zero_grad(set_to_none=True)  # the global model keeps no gradients between rounds
    return losses[-1]
