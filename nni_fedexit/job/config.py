"""The run configuration of ``nni-fedexit run``: one YAML file, every key documented here.

Sections and their keys (defaults in brackets):

``run_dir`` [runs/<config name>]  where everything of the run goes
``seed`` [0]                       seeds data splits, search, federated rounds
``device`` [cpu]                   cpu or cuda: the supernet training and the federated clients
``data``     dataset [fashion-mnist], data_dir [null: the system copy], download [false],
             server_fraction [0.2], val_fraction [0.2], test_samples [null: all]
``space``    a preset name from search_spaces/ [resnet_pool], or a mapping with ``preset`` plus
             SpaceSpec keys to override (sources, widths, depth_crops, ...); in_chans,
             image_size and num_classes come from the data set
``search``   strategy: a preset name from strategies/ [size_aware_pg] or a mapping of
             SizeAwarePolicyGradient arguments (with ``preset`` to start from one);
             epochs [3], batch_size [64], learning_rate [0.001], train_samples [null: all]
             for the shared mode's supernet training; max_trials [10], concurrency [1] and
             trial (TrialSettings keys: train_samples, val_samples, epochs, batch_size, lr) for
             the trials mode
``federated`` FederatedSettings keys (rounds, num_clients, partition, alpha, assignment,
             aggregator, objective, ...); backend [simulation] or flower: the rounds run on the
             SuperNodes of the SuperLink connection flower_superlink ([superlink.NAME] in
             $FLWR_HOME/config.toml; flower_home sets FLWR_HOME), with node_wait, round_timeout,
             client_threads
``exits``    max_accuracy_drop [0.01] or macs_budget [null], criterion [max_prob], prediction [exit]
             (``ensemble``: each exit predicts with the mean probability of the exits up to it),
             rule [per_exit] (or shared: one threshold for every exit), margin [held_out] (the
             drop holds on unseen images with confidence_level [0.95]; none: fitted to the
             validation images only), latency_images [1000] (batch-1 latency of the export)
``nni``      port [8080]: the web UI of the federated stage (and of a trials search);
             host [127.0.0.1]: 127.0.0.1 or localhost (this machine only) or all (NNI's default:
             every interface, no authentication)

Every section is checked when the file loads (:func:`load_config`), before any data is read: an
unknown key, a value of the wrong type, or an impossible value is a :class:`ConfigError` whose
message starts with the key's dotted path. The strategy is built from its preset and arguments
once to check them; the run's :class:`~nni_fedexit.federated.FederatedSettings` is built once, from
the federated section plus the data section, ``seed``, ``device`` and ``run_dir``, and
:meth:`RunConfig.federated_settings` returns that one object. Plain dicts are left for the NNI and
Flower boundaries.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from nni_fedexit.checks import check_type, positive_int
from nni_fedexit.components import SettingsError, validation_message
from nni_fedexit.exits.network import PREDICTIONS
from nni_fedexit.exits.thresholds import CRITERIA, RULES

if TYPE_CHECKING:
    from nni_fedexit.federated import FederatedSettings
    from nni_fedexit.search.shared_trial import SharedSearchSettings
    from nni_fedexit.search.strategy import SizeAwarePolicyGradient

__all__ = ["ConfigError", "RunConfig", "load_config", "run_config_schema"]


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the key."""


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class Section(BaseModel):
    """A section of the run config: typed, every key known, checked when the file loads."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DataConfig(Section):
    """``data``: the data set and the server's share of it (shared by the search and the federated stage)."""

    dataset: str = Field("fashion-mnist", description="the data set: fashion-mnist, digits, cifar10, ...")
    data_dir: str | None = Field(None, description="where the data set is read (null: the system copy)")
    download: bool = Field(False, description="download the data set into data_dir when it is not there")
    server_fraction: Fraction = Field(0.2, description="share of the training images the server keeps (search, "
                                      "its own steps, calibration); the clients share the rest")
    val_fraction: Fraction = Field(0.2, description="share of the server's images held out for validation")
    test_samples: PositiveInt | None = Field(None, description="cap on the test images (null: all)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from nni_fedexit.data import DATASETS

        if value not in DATASETS:
            raise SettingsError(f"dataset: must be one of {list(DATASETS)}, got {value!r}")
        return value


class SearchConfig(Section):
    """``search``: the strategy (S3) and the budget of its supernet training or trials."""

    strategy: str | dict[str, Any] = Field(
        "size_aware_pg", description="a preset name from strategies/, or a mapping of SizeAwarePolicyGradient "
        "arguments (with preset: to start from one)")
    epochs: PositiveInt = Field(3, description="shared mode: epochs of supernet training")
    batch_size: PositiveInt = Field(64, description="shared mode: the supernet's batch size")
    learning_rate: float = Field(0.001, gt=0, description="shared mode: the supernet's learning rate")
    train_samples: PositiveInt | None = Field(None, description="shared mode: cap on the supernet's training images")
    max_trials: PositiveInt = Field(10, description="trials mode: networks trained")
    concurrency: PositiveInt = Field(1, description="trials mode: trials at the same time")
    trial: dict[str, Any] = Field(default_factory=dict, description="trials mode: TrialSettings keys (train_samples, "
                                  "val_samples, epochs, batch_size, lr)")


#: how the early-exit thresholds keep their accuracy target (ExitConfig.margin)
MARGINS = ("held_out", "none")


class ExitConfig(Section):
    """``exits``: the early-exit thresholds (S4) and what they keep."""

    max_accuracy_drop: float | None = Field(0.01, ge=0, le=1, description="the accuracy the thresholds may give up "
                                            "against the last exit (a share); or give macs_budget")
    macs_budget: float | None = Field(None, gt=0, description="expected MACs per image the thresholds aim at")
    criterion: Literal[CRITERIA] = Field(  # type: ignore[valid-type]
        "max_prob", description="an exit's confidence: max_prob or entropy")
    prediction: Literal[PREDICTIONS] = Field(  # type: ignore[valid-type]
        "exit", description="exit (each exit's own softmax) or ensemble (each exit predicts with the mean "
        "probability of the exits up to it)")
    rule: Literal[RULES] = Field(  # type: ignore[valid-type]
        "per_exit", description="per_exit (a threshold per exit) or shared (one for every exit)")
    margin: Literal[MARGINS] = Field(  # type: ignore[valid-type]
        "held_out", description="held_out (the drop holds on unseen images with confidence_level) or none (fitted "
        "to the validation images only)")
    confidence_level: float = Field(0.95, ge=0.5, lt=1, description="the confidence of the held-out guarantee")
    latency_images: int = Field(1000, ge=0, description="test images timed one at a time through the exported "
                                "early-exit runtime (0: no timing)")

    @model_validator(mode="after")
    def _one_target(self) -> "ExitConfig":
        if (self.max_accuracy_drop is None) == (self.macs_budget is None):
            raise SettingsError("max_accuracy_drop: give exactly one of max_accuracy_drop and macs_budget")
        if self.margin == "held_out" and self.max_accuracy_drop is None:
            raise SettingsError("margin: held_out keeps an accuracy drop, and macs_budget is set: set margin: "
                                "none with macs_budget, or give max_accuracy_drop instead")
        return self


class NniConfig(Section):
    """``nni``: the web UI of the federated stage (and of a trials search)."""

    port: int = Field(8080, ge=1, le=65535, description="the web UI's port")
    host: str = Field("127.0.0.1", description="where the web UI listens: 127.0.0.1 or localhost (this machine "
                      "only; reach it through an SSH tunnel) or all (NNI's own behaviour: every interface, no "
                      "authentication)")

    @field_validator("host")
    @classmethod
    def _private_or_all(cls, value: str) -> str:
        if value not in ("127.0.0.1", "localhost", "all"):
            raise SettingsError(f"host: must be 127.0.0.1, localhost or all, got {value!r}; to reach a private "
                                "web UI from another machine use an SSH tunnel (see README)")
        return value


#: FederatedSettings fields the other sections set: the data section's, and the top-level ones
DATA_KEYS = ("dataset", "data_dir", "server_fraction", "val_fraction", "test_samples")
TOP_KEYS = ("seed", "device")
#: TrialSettings fields the run sets: the data section's, the seed, and the strategy's reward
_TRIAL_OWNED = ("dataset", "data_dir", "server_fraction", "val_fraction", "seed", "reward")
DEFAULT_STRATEGY = "size_aware_pg"


class RunConfig(Section):
    """One run of ``nni-fedexit run``: search (S1-S3), exits (S4), federated training (S5)."""

    run_dir: str = Field("", description="where everything of the run goes (default: runs/<config file name>)")
    seed: int = Field(0, ge=0, lt=2 ** 32, description="seeds data splits, search, federated rounds")
    device: str = Field("cpu", description="cpu, cuda or cuda:N: the supernet training and the federated clients")
    data: DataConfig = Field(default_factory=DataConfig)
    space: str | dict[str, Any] = Field(
        "resnet_pool", description="a preset name from search_spaces/, or a mapping with preset: plus SpaceSpec "
        "keys to override (sources, widths, depth_crops, ...)")
    search: SearchConfig = Field(default_factory=SearchConfig)
    federated: dict[str, Any] = Field(
        default_factory=dict, description="FederatedSettings keys (rounds, num_clients, partition, aggregator, "
        "objective, backend, ...); the data section, seed and device set theirs")
    exits: ExitConfig = Field(default_factory=ExitConfig)
    nni: NniConfig = Field(default_factory=NniConfig)
    name: str = Field("run", description="the run's name (the config file's name)")

    _federated: Any = PrivateAttr(None)

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str) -> str:
        if value not in ("cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise SettingsError(f"device: must be cpu, cuda or cuda:N (a GPU index), got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """The configuration as written (what ``config.yaml`` of a run holds): built objects left out."""
        return self.model_dump()

    def federated_settings(self) -> "FederatedSettings":
        """The run's S5 settings: built and checked once (by :func:`load_config`); every call
        returns that same object. ``checkpoint_dir`` is ``<run_dir>/federated``."""
        if self._federated is None:
            self._federated = _federated_settings(self)
        return self._federated

    def strategy_arguments(self) -> tuple[str, dict[str, Any]]:
        """``search.strategy`` as (preset, SizeAwarePolicyGradient arguments over the preset's);
        the seed defaults to the run's."""
        cfg = self.search.strategy
        if isinstance(cfg, str):
            preset, overrides = cfg, {}
        elif isinstance(cfg, Mapping):
            overrides = dict(cfg)
            preset = overrides.pop("preset", DEFAULT_STRATEGY)
            if not isinstance(preset, str):
                raise ConfigError(f"search.strategy.preset: expected a preset name or a YAML file, got {preset!r}")
        else:
            raise ConfigError(f"search.strategy: expected a preset name or a mapping of SizeAwarePolicyGradient "
                              f"arguments, got {cfg!r}")
        return preset, {"seed": self.seed, **overrides}

    def new_strategy(self) -> "SizeAwarePolicyGradient":
        """A fresh strategy for a search experiment (it keeps the search's state), from the
        arguments :func:`load_config` checked."""
        from nni_fedexit.search.strategy import SizeAwarePolicyGradient

        preset, arguments = self.strategy_arguments()
        return SizeAwarePolicyGradient.from_preset(preset, **arguments)

    def shared_search_settings(self) -> "SharedSearchSettings":
        """The shared search's trial settings: the data section's, the space, the strategy's
        arguments, the search section's budget; checkpoints in ``<run_dir>/search/checkpoint``."""
        from nni_fedexit.search.shared_trial import SharedSearchSettings

        d, s = self.data, self.search
        preset, arguments = self.strategy_arguments()
        return SharedSearchSettings(
            dataset=d.dataset, data_dir=d.data_dir, download=d.download, server_fraction=d.server_fraction,
            val_fraction=d.val_fraction, space=self.space, strategy=preset, strategy_arguments=arguments,
            epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate, train_samples=s.train_samples,
            device=self.device, seed=self.seed,
            checkpoint_dir=str(Path(self.run_dir).resolve() / "search" / "checkpoint") if self.run_dir else None)

    def trial_settings(self) -> dict[str, Any]:
        """The trials mode's TrialSettings keys (but the reward): the data section's, the seed,
        then ``search.trial``."""
        d = self.data
        return {"dataset": d.dataset, "data_dir": d.data_dir, "server_fraction": d.server_fraction,
                "val_fraction": d.val_fraction, "seed": self.seed, **self.search.trial}


def run_config_schema() -> dict[str, Any]:
    """The JSON Schema of a run config (``nni-fedexit config schema``), with the federated section's
    keys, and the aggregators', objectives' and backends' own parameters, from their models."""
    from nni_fedexit.federated.settings import federated_section_schema

    schema = RunConfig.model_json_schema()
    schema["properties"]["federated"] = federated_section_schema(owned={*DATA_KEYS, *TOP_KEYS, "checkpoint_dir"})
    return schema


def _check(key: str, value: Any, annotation: Any) -> None:
    """:func:`nni_fedexit.checks.check_type`, its error a :class:`ConfigError`."""
    if not isinstance(annotation, str):  # a signature read without ``from __future__ import annotations``
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    try:
        check_type(key, value, annotation)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _positive(key: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    try:
        positive_int(key, value)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _keyed(prefix: str, message: str, keys: Iterable[str], where: str | None = None) -> str:
    """A component's error message (``"key: ..."`` or ``"key must ..."``, perhaps after ``where: ``)
    as ``"<prefix>.<key>: ..."``; ``"<prefix>: ..."`` when it names no key."""
    if where and message.startswith(f"{where}: "):
        message = message[len(where) + 2:]
    for key in sorted(keys, key=len, reverse=True):
        for sep in (":", " "):
            if message.startswith(key + sep):
                return f"{prefix}.{key}: {message[len(key) + 1:].strip()}"
        if f"key '{key}'" in message:
            return f"{prefix}.{key}: {message}"
    return f"{prefix}: {message}"


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Parse and check a run configuration file; ``run_dir`` defaults to ``runs/<file stem>``.

    ``overrides`` replace keys of the file before the checks: ``run_dir``, or a section's key by
    its dotted path (``nni.port``). Every section is checked here, before any data loads; the run's
    FederatedSettings are built."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    from nni_fedexit.presets import read_yaml_mapping

    data = read_yaml_mapping(p, ConfigError)
    for key, value in (overrides or {}).items():
        section, _, sub = key.partition(".")
        if not sub:
            data[key] = value
        elif data.get(section) is None:
            data[section] = {sub: value}
        elif isinstance(data[section], Mapping):
            data[section] = {**data[section], sub: value}
        # else: the section is no mapping, which the checks report
    for key in [k for k, v in data.items() if v is None and k in RunConfig.model_fields]:
        if isinstance(RunConfig.model_fields[key].default_factory, type):  # an empty section: its defaults
            del data[key]
    try:
        config = RunConfig(**data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, "", RunConfig, "the config")) from None
    if "name" not in data:
        config.name = p.stem
    if not config.run_dir:
        config.run_dir = str(Path("runs") / p.stem)
    check_values(config)
    return config


def check_values(config: RunConfig) -> None:
    """What the sections' own types cannot say, every section: checked before anything runs.
    Builds the run's FederatedSettings (kept on ``config``) and a strategy from its arguments."""
    _check_space(config)
    _check_trial(config)
    _check_strategy(config)
    config.federated_settings()


def _check_space(config: RunConfig) -> None:
    """The space preset and its overrides, as a SpaceSpec; the sizes that come from the data set
    (in_chans, image_size, num_classes) are checked when the space is built for the data."""
    from nni_fedexit.presets import PresetError, load_preset
    from nni_fedexit.space import SpaceSpec, SpecError, load_space_spec

    cfg = config.space
    if isinstance(cfg, str):
        preset, overrides, key = cfg, {}, "space"
    elif isinstance(cfg, Mapping):
        overrides = dict(cfg)
        preset, key = overrides.pop("preset", "resnet_pool"), "space.preset"
        spec_keys = {f.name for f in fields(SpaceSpec)}
        unknown = sorted(set(overrides) - spec_keys)
        if unknown:
            raise ConfigError(f"space.{unknown[0]}: unknown key; space takes {sorted(spec_keys | {'preset'})}")
        if not isinstance(preset, str):
            raise ConfigError(f"space.preset: expected a preset name or a YAML file, got {preset!r}")
    else:
        raise ConfigError(f"space: expected a preset name or a mapping, got {cfg!r}")
    try:
        _, where = load_preset("search_spaces", preset)
    except PresetError as err:
        raise ConfigError(f"{key}: {err}") from err
    # a stand-in image size large enough for any depth: the real one comes with the data
    stand_in = {"in_chans": 1, "image_size": 1024, "num_classes": 10}
    try:
        load_space_spec(preset, **{**overrides, **stand_in})
    except (SpecError, TypeError) as err:
        raise ConfigError(_keyed("space", str(err), [f.name for f in fields(SpaceSpec)], where)) from err


def _check_trial(config: RunConfig) -> None:
    from nni_fedexit.search.trial import TrialSettings

    known = {f.name: f for f in fields(TrialSettings) if f.name not in _TRIAL_OWNED}
    for key, value in config.search.trial.items():
        if key in _TRIAL_OWNED:
            raise ConfigError(f"search.trial.{key}: set by the run (the data section, seed, the strategy's reward)")
        if key not in known:
            raise ConfigError(f"search.trial.{key}: unknown key; search.trial takes {sorted(known)}")
        _check(f"search.trial.{key}", value, str(known[key].type))
    t = TrialSettings(**config.search.trial)
    for key in ("epochs", "batch_size"):
        _positive(f"search.trial.{key}", getattr(t, key))
    for key in ("train_samples", "val_samples"):
        _positive(f"search.trial.{key}", getattr(t, key), optional=True)
    if not t.lr > 0:
        raise ConfigError(f"search.trial.lr: must be > 0, got {t.lr}")


def _check_strategy(config: RunConfig) -> None:
    """The preset must exist; its keys and the overrides must be SizeAwarePolicyGradient's
    arguments, of their types; then one strategy is built from them, which checks the values."""
    from nni_fedexit.presets import PresetError, load_preset
    from nni_fedexit.search.controller import ControllerSettings
    from nni_fedexit.search.shared_trial import SharedSearchSettings
    from nni_fedexit.search.strategy import MODES, SizeAwarePolicyGradient, argument_mode, mode_class, strategy_parameters

    preset, overrides = config.strategy_arguments()
    try:
        data, where = load_preset("strategies", preset)
    except PresetError as err:
        key = "search.strategy.preset" if isinstance(config.search.strategy, Mapping) else "search.strategy"
        raise ConfigError(f"{key}: {err}") from err
    merged = {**data, **overrides}
    mode = merged.get("mode") or "shared"
    if mode not in MODES:
        source = "" if "mode" in overrides else f" (in the preset {where})"
        raise ConfigError(f"search.strategy.mode{source}: must be one of {list(MODES)}, got {mode!r}")
    params = strategy_parameters(mode_class(mode))
    for key, value in merged.items():
        source = "" if key in overrides else f" (in the preset {where})"
        if key not in params:
            other = argument_mode(key)
            if other is not None:
                raise ConfigError(f"search.strategy.{key}{source}: an option of mode {other!r}, not of mode {mode!r}; "
                                  f"mode {mode!r} takes {sorted({*params, 'preset'})}")
            raise ConfigError(f"search.strategy.{key}: unknown key{source}; search.strategy takes "
                              f"{sorted({*params, 'preset'})}")
        if key == "controller" and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"search.strategy.controller{source}: expected a mapping of ControllerSettings "
                                  f"keys, got {value!r}")
            controller = {f.name: f for f in fields(ControllerSettings)}
            for name, v in value.items():
                if name not in controller:
                    raise ConfigError(f"search.strategy.controller.{name}: unknown key{source}; "
                                      f"search.strategy.controller takes {sorted(controller)}")
                _check(f"search.strategy.controller.{name}", v, str(controller[name].type))
            continue
        if key == "reward" and value is not None:
            raise ConfigError(f"search.strategy.reward{source}: a reward function is given in Python, not in a "
                              "config; the config sets beta and baseline_params")
        if params[key].annotation is not inspect.Parameter.empty:
            _check(f"search.strategy.{key}", value, params[key].annotation)
    try:
        strategy = SizeAwarePolicyGradient.from_preset(preset, **overrides)
    except (PresetError, TypeError, ValueError) as err:
        message = str(err)
        if where and message.startswith(f"{where}: "):
            message = message[len(where) + 2:]
        if message.startswith("target."):  # a SizeTarget field: search.strategy.target.<field> ...
            raise ConfigError(f"search.strategy.{message}") from err
        keyed = _keyed("search.strategy", message, params, where)
        if keyed.startswith("search.strategy: "):  # no argument named: perhaps a ControllerSettings field
            keyed = _keyed("search.strategy.controller", message, [f.name for f in fields(ControllerSettings)], where)
            if keyed.startswith("search.strategy.controller: "):
                keyed = "search.strategy: " + keyed[len("search.strategy.controller: "):]
        raise ConfigError(keyed) from err
    if strategy.mode == "shared" and strategy.warmup_epochs >= config.search.epochs:
        raise ConfigError(f"search.strategy.warmup_epochs: {strategy.warmup_epochs} warm-up epochs of search.epochs "
                          f"{config.search.epochs} leave the controller no epoch to learn in; give search.epochs more "
                          "than warmup_epochs, or set search.strategy.warmup_epochs lower")


