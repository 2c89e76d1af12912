"""S5 objective ``multi_exit``: claim 6's total loss, ``sum_i lambda_i * CE(softmax(z_i), y)`` over
the exits the branch trains (every exit along it, or its last one only: ``branch_all_exits``)."""

from __future__ import annotations

from typing import Sequence

import torch

from nni_fedexit.exits import multi_exit_loss
from nni_fedexit.federated.objectives.base import ClientObjective, ObjectiveContext, register_objective

__all__ = ["MultiExitObjective"]


@register_objective("multi_exit")
class MultiExitObjective(ClientObjective):
    """The weighted multi-exit cross-entropy with the branch's ``loss_weights`` (stateless)."""

    def loss(self, ctx: ObjectiveContext, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return multi_exit_loss(outputs, labels, ctx.branch.loss_weights)
