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
3. every reply without an error goes to the round engine, which checks it and adds it to the
   run's aggregator (a bad update is rejected and left out, logged with its node id); entries no
   node trained keep their values;
4. ``evaluate_fn`` has the engine validate the new global model on the server's split, record the
   round, keep the best one and write ``last.safetensors`` / ``best.safetensors`` /
   ``state.json`` to ``checkpoint-dir``. The engine's model, after the server's own steps and
   BatchNorm re-estimation, is what the next round sends (not Flower's last aggregate).

Steps 1, 3 and 4 are :class:`~nni_fedexit.federated.rounds.RoundEngine`'s, the same code as the
simulation backend's.

A run whose ``checkpoint-dir`` holds a checkpoint goes on after its last round (``resume``,
on by default): the saved weights are Flower's initial arrays, and round numbers continue.
The initial weights are seeded as in the simulation backend, or read from ``initial-weights``
(what :func:`~nni_fedexit.federated.federate` with ``backend="flower"`` submits).
"""

from __future__ import annotations

import logging
import os
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

from nni_fedexit.exits import exit_costs
from nni_fedexit.federated.checkpoint import Checkpoint
from nni_fedexit.federated.errors import UpdateRejected
from nni_fedexit.federated.rounds import ClientTask, Participant, RoundEngine, RoundPlan, RoundResults, validate
from nni_fedexit.federated.backends.flower.common import DataShape, build_model, load_data, settings_data, settings_from_config, task_keys, to_array_record, to_state_dict
from nni_fedexit.federated.backends.flower.replies import read_reply

__all__ = ["app", "BranchStrategy", "NodeProfile", "admit_nodes", "discover_nodes", "main", "server_path"]

app = ServerApp()


class NodeProfile(dict):
    """What a SuperNode reported: ``partition-id``, ``num-partitions``, ``data-dir``, ``budget``."""

    @classmethod
    def checked(cls, record: Mapping[str, Any]) -> "NodeProfile":
        """The known entries of a node's profile reply, type-checked; ValueError says what is wrong."""
        out = cls()
        for key in ("partition-id", "num-partitions"):
            if key in record:
                value = record[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{key!r} must be a whole number >= 0, got {value!r}")
                out[key] = int(value)
        if record.get("data-dir"):
            if not isinstance(record["data-dir"], str):
                raise ValueError(f"'data-dir' must be a string, got {record['data-dir']!r}")
            out["data-dir"] = record["data-dir"]
        if record.get("budget") is not None:
            budget = record["budget"]
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
                raise ValueError(f"'budget' must be a finite number > 0, got {budget!r}")
            out["budget"] = float(budget)
        if "partition-id" not in out and "data-dir" not in out:
            raise ValueError("it sent neither a partition-id nor a data-dir")
        return out

    @property
    def partition(self) -> int | None:
        """Its partition of the data set; None for a node training on its own ``data-dir`` only."""
        return int(self["partition-id"]) if "partition-id" in self else None

    @property
    def own_data(self) -> bool:
        """Whether it trains on its own images (``data-dir``) rather than its partition."""
        return bool(self.get("data-dir"))

    def describe(self) -> str:
        where = f"data-dir {self['data-dir']}" if "data-dir" in self else ""
        part = f"partition {self.partition}/{self.get('num-partitions')}" if self.partition is not None else ""
        return " + ".join(w for w in (part, where) if w)


def admit_nodes(profiles: Mapping[int, NodeProfile], num_clients: int, refused: dict[int, str] | None = None,
                holders: dict[int, int] | None = None) -> dict[int, NodeProfile]:
    """The nodes that may take part in a run of ``num_clients`` partitions (the server's setting).

    A node is left out (and named in the log, once) when its partition is outside
    ``0..num_clients-1``, when it loads the data set split into another number of partitions,
    or when another node already holds its partition (``holders``, partition -> node, kept across
    rounds by the caller: the first node to claim a partition keeps it while it is connected).
    """
    refused = refused if refused is not None else {}
    taken = holders if holders is not None else {}
    for part in [q for q, n in taken.items() if n not in profiles]:
        del taken[part]
    out: dict[int, NodeProfile] = {}
    for node in sorted(profiles):
        p = profiles[node]
        why = None
        if p.partition is not None:
            if p.partition >= num_clients:
                why = f"its partition-id {p.partition} is outside 0..{num_clients - 1} (num_clients={num_clients})"
            elif not p.own_data and p.get("num-partitions") != num_clients:
                why = (f"it splits the data set into num-partitions={p.get('num-partitions')}, the run into "
                       f"num_clients={num_clients}")
            elif taken.get(p.partition, node) != node:
                why = f"node {taken[p.partition]} already holds partition {p.partition}"
        if why is not None:
            if refused.get(node) != why:
                log(WARNING, "Node %s is left out of the run: %s", node, why)
            refused[node] = why
            continue
        if p.partition is not None:
            taken[p.partition] = node
        out[node] = p
    return out


def run_num_clients(run_config: Mapping[str, Any], profiles: Mapping[int, NodeProfile]) -> int:
    """The run's number of partitions: the run config's ``num_clients`` when it sets one, else the
    ``num-partitions`` most nodes report (the smaller on a tie; a single node cannot change it
    against the others), else the number of nodes."""
    given = settings_data(run_config)
    if "num_clients" in given:
        return int(given["num_clients"])
    counts: dict[int, int] = {}
    for p in profiles.values():
        if p.partition is not None and not p.own_data and p.get("num-partitions", 0) > 0:
            counts[p["num-partitions"]] = counts.get(p["num-partitions"], 0) + 1
    if counts:
        return min(counts, key=lambda n: (-counts[n], n))
    return max(len(profiles), 1)


#: where a ServerApp may read and write (``checkpoint-dir``, ``initial-weights``): folders separated by ":"
SERVER_ROOT_ENV = "NNI_FEDEXIT_SERVER_ROOT"


def server_roots() -> list[Path]:
    """The folders the ServerApp's files must lie in: ``$NNI_FEDEXIT_SERVER_ROOT`` (set it where
    the SuperLink starts), else its working directory and the system's temporary directory."""
    import tempfile

    value = os.environ.get(SERVER_ROOT_ENV, "")
    roots = [Path(r) for r in value.split(os.pathsep) if r] or [Path.cwd(), Path(tempfile.gettempdir())]
    return [r.expanduser().resolve() for r in roots]


def server_path(value: str, key: str) -> Path:
    """``value`` (a run-config path) resolved, if it lies in one of :func:`server_roots`; else an error.

    A run config comes from whoever submits the run: it must not choose where the SuperLink's
    user reads or writes.
    """
    path = Path(value).expanduser()
    resolved = path.resolve()
    roots = server_roots()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise ValueError(f"{key}: {value} is outside the folders this ServerApp may use ({', '.join(map(str, roots))}); "
                         f"start the SuperLink with {SERVER_ROOT_ENV}=/folder/for/runs (several: separated by "
                         f"{os.pathsep!r}) to allow another")
    return resolved


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
        try:
            out[node] = NodeProfile.checked(record if record is not None else {})
        except ValueError as err:
            log(WARNING, "Node %s sent a profile the server cannot use (%s); it is left out", node, err)
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
    """Depth-aware federated averaging of branch models; one message per node, its own arrays.

    A thin adapter: the rounds are :class:`~nni_fedexit.federated.rounds.RoundEngine`'s (plan,
    replies, aggregation, validation, best round, checkpoint); this class only turns a plan into
    Flower messages and replies into the engine's accept / reject / fail.
    """

    def __init__(self, engine: RoundEngine, profiles: Mapping[int, NodeProfile], node_wait: float = 60.0,
                 query_timeout: float = 120.0, data_shape: Mapping[str, Any] | None = None):
        self.engine = engine
        self.model = engine.model
        self.settings = engine.settings
        #: the data set's sizes, class names and standardisation, for nodes with their own images
        self.data_shape = dict(data_shape or {})
        self.profiles: dict[int, NodeProfile] = dict(profiles)
        self.node_wait = node_wait
        self.query_timeout = query_timeout
        #: nodes left out of the run, with the reason (logged once); which node holds each partition
        self.refused: dict[int, str] = {}
        self.holders: dict[int, int] = {}
        self._keys = {d: task_keys(self.model, d, self.settings) for d in range(1, self.model.num_exits + 1)}
        state = self.model.state_dict()
        #: what a reply for each branch must hold: its keys, with the global model's shapes and dtypes
        self._specs = {d: {k: (tuple(state[k].shape), str(state[k].dtype).removeprefix("torch.")) for k in keys}
                       for d, keys in self._keys.items()}
        #: the current round's replies (the engine's collector) and its tasks by node id
        self.results: RoundResults | None = None
        self.tasks: dict[int, ClientTask] = {}
        #: the current round's messages (the grid sets their message ids when it pushes them)
        self.sent: list[Message] = []
        #: the current round's new global state (None: the round keeps the model)
        self.new_state: dict[str, torch.Tensor] | None = None

    def summary(self) -> None:
        s = self.settings
        log(INFO, "\t├── %d exits; branch keys per depth: %s", self.model.num_exits,
            [len(self._keys[d]) for d in sorted(self._keys)])
        log(INFO, "\t├── client fraction %s, min clients %d, assignment %s", s.client_fraction, s.min_clients, s.assignment)
        log(INFO, "\t└── lr %s (decay %s), %d local epoch(s), batch size %d", s.lr, s.lr_decay, s.local_epochs, s.batch_size)

    # ---- training -------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        s = self.settings
        t = self.engine.done + 1
        # the engine's model, not Flower's ``arrays``: those are the last aggregate, before the
        # server's own steps and BatchNorm re-estimation (and the pre-pass aggregate again after a
        # round that kept the model)
        global_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.tasks, self.sent = {}, []
        self.profiles = discover_nodes(grid, s.min_clients, self.node_wait, self.query_timeout, self.profiles)
        admitted = admit_nodes(self.profiles, s.num_clients, self.refused, self.holders)
        # partitions first, in order; nodes with only their own data-dir after them, by node id
        nodes = sorted(admitted, key=lambda n: (admitted[n].partition is None, admitted[n].partition or 0, n))
        participants = [self.participant(n, admitted[n]) for n in nodes]
        plan = self.engine.plan(t, 0, participants) if participants else RoundPlan(t, s.round_lr(t), [])
        self.results = self.engine.open(plan, global_state)
        if not participants:
            log(WARNING, "Round %d: no node is connected; nothing to train", t)
            return []
        for task in plan.tasks:
            assert task.node is not None
            self.tasks[task.node] = task
            cfg = ConfigRecord(dict(config))
            cfg.update({"server-round": t, "depth": int(task.depth), "lr": float(task.lr), "seed": int(task.seed),
                        "all-exits": bool(s.branch_all_exits)})
            arrays_out = to_array_record(global_state, self._keys[task.depth])
            self.results.bytes_sent += arrays_out.count_bytes()
            content = RecordDict({"arrays": arrays_out, "config": cfg, "data": ConfigRecord(self.data_shape)})
            self.sent.append(Message(content, task.node, MessageType.TRAIN, group_id=str(t)))
        log(INFO, "configure_train: round %d, %d of %d connected nodes: %s", t, len(self.sent), len(participants),
            ", ".join(f"node {n} ({self.profiles[n].describe()}) -> branch {k.depth}" for n, k in self.tasks.items()))
        return self.sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results = self.results
        assert results is not None
        answered: set[int] = set()
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self.sent if m.metadata.message_id}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in self.tasks:
                # the SuperLink answers for a node it lost (error 5, node unavailable) with its own
                # id as the source: the message replied to names the node
                node = sent.get(reply.metadata.reply_to_message_id, node)
            answered.add(node)
            task = self.tasks.get(node)
            if reply.has_error():
                results.fail(task, f"error {reply.error.code}: {reply.error.reason}", ref=None if task else {"node": node})
                continue
            try:
                if task is None:
                    raise UpdateRejected("the node was given no task this round")
                results.bytes_received += sum(r.count_bytes() for r in reply.content.array_records.values())
                update, weight, loss = read_reply(reply.content, self._specs[task.depth])
            except UpdateRejected as err:
                results.reject(task, str(err), ref={"node": node})
                continue
            except Exception as err:  # whatever a node sends, it costs that node its update, never the round
                results.reject(task, f"its reply cannot be read ({type(err).__name__}: {err})", ref={"node": node})
                continue
            results.accept(task, update, weight, loss, allowed=self._keys[task.depth])
        for node in sorted(set(self.tasks) - answered):
            results.fail(self.tasks[node], "no reply before the round's timeout")
        metrics = MetricRecord({"accepted": results.accepted, "rejected": len(results.rejected),
                                "failed": len(results.failed)})
        if results.losses:
            metrics["train-loss"] = float(np.mean(results.losses))
        new_state = self.new_state = self.engine.close(results)
        if new_state is None:
            log(WARNING, "Round %d: only %d update(s) accepted (min_clients=%d); the global model is kept",
                results.plan.round, results.accepted, self.settings.min_clients)
            return None, metrics
        return to_array_record(new_state), metrics

    # ---- no client-side evaluation: the server validates (evaluate_fn) ------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """``evaluate_fn``: round 0 validates the initial model; round r finishes the engine's round."""
        if server_round == 0 or self.results is None:
            self.model.load_state_dict(to_state_dict(arrays))
            metrics = validate(self.model, self.engine.val)
        else:
            # Flower passes the previous aggregate when this round kept the model: the round's own
            # outcome is the engine's, so a kept model is not trained on the server a second time
            metrics = self.engine.finish(self.results, self.new_state)
            self.results, self.new_state = None, None
        out = MetricRecord({"val-total-loss": metrics["total_loss"]})
        for i, a in enumerate(metrics["exit_accuracy"]):
            out[f"val-exit{i + 1}"] = float(a)
        return out

    def participant(self, node: int, profile: NodeProfile) -> Participant:
        """The node as the round engine sees it: its partition, its budget, and the examples its
        update may count for (its partition's size; a node with its own images: see ``RoundEngine``)."""
        part, sizes = profile.partition, self.engine.client_sizes or []
        samples = sizes[part] if part is not None and not profile.own_data and part < len(sizes) else None
        return Participant(part, node, profile.get("budget"), samples)

    def checkpoint_extra(self) -> dict[str, Any]:
        """What ``state.json`` adds on Flower: the nodes that reported (for the run's record)."""
        return {"backend": "flower", "num_clients": self.settings.num_clients,
                "nodes": {str(n): dict(p) for n, p in self.profiles.items()}}




@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the global model from the run config, then run the rounds with :class:`BranchStrategy`.

    With a checkpoint in ``checkpoint-dir`` (and ``resume``), the run goes on after its last
    round: the saved weights are the initial arrays and round numbers continue, so the seeds of
    every later round are those of an uninterrupted run.
    """
    _log_through_flower()
    cfg = dict(context.run_config)
    base = settings_from_config(cfg)
    profiles = discover_nodes(grid, base.min_clients, base.node_wait, base.round_timeout)
    if not profiles:
        raise RuntimeError(f"no SuperNode connected and reported its partition within node_wait={base.node_wait} s")
    num_clients = run_num_clients(cfg, profiles)
    settings = base.replace(num_clients=num_clients, min_clients=min(base.min_clients, num_clients))
    log(INFO, "%d node(s) connected: %s", len(profiles),
        ", ".join(f"node {n} = {p.describe()}" for n, p in profiles.items()))
    if settings.assignment != "capability" and any("budget" in p for p in profiles.values()):
        log(INFO, "Nodes reported compute budgets; they are used with assignment='capability' only (this run: %r)",
            settings.assignment)

    data = load_data(settings)
    model = build_model(cfg, settings, data.bundle)
    initial = str(cfg.get("initial-weights") or "")
    if initial:
        from safetensors.torch import load_file

        path = server_path(initial, "initial-weights")
        if not path.is_file():
            raise RuntimeError(f"initial-weights: {initial} is not a file the ServerApp can read")
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as err:
            raise RuntimeError(f"initial-weights: {initial} is not a safetensors file of this model ({err})") from None
    model.to(settings.device)
    costs = exit_costs(model, data.val.images[:1].to(settings.device))
    ckpt_dir = str(server_path(settings.checkpoint_dir, "checkpoint-dir")) if settings.checkpoint_dir else None
    engine = RoundEngine(model, settings, costs, data.val, Checkpoint(ckpt_dir) if ckpt_dir else None,
                         client_sizes=[len(c) for c in data.clients], server_train=data.server_train,
                         server_labelled=data.server_labelled)
    strategy = BranchStrategy(engine, profiles, node_wait=settings.node_wait, query_timeout=settings.round_timeout,
                              data_shape=DataShape.of(data.bundle).to_config())
    engine.checkpoint_extra = strategy.checkpoint_extra
    if engine.resume() is not None:
        log(INFO, "Resuming from %s after round %d (best round %d)", ckpt_dir, engine.done, engine.best_round)
    remaining = settings.rounds - engine.done
    if remaining < 1:
        log(INFO, "The checkpoint in %s holds all %d round(s) already: nothing to train", ckpt_dir, settings.rounds)
        return
    strategy.start(
        grid=grid, initial_arrays=to_array_record(model.state_dict()), num_rounds=remaining,
        timeout=settings.round_timeout, evaluate_fn=strategy.evaluate,
    )
    log(INFO, "Finished round %d of %d; best round %d%s", engine.done, settings.rounds,
        engine.best_round, f"; checkpoint in {ckpt_dir}" if ckpt_dir else "")


def _log_through_flower() -> None:
    """The round engine logs with Python's logging under ``nni_fedexit``: send it where Flower's own log goes."""
    ours, flower = logging.getLogger("nni_fedexit"), logging.getLogger("flwr")
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
