"""The Flower ServerApp of the exit-point model's federated training (S5 on real edge devices).

Round t, as :func:`~nni_fedexit.federated.federate` runs it in simulation:

1. the connected SuperNodes (``grid.get_node_ids()``; never more than are there) are ordered by
   the ``partition-id`` each reported (a ``query`` message, answered once per node), and the
   round's clients are picked with :func:`select_clients` and given branch depths with
   :func:`assign_branches`, from a generator seeded by ``(seed, t, 0)``. The mode is ``random``
   unless the run config asks for ``capability`` or a node reported a compute ``budget``
   (nodes that did not report one get the profile mix's budget);
2. every chosen node gets ONE message holding only its branch's arrays (the keys of
   ``model.branch(depth, all_exits=True).state_dict()``), a ConfigRecord (depth, lr, seed) and
   the data set's shape and standardisation (``data``, for nodes training on their own images);
3. every reply without an error is checked and added to a :class:`WeightedMean` (a bad update
   raises :class:`UpdateRejected` and is left out, logged with its node id); entries no node
   trained keep their values;
4. ``evaluate_fn`` validates the new global model on the server's split (:func:`validate`) and
   writes ``last.safetensors`` / ``best.safetensors`` / ``state.json`` to ``checkpoint-dir``.

A run whose ``checkpoint-dir`` holds a checkpoint goes on after its last round (``resume``,
on by default): the saved weights are Flower's initial arrays, and round numbers continue.
The initial weights are seeded as in the simulation backend, or read from ``initial-weights``
(what :func:`~nni_fedexit.federated.federate` with ``backend="flower"`` submits).
"""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from nni_fedexit.exits import ExitCost, MultiExitNetwork, exit_costs
from nni_fedexit.federated.aggregators.fedavg import UpdateRejected, WeightedMean
from nni_fedexit.federated.assign import assign_branches, client_profiles, select_clients
from nni_fedexit.federated.evaluator import FederatedSettings, _better, _Checkpoint, _seed, validate
from nni_fedexit.federated.backends.flower.common import DataShape, branch_keys, build_model, load_data, settings_from_config, to_array_record, to_state_dict

__all__ = ["app", "BranchStrategy", "NodeProfile", "discover_nodes", "main"]

app = ServerApp()


class NodeProfile(dict):
    """What a SuperNode reported: ``partition-id``, ``num-partitions``, ``data-dir``, ``budget``."""

    @property
    def partition(self) -> int | None:
        """Its partition of the data set; None for a node training on its own ``data-dir`` only."""
        return int(self["partition-id"]) if "partition-id" in self else None

    def describe(self) -> str:
        where = f"data-dir {self['data-dir']}" if "data-dir" in self else ""
        part = f"partition {self.partition}/{self.get('num-partitions')}" if self.partition is not None else ""
        return " + ".join(w for w in (part, where) if w)


def _wait_for_nodes(grid: Grid, want: int, wait: float) -> list[int]:
    """The connected node ids, once ``want`` are there or ``wait`` seconds have passed."""
    deadline = time.time() + wait
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= want or time.time() >= deadline:
            return nodes
        time.sleep(1.0)


def _query_profiles(grid: Grid, nodes: Iterable[int], timeout: float) -> dict[int, NodeProfile]:
    """Ask each node for its partition (and budget); nodes that fail to answer are left out."""
    messages = [
        Message(RecordDict({"config": ConfigRecord({"ask": "profile"})}), int(n), MessageType.QUERY, group_id="profile")
        for n in nodes
    ]
    if not messages:
        return {}
    out: dict[int, NodeProfile] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            log(WARNING, "Node %s did not report its profile (error %s: %s); it is left out",
                node, reply.error.code, reply.error.reason)
            continue
        record = reply.content.config_records.get("profile")
        if record is None or ("partition-id" not in record and "data-dir" not in record):
            log(WARNING, "Node %s sent neither a partition-id nor a data-dir; it is left out", node)
            continue
        out[node] = NodeProfile(dict(record))
    return out


