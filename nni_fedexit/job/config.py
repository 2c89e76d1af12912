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

import dataclasses
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from nni_fedexit.checks import check_type, positive_int

if TYPE_CHECKING:
    from nni_fedexit.federated import FederatedSettings
    from nni_fedexit.search.shared_trial import SharedSearchSettings
    from nni_fedexit.search.strategy import SizeAwarePolicyGradient

__all__ = ["ConfigError", "RunConfig", "load_config"]


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the key."""


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    server_fraction: float = 0.2
    val_fraction: float = 0.2
    test_samples: int | None = None


@dataclass
class SearchConfig:
    strategy: Any = "size_aware_pg"
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 0.001
    train_samples: int | None = None
    max_trials: int = 10
    concurrency: int = 1
    trial: dict = field(default_factory=dict)


#: how the early-exit thresholds keep their accuracy target (ExitConfig.margin)
MARGINS = ("held_out", "none")


@dataclass
class ExitConfig:
    max_accuracy_drop: float | None = 0.01
    macs_budget: float | None = None
    criterion: str = "max_prob"
    #: "exit" (each exit's own softmax) or "ensemble" (mean of the probabilities of exits 1..i)
    prediction: str = "exit"
    #: "per_exit" (a threshold per exit) or "shared" (one for every exit)
    rule: str = "per_exit"
    #: "held_out" (certify the drop on the server's search-train images) or "none"
    margin: str = "held_out"
    confidence_level: float = 0.95
    #: test images timed one at a time through the exported early-exit runtime (0: no timing)
    latency_images: int = 1000


@dataclass
class NniConfig:
    port: int = 8080
    #: where the web UI listens: 127.0.0.1 (only this machine; reach it through an SSH tunnel) or
    #: "all" (NNI's own behaviour: every interface, with no authentication)
    host: str = "127.0.0.1"


#: FederatedSettings fields the other sections set: the data section's, and the top-level ones
DATA_KEYS = ("dataset", "data_dir", "server_fraction", "val_fraction", "test_samples")
TOP_KEYS = ("seed", "device")
#: TrialSettings fields the run sets: the data section's, the seed, and the strategy's reward
_TRIAL_OWNED = ("dataset", "data_dir", "server_fraction", "val_fraction", "seed", "reward")
DEFAULT_STRATEGY = "size_aware_pg"


@dataclass
class RunConfig:
    run_dir: str = ""
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    space: Any = "resnet_pool"
    search: SearchConfig = field(default_factory=SearchConfig)
    #: the federated section as written (FederatedSettings keys); the settings built from it and the
    #: other sections: :meth:`federated_settings`
    federated: dict = field(default_factory=dict)
    exits: ExitConfig = field(default_factory=ExitConfig)
    nni: NniConfig = field(default_factory=NniConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        """The configuration as written (what ``config.yaml`` of a run holds): built objects left out."""
        return dataclasses.asdict(self)

    def federated_settings(self) -> "FederatedSettings":
        """The run's S5 settings: built and checked once (by :func:`load_config`); every call
        returns that same object. ``checkpoint_dir`` is ``<run_dir>/federated``."""
        settings = self.__dict__.get("_federated_settings")
        if settings is None:
            settings = self.__dict__["_federated_settings"] = _federated_settings(self)
        return settings

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


_SECTIONS = {"data": DataConfig, "search": SearchConfig, "exits": ExitConfig, "nni": NniConfig}


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


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown key; {path or 'the config'} takes {sorted(known)}")
    values = {}
    for key, value in data.items():
        f = known[key]
        if key in _SECTIONS and cls is RunConfig:
            values[key] = _build(_SECTIONS[key], value, key)
            continue
        _check(f"{path}.{key}" if path else key, value, str(f.type))
        values[key] = value
    return cls(**values)


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
    config = _build(RunConfig, data, "")
    config.name = p.stem
    if not config.run_dir:
        config.run_dir = str(Path("runs") / p.stem)
    check_values(config)
    return config


def check_values(config: RunConfig) -> None:
    """Values that are impossible whatever the data, every section: checked before anything runs.
    Builds the run's FederatedSettings (kept on ``config``) and a strategy from its arguments."""
    if config.device not in ("cpu", "cuda") and not (config.device.startswith("cuda:") and config.device[5:].isdigit()):
        raise ConfigError(f"device: must be cpu, cuda or cuda:N (a GPU index), got {config.device!r}")
    _check_data(config)
    _check_space(config)
    _check_search(config)
    config.federated_settings()
    _check_exits(config)
    if not 1 <= config.nni.port <= 65535:
        raise ConfigError(f"nni.port: must be in 1..65535, got {config.nni.port}")
    if config.nni.host not in ("127.0.0.1", "localhost", "all"):
        raise ConfigError(f"nni.host: must be 127.0.0.1, localhost or all, got {config.nni.host!r}; to reach a "
                          "private web UI from another machine use an SSH tunnel (see README)")


