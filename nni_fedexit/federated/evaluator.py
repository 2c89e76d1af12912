"""S5: FederatedEvaluator, an NNI evaluator that trains the exit-point model on edge clients.

Given a network frozen from the block-pool space, it builds the :class:`MultiExitNetwork` and runs
T rounds (claim 5): select clients, assign each a branch model (random, or by capability), let the
clients train their branches on their own partitions, aggregate by name (depth-aware FedAvg),
validate on the server's split, report the round to NNI, keep the best round, checkpoint.

Best round (claim 5, "minimum total loss and maximum accuracy"): the round whose validation total
loss ``sum_i lambda_i * CE_i``, rounded to 4 decimals, is lowest; among equal losses the one with
the higher last-exit validation accuracy; then the earlier round.

Every random choice of round t comes from generators seeded by ``(seed, t)`` (and the client),
so a run stopped after any round and resumed from its checkpoint ends with exactly the model of
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_fedexit.nni_tools import compat  # noqa: F401
import nni
from nni.nas.evaluator import MutableEvaluator

from nni_fedexit.data import DataBundle, ImageData, label_skew, load_dataset, partition, split_roles
from nni_fedexit.exits import ExitCost, MultiExitNetwork, exit_accuracies, exit_costs, exit_outputs
from nni_fedexit.space import architecture_label
from nni_fedexit.federated.aggregators.fedavg import UpdateRejected, WeightedMean
from nni_fedexit.federated.assign import DEFAULT_PROFILE_MIX, ClientProfile, assign_branches, client_profiles, select_clients
from nni_fedexit.federated.client import ClientUpdate, LocalSettings
from nni_fedexit.federated.backends.simulation import ClientTask, SimulationBackend

__all__ = ["FederatedSettings", "FederatedError", "FederatedResult", "FederatedEvaluator", "federate"]

_logger = logging.getLogger(__name__)

#: "simulation": clients trained in this process; "flower": SuperNodes of a Flower SuperLink
BACKENDS = ("simulation", "flower")
#: settings that do not change what a run computes: a checkpoint may be resumed with others
_OPERATIONAL = ("rounds", "checkpoint_dir", "resume", "data_dir", "device", "backend", "flower_superlink",
                "flower_home", "node_wait", "round_timeout", "client_threads")


class FederatedError(RuntimeError):
    """The federated run cannot go on (e.g. too few client updates); the message says why."""


@dataclass
class FederatedSettings:
    """Everything a federated run depends on. Plain values, so NNI can ship it to a trial."""

    rounds: int = 10
    num_clients: int = 10
    #: share of the clients selected each round (at least ``min_clients``)
    client_fraction: float = 1.0
    #: a round counts only if at least this many client updates were accepted
    min_clients: int = 2
    #: "random" (the patent) or "capability" (the deepest branch a client's profile affords)
    assignment: str = "random"
    #: capability mode: [[name, budget (share of the full model's MACs), share of clients], ...]
    profile_mix: list | None = None
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    #: the learning rate of round t is lr * lr_decay ** (t - 1)
    lr_decay: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: client partition: "iid", "dirichlet" (alpha) or "shards" (classes_per_client)
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    server_fraction: float = 0.2
    val_fraction: float = 0.2
    #: caps for CPU-sized runs (None: everything)
    client_samples: int | None = None
    val_samples: int | None = None
    test_samples: int | None = None
    #: exit heads: "linear" or "conv"; lambda_i per exit (None: all 1)
    head: str = "conv"
    head_width: int | None = None
    loss_weights: list | None = None
    #: True: a client trains every exit along its branch (deep supervision); False: exit i only
    branch_all_exits: bool = True
    #: attempts of a round that got fewer than min_clients updates, before the run stops
    round_retries: int = 1
    backend: str = "simulation"
    #: flower backend: the SuperLink connection (a ``[superlink.NAME]`` entry of
    #: ``$FLWR_HOME/config.toml``) the run is submitted to with ``flwr run``
    flower_superlink: str | None = None
    #: flower backend: FLWR_HOME of the ``flwr`` CLI (None: the environment's, else ``~/.flwr``)
    flower_home: str | None = None
    #: flower backend: seconds the server waits for ``min_clients`` SuperNodes before round 1
    node_wait: float = 120.0
    #: flower backend: seconds a round waits for the nodes' replies (late ones are left out)
    round_timeout: float = 600.0
    #: flower backend: torch threads of each ClientApp (0: torch's default)
    client_threads: int = 0
    checkpoint_dir: str | None = None
    resume: bool = True
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        # 1 and 1.0 are the same setting (JSON round trips, e.g. NNI resuming a trial, drop the ".0"):
        # float fields hold floats, so the fingerprint does not depend on how a number was written
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(f.default) is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))

        def positive(key: str) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")

        for key in ("rounds", "num_clients", "min_clients", "local_epochs", "batch_size"):
            positive(key)
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients: {self.min_clients} is more than num_clients ({self.num_clients})")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"client_fraction: must be in (0, 1], got {self.client_fraction}")
        if self.assignment not in ("random", "capability"):
            raise ValueError(f"assignment: must be 'random' or 'capability', got {self.assignment!r}")
        if self.partition not in ("iid", "dirichlet", "shards"):
            raise ValueError(f"partition: must be 'iid', 'dirichlet' or 'shards', got {self.partition!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "flower" and not self.flower_superlink:
            raise ValueError("flower_superlink: the flower backend needs the name of a SuperLink connection "
                             "([superlink.NAME] in $FLWR_HOME/config.toml), e.g. flower_superlink='local-deploy'")
        for key in ("node_wait", "round_timeout"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0 seconds, got {getattr(self, key)}")
        if self.client_threads < 0:
            raise ValueError(f"client_threads: must be >= 0 (0: torch's default), got {self.client_threads}")
        for key in ("lr", "lr_decay"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.round_retries < 0:
            raise ValueError(f"round_retries: must be >= 0, got {self.round_retries}")

    def profiles(self) -> list[tuple[ClientProfile, float]]:
        if self.profile_mix is None:
            return list(DEFAULT_PROFILE_MIX)
        try:
            return [(ClientProfile(str(name), float(budget)), float(share)) for name, budget, share in self.profile_mix]
        except (TypeError, ValueError) as err:
            raise ValueError(f"profile_mix: expected [[name, budget, share], ...], got {self.profile_mix!r}") from err

    def local_settings(self) -> LocalSettings:
        """What every client's local training takes from these settings (all backends)."""
        return LocalSettings(epochs=self.local_epochs, batch_size=self.batch_size, momentum=self.momentum,
                             weight_decay=self.weight_decay)

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed (everything but rounds, paths and backend)."""
        d = dataclasses.asdict(self)
        for key in _OPERATIONAL:
            d.pop(key)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FederatedResult:
    """A finished run: the best round's model, and everything measured on the way."""

    model: MultiExitNetwork
    best_round: int
    history: list[dict[str, Any]]
    test_accuracy: list[float]
    exit_costs: list[ExitCost]
    #: p_h: parameters of the network as searched (before exits replaced its head)
    params: int
    clients: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> dict[str, Any]:
        return self.history[self.best_round - 1]


