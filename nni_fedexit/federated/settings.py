"""S5 settings: everything a federated run depends on, checked once when they are built.

:class:`FederatedSettings` is a pydantic model: typed fields with their defaults and
documentation, every value checked when it is built (an error is one line that starts with the
field's dotted name: ``aggregator.lr: ...``, which the run config prefixes with ``federated.``).
The aggregator, the objective and the backend are sections that choose a component by name and
hold the parameters that component declares on itself (``aggregator: {name: fedadam, lr: 0.02}``,
see :mod:`nni_fedexit.components`). The model crosses every process boundary as one JSON
document (:meth:`FederatedSettings.to_json`): an NNI trial's arguments, a Flower run config's
``settings`` key, Ray actors.

Settings written before the components declared their parameters (``server_lr``, ``prox_mu``,
``flower_superlink``, ``workers`` ... at the top level) still load: :data:`MOVED` says where each
went, and the value is moved there with a warning that says so.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nni_fedexit.components import ComponentParams, MovedSettingWarning, SettingsError, component_params, validation_message
from nni_fedexit.exits import EXIT_HEADS
from nni_fedexit.federated.aggregators.base import AGGREGATORS
from nni_fedexit.federated.assign import DEFAULT_PROFILE_MIX, DEPTH_SAMPLING, ClientProfile
from nni_fedexit.federated.batchnorm import BN_STATS
from nni_fedexit.federated.backends import BACKENDS
from nni_fedexit.federated.client import LocalSettings
from nni_fedexit.federated.depthwise import CLIENT_TRAINING, SEGMENT_DATA
from nni_fedexit.federated.objectives.base import OBJECTIVES
from nni_fedexit.registry import Registry

__all__ = ["BEST_BY", "COMPONENTS", "FederatedSettings", "MOVED", "OPERATIONAL", "federated_section_schema"]

#: the values of ``best_by``
BEST_BY = ("total_loss", "last_exit")

#: the sections that choose a component, and the registry each one's name is looked up in
COMPONENTS: dict[str, Registry] = {"aggregator": AGGREGATORS, "objective": OBJECTIVES, "backend": BACKENDS}

#: settings that do not change what a run computes: a checkpoint may be resumed with others
OPERATIONAL = ("rounds", "checkpoint_dir", "resume", "data_dir", "device", "backend", "node_wait", "round_timeout",
               "client_threads")

#: top-level keys of earlier versions -> (section, the parameter names that take the value there):
#: a value given the old way moves into the section when the chosen component has that parameter
#: (and is dropped, as it was ignored before, when it has not)
MOVED: dict[str, tuple[str, tuple[str, ...]]] = {
    "server_lr": ("aggregator", ("lr",)),
    "server_momentum": ("aggregator", ("momentum", "beta_1")),
    "server_beta2": ("aggregator", ("beta_2",)),
    "server_tau": ("aggregator", ("tau",)),
    "distill_weight": ("objective", ("distill_weight",)),
    "distill_temperature": ("objective", ("distill_temperature",)),
    "prox_mu": ("objective", ("mu",)),
    "dyn_alpha": ("objective", ("alpha",)),
    "logit_tau": ("objective", ("tau",)),
    "flower_superlink": ("backend", ("superlink",)),
    "flower_home": ("backend", ("flwr_home",)),
    "workers": ("backend", ("workers",)),
    "client_num_cpus": ("backend", ("client_num_cpus",)),
    "client_num_gpus": ("backend", ("client_num_gpus",)),
    "ray_address": ("backend", ("ray_address",)),
}

#: the moved keys' defaults in those versions: the fingerprint of a checkpoint is computed on
#: that layout, so checkpoints written before the move resume
_MOVED_DEFAULTS = {"server_lr": None, "server_momentum": 0.9, "server_beta2": 0.99, "server_tau": 0.001,
                   "distill_weight": 1.0, "distill_temperature": 1.0, "prox_mu": 0.01, "dyn_alpha": 0.01,
                   "logit_tau": 1.0}

#: settings added after checkpoints were first written, with the values that compute what runs did
#: before them (left out of the fingerprint at those, so a checkpoint of an earlier version resumes
#: exactly when they are set so)
_ADDED_LATER = {
    "max_client_samples": None, "distill_weight": 0.0, "distill_temperature": 1.0, "prox_mu": 0.01, "dyn_alpha": 0.01,
    "server_lr": None, "server_momentum": 0.9, "server_beta2": 0.99, "server_tau": 0.001, "bn_stats": "average",
    "bn_samples": 2000, "depth_sampling": "uniform", "client_training": "branch", "segment_data": "all", "logit_tau": 1.0, "server_steps": 0,
    "server_samples": None, "best_by": "total_loss",
}

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


def _section(name: str) -> Any:
    return Field(default_factory=lambda: {"name": name}, validate_default=True)


class FederatedSettings(BaseModel):
    """Everything a federated run depends on (S5), typed and checked when built."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)

    rounds: PositiveInt = Field(10, description="federated rounds to run (a resumed run continues up to this many)")
    num_clients: PositiveInt = Field(10, description="edge clients the training data is partitioned among")
    client_fraction: float = Field(1.0, gt=0, le=1, description="share of the clients selected each round "
                                   "(at least min_clients)")
    min_clients: PositiveInt = Field(2, description="a round counts only if at least this many client updates "
                                     "were accepted")
    assignment: Literal["random", "capability"] = Field(
        "random", description="random (the patent: a random branch depth per client and round) or capability "
        "(the deepest branch a client's profile affords)")
    depth_sampling: Literal[DEPTH_SAMPLING] = Field(  # type: ignore[valid-type]
        "proportional", description="random assignment: how a branch depth is drawn: uniform, or proportional "
        "(depth d with probability proportional to d, so deep stages are trained by more clients per round)")
    profile_mix: list[Any] | None = Field(
        None, description="capability assignment: [[name, budget (share of the full model's MACs), share of "
        "clients], ...] (null: phone / tablet / laptop)")
    local_epochs: PositiveInt = Field(1, description="epochs of each client's local training a round")
    batch_size: PositiveInt = Field(32, description="the clients' (and the server's) SGD batch size")
    lr: float = Field(0.05, gt=0, description="the clients' SGD learning rate in round 1")
    lr_decay: float = Field(1.0, gt=0, description="the learning rate of round t is lr * lr_decay ** (t - 1)")
    momentum: float = Field(0.9, ge=0, description="the clients' SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="the clients' SGD weight decay")
    partition: Literal["iid", "dirichlet", "shards"] = Field(
        "iid", description="how the training data is split among clients: iid, dirichlet (label skew with "
        "concentration alpha) or shards (classes_per_client classes each)")
    alpha: float = Field(0.5, gt=0, description="dirichlet partition: the concentration (smaller: more skew)")
    classes_per_client: PositiveInt = Field(2, description="shards partition: classes each client holds")
    dataset: str = Field("fashion-mnist", description="the data set (the run config's data.dataset)")
    data_dir: str | None = Field(None, description="where the data set is read (null: the system copy)")
    server_fraction: Fraction = Field(0.2, description="share of the training images the server keeps (search, "
                                      "its own steps, calibration)")
    val_fraction: Fraction = Field(0.2, description="share of the server's images held out for validation")
    client_samples: PositiveInt | None = Field(None, description="cap on each client's images (null: all)")
    val_samples: PositiveInt | None = Field(None, description="cap on the validation images (null: all)")
    test_samples: PositiveInt | None = Field(None, description="cap on the test images (null: all)")
    head: Literal[EXIT_HEADS] = Field("conv", description="exit heads: linear or conv")  # type: ignore[valid-type]
    head_width: PositiveInt | None = Field(None, description="channels of a conv head (null: the stage's width)")
    loss_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="lambda_i of claim 6's total loss, one per exit (null: all 1)")
    branch_all_exits: bool = Field(True, description="true: a client trains every exit along its branch (deep "
                                   "supervision); false: its last exit only")
    client_training: Literal[CLIENT_TRAINING] = Field(  # type: ignore[valid-type]
        "depthwise", description="branch (the patent: a client trains its branch model, stages 1..d) or depthwise "
        "(it trains every stage, the deeper ones in segments that save no more for backward than its branch, so "
        "every client's data reaches every stage)")
    segment_data: Literal[SEGMENT_DATA] = Field(  # type: ignore[valid-type]
        "split", description="depthwise: all (each segment trains on all of a client's data: up to about 1.5 x "
        "the full model's cost) or split (a client's data is split among its segments: about its branch's cost)")
    aggregator: dict[str, Any] = Field(
        default_factory=lambda: {"name": "fedavg"}, validate_default=True,
        description="the server's aggregation rule: a name, or {name: ..., <its parameters>} (fedavg: the "
        "depth-aware mean; fedavgm, fedadam, fedyogi: a server optimiser on it; or a plugin's)")
    objective: dict[str, Any] = Field(
        default_factory=lambda: {"name": "logit_adjusted"}, validate_default=True,
        description="the clients' training objective: a name, or {name: ..., <its parameters>} (multi_exit: "
        "claim 6's loss; logit_adjusted: on logits shifted by the client's label prior; fedprox; feddyn; or a "
        "plugin's)")
    bn_stats: Literal[BN_STATS] = Field(  # type: ignore[valid-type]
        "server", description="BatchNorm running statistics: average (averaged with the weights), server "
        "(re-estimated on the server's own images after every aggregation) or local (FedBN: each client keeps "
        "its BatchNorm layers; the server re-estimates the global model's)")
    bn_samples: PositiveInt = Field(2000, description="images of the server's training split the re-estimation "
                                    "passes through the model")
    server_steps: Annotated[int, Field(ge=0)] | None = Field(
        None, description="SGD steps the server trains the new global model on its own labelled images after "
        "every aggregation (null: one pass over them; 0: the server does not train)")
    server_samples: PositiveInt | None = Field(
        None, description="the server's labelled images those steps draw from: the first of its search-train "
        "split (null: half of it); the early-exit guarantee is certified on the others")
    best_by: Literal[BEST_BY] = Field(  # type: ignore[valid-type]
        "total_loss", description="how the best round is chosen: total_loss (claim 5: lowest validation total "
        "loss, then the last exit's accuracy) or last_exit (highest last-exit accuracy, then total loss)")
    max_client_samples: PositiveInt | None = Field(
        None, description="the most examples one client's update may count for in the weighted mean (null: the "
        "size of its partition); replies claiming more are rejected")
    round_retries: Annotated[int, Field(ge=0)] = Field(1, description="attempts of a round that got fewer than "
                                                       "min_clients updates, before the run stops")
    backend: dict[str, Any] = Field(
        default_factory=lambda: {"name": "simulation"}, validate_default=True,
        description="where the rounds run: a name, or {name: ..., <its options>}: simulation (in this process), "
        "flower (the SuperNodes of a SuperLink), flower-simulation (virtual SuperNodes on Ray), or a plugin's")
    node_wait: float = Field(120.0, gt=0, description="Flower: seconds the server waits for min_clients "
                             "SuperNodes before round 1")
    round_timeout: float = Field(600.0, gt=0, description="Flower: seconds a round waits for the nodes' replies "
                                 "(late ones are left out)")
    client_threads: Annotated[int, Field(ge=0)] = Field(
        0, description="torch threads of each client's training (0: torch's default; 1 with several workers)")
    checkpoint_dir: str | None = Field(None, description="where the rounds' checkpoint goes (the run config: "
                                       "<run_dir>/federated)")
    resume: bool = Field(True, description="continue from the checkpoint in checkpoint_dir when it fits")
    device: str = Field("cpu", description="cpu or cuda[:N]: where clients and server train")
    seed: Annotated[int, Field(ge=0, lt=2 ** 32)] = Field(0, description="seeds the partition, the branch "
                                                          "depths, the initial weights and the clients' data order")

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError(validation_message(err, "", type(self), "settings")) from None

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Top-level keys of earlier versions (:data:`MOVED`) into their component's section."""
        if not isinstance(data, Mapping) or not any(key in data for key in MOVED):
            return data
        data = dict(data)
        for key, (kind, names) in MOVED.items():
            if key not in data:
                continue
            value = data.pop(key)
            section = data.get(kind, cls.model_fields[kind].default_factory())  # type: ignore[misc]
            section = dict(section) if isinstance(section, Mapping) else {"name": section}
            name = section.get("name")
            try:
                declared = component_params(COMPONENTS[kind].get(name)).model_fields
            except (ValueError, TypeError):
                continue  # the section's own check reports the name
            target = next((n for n in names if n in declared), None)
            if target is None or value is None:
                continue  # ignored before too: the chosen component has no such parameter
            if target in section:
                raise SettingsError(f"{key}: given twice, here and as {kind}.{target}; keep {kind}.{target}")
            warnings.warn(f"{key} is now {kind}.{target} (e.g. {kind}: {{name: {name}, {target}: {value!r}}}); "
                          "read as that", MovedSettingWarning, stacklevel=2)
            section[target] = value
            data[kind] = section
        return data

    @field_validator("aggregator", "objective", "backend", mode="before")
    @classmethod
    def _component(cls, value: Any, info: Any) -> dict[str, Any]:
        """A name or ``{name: ..., <parameters>}``, as the name and every parameter of that component."""
        return COMPONENTS[info.field_name].choose(value)

    @model_validator(mode="after")
    def _consistent(self) -> "FederatedSettings":
        if self.min_clients > self.num_clients:
            raise SettingsError(f"min_clients: {self.min_clients} is more than num_clients ({self.num_clients})")
        gpus = self.backend.get("client_num_gpus", 0) or 0
        if gpus > 0 and not self.device.startswith("cuda"):
            raise SettingsError(f"backend.client_num_gpus: {gpus} GPUs per client, but device is {self.device!r}; set "
                             "device: cuda (or client_num_gpus: 0)")
        self.profiles()
        return self

    def params(self, kind: str) -> ComponentParams:
        """The parameters of the chosen aggregator, objective or backend (``kind``), as its ``Params``."""
        section = dict(getattr(self, kind))
        return component_params(COMPONENTS[kind].get(section.pop("name")))(**section)

    def name(self, kind: str) -> str:
        """The name of the chosen aggregator, objective or backend (``kind``)."""
        return str(getattr(self, kind)["name"])

    def replace(self, **changes: Any) -> "FederatedSettings":
        """A copy with ``changes``, checked as a new one is (``dataclasses.replace`` for this model)."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_json(self) -> str:
        """The settings as one JSON document (``FederatedSettings(**json.loads(text))`` reads it back)."""
        return self.model_dump_json()

    def profiles(self) -> list[tuple[ClientProfile, float]]:
        """The capability mode's device classes and their shares of the clients."""
        if self.profile_mix is None:
            return list(DEFAULT_PROFILE_MIX)
        try:
            mix = [(ClientProfile(str(name), float(budget)), float(share)) for name, budget, share in self.profile_mix]
        except (TypeError, ValueError) as err:
            raise SettingsError(f"profile_mix: expected [[name, budget, share], ...], got {self.profile_mix!r}") from err
        if not mix or any(share < 0 for _, share in mix) or sum(share for _, share in mix) <= 0:
            raise SettingsError(f"profile_mix: shares must be non-negative with a positive sum, got {self.profile_mix!r}")
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
        """What a checkpoint must agree on to be resumed (everything but rounds, paths and backend).

        Computed on the layout of the versions before the components declared their parameters
        (``server_lr`` ... at the top level), so their checkpoints resume."""
        d = self.model_dump()
        for key in OPERATIONAL:
            d.pop(key)
        sections = {kind: dict(d.pop(kind)) for kind in ("aggregator", "objective")}
        for key, (kind, names) in MOVED.items():
            if kind in sections:
                d[key] = next((sections[kind].pop(n) for n in names if n in sections[kind]), _MOVED_DEFAULTS[key])
        if d["server_lr"] is not None and d["server_lr"] == component_params(
                AGGREGATORS.get(sections["aggregator"]["name"])).model_fields["lr"].default:
            d["server_lr"] = None  # the aggregator's default was written as None
        for kind, section in sections.items():
            d[kind] = section.pop("name")
            if section:  # a plugin's own parameters
                d[f"{kind}_params"] = section
        for key, default in _ADDED_LATER.items():  # so checkpoints of earlier versions still resume
            if d[key] == default:
                d.pop(key)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def federated_section_schema(owned: Any = ()) -> dict[str, Any]:
    """The JSON Schema of the settings (the run config's ``federated`` section: ``owned`` keys, set
    by other sections, left out), each component section a name or one of the installed
    components' ``{name: ..., <parameters>}`` (plugins included)."""
    schema = FederatedSettings.model_json_schema()
    for key in owned:
        schema["properties"].pop(key, None)
    for kind, registry in COMPONENTS.items():
        names, choices = registry.names(), []
        for name in names:
            try:
                params = component_params(registry.get(name)).model_json_schema()
            except (ValueError, TypeError):  # a plugin that fails to load: its own error comes when a run names it
                continue
            params["title"] = f"{kind} {name}"
            params["properties"] = {"name": {"const": name}, **params.get("properties", {})}
            params["required"] = ["name", *params.get("required", [])]
            params["additionalProperties"] = False
            choices.append(params)
        schema["properties"][kind] = {"description": FederatedSettings.model_fields[kind].description,
                                      "anyOf": [{"type": "string", "enum": names}, *choices]}
    return schema
