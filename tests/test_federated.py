"""S5: depth-aware aggregation, branch assignment, and federated training of the exit-point model."""

import copy
import logging
import math

import numpy as np
import pytest
import torch

from nni_fedexit import ResNetBlockPoolSpace
from nni_fedexit.data import DataError
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.federated import (
    FederatedData,
    FederatedError,
    FederatedEvaluator,
    FederatedSettings,
    LocalSettings,
    SimulationBackend,
    UpdateRejected,
    aggregate,
    assign_branches,
    check_update,
    client_profiles,
    federate,
    select_clients,
    train_local,
)
from helpers import HAVE_FMNIST, TINY_SAMPLE as SAMPLE, run_trials_experiment, tiny_space


def digits_settings(**overrides):
    base = dict(dataset="digits", rounds=2, num_clients=4, min_clients=2, batch_size=32, lr=0.05, seed=0, head="linear")
    base.update(overrides)
    return FederatedSettings(**base)


# ---- aggregation -------------------------------------------------------------------------------


def test_aggregation_equals_a_hand_computation_with_overlapping_branches():
    g = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0]), "c": torch.tensor([[3.0]]),
         "untouched": torch.tensor([9.0]), "count": torch.tensor(10)}
    c1 = {"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([10.0]), "count": torch.tensor(12)}   # shallow branch
    c2 = {"b": torch.tensor([2.0]), "c": torch.tensor([[7.0]]), "count": torch.tensor(20)}      # other entries
    new = aggregate(g, [(c1, 1.0), (c2, 3.0)])
    assert torch.equal(new["a"], torch.tensor([4.0, 0.0]))           # only client 1 holds it
    assert torch.allclose(new["b"], torch.tensor([(1 * 10.0 + 3 * 2.0) / 4]))
    assert torch.equal(new["c"], torch.tensor([[7.0]]))              # only client 2
    assert torch.equal(new["untouched"], torch.tensor([9.0]))        # nobody: unchanged
    assert new["count"].dtype == torch.int64 and int(new["count"]) == round((12 + 3 * 20) / 4)
    assert set(new) == set(g) and new["untouched"] is not g["untouched"]


def test_aggregation_of_real_branches_keeps_names_and_dtypes():
    model = MultiExitNetwork.from_architecture(tiny_space(), SAMPLE)
    g = model.state_dict()
    shallow = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in model.branch(1).state_dict().items()}
    deep = {k: v.clone() if v.is_floating_point() else v.clone() for k, v in model.branch(3, all_exits=True).state_dict().items()}
    new = aggregate(g, [(shallow, 3), (deep, 1)])
    key = next(k for k in shallow if k.startswith("stem.") and g[k].is_floating_point())
    assert torch.allclose(new[key], g[key] + 0.75)
    only_deep = next(k for k in deep if k.startswith("stages.2.") and g[k].is_floating_point())
    assert torch.equal(new[only_deep], g[only_deep])
    assert all(new[k].dtype == g[k].dtype and new[k].shape == g[k].shape for k in g)


@pytest.mark.parametrize(
    "update,needle",
    [
        ({"zzz": torch.zeros(1)}, "unknown key 'zzz'"),
        ({"a": torch.zeros(3)}, r"'a' has shape \(3,\)"),
        ({"a": torch.tensor([float("nan"), 0.0])}, "'a' holds NaN or Inf"),
        ({"a": torch.tensor([float("inf"), 0.0])}, "'a' holds NaN or Inf"),
        ({"a": torch.tensor([1, 2])}, "'a' has dtype torch.int64"),
        ({}, "empty"),
    ],
)
def test_bad_updates_are_rejected_naming_the_key(update, needle):
    with pytest.raises(UpdateRejected, match=needle):
        check_update({"a": torch.zeros(2)}, update)


# ---- selection and assignment --------------------------------------------------------------------


def test_client_selection_respects_fraction_and_minimum():
    rng = np.random.default_rng(0)
    assert len(select_clients(10, 0.3, 2, rng)) == 3
    assert len(select_clients(10, 0.1, 4, rng)) == 4
    chosen = select_clients(10, 1.0, 2, rng)
    assert chosen == list(range(10))
    with pytest.raises(ValueError, match="fraction"):
        select_clients(10, 0.0, 2, rng)