def _check_data(config: RunConfig) -> None:
    """The data set's name; its fractions and caps are FederatedSettings fields, checked with them."""
    from nni_fedexit.data import DATASETS

    if config.data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset: must be one of {list(DATASETS)}, got {config.data.dataset!r}")


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


def _check_search(config: RunConfig) -> None:
    s = config.search
    for key in ("epochs", "batch_size", "max_trials", "concurrency"):
        if getattr(s, key) < 1:
            raise ConfigError(f"search.{key}: must be at least 1, got {getattr(s, key)}")
    _positive("search.train_samples", s.train_samples, optional=True)
    if not s.learning_rate > 0:
        raise ConfigError(f"search.learning_rate: must be > 0, got {s.learning_rate}")
    _check_trial(config)
    _check_strategy(config)


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


def _check_exits(config: RunConfig) -> None:
    e = config.exits
    if (e.max_accuracy_drop is None) == (e.macs_budget is None):
        raise ConfigError("exits: give exactly one of max_accuracy_drop and macs_budget")
    if e.max_accuracy_drop is not None and not 0 <= e.max_accuracy_drop <= 1:
        raise ConfigError(f"exits.max_accuracy_drop: must be in [0, 1] (a share of accuracy), got {e.max_accuracy_drop}")
    if e.macs_budget is not None and not e.macs_budget > 0:
        raise ConfigError(f"exits.macs_budget: must be > 0 (expected MACs per image), got {e.macs_budget}")
    if e.criterion not in ("max_prob", "entropy"):
        raise ConfigError(f"exits.criterion: must be max_prob or entropy, got {e.criterion!r}")
    from nni_fedexit.exits import PREDICTIONS

    if e.prediction not in PREDICTIONS:
        raise ConfigError(f"exits.prediction: must be one of {list(PREDICTIONS)}, got {e.prediction!r}")
    from nni_fedexit.exits import RULES

    if e.rule not in RULES:
        raise ConfigError(f"exits.rule: must be one of {list(RULES)}, got {e.rule!r}")
    if e.margin not in MARGINS:
        raise ConfigError(f"exits.margin: must be one of {list(MARGINS)}, got {e.margin!r}")
    if e.margin == "held_out" and e.max_accuracy_drop is None:
        raise ConfigError("exits.margin: held_out keeps an accuracy drop, and macs_budget is set: set margin: none "
                          "with macs_budget, or give max_accuracy_drop instead")
    if not (isinstance(e.confidence_level, (int, float)) and 0.5 <= e.confidence_level < 1):
        raise ConfigError(f"exits.confidence_level: must be in [0.5, 1), got {e.confidence_level!r}")
    if not (isinstance(e.latency_images, int) and e.latency_images >= 0):
        raise ConfigError(f"exits.latency_images: must be a whole number >= 0, got {e.latency_images!r}")


def _federated_settings(config: RunConfig) -> "FederatedSettings":
    """The one FederatedSettings of a run: the federated section, plus the keys other sections own."""
    from nni_fedexit.federated import FederatedSettings

    known = {f.name for f in fields(FederatedSettings)}
    owned = {*DATA_KEYS, *TOP_KEYS, "checkpoint_dir"}
    unknown = sorted(set(config.federated) - known)
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
    except (TypeError, ValueError) as err:
        message = str(err)
        key = message.split(":", 1)[0]
        if key in DATA_KEYS:
            raise ConfigError(f"data.{message}") from err
        if key in TOP_KEYS:
            raise ConfigError(message) from err
        raise ConfigError(f"federated.{message}") from err