class FederatedData:
    """The server's validation split, the test set, and every client's partition, loaded once."""

    def __init__(self, settings: FederatedSettings, bundle: DataBundle | None = None):
        s = settings
        self.bundle = bundle or load_dataset(s.dataset, data_dir=s.data_dir)
        train = self.bundle.train
        roles = split_roles(len(train), s.server_fraction, s.val_fraction, seed=s.seed)
        pool = roles.clients
        if s.client_samples is not None:
            pool = np.sort(np.random.default_rng(s.seed).permutation(pool)[: s.client_samples])
        labels = train.labels.numpy()[pool]
        parts = partition(labels, s.num_clients, s.partition, seed=s.seed, alpha=s.alpha,
                          classes_per_client=s.classes_per_client)
        self.clients = [train.subset(pool[p]) for p in parts]
        self.val = train.subset(roles.search_val[: s.val_samples])
        test = self.bundle.test
        self.test = test if s.test_samples is None else test.subset(np.arange(min(s.test_samples, len(test))))
        self.label_skew = label_skew(labels, parts)
        num_classes = self.bundle.num_classes
        self.summary = [
            {"client": i, "samples": len(c), "labels": torch.bincount(c.labels, minlength=num_classes).tolist()}
            for i, c in enumerate(self.clients)
        ]