def test_random_assignment_is_seeded_and_covers_depths():
    a = assign_branches(range(200), 4, "random", np.random.default_rng(1))
    b = assign_branches(range(200), 4, "random", np.random.default_rng(1))
    assert a == b and set(a.values()) == {1, 2, 3, 4}


def test_capability_assignment_gives_the_deepest_branch_that_fits():
    macs = [10.0, 40.0, 60.0, 100.0]
    budgets = [0.05, 0.35, 0.6, 1.0, 0.99]
    out = assign_branches(range(5), 4, "capability", np.random.default_rng(0), budgets, macs)
    assert out == {1: 1, 2: 3, 3: 4, 4: 3}  # client 0 affords no branch and sits out
    profiles = client_profiles(1000, seed=0)
    names = [p.name for p in profiles]
    assert 0.25 < names.count("low-end") / 1000 < 0.35 and 0.35 < names.count("mid-range") / 1000 < 0.45


# ---- federated training ------------------------------------------------------------------------


def test_settings_errors_name_the_key():
    with pytest.raises(ValueError, match="min_clients"):
        FederatedSettings(num_clients=2, min_clients=3)
    with pytest.raises(ValueError, match="assignment"):
        FederatedSettings(assignment="fastest")
    with pytest.raises(ValueError, match="rounds"):
        FederatedSettings(rounds=0)
    with pytest.raises(DataError, match="client"):
        FederatedData(digits_settings(num_clients=5000))


def test_one_client_with_all_the_data_equals_central_training(digits):
    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(), SAMPLE)
    central = copy.deepcopy(model)
    # BatchNorm statistics as the client left them (the server's re-estimation is not central training)
    s = digits_settings(rounds=1, num_clients=1, min_clients=1, local_epochs=2, bn_stats="average")
    data = FederatedData(s, bundle=digits)
    result = federate(model, s, data=data, report=False)
    (task,) = result.history[0]["clients"]
    from nni_fedexit.federated.objectives import make_objective

    train_local(0, central.branch(task["depth"], all_exits=True), data.clients[0],
                LocalSettings(epochs=2, batch_size=32), lr=0.05, seed=task["seed"], objective=make_objective(s))
    fed, cen = result.model.state_dict(), central.state_dict()
    from nni_fedexit.data import split_roles

    assert len(data.clients[0]) == len(split_roles(len(digits.train), 0.2, 0.2, seed=0).clients)  # all of it
    for k in cen:
        assert torch.allclose(fed[k].float(), cen[k].float(), atol=1e-6), k


def test_federated_run_on_fashion_mnist_raises_validation_accuracy(tmp_path):
    pytest.importorskip("torchvision")
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed (`make data`)")
    space = ResNetBlockPoolSpace.from_preset("resnet_pool", widths=[8, 16, 16, 32])
    torch.manual_seed(0)
    s = FederatedSettings(rounds=4, num_clients=5, client_samples=2000, val_samples=500, test_samples=500,
                          lr=0.05, seed=0, checkpoint_dir=str(tmp_path))
    result = FederatedEvaluator(**vars(s)).fit(space.build(space.baseline_sample()), report=False)
    first, last = result.history[0]["exit_accuracy"], result.history[-1]["exit_accuracy"]
    print("validation accuracy per exit, first and last round:", first, last)
    assert last[-1] > first[-1] + 0.1 and np.mean(last) > np.mean(first) + 0.1
    assert result.best_round == min(result.history, key=lambda h: round(h["total_loss"], 4))["round"]
    assert len(result.test_accuracy) == 4 and all(0 <= a <= 1 for a in result.test_accuracy)
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "last.safetensors").is_file()


class FaultyBackend(SimulationBackend):
    """Real clients, except client 1 crashes and client 2 sends NaN weights."""

    def train_client(self, global_state, task):
        if task.client == 1:
            raise ConnectionError("device went offline")
        update = super().train_client(global_state, task)
        if task.client == 2:
            key = next(k for k, v in update.state.items() if v.is_floating_point())
            update.state[key] = torch.full_like(update.state[key], float("nan"))
        return update


