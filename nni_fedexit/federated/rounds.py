"""S5: the one round engine every backend uses (claim 5).

Round t: :meth:`RoundEngine.plan` selects the clients and gives each a branch depth, a learning
rate and a seed; the backend moves the global weights to the clients and hands every reply to
the round's :class:`RoundResults` (accepted into the aggregator, rejected with a reason, or
failed); :meth:`RoundEngine.close` aggregates and :meth:`RoundEngine.finish` validates on the
server's split, records the round, keeps the best one and writes the checkpoint. The simulation
backend calls these in this process, the Flower ServerApp from its strategy: a backend only
moves weights to clients and replies back.

Best round (claim 5, "minimum total loss and maximum accuracy"): with ``best_by: total_loss`` the
round whose validation total loss ``sum_i lambda_i * CE_i``, rounded to 4 decimals, is lowest;
among equal losses the one with the higher last-exit validation accuracy; then the earlier round.
With ``best_by: last_exit`` the round with the highest last-exit validation accuracy (rounded to
4 decimals), then the lower total loss, then the earlier round.

Every random choice of round t comes from generators seeded by ``(seed, t, attempt)`` (and the
client), so a run stopped after any round and resumed from its checkpoint ends with exactly the
model of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nni_fedexit.data import ImageData
from nni_fedexit.exits import ExitCost, MultiExitNetwork, ensemble_accuracy, exit_accuracies, exit_outputs
from nni_fedexit.federated.aggregators import Aggregator, RoundAggregate, check_update, make_aggregator
from nni_fedexit.federated.batchnorm import reestimate_bn_statistics
from nni_fedexit.federated.assign import assign_branches, client_profiles, select_clients
from nni_fedexit.federated.checkpoint import Checkpoint, Resumed
from nni_fedexit.federated.errors import FederatedError, UpdateRejected
from nni_fedexit.federated.server_pass import server_pass
from nni_fedexit.federated.settings import FederatedSettings

__all__ = [
    "ClientTask", "Participant", "RoundPlan", "RoundResults", "RoundEngine", "RunOutcome", "better", "check_weight",
    "metric_dict",
    "stable_seed", "tensor_bytes", "validate",
]

_logger = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]


def tensor_bytes(state: State, keys: Sequence[str] | None = None) -> int:
    """Bytes of the tensors of ``state`` (only ``keys``, if given)."""
    return sum(state[k].nelement() * state[k].element_size() for k in (state if keys is None else keys))


def stable_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash is salted per process)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def validate(model: MultiExitNetwork, data: ImageData) -> dict[str, Any]:
    """Per-exit accuracy and loss, the total loss sum_i lambda_i * CE_i, and the accuracy of the
    ensemble of exits (mean of their probabilities), on ``data``."""
    logits, labels = exit_outputs(model, data)
    losses = [float(F.cross_entropy(z, labels)) for z in logits]
    return {
        "exit_accuracy": exit_accuracies(logits, labels),
        "ensemble_accuracy": ensemble_accuracy(logits, labels),
        "exit_loss": losses,
        "total_loss": float(sum(w * l for w, l in zip(model.loss_weights, losses))),
    }


def better(new: Mapping[str, Any], old: Mapping[str, Any] | None, by: str = "total_loss") -> bool:
    """Whether validation metrics ``new`` make a better round than ``old`` under rule ``by`` (see the module doc)."""
    if old is None:
        return True
    if by == "total_loss":
        key = lambda m: (round(m["total_loss"], 4), -m["exit_accuracy"][-1])  # noqa: E731
    elif by == "last_exit":
        key = lambda m: (-round(m["exit_accuracy"][-1], 4), m["total_loss"])  # noqa: E731
    else:
        raise ValueError(f"best_by must be 'total_loss' or 'last_exit', got {by!r}")
    return key(new) < key(old)


def metric_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What NNI shows: the last exit's validation accuracy as "default", every exit, the total loss."""
    out = {"default": float(metrics["exit_accuracy"][-1]), "total_loss": float(metrics["total_loss"])}
    out.update({f"exit{i + 1}": float(a) for i, a in enumerate(metrics["exit_accuracy"])})
    if "ensemble_accuracy" in metrics:
        out["ensemble"] = float(metrics["ensemble_accuracy"])
    return out


