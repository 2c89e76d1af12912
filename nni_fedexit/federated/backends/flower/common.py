"""What the Flower ServerApp and ClientApp share: run config -> settings, data, model; arrays.

A Flower run config holds only flat ``bool | int | float | str`` values. The settings travel as
one JSON document under ``settings`` (:class:`~nni_fedexit.federated.settings.FederatedSettings`,
serialised once), or, in a hand-written app, as a ``[tool.flwr.app.config.settings]`` table
(:func:`settings_data`); ``architecture`` is a JSON object (``{"stage1": "resnet18", ...}``),
``space-widths`` and ``space-sources`` are comma-separated.

Both sides build the same :class:`~nni_fedexit.exits.MultiExitNetwork` (the space is sized from
the data set, the initial weights are seeded as in :func:`~nni_fedexit.federated.federate`),
and load the same :class:`~nni_fedexit.federated.FederatedData`, so partition ``i`` of a
deployment is client ``i`` of the simulation backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from nni_fedexit.data import DataBundle
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.space import ResNetBlockPoolSpace
from nni_fedexit.federated.client_data import FederatedData
from nni_fedexit.federated.rounds import stable_seed
from nni_fedexit.federated.settings import MOVED, FederatedSettings
from nni_fedexit.files import write_text

if TYPE_CHECKING:  # flwr is only needed by the apps themselves
    from flwr.app import ArrayRecord

__all__ = [
    "DEFAULTS", "DataShape", "architecture_from_config", "branch_keys", "build_model", "load_branch_state", "load_data",
    "run_config", "settings_data", "settings_from_config", "space_from_config", "task_keys", "to_array_record", "to_state_dict",
    "write_app",
]

#: run-config keys of this backend (beyond the FederatedSettings fields) and their defaults
DEFAULTS: dict[str, Any] = {
    "architecture": '{"stage1": "resnet18", "stage2": "resnet50", "stage3": "resnet18"}',
    "space-sources": "resnet18,resnet50",
    "space-widths": "8,16,16",
    "space-depth-crops": "",
    "space-stem-width": 0,
    "space-stem-stride": 1,
    #: a safetensors file of the exit-point model's initial weights, readable by the ServerApp
    #: ("": seeded initial weights, as the simulation backend makes them)
    "initial-weights": "",
}

def _get(run_config: Mapping[str, Any], key: str) -> Any:
    return run_config.get(key, DEFAULTS.get(key))


#: the run-config key of the settings: one JSON document (:meth:`FederatedSettings.to_json`)
SETTINGS_KEY = "settings"


def settings_data(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a Flower run config gives, as a mapping (not yet checked).

    The JSON document under ``settings`` (what the ``flower`` backend submits), then the
    ``settings.<key>`` entries over it: Flower hands a hand-written app's
    ``[tool.flwr.app.config.settings]`` table (and ``flwr run --run-config "settings.rounds=5"``)
    over with dotted keys, ``settings.aggregator.name`` for a nested one. A run config holds no
    lists, so a list is written as a JSON string (``settings.loss_weights = "[1, 0.5, 1]"``).
    A run config of an earlier version (settings as hyphenated top-level keys) is refused, by key."""
    fields = set(FederatedSettings.model_fields) | set(MOVED)
    old = sorted(k for k in run_config if k.replace("-", "_") in fields and k != SETTINGS_KEY)
    if old:
        raise ValueError(f"run config key {old[0]!r}: the settings are now under settings.* "
                         f"(settings.{old[0].replace('-', '_')}), or one JSON document in 'settings'; "
                         "see examples/flower_deployment/pyproject.toml")
    text = run_config.get(SETTINGS_KEY, "{}")
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"run config key 'settings': not a JSON document ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"run config key 'settings': expected a JSON object of settings, got {text!r:.80}")
    for key in sorted(run_config):
        if not key.startswith(SETTINGS_KEY + "."):
            continue
        value = run_config[key]
        if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"run config key {key!r}: not JSON ({err})") from None
        *path, last = key.split(".")[1:]
        target = data
        for part in path:
            section = target.get(part)
            if isinstance(section, str):  # a component chosen by name, given parameters here
                section = {"name": section}
            target[part] = section = dict(section) if isinstance(section, Mapping) else {}
            target = section
        target[last] = value
    return data


