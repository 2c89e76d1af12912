"""S5: the one round engine every backend uses (claim 5).

Round t: :meth:`RoundEngine.plan` selects the clients and gives each a branch depth, a learning
rate and a seed; the backend moves the global weights to the clients and hands every reply to
the round's :class:`RoundResults` (accepted into the aggregator, rejected with a reason, or
failed); :meth:`RoundEngine.close` aggregates and :meth:`RoundEngine.finish` validates on the
server's split, records the round, keeps the best one and writes the checkpoint. The simulation
backend calls these in this process, the Flower ServerApp from its strategy: a backend only
moves weights to clients and replies back.

Best round (claim 5, "minimum total loss and maximum accuracy"): the round whose validation total
loss ``sum_i lambda_i * CE_i``, rounded to 4 decimals, is lowest; among equal losses the one with
the higher last-exit validation accuracy; then the earlier round.

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
from nni_fedexit.exits import ExitCost, MultiExitNetwork, exit_accuracies, exit_outputs
from nni_fedexit.federated.aggregators import Aggregator, RoundAggregate, make_aggregator
from nni_fedexit.federated.assign import assign_branches, client_profiles, select_clients
from nni_fedexit.federated.checkpoint import Checkpoint, Resumed
from nni_fedexit.federated.errors import FederatedError, UpdateRejected
from nni_fedexit.federated.settings import FederatedSettings

__all__ = [
    "ClientTask", "Participant", "RoundPlan", "RoundResults", "RoundEngine", "RunOutcome", "better", "metric_dict",
    "stable_seed", "validate",
]

_logger = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]


def stable_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash is salted per process)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def validate(model: MultiExitNetwork, data: ImageData) -> dict[str, Any]:
    """Per-exit accuracy and loss, and the total loss sum_i lambda_i * CE_i, on ``data``."""
    logits, labels = exit_outputs(model, data)
    losses = [float(F.cross_entropy(z, labels)) for z in logits]
    return {
        "exit_accuracy": exit_accuracies(logits, labels),
        "exit_loss": losses,
        "total_loss": float(sum(w * l for w, l in zip(model.loss_weights, losses))),
    }


def better(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether validation metrics ``new`` make a better round than ``old`` (see the module doc)."""
    if old is None:
        return True
    key = lambda m: (round(m["total_loss"], 4), -m["exit_accuracy"][-1])  # noqa: E731
    return key(new) < key(old)


def metric_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What NNI shows: the last exit's validation accuracy as "default", every exit, the total loss."""
    out = {"default": float(metrics["exit_accuracy"][-1]), "total_loss": float(metrics["total_loss"])}
    out.update({f"exit{i + 1}": float(a) for i, a in enumerate(metrics["exit_accuracy"])})
    return out