def check_weight(weight: Any, bound: float | None) -> float:
    """A client's sample count as the aggregate's weight: a finite number in (0, ``bound``]; else
    UpdateRejected. The bound keeps any one client to its share of the round (see RoundEngine)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
        raise UpdateRejected(f"its sample count is a {type(weight).__name__}, not a number")
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise UpdateRejected(f"its sample count must be a finite number > 0, got {weight}")
    if bound is not None and value > bound:
        raise UpdateRejected(f"it reports {weight:g} examples, more than the {bound:g} it may count for "
                             "(its partition's size, or max_client_samples)")
    return value


@dataclass(frozen=True)
class Participant:
    """A client that can take part in a round: its partition (``client``), its Flower node, its budget."""

    #: its partition of the data set (the simulation's client index); None: a node with only its own data
    client: int | None
    node: int | None = None
    #: the share of the full model's MACs it reported it can run (None: the profile mix decides)
    budget: float | None = None
    #: the training examples the server knows it holds (its partition); None: not known to the server
    samples: int | None = None

    def describe(self) -> str:
        return _describe(self.client, self.node)


def _describe(client: int | None, node: int | None) -> str:
    return f"client {client}" if node is None else f"node {node}"


@dataclass(frozen=True)
class ClientTask:
    """One client's job in one round."""

    client: int | None
    depth: int
    lr: float
    seed: int
    node: int | None = None
    #: the most examples its update may count for in the aggregate (None: no bound)
    max_weight: float | None = None

    def describe(self) -> str:
        return _describe(self.client, self.node)

    def ref(self) -> dict[str, Any]:
        """Who it is, for the round's record: ``{"client": c}`` (and ``"node"`` on Flower)."""
        return {"client": self.client} if self.node is None else {"node": self.node, "client": self.client}

    def to_dict(self) -> dict[str, Any]:
        return {**self.ref(), "depth": self.depth, "lr": self.lr, "seed": self.seed}


@dataclass
class RoundPlan:
    round: int
    lr: float
    tasks: list[ClientTask]
    started: float = field(default_factory=time.time)


class RoundResults:
    """The replies of one round: each accepted into the aggregate, rejected with a reason, or failed."""

    def __init__(self, plan: RoundPlan, aggregate: RoundAggregate):
        self.plan = plan
        self.aggregate = aggregate
        self.rejected: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.losses: list[float] = []
        #: the weights moved this round, in bytes: to the clients and back (Flower: the ArrayRecords
        #: of the messages; in-process: the tensors of the branch entries handed over)
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def accepted(self) -> int:
        return self.aggregate.count

    def accept(self, task: ClientTask, update: State, weight: float, loss: float,
               allowed: Sequence[str] | None = None) -> bool:
        """Add a client's update (refused, and recorded, if it does not fit); True when accepted."""
        try:
            weight = check_weight(weight, task.max_weight)
            if not math.isfinite(loss):
                raise UpdateRejected(f"its training loss is {loss}")
            if allowed is not None:
                extra = sorted(set(update) - set(allowed))
                if extra:
                    raise UpdateRejected(f"it holds entries outside its branch {task.depth}: {extra[:3]}")
            self.aggregate.add(update, weight)
        except UpdateRejected as err:
            self.reject(task, str(err))
            return False
        self.losses.append(float(loss))
        return True

    def reject(self, task: ClientTask | None, reason: str, ref: Mapping[str, Any] | None = None) -> None:
        ref = dict(ref or (task.ref() if task else {}))
        _logger.warning("Round %d: update of %s (branch %s) rejected: %s", self.plan.round,
                        task.describe() if task else ref, task.depth if task else None, reason)
        self.rejected.append({**ref, "reason": reason})

    def fail(self, task: ClientTask | None, reason: str, ref: Mapping[str, Any] | None = None) -> None:
        ref = dict(ref or (task.ref() if task else {}))
        _logger.warning("Round %d: %s (branch %s) failed and is dropped from the round: %s", self.plan.round,
                        task.describe() if task else ref, task.depth if task else None, reason)
        self.failed.append({**ref, "reason": reason})

    def summary(self) -> dict[str, Any]:
        """The round's record of its clients (see :meth:`RoundEngine.finish`)."""
        return {
            "clients": [task.to_dict() for task in self.plan.tasks], "accepted": self.accepted,
            "rejected": self.rejected, "failed": self.failed,
            "train_loss": float(np.mean(self.losses)) if self.losses else float("nan"),
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
        }