def discover_nodes(grid: Grid, min_nodes: int, wait: float, timeout: float,
                   known: Mapping[int, NodeProfile] | None = None) -> dict[int, NodeProfile]:
    """Profiles of the connected nodes (asking only the ones not in ``known``)."""
    nodes = _wait_for_nodes(grid, min_nodes, wait)
    known = dict(known or {})
    new = [n for n in nodes if n not in known]
    if new:
        known.update(_query_profiles(grid, new, timeout))
    return {n: known[n] for n in nodes if n in known}


class BranchStrategy(Strategy):
    """Depth-aware federated averaging of branch models; one message per node, its own arrays."""

    def __init__(self, model: MultiExitNetwork, settings: FederatedSettings, costs: list[ExitCost],
                 profiles: Mapping[int, NodeProfile], node_wait: float = 60.0, query_timeout: float = 120.0,
                 data_shape: Mapping[str, Any] | None = None):
        self.model = model
        #: the data set's sizes, class names and standardisation, for nodes with their own images
        self.data_shape = dict(data_shape or {})
        self.settings = settings
        self.costs = costs
        self.profiles: dict[int, NodeProfile] = dict(profiles)
        self.node_wait = node_wait
        self.query_timeout = query_timeout
        self._keys = {d: branch_keys(model, d, settings.branch_all_exits) for d in range(1, model.num_exits + 1)}
        self.global_state: dict[str, torch.Tensor] = {}
        #: node id -> its task of the current round
        self.tasks: dict[int, dict[str, Any]] = {}
        #: the current round's messages (the grid sets their message ids when it pushes them)
        self.sent: list[Message] = []
        #: what the last aggregation measured (the evaluate_fn's history takes it)
        self.last_round: dict[str, Any] = {}
        #: rounds done before this run (resumed from a checkpoint): Flower's round r is round offset + r
        self.offset = 0

    def summary(self) -> None:
        s = self.settings
        log(INFO, "\t├── %d exits; branch keys per depth: %s", self.model.num_exits,
            [len(self._keys[d]) for d in sorted(self._keys)])
        log(INFO, "\t├── client fraction %s, min clients %d, assignment %s", s.client_fraction, s.min_clients, s.assignment)
        log(INFO, "\t└── lr %s (decay %s), %d local epoch(s), batch size %d", s.lr, s.lr_decay, s.local_epochs, s.batch_size)

    # ---- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        s = self.settings
        t = self.offset + server_round
        self.global_state = to_state_dict(arrays)
        self.tasks = {}
        self.sent = []
        self.profiles = discover_nodes(grid, s.min_clients, self.node_wait, self.query_timeout, self.profiles)
        # partitions first, in order; nodes with only their own data-dir after them, by node id
        participants = sorted(self.profiles, key=lambda n: (self.profiles[n].partition is None, self.profiles[n].partition or 0, n))
        if not participants:
            log(WARNING, "Round %d: no node is connected; nothing to train", t)
            return []
        n = len(participants)
        rng = np.random.default_rng([s.seed, t, 0])
        selected = select_clients(n, s.client_fraction, min(s.min_clients, n), rng)
        reported = [self.profiles[node].get("budget") for node in participants]
        mode = "capability" if s.assignment == "capability" or any(b is not None for b in reported) else "random"
        budgets = None
        if mode == "capability":
            mix = client_profiles(n, s.profiles(), seed=s.seed)
            budgets = [float(b) if b is not None else mix[c].budget for c, b in enumerate(reported)]
        depths = assign_branches(selected, self.model.num_exits, mode, rng, budgets=budgets,
                                 exit_macs=[c.macs for c in self.costs])
        lr = s.lr * s.lr_decay ** (t - 1)
        messages = []
        for c in selected:
            node = participants[c]
            if c not in depths:
                log(INFO, "Round %d: node %s (budget %s) affords no branch; it sits out", t, node, budgets[c] if budgets else "")
                continue
            pid = self.profiles[node].partition
            seed = _seed(s.seed, t, 0, pid if pid is not None else node)
            task = {"node": node, "partition": pid, "depth": depths[c], "lr": lr, "seed": seed}
            self.tasks[node] = task
            cfg = ConfigRecord(dict(config))
            cfg.update({"server-round": t, "depth": int(task["depth"]), "lr": float(lr), "seed": int(task["seed"]),
                        "all-exits": bool(s.branch_all_exits)})
            content = RecordDict({"arrays": to_array_record(self.global_state, self._keys[task["depth"]]), "config": cfg,
                                  "data": ConfigRecord(self.data_shape)})
            messages.append(Message(content, node, MessageType.TRAIN, group_id=str(t)))
        self.sent = messages
        log(INFO, "configure_train: round %d, %d of %d connected nodes (%s mode): %s", t, len(messages), n, mode,
            ", ".join(f"node {k} ({self.profiles[k].describe()}) -> branch {v['depth']}" for k, v in self.tasks.items()))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t = self.offset + server_round
        acc = WeightedMean(self.global_state)
        rejected: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        losses: list[float] = []
        answered: set[int] = set()
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self.sent if m.metadata.message_id}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in self.tasks:
                # the SuperLink answers for a node it lost (error 5, node unavailable) with its own
                # id as the source: the message replied to names the node
                node = sent.get(reply.metadata.reply_to_message_id, node)
            answered.add(node)
            task = self.tasks.get(node, {})
            if reply.has_error():
                log(WARNING, "Round %d: node %s (branch %s) failed and is dropped from the round: error %s: %s",
                    t, node, task.get("depth"), reply.error.code, reply.error.reason)
                failed.append({"node": node, "reason": f"error {reply.error.code}: {reply.error.reason}"})
                continue
            try:
                if node not in self.tasks:
                    raise UpdateRejected("the node was given no task this round")
                content = reply.content
                if "arrays" not in content.array_records or "metrics" not in content.metric_records:
                    raise UpdateRejected("the reply has no 'arrays' ArrayRecord or no 'metrics' MetricRecord")
                metrics = content.metric_records["metrics"]
                weight = float(metrics.get("num-examples", 0))
                loss = float(metrics.get("train-loss", 0.0))
                if not math.isfinite(loss):
                    raise UpdateRejected(f"its training loss is {loss}")
                update = to_state_dict(content.array_records["arrays"])
                extra = sorted(set(update) - set(self._keys[task["depth"]]))
                if extra:
                    raise UpdateRejected(f"it holds entries outside its branch {task['depth']}: {extra[:3]}")
                acc.add(update, weight)
                losses.append(loss)
            except UpdateRejected as err:
                log(WARNING, "Round %d: update of node %s (branch %s) rejected: %s", t, node, task.get("depth"), err)
                rejected.append({"node": node, "reason": str(err)})
        for node in sorted(set(self.tasks) - answered):
            log(WARNING, "Round %d: node %s (branch %s) did not reply in time", t, node, self.tasks[node]["depth"])
            failed.append({"node": node, "reason": "no reply before the round's timeout"})
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.last_round = {
            "clients": [{k: v for k, v in task.items()} for task in self.tasks.values()],
            "accepted": acc.count, "rejected": rejected, "failed": failed, "train_loss": train_loss,
        }
        metrics = MetricRecord({"accepted": acc.count, "rejected": len(rejected), "failed": len(failed)})
        if losses:
            metrics["train-loss"] = train_loss
        if acc.count < self.settings.min_clients:
            log(WARNING, "Round %d: only %d update(s) accepted (min_clients=%d); the global model is kept",
                t, acc.count, self.settings.min_clients)
            return None, metrics
        return to_array_record(acc.result()), metrics

    # ---- no client-side evaluation: the server validates (evaluate_fn) ------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


