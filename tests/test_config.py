"""The run configuration: every section checked when it loads, messages that start with the dotted key,
the run's FederatedSettings built once."""

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from nni_fedexit.job.cli import main
from nni_fedexit.job.config import ConfigError, load_config
from helpers import EXAMPLES


def _config(tmp_path, **changes):
    """tiny_digits.yaml with ``section__key=value`` (or ``key=value``) changes, as a file."""
    data = yaml.safe_load((EXAMPLES / "tiny_digits.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def no_data(monkeypatch):
    """load_config must not read any data: loading a data set here fails the test."""
    import importlib

    import nni_fedexit.data
    import nni_fedexit.data.datasets

    # the modules load_config may import bind the real loader first (imports are lazy: a module
    # imported while the loader is replaced would keep the replacement for the rest of the session)
    for name in ("nni_fedexit.job.pipeline", "nni_fedexit.search.shared_trial", "nni_fedexit.search.trial",
                 "nni_fedexit.federated.client_data"):
        importlib.import_module(name)

    def refuse(*args, **kwargs):
        raise AssertionError("load_config loaded data")

    for module in (nni_fedexit.data, nni_fedexit.data.datasets):
        monkeypatch.setattr(module, "load_dataset", refuse)


@pytest.mark.parametrize(
    "changes,prefix",
    [
        ({"federated__profile_mix": [[1]]}, "federated.profile_mix: "),
        ({"federated__loss_weights": "abc"}, "federated.loss_weights: "),
        ({"federated__head": "mlp"}, "federated.head: "),
        ({"federated__round_retries": 1.5}, "federated.round_retries: "),
        ({"federated__lr": "0.1"}, "federated.lr: "),
        ({"federated__aggregator": "nope"}, "federated.aggregator: "),
        ({"federated__objective": "nope"}, "federated.objective: "),
        ({"federated__client_training": "layerwise"}, "federated.client_training: "),
        ({"federated__segment_data": "half"}, "federated.segment_data: "),
        ({"federated__objective": {"name": "logit_adjusted", "tau": 0}}, "federated.objective.tau: "),
        ({"federated__server_steps": -1}, "federated.server_steps: "),
        ({"federated__server_steps": 1.5}, "federated.server_steps: "),
        ({"federated__server_samples": 0}, "federated.server_samples: "),
        ({"federated__best_by": "accuracy"}, "federated.best_by: "),
        ({"federated__backend": "nope"}, "federated.backend: "),
        ({"federated__roundz": 3}, "federated.roundz: unknown key"),
        ({"federated__seed": 3}, "federated.seed: "),
        ({"data__server_fraction": 1.5}, "data.server_fraction: "),
        ({"data__test_samples": 0}, "data.test_samples: "),
        ({"data__dataset": "mnist"}, "data.dataset: "),
        ({"search": {"strategy": "no_such_preset"}}, "search.strategy: "),
        ({"search": {"strategy": {"preset": "no_such_preset"}}}, "search.strategy.preset: "),
        ({"search": {"strategy": {"preset": "size_aware_pg", "bogus": 1}}}, "search.strategy.bogus: unknown key"),
        ({"search": {"strategy": {"preset": "size_aware_pg", "beta": 0}}}, "search.strategy.beta: "),
        ({"search": {"strategy": {"preset": "size_aware_pg", "samples_per_update": "two"}}},
         "search.strategy.samples_per_update: "),
        ({"search": {"strategy": {"preset": "size_aware_pg", "mode": "both"}}}, "search.strategy.mode: "),
        ({"search": {"strategy": {"preset": "size_aware_pg_trials", "warmup_epochs": 1}}},
         "search.strategy.warmup_epochs: an option of mode 'shared', not of mode 'trials'"),
        ({"search": {"strategy": {"preset": "size_aware_pg", "mode": "trials"}}},
         "search.strategy.final_samples (in the preset "),
        ({"search": {"strategy": {"preset": "size_aware_pg", "controller": {"hidden": 3}}}},
         "search.strategy.controller.hidden: unknown key"),
        ({"search": {"strategy": {"preset": "size_aware_pg", "controller": {"hidden_size": 0}}}},
         "search.strategy.controller.hidden_size: "),
        ({"search": {"strategy": {"preset": "size_aware_pg", "reward": 3}}}, "search.strategy.reward: "),
        ({"search__trial": {"epoch": 1}}, "search.trial.epoch: unknown key"),
        ({"search__trial": {"lr": "fast"}}, "search.trial.lr: "),
        ({"search__learning_rate": 0}, "search.learning_rate: "),
        ({"space": {"preset": "resnet_pool", "sources": ["resnet18"]}}, "space.sources: "),
        ({"space": "no_such_space"}, "space: "),
        ({"exits__macs_budget": 1e6}, "exits.max_accuracy_drop: give exactly one"),
        ({"seedd": 1}, "seedd: unknown key"),
    ],
)
def test_bad_value_fails_at_load_naming_the_dotted_key(tmp_path, no_data, changes, prefix):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, **changes))
    assert str(info.value).startswith(prefix), str(info.value)


