"""S5 aggregators ``fedavgm``, ``fedadam``, ``fedyogi``: a server optimiser on the depth-aware mean.

Each round the depth-aware :class:`~nni_fedexit.federated.aggregators.fedavg.WeightedMean` gives,
for every parameter some client held, its mean ``m``; the pseudo-gradient is ``d = m - w``
(``w``: the global value). The server then steps, per parameter and only for the parameters that
received updates this round (a deep stage no client trained keeps its value and its moments):

- ``fedavgm`` (Hsu et al. 2019): ``v <- momentum * v + d``; ``w <- w + lr * v``
- ``fedadam`` (Reddi et al., ICLR 2021): ``m1 <- b1*m1 + (1-b1)*d``; ``v <- b2*v + (1-b2)*d^2``;
  ``w <- w + lr * m1 / (sqrt(v) + tau)``
- ``fedyogi``: as fedadam, with ``v <- v - (1-b2) * d^2 * sign(v - d^2)``

BatchNorm running statistics and integer entries are not optimised: they take the plain mean.
The moments are the aggregator's state and go into the checkpoint (``server.safetensors``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from pydantic import Field

from nni_fedexit.components import ComponentParams
from nni_fedexit.federated.aggregators.base import Aggregator
from nni_fedexit.federated.aggregators.fedavg import WeightedMean
from nni_fedexit.federated.batchnorm import is_bn_statistic

__all__ = ["ServerOptimizer", "FedAvgM", "FedAdam", "FedYogi"]

State = Mapping[str, torch.Tensor]


class ServerStep(WeightedMean):
    """One round: the weighted mean of the updates, then the aggregator's step from the global state."""

    def __init__(self, global_state: State, optimizer: "ServerOptimizer"):
        super().__init__(global_state)
        self.optimizer = optimizer

    def result(self) -> dict[str, torch.Tensor]:
        mean = super().result()
        out: dict[str, torch.Tensor] = {}
        updated = self.updated
        for key, old in self.global_state.items():
            if key not in updated or not old.is_floating_point() or is_bn_statistic(key):
                out[key] = mean[key]
                continue
            w = old.detach().to("cpu", torch.float64)
            delta = mean[key].to("cpu", torch.float64) - w
            out[key] = (w + self.optimizer.step(key, delta)).to(dtype=old.dtype, device=old.device)
        return out


class ServerOptimizer(Aggregator):
    """The depth-aware mean followed by a per-parameter server step (subclasses: :meth:`step`)."""

    #: the moments this rule keeps per parameter
    moments: tuple[str, ...] = ()

    def __init__(self, settings: Any = None, params: ComponentParams | None = None):
        super().__init__(settings, params)
        self.state: dict[str, dict[str, torch.Tensor]] = {m: {} for m in self.moments}

    def begin(self, global_state: State) -> ServerStep:
        return ServerStep(global_state, self)

    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """The change of parameter ``key`` given its pseudo-gradient ``delta`` (float64, CPU)."""
        raise NotImplementedError

    def moment(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        return self.state[name].get(key, torch.zeros_like(like))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{m}/{k}": v.clone() for m, values in self.state.items() for k, v in values.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        loaded: dict[str, dict[str, torch.Tensor]] = {m: {} for m in self.moments}
        for name, value in state.items():
            moment, _, key = name.partition("/")
            if moment not in loaded or not key:
                raise ValueError(f"{type(self).__name__} keeps the moments {list(self.moments)}, "
                                 f"but the checkpoint holds {name!r}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"its moment {name!r} holds NaN or Inf values")
            loaded[moment][key] = value.to("cpu", torch.float64)
        self.state = loaded


class FedAvgM(ServerOptimizer):
    """``fedavgm``: server momentum on the depth-aware mean (Hsu et al. 2019)."""

    class Params(ComponentParams):
        lr: float = Field(1.0, gt=0, description="server step size on the momentum")
        momentum: float = Field(0.9, ge=0, lt=1, description="server momentum beta")

    moments = ("momentum",)

    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        v = self.params.momentum * self.moment("momentum", key, delta) + delta
        self.state["momentum"][key] = v
        return self.params.lr * v


class FedAdam(ServerOptimizer):
    """``fedadam``: Adam on the server's pseudo-gradient (Reddi et al., ICLR 2021)."""

    class Params(ComponentParams):
        lr: float = Field(0.01, gt=0, description="server step size (Reddi et al.'s eta)")
        beta_1: float = Field(0.9, ge=0, lt=1, description="decay of the first moment")
        beta_2: float = Field(0.99, ge=0, lt=1, description="decay of the second moment")
        tau: float = Field(0.001, gt=0, description="adaptivity: added to the second moment's root")

    moments = ("m", "v")

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        beta_2 = self.params.beta_2
        return beta_2 * v + (1 - beta_2) * delta ** 2

    def step(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        p = self.params
        m = p.beta_1 * self.moment("m", key, delta) + (1 - p.beta_1) * delta
        v = self.second_moment(self.moment("v", key, delta), delta)
        self.state["m"][key], self.state["v"][key] = m, v
        return p.lr * m / (v.sqrt() + p.tau)


class FedYogi(FedAdam):
    """``fedyogi``: FedAdam with Yogi's additive second moment (slower to grow under noisy deltas)."""

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        d2 = delta ** 2
        return v - (1 - self.params.beta_2) * d2 * torch.sign(v - d2)