@dataclass(frozen=True)
class Participant:
    """A client that can take part in a round: its partition (``client``), its Flower node, its budget."""

    #: its partition of the data set (the simulation's client index); None: a node with only its own data
    client: int | None
    node: int | None = None
    #: the share of the full model's MACs it reported it can run (None: the profile mix decides)
    budget: float | None = None

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

    @property
    def accepted(self) -> int:
        return self.aggregate.count

    def accept(self, task: ClientTask, update: State, weight: float, loss: float,
               allowed: Sequence[str] | None = None) -> bool:
        """Add a client's update (refused, and recorded, if it does not fit); True when accepted."""
        try:
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
    """

    def __init__(self, model: MultiExitNetwork, settings: FederatedSettings, costs: Sequence[ExitCost], val: ImageData,
                 checkpoint: Checkpoint | None = None, on_record: Callable[[dict[str, Any]], None] | None = None,
                 checkpoint_extra: Callable[[], dict[str, Any]] | None = None):
        self.model = model
        self.settings = settings
        self.costs = list(costs)
        self.val = val
        self.checkpoint = checkpoint
        self.on_record = on_record
        self.checkpoint_extra = checkpoint_extra
        self.aggregator: Aggregator = make_aggregator(settings)
        #: each client's objective state, kept across rounds and in the checkpoint (in-process clients)
        self.client_states: dict[int, dict[str, torch.Tensor]] = {}
        self.history: list[dict[str, Any]] = []
        self.best_round = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        #: rounds already done (a resumed run goes on after them)
        self.done = 0

    # ---- resume ---------------------------------------------------------------------------------

    def resume(self) -> Resumed | None:
        """Go on from the checkpoint, if there is one for these settings: weights, history, best round, states."""
        resumed = self.checkpoint.resume_point(self.settings) if self.checkpoint is not None else None
        if resumed is None:
            return None
        self.model.load_state_dict(resumed.last)
        self.history = list(resumed.state["history"])
        self.done = resumed.round
        if resumed.best is not None and resumed.best_round:
            self.best_state, self.best_round = resumed.best, resumed.best_round
        self.aggregator.load_state_dict({k[len("aggregator/"):]: v for k, v in resumed.server.items()
                                         if k.startswith("aggregator/")})
        for key, value in resumed.server.items():
            if key.startswith("client/"):
                _, client, name = key.split("/", 2)
                self.client_states.setdefault(int(client), {})[name] = value
        _logger.info("Resuming from %s after round %d", self.checkpoint.folder, self.done)  # type: ignore[union-attr]
        return resumed

    # ---- one round ------------------------------------------------------------------------------

    def plan(self, t: int, attempt: int = 0, participants: Sequence[Participant] | None = None) -> RoundPlan:
        """Round ``t``'s clients, branch depths, learning rate and seeds (``participants``: default
        every client of the simulation). Capability assignment is used when the settings ask for
        it or a participant reported a budget."""
        s = self.settings
        parts = list(participants) if participants is not None else [Participant(c) for c in range(s.num_clients)]
        n = len(parts)
        rng = np.random.default_rng([s.seed, t, attempt])
        selected = select_clients(n, s.client_fraction, min(s.min_clients, n), rng)
        reported = [p.budget for p in parts]
        mode = "capability" if s.assignment == "capability" or any(b is not None for b in reported) else "random"
        budgets = None
        if mode == "capability":
            mix = client_profiles(n, s.profiles(), seed=s.seed)
            budgets = [float(b) if b is not None else mix[i].budget for i, b in enumerate(reported)]
        depths = assign_branches(selected, len(self.costs), mode, rng, budgets=budgets,
                                 exit_macs=[c.macs for c in self.costs])
        lr = s.round_lr(t)
        tasks = []
        for i in selected:
            p = parts[i]
            if i not in depths:
                _logger.info("Round %d: %s (budget %s) affords no branch; it sits out", t, p.describe(),
                             budgets[i] if budgets else "")
                continue
            key = p.client if p.client is not None else p.node
            tasks.append(ClientTask(p.client, depths[i], lr, stable_seed(s.seed, t, attempt, key), node=p.node))
        return RoundPlan(t, lr, tasks)

    def open(self, plan: RoundPlan, global_state: State) -> RoundResults:
        """The round's result collector, aggregating onto ``global_state``."""
        return RoundResults(plan, self.aggregator.begin(global_state))

    def close(self, results: RoundResults) -> dict[str, torch.Tensor] | None:
        """The new global state, or None when fewer than ``min_clients`` updates were accepted."""
        if results.accepted < self.settings.min_clients:
            return None
        return results.aggregate.result()

    def finish(self, results: RoundResults, new_state: State | None) -> dict[str, Any]:
        """Load the new global state (None: keep the model), validate, record, keep the best, checkpoint."""
        s = self.settings
        t = results.plan.round
        if new_state is not None:
            self.model.load_state_dict(new_state)
        metrics = validate(self.model, self.val)
        record = {"round": t, "lr": results.plan.lr, "seconds": time.time() - results.plan.started,
                  **results.summary(), **metrics}
        self.history.append(record)
        improved = better(metrics, self.history[self.best_round - 1] if self.best_round else None)
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
            self.checkpoint.save(state, self.model.state_dict(), self.best_state if improved else None,
                                 self.server_state())
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