def test_a_missing_strategy_preset_names_the_available_ones(tmp_path, no_data):
    with pytest.raises(ConfigError, match=r"^search\.strategy\.preset: .*'no_such_preset'.*size_aware_pg_trials"):
        load_config(_config(tmp_path, search={"strategy": {"preset": "no_such_preset"}}))


def test_an_unknown_strategy_key_lists_the_known_ones(tmp_path, no_data):
    with pytest.raises(ConfigError, match=r"^search\.strategy\.bogus: unknown key.*'final_samples'.*'preset'"):
        load_config(_config(tmp_path, search={"strategy": {"preset": "size_aware_pg", "bogus": 1}}))


def test_a_good_config_builds_its_federated_settings_once(tmp_path, no_data):
    from nni_fedexit.federated import FederatedSettings

    config = load_config(_config(tmp_path, federated__rounds=7, run_dir=str(tmp_path / "run")))
    settings = config.federated_settings()
    assert isinstance(settings, FederatedSettings)
    assert settings is config.federated_settings() is config.federated_settings()
    assert settings.rounds == 7 and settings.dataset == "digits" and settings.seed == config.seed
    assert settings.checkpoint_dir == str((tmp_path / "run" / "federated").resolve())
    # what the run directory's config.yaml holds: the sections as written, no built object
    assert config.to_dict()["federated"] == {"rounds": 7, "num_clients": 3, "min_clients": 2, "head": "linear"}
    assert load_config(_config(tmp_path, **config.to_dict())).federated_settings() == settings


def test_the_strategy_comes_from_the_checked_arguments(tmp_path, no_data):
    config = load_config(_config(tmp_path, seed=5))
    preset, arguments = config.strategy_arguments()
    assert preset == "size_aware_pg" and arguments == {"seed": 5, "final_samples": 4, "samples_per_update": 2,
                                                  "warmup_epochs": 1}
    first, second = config.new_strategy(), config.new_strategy()
    assert first is not second and (first.final_samples, first.seed, first.mode) == (4, 5, "shared")


def test_dotted_overrides_are_checked(tmp_path, no_data):
    assert load_config(_config(tmp_path), {"nni.port": 9001}).nni.port == 9001
    with pytest.raises(ConfigError, match=r"^nni\.port: Input should be greater than or equal to 1 \(got "):
        load_config(_config(tmp_path), {"nni.port": 0})


# ---- from the command line (moved from test_run.py) ---------------------------------------------


