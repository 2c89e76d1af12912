"""S5: BatchNorm under label skew: server-side re-estimation of the statistics, and FedBN's local layers.

Averaging BatchNorm running statistics over label-skewed clients gives the global model
statistics that match no real batch: the mean of the clients' variances misses the spread of
their means. Two remedies, chosen by ``federated.bn_stats``:

- ``server``: after every aggregation the server passes its own training split (S2 data, which
  the clients never see) through the new global model in training mode and takes the exact
  (cumulative) running mean and variance of every BatchNorm layer. Only running statistics change.
- ``local`` (FedBN, Li et al. 2021): each client keeps its BatchNorm layers (affine parameters and
  statistics) from round to round and does not send them; the server re-estimates the global
  model's statistics as above.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from nni_fedexit.data import ImageData

__all__ = ["BN_STATE_PREFIX", "BN_STATS", "bn_keys", "is_bn_statistic", "keep_local_bn", "reestimate_bn_statistics", "restore_local_bn"]

#: the values of ``federated.bn_stats``
BN_STATS = ("average", "server", "local")
#: the client-state names of a client's own BatchNorm entries: ``bn/<entry of the model>``
BN_STATE_PREFIX = "bn/"
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_statistic(key: str) -> bool:
    """Whether a state-dict entry is a BatchNorm running statistic (not a trained parameter)."""
    return key.rsplit(".", 1)[-1] in _STATISTICS


def bn_keys(model: nn.Module) -> list[str]:
    """Every state-dict entry of ``model``'s BatchNorm layers (affine parameters and statistics)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys.extend(prefix + k for k in module.state_dict())
    return keys


@torch.no_grad()
def reestimate_bn_statistics(model: nn.Module, data: ImageData, batch_size: int = 256) -> int:
    """Replace every BatchNorm layer's running statistics by their exact values on ``data``.

    Training-mode forward passes with ``momentum=None`` (a cumulative average), no gradients;
    parameters are untouched, and the model's train/eval mode and momenta are restored. Runs on
    one torch thread: float32 reductions depend on the thread count, and the statistics must be
    the same wherever the server runs (a Flower ServerApp, a simulation). Returns the number of
    BatchNorm layers re-estimated.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers or len(data) == 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    device = next(model.parameters()).device
    threads = torch.get_num_threads()
    model.train()
    try:
        torch.set_num_threads(1)
        for start in range(0, len(data), batch_size):
            model(data.images[start : start + batch_size].to(device))
    finally:
        torch.set_num_threads(threads)
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(layers)


def restore_local_bn(model: nn.Module, client_state: Mapping[str, torch.Tensor]) -> None:
    """Load a client's own BatchNorm entries (``bn/<key>`` of its state) over the global ones.

    Only the entries ``model`` (this round's branch) holds; those of deeper layers stay kept.
    """
    state = model.state_dict()
    with torch.no_grad():
        for key, value in client_state.items():
            name = key[len(BN_STATE_PREFIX):]
            if key.startswith(BN_STATE_PREFIX) and name in state:
                if value.shape != state[name].shape:
                    raise ValueError(f"the client's BatchNorm entry {name!r} has shape {tuple(value.shape)}, "
                                     f"the model {tuple(state[name].shape)}")
                state[name].copy_(value.to(state[name].device))


def keep_local_bn(model: nn.Module, update: dict[str, torch.Tensor], client_state: dict[str, torch.Tensor]) -> None:
    """FedBN: move ``model``'s BatchNorm entries out of ``update`` into ``client_state`` (in place)."""
    for key in bn_keys(model):
        if key in update:
            client_state[BN_STATE_PREFIX + key] = update.pop(key)
