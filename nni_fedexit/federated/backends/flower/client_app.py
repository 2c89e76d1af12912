"""The Flower ClientApp: one edge device trains the branch model the server gave it.

Its SuperNode's ``--node-config`` names its data, either
- ``partition-id`` and ``num-partitions``: client ``partition-id`` of
  :class:`~nni_fedexit.federated.FederatedData` built with ``num_clients = num-partitions`` (the
  node loads the data set; a deployment then trains on exactly the simulation's clients), or
- ``data-dir``: the device's own images, one sub-folder per class (``0``.. or the class names;
  :func:`~nni_fedexit.data.load_image_folder`), standardised with the statistics the server
  sends; the node needs no copy of the data set. ``partition-id`` may be added to fix the
  node's place (and seeds) among the others;
and optionally ``budget``, the share of the full model's MACs the device can run (the server then
assigns branches by capability).

``query`` answers the server's profile request; ``train`` loads the received branch arrays into
the model built from the run config, trains ``branch(depth, all_exits=True)`` with
:func:`~nni_fedexit.federated.train_local`, and replies with only that branch's arrays and a
MetricRecord with ``num-examples`` (and ``train-loss``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from nni_fedexit.data import ImageData, load_image_folder
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.federated.client import train_local
from nni_fedexit.federated.objectives import ClientObjective, make_objective
from nni_fedexit.federated.settings import FederatedSettings
from nni_fedexit.federated.backends.flower.common import DataShape, build_model, load_branch_state, load_data, settings_from_config, task_keys, to_array_record, to_state_dict

__all__ = ["app", "node_data", "node_partition", "query", "train_branch"]

app = ClientApp()

_MODEL_CACHE: dict[str, MultiExitNetwork] = {}
_SETTINGS_CACHE: dict[str, tuple[FederatedSettings, ClientObjective]] = {}
#: the objective's per-client state lives in the node's context.state under this name
STATE_RECORD = "objective-state"


def node_partition(node_config: Mapping[str, Any]) -> tuple[int | None, int]:
    """``(partition-id, num-partitions)`` of this node, checked; ``(None, 0)`` for a ``data-dir`` node without them."""
    has_dir = bool(node_config.get("data-dir"))
    if has_dir and "partition-id" not in node_config:
        return None, int(node_config.get("num-partitions", 0))
    try:
        pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"this SuperNode has no {err.args[0]!r} in its node config: start it with "
            '--node-config "partition-id=I num-partitions=N" (a share of the data set) or '
            '--node-config "data-dir=/path/to/images" (its own images, one sub-folder per class)'
        ) from None
    if not 0 <= pid < parts:
        raise ValueError(f"partition-id must be in 0..{parts - 1}, got {pid}")
    return pid, parts


_FOLDER_CACHE: dict[tuple, ImageData] = {}


def node_data(node_config: Mapping[str, Any], settings: FederatedSettings, shape: DataShape | None) -> tuple[ImageData, DataShape]:
    """This node's training data and the data set's shape: its ``data-dir``, or its partition."""
    folder = node_config.get("data-dir")
    if folder:
        if shape is None:
            raise ValueError("the server sent no 'data' record: a data-dir node needs a server of the same nni_fedexit version")
        key = (str(folder), shape)
        if key not in _FOLDER_CACHE:
            _FOLDER_CACHE.clear()
            _FOLDER_CACHE[key] = load_image_folder(folder, shape.class_names, shape.in_chans, shape.image_size,
                                                   shape.mean, shape.std)
        return _FOLDER_CACHE[key], shape
    pid, _ = node_partition(node_config)
    data = load_data(settings)
    return data.clients[pid], DataShape.of(data.bundle)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition (and compute budget, if its node config has one)."""
    pid, parts = node_partition(context.node_config)
    profile = ConfigRecord({"num-partitions": parts})
    if pid is not None:
        profile["partition-id"] = pid
    if context.node_config.get("data-dir"):
        profile["data-dir"] = str(context.node_config["data-dir"])
    if "budget" in context.node_config:
        profile["budget"] = float(context.node_config["budget"])
    return Message(RecordDict({"profile": profile}), reply_to=msg)


def node_settings(run_config: Mapping[str, Any], parts: int) -> tuple[FederatedSettings, ClientObjective]:
    """The run's settings (as this node's share of the data set needs them) and the client objective,
    built once per run config."""
    key = repr(sorted(run_config.items())) + f"|{parts}"
    if key not in _SETTINGS_CACHE:
        base = settings_from_config(run_config)
        settings = base.replace(num_clients=parts, min_clients=min(base.min_clients, parts))
        _SETTINGS_CACHE.clear()
        _SETTINGS_CACHE[key] = (settings, make_objective(settings))
    return _SETTINGS_CACHE[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the branch model carried by ``msg`` on this node's partition."""
    return train_branch(msg, context, dict(context.run_config))


def train_branch(msg: Message, context: Context, cfg: Mapping[str, Any],
                 partition: Callable[[int], ImageData] | None = None) -> Message:
    """Train the branch model carried by ``msg`` with run config ``cfg``; the reply holds only
    the branch's arrays. ``partition(i)`` gives partition ``i``'s data where the caller holds it
    (Flower's simulation engine: the driver's data set, through Ray's object store); else the
    node loads its data as its node config says."""
    pid, parts = node_partition(context.node_config)
    settings, objective = node_settings(cfg, max(parts, 1))
    if settings.client_threads > 0:
        torch.set_num_threads(settings.client_threads)
    record = msg.content.config_records.get("data")
    shape = DataShape.from_config(record) if record else None
    if partition is not None and pid is not None and shape is not None:
        local = partition(pid)
    else:
        local, shape = node_data(context.node_config, settings, shape)

    key = settings.fingerprint() + repr(shape) + repr(sorted((k, v) for k, v in cfg.items() if k.startswith(("space-", "architecture"))))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_model(cfg, settings, shape).to(settings.device)
    model = _MODEL_CACHE[key]

    task = msg.content.config_records["config"]
    depth = int(task["depth"])
    all_exits = bool(task.get("all-exits", settings.branch_all_exits))
    state = {k: v.to(settings.device) for k, v in to_state_dict(msg.content.array_records["arrays"]).items()}
    load_branch_state(model, state, depth, all_exits, keys=task_keys(model, depth, settings))
    branch = model.branch(depth, all_exits=all_exits)
    kept = context.state.array_records.get(STATE_RECORD)
    update = train_local(pid if pid is not None else -1, branch, local, settings.local_settings(), float(task["lr"]),
                         int(task["seed"]), objective, state, to_state_dict(kept) if kept is not None else None,
                         int(task.get("server-round", 0)))
    if update.client_state:
        context.state.array_records[STATE_RECORD] = to_array_record(update.client_state)
    metrics = MetricRecord({"num-examples": int(update.num_samples), "train-loss": float(update.loss), "depth": depth})
    return Message(RecordDict({"arrays": to_array_record(update.state), "metrics": metrics}), reply_to=msg)