def test_failing_client_and_nan_update_are_dropped_and_named(digits, caplog):
    s = digits_settings(rounds=1, num_clients=4, min_clients=2)
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        result = federate(tiny_space().build(SAMPLE), s, data=FederatedData(s, bundle=digits),
                          backend_factory=FaultyBackend, report=False)
    record = result.history[0]
    assert record["accepted"] == 2
    assert [f["client"] for f in record["failed"]] == [1] and "device went offline" in record["failed"][0]["reason"]
    assert [r["client"] for r in record["rejected"]] == [2] and "NaN" in record["rejected"][0]["reason"]
    assert "client 1 (branch" in caplog.text and "failed and is dropped" in caplog.text
    assert "update of client 2" in caplog.text and "rejected" in caplog.text
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point())


def test_too_few_updates_stops_with_a_clear_error_and_keeps_trained_rounds(digits, tmp_path):
    class AllFail(SimulationBackend):
        def train_client(self, global_state, task):
            if self.rounds_seen >= 1:
                raise RuntimeError("battery empty")
            return super().train_client(global_state, task)

        def run_round(self, *args, **kwargs):
            super().run_round(*args, **kwargs)
            self.rounds_seen += 1

    def factory(*args):
        backend = AllFail(*args)
        backend.rounds_seen = 0
        return backend

    s = digits_settings(rounds=3, checkpoint_dir=str(tmp_path))
    with pytest.raises(FederatedError, match=r"round 2: only 0 client updates .* min_clients=2.*Rounds 1..1 are kept"):
        federate(tiny_space().build(SAMPLE), s, data=FederatedData(s, bundle=digits), backend_factory=factory, report=False)
    assert (tmp_path / "best.safetensors").is_file()


def test_stopped_run_resumes_to_the_same_model(digits, tmp_path):
    net = tiny_space().build(SAMPLE)
    full = federate(copy.deepcopy(net), digits_settings(rounds=3), data=None, report=False)
    first = digits_settings(rounds=2, checkpoint_dir=str(tmp_path))
    federate(copy.deepcopy(net), first, report=False)
    resumed = federate(copy.deepcopy(net), digits_settings(rounds=3, checkpoint_dir=str(tmp_path)), report=False)
    assert [h["round"] for h in resumed.history] == [1, 2, 3]
    assert resumed.best_round == full.best_round
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    with pytest.raises(FederatedError, match="other settings"):
        federate(copy.deepcopy(net), digits_settings(rounds=4, lr=0.1, checkpoint_dir=str(tmp_path)), report=False)


def test_capability_assignment_run(digits):
    s = digits_settings(rounds=1, num_clients=6, assignment="capability",
                        profile_mix=[["tiny", 0.01, 0.5], ["full", 1.0, 0.5]])
    result = federate(tiny_space().build(SAMPLE), s, data=FederatedData(s, bundle=digits), report=False)
    depths = {c["depth"] for c in result.history[0]["clients"]}
    assert depths == {3}  # "tiny" devices afford no branch; "full" ones train the deepest


def test_federated_evaluator_runs_as_nni_trials_with_a_curve_per_round(tmp_path):
    """FederatedEvaluator as the evaluator of a trials search: shipped to trial processes by NNI."""
    import json

    from nni_fedexit.search.strategy import SizeAwarePolicyGradient

    space = tiny_space()
    evaluator = FederatedEvaluator(dataset="digits", rounds=2, num_clients=3, min_clients=2, head="linear")
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=1, seed=0)
    jobs, metrics, _ = run_trials_experiment(space, evaluator, strategy, tmp_path, trials=2)
    assert [j["status"] for j in jobs] == ["SUCCEEDED", "SUCCEEDED"]
    for job in jobs:
        mine = [m for m in metrics if m["trialJobId"] == job["trialJobId"]]
        assert sorted(m["type"] for m in mine) == ["FINAL", "PERIODICAL", "PERIODICAL"]  # one point per round
        final = json.loads(json.loads(next(m for m in mine if m["type"] == "FINAL")["data"]))
        assert final["best_round"] in (1, 2) and {"test_exit1", "test_exit3", "params"} <= set(final)
    assert len(strategy.records) == 2
    for record in strategy.records:
        assert record["params"] == space.count_params(record["sample"])
