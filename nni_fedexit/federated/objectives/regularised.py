"""S5 objectives ``fedprox`` and ``feddyn``: the multi-exit loss (with its self-distillation) plus a
term that keeps a skewed client from drifting away from the global model.

- ``fedprox`` (Li et al., MLSys 2020): ``+ mu/2 * ||w - w_global||^2`` over the branch's parameters.
- ``feddyn`` (Acar et al., ICLR 2021): ``- <g_k, w> + alpha/2 * ||w - w_global||^2``, where ``g_k``
  is client k's own state, kept from round to round (in the checkpoint on the simulation backend,
  in the SuperNode's ``context.state`` on Flower) and updated after each local training by
  ``g_k <- g_k - alpha * (w_k - w_global)``. Only the client side of FedDyn: the server
  aggregates with the run's aggregator.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from nni_fedexit.federated.objectives.base import ObjectiveContext
from nni_fedexit.federated.objectives.multi_exit import MultiExitObjective

__all__ = ["DriftRegularised", "FedProxObjective", "FedDynObjective"]

#: the client-state names of FedDyn's gradient state: ``dyn/<parameter of the model>``
DYN_STATE_PREFIX = "dyn/"


def _anchor(ctx: ObjectiveContext) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, parameter, its global value on the parameter's device) for every trained parameter."""
    out = []
    for name, p in ctx.branch.named_parameters():
        if p.requires_grad and name in ctx.global_state:
            out.append((name, p, ctx.global_state[name].detach().to(p.device, p.dtype)))
    return out


def _squared_distance(anchor: Sequence[tuple[str, torch.nn.Parameter, torch.Tensor]]) -> torch.Tensor:
    return sum(((p - g) ** 2).sum() for _, p, g in anchor)  # type: ignore[return-value]


class DriftRegularised(MultiExitObjective):
    """The multi-exit loss plus ``penalty(ctx)``, a term on the branch's distance from the global
    model; :meth:`begin` puts the global weights on the device once per local training."""

    @property
    def strength(self) -> float:
        """The strength of the term, from the parameters (0: the plain multi-exit objective)."""
        raise NotImplementedError

    def begin(self, ctx: ObjectiveContext) -> None:
        ctx.scratch["anchor"] = _anchor(ctx)

    def penalty(self, ctx: ObjectiveContext) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, ctx: ObjectiveContext, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        total = super().loss(ctx, outputs, labels)
        return total + self.penalty(ctx) if self.strength > 0 else total


class FedProxObjective(DriftRegularised):
    """The multi-exit loss plus FedProx's proximal term ``mu / 2 * ||w - w_global||^2``."""

    class Params(MultiExitObjective.Params):
        mu: float = Field(0.01, ge=0, description="mu of the proximal term mu/2 * ||w - w_global||^2")

    @property
    def strength(self) -> float:
        return self.params.mu

    def penalty(self, ctx: ObjectiveContext) -> torch.Tensor:
        return self.strength / 2 * _squared_distance(ctx.scratch["anchor"])


class FedDynObjective(DriftRegularised):
    """The multi-exit loss plus FedDyn's dynamic regulariser, with per-client gradient state."""

    class Params(MultiExitObjective.Params):
        alpha: float = Field(0.01, ge=0, description="alpha of FedDyn's regulariser (each client's gradient "
                             "state is kept across rounds)")

    @property
    def strength(self) -> float:
        return self.params.alpha

    def begin(self, ctx: ObjectiveContext) -> None:
        super().begin(ctx)
        grads = {}
        for name, p, _ in ctx.scratch["anchor"]:
            g = ctx.client_state.get(DYN_STATE_PREFIX + name)
            if g is None:
                continue
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"FedDyn state {DYN_STATE_PREFIX + name!r} has shape {tuple(g.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            grads[name] = g.to(p.device, p.dtype)
        ctx.scratch["dyn"] = grads

    def penalty(self, ctx: ObjectiveContext) -> torch.Tensor:
        anchor, grads = ctx.scratch["anchor"], ctx.scratch["dyn"]
        linear = sum((grads[n] * p).sum() for n, p, _ in anchor if n in grads)
        return self.strength / 2 * _squared_distance(anchor) - linear

    def end(self, ctx: ObjectiveContext) -> None:
        if self.strength <= 0:
            return
        with torch.no_grad():
            for name, p, g_global in ctx.scratch["anchor"]:
                old = ctx.scratch["dyn"].get(name)
                step = self.strength * (p.detach() - g_global)
                new = -step if old is None else old - step
                ctx.client_state[DYN_STATE_PREFIX + name] = new.to("cpu", torch.float32)