def settings_from_config(run_config: Mapping[str, Any], **overrides: Any) -> FederatedSettings:
    """:class:`FederatedSettings` from a Flower run config (:func:`settings_data`), then ``overrides``."""
    return FederatedSettings(**{**settings_data(run_config), **overrides})


def run_config(settings: FederatedSettings, arch: Mapping[str, str], spec: Any, **extra: Any) -> dict[str, Any]:
    """The Flower run config of ``settings`` and one architecture of the space ``spec`` (a SpaceSpec).

    The inverse of :func:`settings_from_config` and :func:`space_from_config`: the settings as one
    JSON document (but the backend: the deployment is the backend), the architecture as a JSON
    object, the space's lists comma-separated. ``extra`` sets further keys (``initial-weights`` ...).
    """
    out: dict[str, Any] = {
        SETTINGS_KEY: settings.model_dump_json(exclude={"backend"}),
        "architecture": json.dumps(dict(arch)),
        "space-sources": ",".join(spec.sources),
        "space-widths": ",".join(str(w) for w in spec.widths),
        "space-depth-crops": ",".join(str(k) for k in spec.depth_crops),
        "space-stem-width": int(spec.stem_width or 0),
        "space-stem-stride": int(spec.stem_stride),
        "initial-weights": "",
    }
    out.update(extra)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    raise TypeError(f"a Flower run config holds bool, int, float or str values, got {type(value).__name__}: {value!r}")


def write_app(folder: str | Path, config: Mapping[str, Any], name: str = "nni-fedexit-flower") -> Path:
    """A Flower app folder (``pyproject.toml`` only) running our ServerApp/ClientApp with ``config``.

    ``flwr run`` overrides only keys the app lists, so the submitting side writes the whole run
    config into the app it submits (the app code itself is the installed package).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# written by nni_fedexit (federated backend 'flower'); submitted with `flwr run`",
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n',
        f'[project]\nname = "{name}"\nversion = "0.1.0"\ndescription = "nni_fedexit federated run"\n'
        'license = "Apache-2.0"\ndependencies = ["flwr>=1.42,<1.43"]\n',
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n',
        '[tool.flwr.app]\npublisher = "nni-fedexit"\n',
        "[tool.flwr.app.components]",
        'serverapp = "nni_fedexit.federated.backends.flower.server_app:app"',
        'clientapp = "nni_fedexit.federated.backends.flower.client_app:app"\n',
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml_value(value)}" for key, value in config.items()),
    ]
    write_text(folder / "pyproject.toml", "\n".join(lines) + "\n")
    return folder


def _csv(value: Any, cast: type) -> list:
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v.strip()) for v in str(value).split(",") if v.strip()]


def architecture_from_config(run_config: Mapping[str, Any]) -> dict[str, str]:
    arch = _get(run_config, "architecture")
    if isinstance(arch, str):
        try:
            arch = json.loads(arch)
        except json.JSONDecodeError as err:
            raise ValueError(f"architecture: expected a JSON object such as {DEFAULTS['architecture']}, got {arch!r}") from err
    if not isinstance(arch, Mapping):
        raise ValueError(f"architecture: expected a JSON object of stage labels to candidates, got {arch!r}")
    return {str(k): str(v) for k, v in arch.items()}


def space_from_config(run_config: Mapping[str, Any], bundle: DataBundle | DataShape) -> ResNetBlockPoolSpace:
    """The block-pool space of the run config, sized for the data set's images and classes."""
    stem = int(_get(run_config, "space-stem-width") or 0)
    return ResNetBlockPoolSpace(
        sources=_csv(_get(run_config, "space-sources"), str),
        widths=_csv(_get(run_config, "space-widths"), int),
        depth_crops=_csv(_get(run_config, "space-depth-crops") or "", int),
        stem_width=stem or None, stem_stride=int(_get(run_config, "space-stem-stride") or 1),
        in_chans=bundle.in_chans, image_size=bundle.image_size, num_classes=bundle.num_classes,
    )