def _federated_settings(config: RunConfig) -> "FederatedSettings":
    """The one FederatedSettings of a run: the federated section, plus the keys other sections own."""
    from nni_fedexit.federated.settings import MOVED, FederatedSettings

    known = set(FederatedSettings.model_fields)
    owned = {*DATA_KEYS, *TOP_KEYS, "checkpoint_dir"}
    unknown = sorted(set(config.federated) - known - set(MOVED))
    if unknown:
        raise ConfigError(f"federated.{unknown[0]}: unknown key; federated takes {sorted(known - owned)}")
    clash = sorted(set(config.federated) & owned)
    if clash:
        where = "run_dir decides it" if clash[0] == "checkpoint_dir" else "set it in the data section (seed and device at the top)"
        raise ConfigError(f"federated.{clash[0]}: {where}")
    values = {
        **config.federated, **{key: getattr(config.data, key) for key in DATA_KEYS},
        **{key: getattr(config, key) for key in TOP_KEYS},
        "checkpoint_dir": str(Path(config.run_dir).resolve() / "federated"),
    }
    try:
        return FederatedSettings(**values)
    except ValueError as err:
        message = str(err)
        key = message.split(":", 1)[0]
        if key in DATA_KEYS:
            raise ConfigError(f"data.{message}") from None
        if key in TOP_KEYS:
            raise ConfigError(message) from None
        raise ConfigError(f"federated.{message}") from None