@dataclass
class RunOutcome:
    """What a backend's rounds produced."""

    history: list[dict[str, Any]]
    best_round: int
    best_state: dict[str, torch.Tensor] | None
    #: the clients that took part: partitions (simulation) or SuperNodes (flower)
    clients: list[dict[str, Any]]


class RoundEngine:
    """The server's side of the rounds, for every backend: plan, collect, aggregate, validate, keep best, checkpoint.

    ``on_record(record)`` is called after each finished round (the NNI report);
    ``checkpoint_extra()`` adds backend entries to ``state.json`` (Flower: the nodes).

    Weight bound: a client's update counts in the weighted mean with the sample count it
    reports, which must not exceed what the server knows it holds: ``client_sizes[c]`` (the
    size of partition ``c``), for a client the server knows no size of (a device with its own
    images) the largest partition, and never more than ``settings.max_client_samples`` when that
    is set. A reply claiming more is rejected, so no client weighs more than its share.

    ``server_train`` is the server's own training split: with ``bn_stats`` ``server`` or
    ``local`` the BatchNorm statistics of every new global model are re-estimated on it.
    ``server_labelled``: the server's labelled images; with ``server_steps`` the server first
    trains the new global model on them (server_pass.py).
    """

    def __init__(self, model: MultiExitNetwork, settings: FederatedSettings, costs: Sequence[ExitCost], val: ImageData,
                 checkpoint: Checkpoint | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
                 checkpoint_extra: Callable[[], dict[str, Any]] | None = None, client_sizes: Sequence[int] | None = None,
                 server_train: ImageData | None = None, server_labelled: ImageData | None = None):
        self.model = model
        self.settings = settings
        self.costs = list(costs)
        self.val = val
        self.checkpoint = checkpoint
        self.on_record = on_record
        self.checkpoint_extra = checkpoint_extra
        #: training examples of each partition (the weight bound's base)
        self.client_sizes = list(client_sizes) if client_sizes is not None else None
        if settings.bn_stats != "average" and (server_train is None or len(server_train) == 0):
            raise FederatedError(f"bn_stats={settings.bn_stats!r} re-estimates BatchNorm statistics on the server's "
                                 "training split, but none was given; pass server_train, or use bn_stats='average'")
        if settings.server_steps != 0 and (server_labelled is None or len(server_labelled) == 0):
            raise FederatedError(f"server_steps={settings.server_steps} trains the global model on the server's labelled "
                                 "images, but none were given; pass server_labelled, or set server_steps: 0")
        self.server_train = server_train
        self.server_labelled = server_labelled
        self.aggregator: Aggregator = make_aggregator(settings)
        #: each client's objective state, kept across rounds and in the checkpoint (in-process clients)
        self.client_states: dict[int, dict[str, torch.Tensor]] = {}
        self.history: list[dict[str, Any]] = []
        self.best_round = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        #: rounds already done (a resumed run goes on after them)
        self.done = 0
        #: the best round's weights must be written at the next save (a resumed checkpoint lost them)
        self.rewrite_best = False

    # ---- resume ---------------------------------------------------------------------------------

    def resume(self) -> Resumed | None:
        """Go on from the checkpoint, if there is one for these settings: weights, history, best round, states.

        Every weights file must fit the model (same entries, shapes and dtypes, finite values);
        one that does not is refused by name. An unusable best file costs only the best round's
        weights: the last round's model takes its place, and the log says so.
        """
        resumed = self.checkpoint.resume_point(self.settings) if self.checkpoint is not None else None
        if resumed is None:
            return None
        folder = self.checkpoint.folder  # type: ignore[union-attr]
        model_state = self.model.state_dict()
        self._check_weights(resumed.last, model_state, folder / "last.safetensors")
        self.model.load_state_dict(resumed.last)
        self.history = list(resumed.state["history"])
        self.done = resumed.round
        best, problem = resumed.best, resumed.best_problem
        if best is not None and problem is None:
            try:
                self._check_weights(best, model_state, folder / "best.safetensors")
            except FederatedError as err:
                best, problem = None, str(err)
        if self.done:
            if best is None and resumed.best_round != self.done:
                _logger.warning("%s The best round so far (%d) has lost its weights: the last round (%d) takes its "
                                "place, and the best round is chosen among it and the rounds still to run.",
                                problem or f"{folder / 'best.safetensors'} is missing.", resumed.best_round, self.done)
                self.best_round, self.rewrite_best = self.done, True
            else:
                self.best_round = resumed.best_round
                self.rewrite_best = best is None
            self.best_state = best if best is not None else {k: v.clone() for k, v in resumed.last.items()}
        self._load_server_state(resumed.server, folder / "server.safetensors")
        _logger.info("Resuming from %s after round %d", folder, self.done)
        return resumed

    @staticmethod
    def _check_weights(weights: State, model_state: State, path: Any) -> None:
        """Refuse (by file name) weights that do not fit the model or hold NaN / Inf."""
        missing = sorted(set(model_state) - set(weights))
        try:
            if missing:
                raise UpdateRejected(f"it lacks {len(missing)} entries of the model, e.g. {missing[0]!r}")
            check_update(model_state, weights)
        except UpdateRejected as err:
            raise FederatedError(f"checkpoint file {path} does not fit this model: {err}; it was written for another "
                                 "network or damaged. Use another checkpoint directory, or resume=False to start over") from None

    def _load_server_state(self, server: State, path: Any) -> None:
        aggregator: dict[str, torch.Tensor] = {}
        clients: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in server.items():
            role, _, rest = key.partition("/")
            if role == "aggregator" and rest:
                aggregator[rest] = value
                continue
            client, _, name = rest.partition("/")
            if role != "client" or not client.isdigit() or int(client) >= self.settings.num_clients or not name:
                raise FederatedError(f"checkpoint file {path} holds the entry {key!r}, which is neither 'aggregator/<name>' "
                                     f"nor 'client/<0..{self.settings.num_clients - 1}>/<name>'; use another checkpoint "
                                     "directory, or resume=False to start over")
            clients.setdefault(int(client), {})[name] = value
        try:
            self.aggregator.load_state_dict(aggregator)
        except (ValueError, KeyError, RuntimeError) as err:
            raise FederatedError(f"checkpoint file {path} does not fit the aggregator {self.settings.name('aggregator')!r}: {err}; "
                                 "use another checkpoint directory, or resume=False to start over") from None
        self.client_states.update(clients)

    # ---- one round ------------------------------------------------------------------------------

    def plan(self, t: int, attempt: int = 0, participants: Sequence[Participant] | None = None) -> RoundPlan:
        """Round ``t``'s clients, branch depths, learning rate and seeds (``participants``: default
        every client of the simulation). With ``assignment: capability``, a participant's reported
        budget replaces its profile's; in ``random`` mode budgets are not used."""
        s = self.settings
        sizes = self.client_sizes
        parts = (list(participants) if participants is not None else
                 [Participant(c, samples=sizes[c] if sizes and c < len(sizes) else None) for c in range(s.num_clients)])
        n = len(parts)
        rng = np.random.default_rng([s.seed, t, attempt])
        selected = select_clients(n, s.client_fraction, min(s.min_clients, n), rng)
        mode = s.assignment
        budgets = None
        if mode == "capability":
            mix = client_profiles(n, s.profiles(), seed=s.seed)
            budgets = [float(p.budget) if p.budget is not None else mix[i].budget for i, p in enumerate(parts)]
        depths = assign_branches(selected, len(self.costs), mode, rng, budgets=budgets,
                                 exit_macs=[c.macs for c in self.costs], depth_sampling=s.depth_sampling)
        lr = s.round_lr(t)
        tasks = []
        for i in selected:
            p = parts[i]
            if i not in depths:
                _logger.info("Round %d: %s (budget %s) affords no branch; it sits out", t, p.describe(),
                             budgets[i] if budgets else "")
                continue
            key = p.client if p.client is not None else p.node
            tasks.append(ClientTask(p.client, depths[i], lr, stable_seed(s.seed, t, attempt, key), node=p.node,
                                    max_weight=self.weight_bound(p)))
        return RoundPlan(t, lr, tasks)

    def weight_bound(self, participant: Participant) -> float | None:
        """The most examples ``participant``'s update may count for (see the class doc)."""
        bound = participant.samples
        if bound is None and self.client_sizes:
            bound = max(self.client_sizes)
        cap = self.settings.max_client_samples
        if cap is not None:
            bound = cap if bound is None else min(bound, cap)
        return None if bound is None else float(bound)

    def open(self, plan: RoundPlan, global_state: State) -> RoundResults:
        """The round's result collector, aggregating onto ``global_state``."""
        return RoundResults(plan, self.aggregator.begin(global_state))

    def close(self, results: RoundResults) -> dict[str, torch.Tensor] | None:
        """The new global state, or None when fewer than ``min_clients`` updates were accepted."""
        if results.accepted < self.settings.min_clients:
            return None
        new_state = results.aggregate.result()
        bad = [k for k, v in new_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            _logger.warning("Round %d: the aggregate holds NaN or Inf (%s); the global model is kept",
                            results.plan.round, ", ".join(bad[:3]))
            return None
        return new_state

    def finish(self, results: RoundResults, new_state: State | None) -> dict[str, Any]:
        """Load the new global state (None: keep the model), validate, record, keep the best, checkpoint."""
        s = self.settings
        t = results.plan.round
        server_loss = None
        if new_state is not None:
            self.model.load_state_dict(new_state)
            if s.server_steps != 0:
                assert self.server_labelled is not None
                server_loss = server_pass(self.model, self.server_labelled, s, results.plan.lr, stable_seed(s.seed, t, -1))
            if s.bn_stats != "average":
                reestimate_bn_statistics(self.model, self.server_train)
        metrics = validate(self.model, self.val)
        record = {"round": t, "lr": results.plan.lr, "seconds": time.time() - results.plan.started,
                  **results.summary(), **metrics, **({"server_loss": server_loss} if server_loss is not None else {})}
        self.history.append(record)
        improved = better(metrics, self.history[self.best_round - 1] if self.best_round else None, s.best_by)
        if improved:
            self.best_round = t
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.done = t
        _logger.info("Round %d/%d: val accuracy per exit %s, total loss %.4f%s", t, s.rounds,
                     " ".join(f"{a:.4f}" for a in metrics["exit_accuracy"]), metrics["total_loss"],
                     " (best)" if improved else "")
        if self.on_record is not None:
            self.on_record(record)
        if self.checkpoint is not None:
            state = {"fingerprint": s.fingerprint(), "round": t, "best_round": self.best_round, "history": self.history,
                     **(self.checkpoint_extra() if self.checkpoint_extra else {})}
            self.checkpoint.save(state, self.model.state_dict(),
                                 self.best_state if improved or self.rewrite_best else None, self.server_state())
            self.rewrite_best = False
        return record

    def server_state(self) -> dict[str, torch.Tensor]:
        """The aggregator's state and the clients' objective states, flat, for ``server.safetensors``."""
        out = {f"aggregator/{k}": v for k, v in self.aggregator.state_dict().items()}
        for client, state in self.client_states.items():
            out.update({f"client/{client}/{k}": v for k, v in state.items()})
        return out

    def outcome(self, clients: list[dict[str, Any]]) -> RunOutcome:
        if self.best_state is None:
            raise FederatedError("no round was run: rounds must be larger than the checkpoint's last round")
        return RunOutcome(self.history, self.best_round, self.best_state, clients)
