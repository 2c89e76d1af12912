"""S5 objective ``logit_adjusted``: the multi-exit loss on logits shifted by the client's own label prior.

Under label skew a client's softmax learns its own class prior: the classes it lacks are pushed
down at every step, and the global model forgets them. Logit adjustment (balanced softmax, Ren
et al. 2020; FedLC, Zhang et al., ICML 2022) trains ``z + tau * log p_k`` instead of ``z``, where
``p_k`` is client k's share of each class: the prior is explained by the shift, so the logits
``z`` themselves learn ``p(y | x)`` under a uniform prior, the same at every client. A class the
client has no example of counts as one example (a finite shift that all but masks it, as in
restricted softmax). With balanced classes the shift is the same for every class and the loss is
exactly the cross-entropy. Every exit's logits are shifted, for the cross-entropy and for the
self-distillation between exits; at inference nothing changes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from nni_fedexit.federated.objectives.base import ObjectiveContext
from nni_fedexit.federated.objectives.multi_exit import MultiExitObjective

__all__ = ["LogitAdjusted", "label_prior_shift"]


def label_prior_shift(class_counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau * log p`` with ``p`` the class shares of ``class_counts`` (an absent class counts as one example)."""
    counts = class_counts.to(torch.float64).clamp(min=1.0)
    return (tau * torch.log(counts / counts.sum())).to(torch.float32)


class LogitAdjusted(MultiExitObjective):
    """``logit_adjusted``: :class:`MultiExitObjective` on ``z + tau * log p_client`` at every exit."""

    class Params(MultiExitObjective.Params):
        tau: float = Field(1.0, gt=0, description="tau of the shift tau * log p_client of every exit's logits")

    def begin(self, ctx: ObjectiveContext) -> None:
        if ctx.class_counts is None:
            raise ValueError("objective 'logit_adjusted' needs the client's class counts (ObjectiveContext.class_counts)")
        ctx.scratch["shift"] = label_prior_shift(ctx.class_counts, self.params.tau)

    def loss(self, ctx: ObjectiveContext, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        shift = ctx.scratch["shift"].to(outputs[0].device)
        return super().loss(ctx, [z + shift for z in outputs], labels)