def build_model(run_config: Mapping[str, Any], settings: FederatedSettings, bundle: DataBundle | DataShape) -> MultiExitNetwork:
    """The exit-point model of the run config's architecture, with seeded initial weights."""
    s = settings
    space = space_from_config(run_config, bundle)
    arch = architecture_from_config(run_config)
    torch.manual_seed(stable_seed(s.seed))  # the network's initial weights
    network = space.build(arch)
    network.arch = dict(arch)
    torch.manual_seed(stable_seed(s.seed, 0))  # the exits' initial weights, as federate() seeds them
    return MultiExitNetwork.from_network(network, head=s.head, head_width=s.head_width, loss_weights=s.loss_weights)


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a device needs to know of the data set to use its own images (``data-dir``): the
    model's input and output sizes, the class names, the standardisation. The server sends it."""

    in_chans: int
    image_size: int
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, bundle: DataBundle) -> "DataShape":
        return cls(bundle.in_chans, bundle.image_size, bundle.num_classes, tuple(bundle.class_names),
                   tuple(bundle.mean), tuple(bundle.std))

    def to_config(self) -> dict[str, Any]:
        return {"in-chans": self.in_chans, "image-size": self.image_size, "num-classes": self.num_classes,
                "class-names": list(self.class_names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> "DataShape":
        return cls(int(record["in-chans"]), int(record["image-size"]), int(record["num-classes"]),
                   tuple(str(c) for c in record["class-names"]), tuple(float(v) for v in record["mean"]),
                   tuple(float(v) for v in record["std"]))


_DATA_CACHE: dict[str, FederatedData] = {}


def load_data(settings: FederatedSettings) -> FederatedData:
    """The run's :class:`FederatedData` (server split, test set, partitions), cached per settings."""
    key = json.dumps([settings.fingerprint(), settings.data_dir])
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = FederatedData(settings)
    return _DATA_CACHE[key]


def branch_keys(model: MultiExitNetwork, depth: int, all_exits: bool = True) -> list[str]:
    """The state-dict keys of branch model ``depth`` (names as in the full model)."""
    return list(model.branch(depth, all_exits=all_exits).state_dict().keys())


def task_keys(model: MultiExitNetwork, depth: int, settings: FederatedSettings) -> list[str]:
    """The entries a node given branch ``depth`` receives and may send back: its branch's, or with
    ``client_training: depthwise`` (it trains every stage) the whole model's."""
    if settings.client_training == "depthwise":
        return list(model.state_dict().keys())
    return branch_keys(model, depth, settings.branch_all_exits)


def load_branch_state(model: MultiExitNetwork, state: Mapping[str, torch.Tensor], depth: int, all_exits: bool = True,
                      keys: Iterable[str] | None = None) -> None:
    """Load branch ``depth``'s entries (or ``keys``) into ``model``; ``state`` must hold exactly those keys."""
    want = set(branch_keys(model, depth, all_exits) if keys is None else keys)
    got = set(state)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(f"arrays for branch {depth} do not match it: missing {missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict(dict(state), strict=False)


def to_array_record(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> "ArrayRecord":
    """An ArrayRecord of ``state`` (only ``keys``, in that order, if given), copied to the CPU."""
    from flwr.app import ArrayRecord

    names = list(state) if keys is None else list(keys)
    return ArrayRecord({k: state[k].detach().to("cpu").contiguous() for k in names})


def to_state_dict(record: "ArrayRecord") -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, by name (dtypes and shapes kept)."""
    return dict(record.to_torch_state_dict())
