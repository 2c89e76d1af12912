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
             trial (TrialSettings keys) for the trials mode
``federated`` FederatedSettings keys (rounds, num_clients, partition, alpha, assignment, ...);
             backend [simulation] or flower: the rounds run on the SuperNodes of the SuperLink
             connection flower_superlink ([superlink.NAME] in $FLWR_HOME/config.toml; flower_home
             sets FLWR_HOME), with node_wait, round_timeout, client_threads
``exits``    max_accuracy_drop [0.01] or macs_budget [null], criterion [max_prob]
``nni``      port [8080]: the web UI of the federated stage (and of a trials search);
             host [127.0.0.1]: 127.0.0.1 or localhost (this machine only) or all (NNI's default:
             every interface, no authentication)

An unknown key, a value of the wrong type, or an impossible value is a :class:`ConfigError`
whose message starts with the key's dotted path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

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


@dataclass
class ExitConfig:
    max_accuracy_drop: float | None = 0.01
    macs_budget: float | None = None
    criterion: str = "max_prob"


@dataclass
class NniConfig:
    port: int = 8080
    #: where the web UI listens: 127.0.0.1 (only this machine; reach it through an SSH tunnel) or
    #: "all" (NNI's own behaviour: every interface, with no authentication)
    host: str = "127.0.0.1"


@dataclass
class RunConfig:
    run_dir: str = ""
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    space: Any = "resnet_pool"
    search: SearchConfig = field(default_factory=SearchConfig)
    federated: dict = field(default_factory=dict)
    exits: ExitConfig = field(default_factory=ExitConfig)
    nni: NniConfig = field(default_factory=NniConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "search": SearchConfig, "exits": ExitConfig, "nni": NniConfig}


def _check_type(path: str, value: Any, default: Any, annotation: str) -> None:
    """The value's type must fit the field (judged from its annotation)."""
    if value is None:
        if "None" in annotation:
            return
        raise ConfigError(f"{path}: must not be empty (null)")
    if "bool" in annotation and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if annotation.startswith("float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if annotation.startswith("str") and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if annotation == "dict" and not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key; {path} takes {sorted(known)}")
    values = {}
    for key, value in data.items():
        f = known[key]
        if key in _SECTIONS and cls is RunConfig:
            values[key] = _build(_SECTIONS[key], value, key)
            continue
        annotation = str(f.type)
        if annotation != "Any":
            _check_type(f"{path}.{key}" if path else key, value, f.default, annotation)
        values[key] = value
    return cls(**values)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Parse and check a run configuration file; ``run_dir`` defaults to ``runs/<file stem>``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    from nni_fedexit.presets import read_yaml_mapping

    data = read_yaml_mapping(p, ConfigError)
    data.update(overrides or {})
    config = _build(RunConfig, data, "")
    config.name = p.stem
    if not config.run_dir:
        config.run_dir = str(Path("runs") / p.stem)
    check_values(config)
    return config


def check_values(config: RunConfig) -> None:
    """Values that are impossible whatever the data: checked before anything runs."""
    from nni_fedexit.federated import FederatedSettings
    from nni_fedexit.space import SpaceSpec

    fed_keys = {f.name for f in fields(FederatedSettings)}
    owned = {"dataset", "data_dir", "server_fraction", "val_fraction", "test_samples", "checkpoint_dir", "seed", "device"}
    unknown = sorted(set(config.federated) - fed_keys)
    if unknown:
        raise ConfigError(f"federated.{unknown[0]}: unknown key; federated takes {sorted(fed_keys - owned)}")
    clash = sorted(set(config.federated) & owned)
    if clash:
        raise ConfigError(f"federated.{clash[0]}: set it in the data section (seed and device at the top)")
    if config.device not in ("cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ConfigError(f"device: must be cpu or cuda, got {config.device!r}")
    try:
        FederatedSettings(**config.federated)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"federated.{err}") from err
    if isinstance(config.space, Mapping):
        spec_keys = {f.name for f in fields(SpaceSpec)} | {"preset"}
        unknown = sorted(set(config.space) - spec_keys)
        if unknown:
            raise ConfigError(f"space.{unknown[0]}: unknown key; space takes {sorted(spec_keys)}")
    elif not isinstance(config.space, str):
        raise ConfigError(f"space: expected a preset name or a mapping, got {config.space!r}")
    e = config.exits
    if (e.max_accuracy_drop is None) == (e.macs_budget is None):
        raise ConfigError("exits: give exactly one of max_accuracy_drop and macs_budget")
    if e.criterion not in ("max_prob", "entropy"):
        raise ConfigError(f"exits.criterion: must be max_prob or entropy, got {e.criterion!r}")
    for key in ("epochs", "batch_size", "max_trials", "concurrency"):
        if getattr(config.search, key) < 1:
            raise ConfigError(f"search.{key}: must be at least 1, got {getattr(config.search, key)}")
    if not 1 <= config.nni.port <= 65535:
        raise ConfigError(f"nni.port: must be in 1..65535, got {config.nni.port}")
    if config.nni.host not in ("127.0.0.1", "localhost", "all"):
        raise ConfigError(f"nni.host: must be 127.0.0.1, localhost or all, got {config.nni.host!r}; to reach a "
                          "private web UI from another machine use an SSH tunnel (see README)")