def _seed(*parts: int) -> int:
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


def _better(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    if old is None:
        return True
    key = lambda m: (round(m["total_loss"], 4), -m["exit_accuracy"][-1])  # noqa: E731
    return key(new) < key(old)


class _Checkpoint:
    """``last.safetensors`` + ``best.safetensors`` + ``state.json`` in one folder, written atomically."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def state(self) -> dict[str, Any] | None:
        """``state.json``, or None while it is not there (or being replaced): for watchers of a run."""
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def resume_point(self, settings: "FederatedSettings") -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                    dict[str, torch.Tensor] | None] | None:
        """``(state, last, best)`` to go on from, or None to start at round 1 (no checkpoint, or
        ``resume`` off); a checkpoint written with other settings is an error."""
        if not settings.resume or not self.exists():
            return None
        state, last, best = self.load()
        if state.get("fingerprint") != settings.fingerprint():
            raise FederatedError(
                f"checkpoint in {self.folder} was written with other settings (data, partition, model or training); "
                "use another checkpoint directory, or resume=False (resume=false in a Flower run config) to start over"
            )
        return state, last, best

    def save(self, state: Mapping[str, Any], last: Mapping[str, torch.Tensor], best: Mapping[str, torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        self._atomic(self.folder / "last.safetensors", lambda p: save_file(_contiguous(last), str(p)))
        if best is not None:
            self._atomic(self.folder / "best.safetensors", lambda p: save_file(_contiguous(best), str(p)))
        self._atomic(self.folder / "state.json", lambda p: p.write_text(json.dumps(state, indent=1)))

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        from safetensors.torch import load_file

        state = json.loads((self.folder / "state.json").read_text())
        last = load_file(str(self.folder / "last.safetensors"))
        best_path = self.folder / "best.safetensors"
        return state, last, (load_file(str(best_path)) if best_path.is_file() else None)

    @staticmethod
    def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def federate(
    network: nn.Module,
    settings: FederatedSettings,
    data: FederatedData | None = None,
    backend_factory: Callable[..., Any] | None = None,
    report: bool = True,
) -> FederatedResult:
    """Train the exit-point model of ``network`` for ``settings.rounds`` rounds; see the module doc.

    ``network`` is a network frozen from the block-pool space (its exits are added here), or a
    :class:`MultiExitNetwork` to train further.
    ``backend_factory(template, client_data, local_settings, all_exits)`` builds the client
    backend (default: :class:`SimulationBackend`).
    """
    s = settings
    params = sum(p.numel() for p in network.parameters())
    if isinstance(network, MultiExitNetwork):  # continue training a given exit-point model
        model = network
    else:
        torch.manual_seed(_seed(s.seed, 0))  # the exits' initial weights
        model = MultiExitNetwork.from_network(network, head=s.head, head_width=s.head_width, loss_weights=s.loss_weights)
    model.to(s.device)
    data = data or FederatedData(s)
    costs = exit_costs(model, data.val.images[:1].to(s.device))
    if s.backend == "flower":
        from nni_fedexit.federated.backends.flower.submit import run_on_flower

        def on_round(record: Mapping[str, Any]) -> None:
            _logger.info("Round %d/%d: val accuracy per exit %s, total loss %.4f", record["round"], s.rounds,
                         " ".join(f"{a:.4f}" for a in record["exit_accuracy"]), record["total_loss"])
            if report:
                nni.report_intermediate_result(_metric_dict(record))

        history, best_round, best_state, state = run_on_flower(model, s, on_round)
        clients = [{"node": int(n), **p} for n, p in state.get("nodes", {}).items()]
    else:
        history, best_round, best_state = _simulate(model, s, data, costs, backend_factory, report)
        clients = data.summary

    if best_state is None:
        raise FederatedError("no round was run: rounds must be larger than the checkpoint's last round")
    model.load_state_dict(best_state)
    logits, labels = exit_outputs(model, data.test)
    test_accuracy = exit_accuracies(logits, labels)
    result = FederatedResult(model, best_round, history, test_accuracy, costs, params, clients)
    if report:
        final: dict[str, Any] = _metric_dict(history[best_round - 1])
        final.update({"params": float(params), "best_round": best_round})
        if model.arch:
            final["architecture"] = architecture_label(model.arch)
        final.update({f"test_exit{i + 1}": a for i, a in enumerate(test_accuracy)})
        nni.report_final_result(final)
    return result


def _simulate(
    model: MultiExitNetwork, s: FederatedSettings, data: FederatedData, costs: Sequence[ExitCost],
    backend_factory: Callable[..., Any] | None, report: bool,
) -> tuple[list[dict[str, Any]], int, dict[str, torch.Tensor] | None]:
    """The rounds of the ``simulation`` backend: ``(history, best_round, best_state)``."""
    profiles = client_profiles(s.num_clients, s.profiles(), seed=s.seed) if s.assignment == "capability" else None
    backend = (backend_factory or SimulationBackend)(model, data.clients, s.local_settings(), s.branch_all_exits)

    history: list[dict[str, Any]] = []
    best_round = 0
    best_state: dict[str, torch.Tensor] | None = None
    start = 1
    ckpt = _Checkpoint(s.checkpoint_dir) if s.checkpoint_dir else None
    resumed = ckpt.resume_point(s) if ckpt is not None else None
    if resumed is not None:
        saved, last, best = resumed
        model.load_state_dict(last)
        history = saved["history"]
        start = saved["round"] + 1
        if best is not None and saved["best_round"]:
            best_state, best_round = best, int(saved["best_round"])
        _logger.info("Resuming from %s after round %d", ckpt.folder, saved["round"])

    for t in range(start, s.rounds + 1):
        t0 = time.time()
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        outcome = None
        for attempt in range(s.round_retries + 1):
            outcome = _run_round(t, attempt, s, backend, global_state, profiles, costs)
            if outcome["accepted"] >= s.min_clients:
                break
            _logger.warning("Round %d: only %d of %d client updates accepted (min_clients=%d)%s", t,
                            outcome["accepted"], len(outcome["tasks"]), s.min_clients,
                            "; retrying" if attempt < s.round_retries else "")
        assert outcome is not None
        if outcome["accepted"] < s.min_clients:
            raise FederatedError(
                f"round {t}: only {outcome['accepted']} client updates were accepted after {s.round_retries + 1} "
                f"attempts, fewer than min_clients={s.min_clients}. Rounds 1..{t - 1} are kept"
                + (f" in {ckpt.folder}; rerun to resume" if ckpt else "")
                + "; lower min_clients or check the failing clients in the log."
            )
        model.load_state_dict(outcome["state"])
        metrics = validate(model, data.val)
        record = {
            "round": t, "lr": s.lr * s.lr_decay ** (t - 1), "seconds": time.time() - t0,
            "clients": outcome["tasks"], "accepted": outcome["accepted"],
            "rejected": outcome["rejected"], "failed": outcome["failed"],
            "train_loss": outcome["train_loss"], **metrics,
        }
        history.append(record)
        improved = _better(metrics, history[best_round - 1] if best_round else None)
        if improved:
            best_round = t
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        _logger.info(
            "Round %d/%d: val accuracy per exit %s, total loss %.4f%s", t, s.rounds,
            " ".join(f"{a:.4f}" for a in metrics["exit_accuracy"]), metrics["total_loss"], " (best)" if improved else "",
        )
        if report:
            nni.report_intermediate_result(_metric_dict(metrics))
        if ckpt is not None:
            ckpt.save({"fingerprint": s.fingerprint(), "round": t, "best_round": best_round, "history": history},
                      model.state_dict(), best_state if improved else None)

    return history, best_round, best_state


def _metric_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What NNI shows: the last exit's validation accuracy as "default", every exit, the total loss."""
    out = {"default": float(metrics["exit_accuracy"][-1]), "total_loss": float(metrics["total_loss"])}
    out.update({f"exit{i + 1}": float(a) for i, a in enumerate(metrics["exit_accuracy"])})
    return out


def _run_round(
    t: int, attempt: int, s: FederatedSettings, backend: Any, global_state: Mapping[str, torch.Tensor],
    profiles: Sequence[ClientProfile] | None, costs: Sequence[ExitCost],
) -> dict[str, Any]:
    """One round's selection, assignment, client training and aggregation."""
    rng = np.random.default_rng([s.seed, t, attempt])
    selected = select_clients(s.num_clients, s.client_fraction, s.min_clients, rng)
    depths = assign_branches(
        selected, len(costs), s.assignment, rng,
        budgets=[p.budget for p in profiles] if profiles else None, exit_macs=[c.macs for c in costs],
    )
    for c in selected:
        if c not in depths:
            _logger.info("Round %d: client %d (%s) affords no branch; it sits out", t, c, profiles[c].name if profiles else "")
    lr = s.lr * s.lr_decay ** (t - 1)
    tasks = [ClientTask(c, depths[c], lr, _seed(s.seed, t, attempt, c)) for c in selected if c in depths]
    acc = WeightedMean(global_state)
    rejected: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    losses: list[float] = []

    def on_update(task: ClientTask, update: ClientUpdate) -> None:
        try:
            if not math.isfinite(update.loss):
                raise UpdateRejected(f"its training loss is {update.loss}")
            acc.add(update.state, update.num_samples)
            losses.append(update.loss)
        except UpdateRejected as err:
            _logger.warning("Round %d: update of client %d (branch %d) rejected: %s", t, task.client, task.depth, err)
            rejected.append({"client": task.client, "reason": str(err)})

    def on_failure(task: ClientTask, err: BaseException) -> None:
        _logger.warning("Round %d: client %d (branch %d) failed and is dropped from the round: %s: %s",
                        t, task.client, task.depth, type(err).__name__, err)
        failed.append({"client": task.client, "reason": f"{type(err).__name__}: {err}"})

    backend.run_round(global_state, tasks, on_update, on_failure)
    return {
        "state": acc.result(),
        "tasks": [{"client": task.client, "depth": task.depth, "seed": task.seed} for task in tasks],
        "accepted": acc.count,
        "rejected": rejected,
        "failed": failed,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
    }


@nni.trace
class FederatedEvaluator(MutableEvaluator):
    """An NNI evaluator: federated training of the exit-point model of the network it is given.

    Keyword arguments are :class:`FederatedSettings` fields. Use it as the evaluator of a
    ``NasExperiment`` (one trial per architecture, or the single trial of the final federated
    stage: the web UI draws one point per round), or from Python with :meth:`fit`.
    """

    def __init__(self, **settings: Any):
        self.settings = FederatedSettings(**settings)
        self.result: FederatedResult | None = None

    def extra_repr(self) -> str:
        s = self.settings
        return f"rounds={s.rounds}, num_clients={s.num_clients}, assignment={s.assignment!r}, partition={s.partition!r}"

    def fit(self, network: nn.Module, data: FederatedData | None = None, report: bool = True) -> FederatedResult:
        """Run the federated training; returns the trained model and what was measured."""
        settings = self.settings
        if settings.checkpoint_dir is None and nni.get_trial_id() != "STANDALONE":
            out = os.environ.get("NNI_OUTPUT_DIR")
            if out:
                settings = dataclasses.replace(settings, checkpoint_dir=str(Path(out) / "federated"))
        self.result = federate(network, settings, data=data, report=report)
        return self.result

    def _execute(self, model: Any) -> Any:
        # NNI builds the trial's network right after this: seeded, its initial weights are those
        # of a deployment's ServerApp (flower.common.build_model) and the same in every run
        torch.manual_seed(_seed(self.settings.seed))
        return super()._execute(model)

    def evaluate(self, model: nn.Module) -> FederatedResult:
        return self.fit(model)
