"""Plain supervised training and evaluation on in-memory tensors.

Used to train one sampled architecture (the demo, ``trials`` search mode) and to score models;
the federated clients' local training builds on the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from nni_fedexit.data import ImageData

__all__ = ["TrainSettings", "train_classifier", "evaluate_accuracy"]


@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    #: stop an epoch after this many batches (None: the whole epoch); keeps CPU runs short
    max_batches: int | None = None
    #: "cosine" anneals the learning rate to 0 over the run; "constant" keeps it (federated rounds
    #: schedule it across rounds instead)
    schedule: str = "cosine"
    #: parts each batch is cut into, its gradient accumulated over them: the activations kept for
    #: backward are those of one part (a memory-bound client, federated/depthwise.py)
    micro_batches: int = 1


LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def train_classifier(
    model: nn.Module, data: ImageData, settings: TrainSettings, progress: bool = False, loss_fn: LossFn | None = None,
) -> list[float]:
    """SGD with momentum and a cosine learning-rate schedule; returns the mean loss per epoch.

    ``loss_fn(outputs, labels)`` defaults to cross-entropy; a multi-exit network passes its
    weighted sum over exits.
    """
    loss_fn = loss_fn or F.cross_entropy
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    n = len(data)
    per_epoch = -(-n // settings.batch_size)
    if settings.max_batches is not None:
        per_epoch = min(per_epoch, settings.max_batches)
    if settings.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {settings.schedule!r}")
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, per_epoch * settings.epochs))
        if settings.schedule == "cosine" else None
    )
    losses: list[float] = []
    device = next(model.parameters()).device
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        bar = tqdm(range(per_epoch), desc=f"epoch {epoch + 1}/{settings.epochs}", disable=not progress, leave=False)
        for b in bar:
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x, y = data.images[idx].to(device, non_blocking=True), data.labels[idx].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            if settings.micro_batches == 1:
                loss = loss_fn(model(x), y)
                loss.backward()
            else:  # the batch's mean loss, one part at a time
                loss = x.new_zeros(())
                for xs, ys in zip(x.tensor_split(settings.micro_batches), y.tensor_split(settings.micro_batches)):
                    if len(ys):
                        part = loss_fn(model(xs), ys) * (len(ys) / len(y))
                        part.backward()
                        loss = loss + part.detach()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.3f}")
        losses.append(total / max(seen, 1))
    return losses


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: ImageData, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.images[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == data.labels[start : start + batch_size]).sum())
    return correct / max(len(data), 1)
