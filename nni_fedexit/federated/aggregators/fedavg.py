"""S5 aggregator ``fedavg``: depth-aware federated averaging (the patent's aggregation; every backend).

Clients train branch models of different depths, so each update holds only some of the global
model's entries. For every parameter and buffer, the new value is the sample-weighted mean over
the clients whose branch holds it; entries no client touched keep their value. Before anything
is averaged, an update is checked: unknown keys, wrong shapes or non-finite values reject it,
with a message naming the key.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from nni_fedexit.federated.aggregators.base import Aggregator
from nni_fedexit.federated.errors import UpdateRejected

__all__ = ["FedAvg", "check_update", "WeightedMean", "aggregate"]

State = Mapping[str, torch.Tensor]


def check_update(global_state: State, update: State) -> None:
    """Raise :class:`UpdateRejected` unless every entry of ``update`` fits ``global_state``."""
    if not update:
        raise UpdateRejected("the update is empty")
    for key, value in update.items():
        if key not in global_state:
            raise UpdateRejected(f"unknown key {key!r} (not in the global model)")
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(f"{key!r} is a {type(value).__name__}, not a tensor")
        want = global_state[key]
        if tuple(value.shape) != tuple(want.shape):
            raise UpdateRejected(f"{key!r} has shape {tuple(value.shape)}, the global model {tuple(want.shape)}")
        if value.is_floating_point() != want.is_floating_point():
            raise UpdateRejected(f"{key!r} has dtype {value.dtype}, the global model {want.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UpdateRejected(f"{key!r} holds NaN or Inf values")


class WeightedMean:
    """Streaming form of :func:`aggregate`: add updates one at a time, then take the result.

    Holds one running sum per entry, so a backend never keeps more than one client update.
    """

    def __init__(self, global_state: State):
        self.global_state = global_state
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self.count = 0

    def add(self, update: State, weight: float) -> None:
        if not weight > 0:
            raise UpdateRejected(f"the update's weight (sample count) must be > 0, got {weight}")
        check_update(self.global_state, update)
        for key, value in update.items():
            v = value.detach().to(device="cpu", dtype=torch.float64) * float(weight)
            if key in self._sums:
                self._sums[key] += v
                self._weights[key] += float(weight)
            else:
                self._sums[key] = v
                self._weights[key] = float(weight)
        self.count += 1

    @property
    def updated(self) -> set[str]:
        """The entries at least one accepted update held this round."""
        return set(self._sums)

    def result(self) -> dict[str, torch.Tensor]:
        """The new global state: weighted means where clients contributed, old values elsewhere."""
        out: dict[str, torch.Tensor] = {}
        for key, old in self.global_state.items():
            if key in self._sums:
                mean = self._sums[key] / self._weights[key]
                if not old.is_floating_point():
                    mean = mean.round()
                out[key] = mean.to(dtype=old.dtype, device=old.device)
            else:
                out[key] = old.clone()
        return out


class FedAvg(Aggregator):
    """``fedavg``: each round's new global model is the :class:`WeightedMean` of the accepted updates."""

    def begin(self, global_state: State) -> WeightedMean:
        return WeightedMean(global_state)


def aggregate(global_state: State, updates: Sequence[tuple[State, float]]) -> dict[str, torch.Tensor]:
    """``{key: sum_k n_k * w_k[key] / sum_k n_k}`` over the updates holding ``key``; else unchanged.

    ``updates`` are ``(state_dict, sample_count)`` pairs. Raises :class:`UpdateRejected` for an
    update that does not fit the global model (check them first with :func:`check_update` to
    drop bad ones instead).
    """
    acc = WeightedMean(global_state)
    for state, weight in updates:
        acc.add(state, weight)
    return acc.result()