# Each message: "error: " (click's prefix), the dotted key, then what is wrong and what to do.
# The fix each one must name, from docs/configuration.md and the checks in nni_fedexit/job/config.py:
# the keys a section takes, the type expected, the values allowed, or the bound to respect.
@pytest.mark.parametrize(
    "changes,start,fix",
    [
        ({"federated__roundz": 3}, "federated.roundz: unknown key", "federated takes ['aggregator',"),
        ({"search__epochs": "three"}, "search.epochs: Input should be a valid integer", "(got 'three')"),
        ({"federated__min_clients": 9}, "federated.min_clients: 9 is more than num_clients", "(3)"),
        ({"federated__num_clients": 100000}, "federated.num_clients: 100000 clients but only",
         "use fewer clients or more data"),
        ({"exits__criterion": "margin"}, "exits.criterion: Input should be 'max_prob' or 'entropy'", "(got 'margin')"),
        ({"exits__rule": "mine"}, "exits.rule: Input should be 'shared' or 'per_exit'", "(got 'mine')"),
        ({"exits__margin": "lots"}, "exits.margin: Input should be 'held_out' or 'none'", "(got 'lots')"),
        ({"exits__confidence_level": 1.0}, "exits.confidence_level: Input should be less than 1", "(got 1.0)"),
        ({"nni__host": "0.0.0.0"}, "nni.host: must be 127.0.0.1, localhost or all", "SSH tunnel"),
        ({"federated__aggregator": {"name": "fedadam", "beta1": 0.5}}, "federated.aggregator.beta1: unknown key",
         "aggregator takes ['beta_1', 'beta_2', 'lr', 'tau']"),
        ({"federated__backend": {"name": "flower"}}, "federated.backend.superlink: the flower backend needs",
         "superlink: local-deploy"),
        ({"exits": {"max_accuracy_drop": None, "macs_budget": 1e6}}, "exits.margin: held_out keeps an accuracy drop",
         "set margin: none"),
        ({"data__datset": "digits"}, "data.datset: unknown key",
         "data takes ['data_dir', 'dataset', 'download', 'server_fraction', 'test_samples', 'val_fraction']"),
        ({"space": {"preset": "resnet_pool", "widht": [8]}}, "space.widht: unknown key", "'widths']"),
        ({"device": "tpu"}, "device: must be cpu, cuda or cuda:N", "got 'tpu'"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, changes, start, fix):
    result = CliRunner().invoke(main, ["run", str(_config(tmp_path, **changes)), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {start}"), result.output
    assert result.output.count("\n") == 1 and fix in result.output  # one line, with what to do
    assert not (tmp_path / "r" / "stages.json").exists()  # nothing ran


def test_bad_port_option_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["run", str(_config(tmp_path)), "--run-dir", str(tmp_path / "r"), "--port", "0"])
    assert result.exit_code == 2 and result.output == "error: nni.port: Input should be greater than or equal to 1 (got 0)\n", result.output


def test_missing_config_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml not found" in result.output


def test_every_example_config_is_valid():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert {"fmnist_quickstart.yaml", "fmnist_full.yaml", "cifar10.yaml", "fmnist_noniid.yaml"} <= set(names)
    for name in names:
        load_config(EXAMPLES / name)


def test_flower_example_config_is_checked(tmp_path):
    """federated.backend: flower needs the SuperLink connection; the example names it."""
    config = load_config(EXAMPLES / "tiny_digits_flower.yaml")
    settings = config.federated_settings()
    assert settings.backend == {"name": "flower", "superlink": "local-deploy", "flwr_home": None}
    broken = yaml.safe_load((EXAMPLES / "tiny_digits_flower.yaml").read_text())
    del broken["federated"]["backend"]["superlink"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ConfigError, match=r"^federated\.backend\.superlink: .*config\.toml"):
        load_config(tmp_path / "broken.yaml")


def test_messages_start_with_the_key_not_a_file_path(tmp_path, no_data):
    """A strategy preset's own errors name the preset file after the key, not before it."""
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, search={"strategy": {"preset": "size_aware_pg", "final_samples": 0}}))
    assert re.match(r"^search\.strategy\.final_samples: ", str(info.value)), str(info.value)


def test_the_label_skew_options_come_from_the_yaml(tmp_path, no_data):
    config = load_config(_config(tmp_path, federated__client_training="branch", federated__segment_data="all",
                                 federated__objective={"name": "logit_adjusted", "tau": 0.5}, federated__server_steps=0,
                                 federated__best_by="last_exit", federated__server_samples=1000))
    s = config.federated_settings()
    assert (s.client_training, s.segment_data, s.name("objective"), s.server_steps, s.best_by, s.params("objective").tau,
            s.server_samples) == ("branch", "all", "logit_adjusted", 0, "last_exit", 0.5, 1000)
    assert s.local_settings().mode == "branch" and s.local_settings().segment_data == "all"


def test_config_schema_describes_every_key_and_validates_the_examples(tmp_path):
    """``nni-fedexit config schema``: JSON Schema an editor completes keys from; every example config
    is valid under it, a typo or a wrong type is not, and the components' own parameters are in it."""
    import jsonschema

    result = CliRunner().invoke(main, ["config", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(EXAMPLES.glob("*.yaml")):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors)
    federated = schema["properties"]["federated"]["properties"]
    assert "dataset" not in federated and "seed" not in federated  # set by other sections
    fedadam = next(c for c in federated["aggregator"]["anyOf"] if c.get("title") == "aggregator fedadam")
    assert set(fedadam["properties"]) == {"name", "lr", "beta_1", "beta_2", "tau"}
    assert fedadam["properties"]["lr"]["exclusiveMinimum"] == 0 and fedadam["properties"]["lr"]["description"]
    for bad in ({"federated": {"roundz": 3}}, {"exits": {"criterion": "margin"}},
                {"federated": {"aggregator": {"name": "fedadam", "beta1": 0.5}}}, {"nni": {"port": "8080"}}):
        assert list(validator.iter_errors(bad)), bad


def test_config_check_prints_the_resolved_settings_and_moves_old_keys_with_one_line_each(tmp_path):
    path = _config(tmp_path, federated__aggregator="fedadam", federated__server_lr=0.02)
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: server_lr is now aggregator.lr (e.g. aggregator: {name: fedadam, lr: 0.02}); "
                             "read as that\n")
    resolved = json.loads(result.stdout.split("\n", 1)[1])
    assert resolved["aggregator"] == {"name": "fedadam", "lr": 0.02, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}
    assert resolved["objective"]["name"] == "logit_adjusted" and "checkpoint_dir" not in resolved
    bad = CliRunner().invoke(main, ["config", "check", str(_config(tmp_path, federated__objective={"name": "fedprox",
                                                                                                 "mu": -1}))])
    assert bad.exit_code == 2 and bad.output == ("error: federated.objective.mu: Input should be greater than or "
                                                 "equal to 0 (got -1)\n"), bad.output


def test_the_configuration_reference_shows_every_key_the_models_declare():
    """docs/configuration.md's reference is written from the models: every field of every section
    and every built-in component's parameters, with its description."""
    from nni_fedexit.components import component_params
    from nni_fedexit.federated.settings import COMPONENTS, FederatedSettings
    from nni_fedexit.job.config import DataConfig, ExitConfig, NniConfig, SearchConfig
    from nni_fedexit.job.config_reference import reference_markdown

    text = reference_markdown()
    models = [DataConfig, SearchConfig, ExitConfig, NniConfig, FederatedSettings]
    models += [component_params(registry.get(name)) for registry in COMPONENTS.values() for name in registry.names()]
    for model in models:
        for name, field in model.model_fields.items():
            if name in ("dataset", "data_dir", "server_fraction", "val_fraction", "test_samples", "seed", "device",
                        "checkpoint_dir") and model is FederatedSettings:
                continue  # documented in the section that sets them
            assert f"| `{name}` |" in text, (model.__name__, name)
            assert field.description and field.description.split()[0] in text, (model.__name__, name)