class ServerValidation:
    """``evaluate_fn``: validate on the server's split, keep the best round, write the checkpoint."""

    def __init__(self, model: MultiExitNetwork, val: Any, settings: FederatedSettings, strategy: BranchStrategy,
                 checkpoint_dir: str | None):
        self.model = model
        self.val = val
        self.settings = settings
        self.strategy = strategy
        self.ckpt = _Checkpoint(checkpoint_dir) if checkpoint_dir else None
        self.history: list[dict[str, Any]] = []
        self.best_round = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = to_state_dict(arrays)
        self.model.load_state_dict(state)
        metrics = validate(self.model, self.val)
        out = MetricRecord({"val-total-loss": metrics["total_loss"]})
        for i, a in enumerate(metrics["exit_accuracy"]):
            out[f"val-exit{i + 1}"] = float(a)
        if server_round == 0:
            return out
        s = self.settings
        t = self.strategy.offset + server_round
        record = {"round": t, "lr": s.lr * s.lr_decay ** (t - 1), **self.strategy.last_round, **metrics}
        self.history.append(record)
        improved = _better(metrics, self.history[self.best_round - 1] if self.best_round else None)
        if improved:
            self.best_round = t
        log(INFO, "Round %d/%d: val accuracy per exit %s, total loss %.4f%s", t, s.rounds,
            " ".join(f"{a:.4f}" for a in metrics["exit_accuracy"]), metrics["total_loss"], " (best)" if improved else "")
        if self.ckpt is not None:
            nodes = {str(n): dict(p) for n, p in self.strategy.profiles.items()}
            self.ckpt.save({"fingerprint": s.fingerprint(), "round": t, "best_round": self.best_round,
                            "history": self.history, "backend": "flower", "num_clients": s.num_clients,
                            "nodes": nodes}, state, state if improved else None)
            log(INFO, "Round %d: checkpoint written to %s%s", t, self.ckpt.folder, " (best)" if improved else "")
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the global model from the run config, then run the rounds with :class:`BranchStrategy`.

    With a checkpoint in ``checkpoint-dir`` (and ``resume``), the run goes on after its last
    round: the saved weights are the initial arrays and round numbers continue, so the seeds of
    every later round are those of an uninterrupted run.
    """
    cfg = dict(context.run_config)
    base = settings_from_config(cfg)
    profiles = discover_nodes(grid, base.min_clients, base.node_wait, base.round_timeout)
    if not profiles:
        raise RuntimeError(f"no SuperNode connected and reported its partition within node-wait={base.node_wait} s")
    num_parts = max(int(p.get("num-partitions", 0)) for p in profiles.values())
    num_clients = max(num_parts, len(profiles))
    settings = settings_from_config(cfg, num_clients=num_clients, min_clients=min(base.min_clients, num_clients))
    log(INFO, "%d node(s) connected: %s", len(profiles),
        ", ".join(f"node {n} = {p.describe()}" for n, p in profiles.items()))

    data = load_data(settings)
    model = build_model(cfg, settings, data.bundle)
    initial = str(cfg.get("initial-weights") or "")
    if initial:
        from safetensors.torch import load_file

        if not Path(initial).is_file():
            raise RuntimeError(f"initial-weights: {initial} is not a file the ServerApp can read")
        model.load_state_dict(load_file(initial))
    model.to(settings.device)
    costs = exit_costs(model, data.val.images[:1].to(settings.device))
    strategy = BranchStrategy(model, settings, costs, profiles, node_wait=settings.node_wait,
                              query_timeout=settings.round_timeout, data_shape=DataShape.of(data.bundle).to_config())
    ckpt_dir = settings.checkpoint_dir or None
    if ckpt_dir:
        ckpt_dir = str(Path(ckpt_dir).expanduser().absolute())
    evaluate = ServerValidation(model, data.val, settings, strategy, ckpt_dir)
    resumed = evaluate.ckpt.resume_point(settings) if evaluate.ckpt is not None else None
    arrays = model.state_dict()
    if resumed is not None:
        saved, arrays, _ = resumed
        strategy.offset = int(saved["round"])
        evaluate.history = list(saved["history"])
        evaluate.best_round = int(saved["best_round"])
        log(INFO, "Resuming from %s after round %d (best round %d)", ckpt_dir, strategy.offset, evaluate.best_round)
    remaining = settings.rounds - strategy.offset
    if remaining < 1:
        log(INFO, "The checkpoint in %s holds all %d round(s) already: nothing to train", ckpt_dir, settings.rounds)
        return
    strategy.start(
        grid=grid, initial_arrays=to_array_record(arrays), num_rounds=remaining,
        timeout=settings.round_timeout, evaluate_fn=evaluate,
    )
    log(INFO, "Finished round %d of %d; best round %d%s", strategy.offset + remaining, settings.rounds,
        evaluate.best_round, f"; checkpoint in {ckpt_dir}" if ckpt_dir else "")
