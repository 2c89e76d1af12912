"""S5 settings: everything a federated run depends on, checked once when they are built.

:class:`FederatedSettings` holds plain values (NNI ships it to a trial as keyword arguments, the
Flower backend as a flat run config); building one checks every field, and an error starts with
the field's name, which the run config prefixes with ``federated.``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from nni_fedexit.checks import check_fields, positive_int
from nni_fedexit.exits import EXIT_HEADS
from nni_fedexit.federated.aggregators import aggregator_names
from nni_fedexit.federated.assign import DEFAULT_PROFILE_MIX, DEPTH_SAMPLING, ClientProfile
from nni_fedexit.federated.batchnorm import BN_STATS
from nni_fedexit.federated.backends import backend_names
from nni_fedexit.federated.client import LocalSettings
from nni_fedexit.federated.depthwise import CLIENT_TRAINING, SEGMENT_DATA
from nni_fedexit.federated.objectives import objective_names

__all__ = ["BEST_BY", "FederatedSettings", "OPERATIONAL"]

#: the values of ``best_by``
BEST_BY = ("total_loss", "last_exit")

#: settings that do not change what a run computes: a checkpoint may be resumed with others
OPERATIONAL = ("rounds", "checkpoint_dir", "resume", "data_dir", "device", "backend", "flower_superlink",
               "flower_home", "node_wait", "round_timeout", "client_threads", "workers", "client_num_cpus",
               "client_num_gpus", "ray_address")

#: settings added after checkpoints were first written, with the values that compute what runs did
#: before them (left out of the fingerprint at those, so a checkpoint of an earlier version resumes
#: exactly when they are set so)
_ADDED_LATER = {
    "max_client_samples": None, "distill_weight": 0.0, "distill_temperature": 1.0, "prox_mu": 0.01, "dyn_alpha": 0.01,
    "server_lr": None, "server_momentum": 0.9, "server_beta2": 0.99, "server_tau": 0.001, "bn_stats": "average",
    "bn_samples": 2000, "depth_sampling": "uniform", "client_training": "branch", "segment_data": "all", "logit_tau": 1.0, "server_steps": 0,
    "server_samples": None, "best_by": "total_loss",
}


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
    #: random mode: how a branch depth is drawn: "uniform", or "proportional" (depth d with
    #: probability proportional to d, so deep stages are trained by more clients per round)
    depth_sampling: str = "proportional"
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
    #: "branch" (the patent): a client trains its branch model, stages 1..d; "depthwise": it trains
    #: every stage, the deeper ones in segments that save no more for backward than its branch
    #: (federated/depthwise.py), so every client's data reaches every stage
    client_training: str = "depthwise"
    #: depthwise: "all" (each segment trains on all of a client's data: a local pass costs up to
    #: about 1.5 x the full model's) or "split" (a client's data is split among its segments: a pass
    #: costs about what its branch's did, each stage sees a share of the data)
    segment_data: str = "split"
    #: the server's aggregation rule, by name (``federated.aggregators``): "fedavg" is the depth-aware mean
    aggregator: str = "fedavg"
    #: the clients' training objective, by name (``federated.objectives``): "logit_adjusted" is claim 6's
    #: loss on logits shifted by the client's own label prior (``logit_tau``), "multi_exit" claim 6's loss
    #: as it stands; "fedprox" adds a proximal term (``prox_mu``); "feddyn" FedDyn's dynamic regulariser (``dyn_alpha``)
    objective: str = "logit_adjusted"
    #: self-distillation between the exits a branch holds (DepthFL): weight of the mutual KL term (0: off)
    distill_weight: float = 1.0
    #: softmax temperature of that KL term
    distill_temperature: float = 1.0
    #: objective "fedprox": mu of the proximal term mu/2 * ||w - w_global||^2
    prox_mu: float = 0.01
    #: objective "feddyn": alpha of FedDyn's regulariser (each client's gradient state is kept across rounds)
    dyn_alpha: float = 0.01
    #: objective "logit_adjusted": tau of the shift ``tau * log p_client`` of every exit's logits
    logit_tau: float = 1.0
    #: server optimisers ("fedavgm", "fedadam", "fedyogi"): step size on the depth-aware mean's
    #: pseudo-gradient (None: 1.0 for fedavgm, 0.01 for fedadam and fedyogi)
    server_lr: float | None = None
    #: server momentum (fedavgm's beta, fedadam/fedyogi's beta_1)
    server_momentum: float = 0.9
    #: fedadam / fedyogi: beta_2 and the adaptivity tau (Reddi et al. 2021)
    server_beta2: float = 0.99
    server_tau: float = 0.001
    #: BatchNorm running statistics: "average" (averaged with the weights), "server" (re-estimated
    #: on the server's own training split after every aggregation) or "local" (FedBN: each client
    #: keeps its BatchNorm layers; the server re-estimates the global model's statistics)
    bn_stats: str = "server"
    #: examples of the server's training split the re-estimation passes through the model
    bn_samples: int = 2000
    #: SGD steps (of ``batch_size`` images) the server trains the new global model on its own
    #: labelled images after every aggregation, every exit, the clients' objective without
    #: client terms (None: one pass over those images, 150 steps in the demo; 0: the server does not train)
    server_steps: int | None = None
    #: the server's labelled images those steps draw from: the first of its search-train split
    #: (None: half of it); the early-exit guarantee is certified on the others
    server_samples: int | None = None
    #: how the best round is chosen: "total_loss" (claim 5: lowest validation total loss, then the
    #: last exit's accuracy) or "last_exit" (highest last-exit validation accuracy, then total loss)
    best_by: str = "total_loss"
    #: the most examples one client's update may count for in the weighted mean (None: the size of
    #: its partition; a device with its own images, the largest partition). Replies claiming more are rejected
    max_client_samples: int | None = None
    #: attempts of a round that got fewer than min_clients updates, before the run stops
    round_retries: int = 1
    #: where the rounds run, by name (``federated.backends``): "simulation" (in this process),
    #: "flower-simulation" (virtual SuperNodes on Flower's simulation engine, Ray) or "flower"
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
    #: torch threads of each client's training (0: torch's default; 1 when ``workers`` > 1)
    client_threads: int = 0
    #: clients trained at the same time: ``simulation``: threads of this process (each with its
    #: own copy of the model); ``flower-simulation``: Ray actors (``workers * client_num_cpus``
    #: CPUs for a Ray instance this run starts; an existing cluster's size decides otherwise)
    workers: int = 1
    #: flower-simulation: CPUs and GPUs each virtual SuperNode's ClientApp holds (fractions allowed)
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    #: flower-simulation: address of a running Ray cluster (``ray start --head``), e.g.
    #: "127.0.0.1:6379"; None: a private Ray instance on this machine, started and stopped by the run
    ray_address: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = True
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        # 1 and 1.0 are the same setting (JSON round trips, e.g. NNI resuming a trial, drop the ".0"):
        # float fields hold floats, so the fingerprint does not depend on how a number was written
        check_fields(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if str(f.type).startswith("float") and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        for key in ("rounds", "num_clients", "min_clients", "local_epochs", "batch_size", "classes_per_client", "bn_samples"):
            positive_int(key, getattr(self, key))
        for key in ("client_samples", "val_samples", "test_samples", "head_width", "max_client_samples", "server_samples"):
            if getattr(self, key) is not None:
                positive_int(key, getattr(self, key))
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients: {self.min_clients} is more than num_clients ({self.num_clients})")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"client_fraction: must be in (0, 1], got {self.client_fraction}")
        for key, allowed in (("assignment", ("random", "capability")), ("partition", ("iid", "dirichlet", "shards")),
                             ("head", EXIT_HEADS), ("aggregator", aggregator_names()),
                             ("objective", objective_names()), ("backend", backend_names()),
                             ("bn_stats", BN_STATS), ("depth_sampling", DEPTH_SAMPLING),
                             ("client_training", CLIENT_TRAINING), ("best_by", BEST_BY),
                             ("segment_data", SEGMENT_DATA)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.backend == "flower" and not self.flower_superlink:
            raise ValueError("flower_superlink: the flower backend needs the name of a SuperLink connection "
                             "([superlink.NAME] in $FLWR_HOME/config.toml), e.g. flower_superlink='local-deploy'")
        for key in ("node_wait", "round_timeout", "lr", "lr_decay", "alpha", "distill_temperature", "server_tau",
                    "logit_tau"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        for key in ("momentum", "weight_decay", "distill_weight", "prox_mu", "dyn_alpha"):
            if not getattr(self, key) >= 0 or not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key}: must be a finite number >= 0, got {getattr(self, key)}")
        if self.server_lr is not None and not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr: must be a finite number > 0 (or None for the aggregator's default), "
                             f"got {self.server_lr}")
        for key in ("server_momentum", "server_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        positive_int("workers", self.workers)
        if not (math.isfinite(self.client_num_cpus) and self.client_num_cpus > 0):
            raise ValueError(f"client_num_cpus: must be a number > 0 (a fraction is allowed), got {self.client_num_cpus}")
        if not (math.isfinite(self.client_num_gpus) and self.client_num_gpus >= 0):
            raise ValueError(f"client_num_gpus: must be a number >= 0 (a fraction is allowed), got {self.client_num_gpus}")
        if self.client_num_gpus > 0 and not str(self.device).startswith("cuda"):
            raise ValueError(f"client_num_gpus: {self.client_num_gpus} GPUs per client, but device is "
                             f"{self.device!r}; set device: cuda (or client_num_gpus: 0)")
        if self.ray_address is not None and not str(self.ray_address).strip():
            raise ValueError("ray_address: empty; give the cluster's HOST:PORT (ray start --head prints it), or leave it out")
        if self.client_threads < 0:
            raise ValueError(f"client_threads: must be >= 0 (0: torch's default), got {self.client_threads}")
        if self.server_steps is not None and (isinstance(self.server_steps, bool) or not isinstance(self.server_steps, int)
                                              or self.server_steps < 0):
            raise ValueError(f"server_steps: must be an integer >= 0 (0: the server does not train; leave it out for one "
                             f"pass over the server's labelled images), got {self.server_steps!r}")
        if self.round_retries < 0:
            raise ValueError(f"round_retries: must be >= 0, got {self.round_retries}")
        for key in ("server_fraction", "val_fraction"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"{key}: must be in (0, 1), got {getattr(self, key)}")
        if self.loss_weights is not None:
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                       for w in self.loss_weights):
                raise ValueError(f"loss_weights: expected a list of finite non-negative numbers (one per exit), "
                                 f"got {self.loss_weights!r}")
        self.profiles()

    def profiles(self) -> list[tuple[ClientProfile, float]]:
        """The capability mode's device classes and their shares of the clients."""
        if self.profile_mix is None:
            return list(DEFAULT_PROFILE_MIX)
        try:
            mix = [(ClientProfile(str(name), float(budget)), float(share)) for name, budget, share in self.profile_mix]
        except (TypeError, ValueError) as err:
            raise ValueError(f"profile_mix: expected [[name, budget, share], ...], got {self.profile_mix!r}") from err
        if not mix or any(share < 0 for _, share in mix) or sum(share for _, share in mix) <= 0:
            raise ValueError(f"profile_mix: shares must be non-negative with a positive sum, got {self.profile_mix!r}")
        return mix

    def server_images(self, available: int) -> int:
        """How many of the server's ``available`` search-train images its steps train on: the
        first ``server_samples`` (None: half), 0 with ``server_steps: 0``."""
        if self.server_steps == 0:
            return 0
        return available // 2 if self.server_samples is None else min(self.server_samples, available)

    def server_step_count(self, labelled: int) -> int:
        """The server's SGD steps a round on ``labelled`` images: ``server_steps``, or one pass
        over them (at least one step) when it is None."""
        if self.server_steps is not None:
            return self.server_steps
        return max(1, labelled // self.batch_size) if labelled > 0 else 0

    def round_lr(self, t: int) -> float:
        """The clients' learning rate in round ``t`` (1-based): ``lr * lr_decay ** (t - 1)``."""
        return self.lr * self.lr_decay ** (t - 1)

    def local_settings(self) -> LocalSettings:
        """What every client's local training takes from these settings (all backends)."""
        return LocalSettings(epochs=self.local_epochs, batch_size=self.batch_size, momentum=self.momentum,
                             weight_decay=self.weight_decay, local_bn=self.bn_stats == "local", mode=self.client_training,
                             segment_data=self.segment_data)

    def fingerprint(self) -> str:
        """What a checkpoint must agree on to be resumed (everything but rounds, paths and backend)."""
        d = dataclasses.asdict(self)
        for key in OPERATIONAL:
            d.pop(key)
        for key, default in _ADDED_LATER.items():  # so checkpoints of earlier versions still resume
            if d[key] == default:
                d.pop(key)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
