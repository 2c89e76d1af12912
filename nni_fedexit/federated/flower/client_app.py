"""The Flower ClientApp: one edge device trains the branch model the server gave it.

Its SuperNode's ``--node-config`` names its data: ``partition-id`` and ``num-partitions`` (the
partition is client ``partition-id`` of :class:`~nni_fedexit.federated.FederatedData` built with
``num_clients = num-partitions``, so a deployment trains on exactly the simulation's clients),
and optionally ``budget``, the share of the full model's MACs the device can run (the server then
assigns branches by capability).

``query`` answers the server's profile request; ``train`` loads the received branch arrays into
the model built from the run config, trains ``branch(depth, all_exits=True)`` with
:func:`~nni_fedexit.federated.train_local`, and replies with only that branch's arrays and a
MetricRecord with ``num-examples`` (and ``train-loss``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ...exits import MultiExitNetwork
from ..local import train_local
from .common import build_model, load_branch_state, load_data, local_settings, settings_from_config, to_array_record, to_state_dict

__all__ = ["app", "node_partition"]

app = ClientApp()

_MODEL_CACHE: dict[str, MultiExitNetwork] = {}


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of this node, checked."""
    try:
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"this SuperNode has no {err.args[0]!r} in its node config: start it with "
            '--node-config "partition-id=I num-partitions=N"'
        ) from None
    if not 0 <= pid < parts:
        raise ValueError(f"partition-id must be in 0..{parts - 1}, got {pid}")
    return pid, parts


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition (and compute budget, if its node config has one)."""
    pid, parts = node_partition(context.node_config)
    profile = ConfigRecord({"partition-id": pid, "num-partitions": parts})
    if "budget" in context.node_config:
        profile["budget"] = float(context.node_config["budget"])
    return Message(RecordDict({"profile": profile}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the branch model carried by ``msg`` on this node's partition."""
    cfg = dict(context.run_config)
    pid, parts = node_partition(context.node_config)
    base = settings_from_config(cfg)
    if base.client_threads > 0:
        torch.set_num_threads(base.client_threads)
    settings = settings_from_config(cfg, num_clients=parts, min_clients=min(base.min_clients, parts))
    data = load_data(settings)

    key = settings.fingerprint() + repr(sorted((k, v) for k, v in cfg.items() if k.startswith(("space-", "architecture"))))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_model(cfg, settings, data.bundle).to(settings.device)
    model = _MODEL_CACHE[key]

    task = msg.content.config_records["config"]
    depth = int(task["depth"])
    all_exits = bool(task.get("all-exits", settings.branch_all_exits))
    state = to_state_dict(msg.content.array_records["arrays"])
    load_branch_state(model, {k: v.to(settings.device) for k, v in state.items()}, depth, all_exits)
    branch = model.branch(depth, all_exits=all_exits)
    update = train_local(pid, branch, data.clients[pid], local_settings(settings), float(task["lr"]), int(task["seed"]))
    metrics = MetricRecord({"num-examples": int(update.num_samples), "train-loss": float(update.loss),
                            "depth": depth, "partition-id": pid})
    return Message(RecordDict({"arrays": to_array_record(update.state), "metrics": metrics}), reply_to=msg)
