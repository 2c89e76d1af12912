"""S5 objective ``multi_exit``: claim 6's total loss, ``sum_i lambda_i * CE(softmax(z_i), y)`` over
the exits the branch trains (every exit along it, or its last one only: ``branch_all_exits``),
plus, with ``distill_weight > 0``, self-distillation between those exits (DepthFL's mutual
distillation: each exit learns the softened predictions of the others, which are not
differentiated through)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from nni_fedexit.components import ComponentParams
from nni_fedexit.exits import multi_exit_loss
from nni_fedexit.federated.objectives.base import ClientObjective, ObjectiveContext

__all__ = ["MultiExitObjective", "self_distillation"]


def self_distillation(outputs: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """``sum_i mean_{j != i} T^2 * KL(softmax(z_j / T) || softmax(z_i / T))``, teachers detached.

    Zero for a branch with one exit.
    """
    if len(outputs) < 2:
        return outputs[0].new_zeros(()) if outputs else torch.zeros(())
    log_p = [F.log_softmax(z / temperature, dim=1) for z in outputs]
    total = outputs[0].new_zeros(())
    for i, student in enumerate(log_p):
        for j, teacher in enumerate(log_p):
            if i != j:
                kl = F.kl_div(student, teacher.detach(), reduction="batchmean", log_target=True)
                total = total + kl * temperature ** 2 / (len(outputs) - 1)
    return total


class MultiExitObjective(ClientObjective):
    """The weighted multi-exit cross-entropy with the branch's ``loss_weights``, plus
    ``distill_weight`` times :func:`self_distillation` (stateless)."""

    class Params(ComponentParams):
        distill_weight: float = Field(1.0, ge=0, description="self-distillation between the exits a branch holds "
                                      "(DepthFL): weight of the mutual KL term (0: off)")
        distill_temperature: float = Field(1.0, gt=0, description="softmax temperature of that KL term")

    def loss(self, ctx: ObjectiveContext, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        total = multi_exit_loss(outputs, labels, ctx.branch.loss_weights)
        weight = self.params.distill_weight
        if weight > 0 and len(outputs) > 1:
            total = total + weight * self_distillation(outputs, self.params.distill_temperature)
        return total
