"""Plugins by entry point: a third-party distribution's aggregator and objective, chosen by name.

The distribution is built from a pyproject with ``[project.entry-points."nni_fedexit.aggregators"]``
and installed by pip into its own folder (``plugin_site``). Here: the registry finds it, refuses what
it must, and a federated run in this process uses it. In an NNI trial: tests/test_run.py; on Flower
SuperNodes and the ServerApp: tests/test_flower.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import torch

from nni_fedexit.federated import FederatedData, FederatedSettings, federate
from nni_fedexit.federated.aggregators import FedAvg, aggregator_names, make_aggregator
from nni_fedexit.federated.aggregators.base import AGGREGATORS
from nni_fedexit.federated.objectives import objective_names
from nni_fedexit.federated.objectives.base import OBJECTIVES
from nni_fedexit.registry import ENTRY_POINT_GROUPS, Registry
from helpers import TINY_SAMPLE, plugin_uses, tiny_space


@pytest.fixture
def with_plugin(plugin_site, monkeypatch):
    """The plugin's folder on sys.path, and the registries to read the entry points again."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setattr(AGGREGATORS, "plugins", None)
    monkeypatch.setattr(OBJECTIVES, "plugins", None)
    for name in ("logged_fedavg",):
        monkeypatch.delitem(AGGREGATORS.entries, name, raising=False)
    monkeypatch.delitem(OBJECTIVES.entries, "logged_multi_exit", raising=False)
    yield plugin_site
    sys.modules.pop("fedexit_plugin_demo", None)


def test_entry_point_groups_are_the_documented_ones():
    assert ENTRY_POINT_GROUPS == {"aggregator": "nni_fedexit.aggregators", "objective": "nni_fedexit.objectives",
                                  "backend": "nni_fedexit.backends"}


def test_installed_plugins_are_found_by_name(with_plugin):
    assert "logged_fedavg" in aggregator_names() and "fedavg" in aggregator_names()
    assert "logged_multi_exit" in objective_names()
    cls = AGGREGATORS.get("logged_fedavg")
    assert cls.__name__ == "LoggedFedAvg" and issubclass(cls, FedAvg)
    assert FederatedSettings(aggregator="logged_fedavg", objective="logged_multi_exit").aggregator == \
        {"name": "logged_fedavg", "tag": "plugin"}
    # the plugin's own parameters: checked where the config loads, built into the component, in the schema
    chosen = FederatedSettings(aggregator={"name": "logged_fedavg", "tag": "mine"})
    assert make_aggregator(chosen).params.tag == "mine"
    with pytest.raises(ValueError, match=r"^aggregator\.trim: unknown key; aggregator takes \['tag'\]$"):
        FederatedSettings(aggregator={"name": "logged_fedavg", "trim": 0.1})
    from nni_fedexit.job.config import run_config_schema

    choices = run_config_schema()["properties"]["federated"]["properties"]["aggregator"]["anyOf"]
    plugin = next(c for c in choices if c.get("properties", {}).get("name") == {"const": "logged_fedavg"})
    assert plugin["properties"]["tag"]["description"] == "written into each log line"


def test_a_plugin_cannot_take_a_built_in_name(with_plugin, caplog):
    registry = Registry("aggregator", {"logged_fedavg": "nni_fedexit.federated.aggregators.fedavg:FedAvg"},
                        group="nni_fedexit.aggregators")
    with caplog.at_level(logging.WARNING, logger="nni_fedexit.registry"):
        assert registry.names() == ["logged_fedavg"]
        assert registry.get("logged_fedavg") is FedAvg
    assert "ignored: 'logged_fedavg' is built in" in caplog.text


def test_unknown_name_lists_the_plugins_too(with_plugin):
    with pytest.raises(ValueError, match=r"aggregator: must be one of \[.*'logged_fedavg'.*\], got 'nope'"):
        AGGREGATORS.get("nope")


def test_a_plugin_that_fails_to_load_is_named(monkeypatch):
    registry = Registry("objective", group="nni_fedexit.objectives")
    broken = EntryPoint("broken", "no_such_module_anywhere:Thing", "nni_fedexit.objectives")
    monkeypatch.setattr(registry, "plugins", {"broken": broken})
    with pytest.raises(ValueError, match=r"objective: 'broken' comes from the plugin .* no_such_module_anywhere:Thing "
                                         r"in nni_fedexit.objectives.*failed to load: ModuleNotFoundError"):
        registry.get("broken")


@pytest.mark.slow
def test_plugins_are_read_only_when_a_name_is_looked_up():
    """Importing the registries reads no entry points (a fresh interpreter)."""
    code = ("from nni_fedexit.federated.aggregators.base import AGGREGATORS\nassert AGGREGATORS.plugins is None\n"
            "AGGREGATORS.get('fedavg')\nassert AGGREGATORS.plugins is None\n"
            "AGGREGATORS.names()\nassert AGGREGATORS.plugins is not None")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_plugin_search_space_preset_is_found_by_name(with_plugin):
    from nni_fedexit.presets import list_presets, load_preset
    from nni_fedexit.space import ResNetBlockPoolSpace

    assert "plugin_pool" in list_presets("search_spaces") and "resnet_pool" in list_presets("search_spaces")
    spec, where = load_preset("search_spaces", "plugin_pool")
    assert spec["widths"] == [8, 16, 16] and "fedexit_plugin_demo:PLUGIN_POOL" in where and "fedexit-plugin-demo" in where
    space = ResNetBlockPoolSpace.from_preset("plugin_pool")
    assert list(space.spec.sources) == ["resnet18", "resnet50"] and list(space.spec.widths) == [8, 16, 16]


@pytest.mark.slow
def test_a_federated_run_uses_the_plugin(with_plugin, digits, tmp_path, monkeypatch):
    log = tmp_path / "uses.jsonl"
    monkeypatch.setenv("FEDEXIT_PLUGIN_LOG", str(log))
    settings = FederatedSettings(dataset="digits", rounds=2, num_clients=3, min_clients=2, batch_size=32, lr=0.05,
                                 seed=0, head="linear", aggregator="logged_fedavg", objective="logged_multi_exit")
    plain = settings.replace(aggregator="fedavg", objective="multi_exit")
    torch.manual_seed(0)
    result = federate(tiny_space().build(TINY_SAMPLE), settings, data=FederatedData(settings, bundle=digits), report=False)
    uses = plugin_uses(log)
    assert [u["kind"] for u in uses].count("aggregator") == 2  # one per round
    assert {u["client"] for u in uses if u["kind"] == "objective"} <= {0, 1, 2}
    # the plugin's maths are FedAvg's and the multi-exit loss's: the same run as the built-ins
    torch.manual_seed(0)
    reference = federate(tiny_space().build(TINY_SAMPLE), plain, data=FederatedData(plain, bundle=digits), report=False)
    assert all((a == b).all() for a, b in zip(result.model.state_dict().values(), reference.model.state_dict().values()))
