"""S5: depth-aware aggregation, branch assignment, and federated training of the exit-point model."""

import copy
import logging

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
    SimulationBackend,
    UpdateRejected,
    aggregate,
    assign_branches,
    check_update,
    client_profiles,
    federate,
    select_clients,
    stable_seed,
    train_local,
    validate,
)
from helpers import TINY_SAMPLE as SAMPLE, digits_settings, needs_fmnist, run_trials_experiment, tiny_space





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


@pytest.mark.slow
def test_one_client_with_all_the_data_equals_central_training(digits):
    """One client holding every training example, the whole network (capability assignment with a
    full budget), one round: the federated model is, bit for bit, a plain PyTorch training loop
    written here (a DataLoader over a seeded permutation, SGD, the sum of the exits'
    cross-entropies), from the same initial weights."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(), SAMPLE)
    central = copy.deepcopy(model)
    # BatchNorm statistics as the client left them (the server's re-estimation is not central
    # training); no self-distillation, no label-prior shift, no server steps: central training is
    # the plain multi-exit loss
    s = digits_settings(rounds=1, num_clients=1, min_clients=1, local_epochs=2, bn_stats="average", server_steps=0,
                        objective={"name": "multi_exit", "distill_weight": 0.0}, assignment="capability",
                        profile_mix=[["full", 1.0, 1.0]])
    data = FederatedData(s, bundle=digits)
    result = federate(model, s, data=data, report=False)
    (task,) = result.history[0]["clients"]
    assert task["depth"] == 3 and task["lr"] == 0.05  # the whole network, the run's learning rate
    from nni_fedexit.data import split_roles

    train = data.clients[0]
    assert len(train) == len(split_roles(len(digits.train), 0.2, 0.2, seed=0).clients)  # all of it
    # central training: 2 epochs of batches of 32, each epoch in the order of one torch.randperm
    # drawn from a generator seeded with the client's seed. (RandomSampler with that generator
    # is not this order: at the end of every epoch it draws one more, empty-sliced, permutation.)
    gen = torch.Generator().manual_seed(task["seed"])
    opt = torch.optim.SGD(central.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    central.train()
    for _ in range(2):
        order = torch.randperm(len(train), generator=gen)
        for x, y in DataLoader(TensorDataset(train.images[order], train.labels[order]), batch_size=32):
            z1, z2, z3 = central(x)
            loss = F.cross_entropy(z1, y) + F.cross_entropy(z2, y) + F.cross_entropy(z3, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    fed, cen = result.model.state_dict(), central.state_dict()
    assert set(fed) == set(cen)
    for k in cen:
        assert torch.equal(fed[k], cen[k]), k


@pytest.mark.slow
@needs_fmnist
def test_federated_run_on_fashion_mnist_raises_validation_accuracy(tmp_path):
    space = ResNetBlockPoolSpace.from_preset("resnet_pool", widths=[8, 16, 16, 32])
    torch.manual_seed(0)
    s = FederatedSettings(rounds=4, num_clients=5, client_samples=2000, val_samples=500, test_samples=500,
                          lr=0.05, seed=0, checkpoint_dir=str(tmp_path))
    network = space.build(space.baseline_sample())
    data = FederatedData(s)
    torch.manual_seed(stable_seed(s.seed, 0))  # the exits federate() adds, untrained: where the rounds start
    before = validate(MultiExitNetwork.from_network(copy.deepcopy(network), head=s.head), data.val)["exit_accuracy"]
    result = FederatedEvaluator(**vars(s)).fit(network, data=data, report=False)
    first, last = result.history[0]["exit_accuracy"], result.history[-1]["exit_accuracy"]
    print("validation accuracy per exit, untrained, first and last round:", before, first, last)
    assert all(a > b + 0.3 for a, b in zip(first, before))  # round 1 (clients, then the server's steps) learns
    assert last[-1] > first[-1] + 0.02 and np.mean(last) > np.mean(first) + 0.02  # and the rounds go on learning
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # any setting that changes what the run computes refuses the checkpoint; its files are untouched
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for change in (dict(lr=0.1), dict(num_clients=3), dict(partition="dirichlet"), dict(aggregator="fedavgm"),
                   dict(seed=1), dict(lr_decay=0.9), dict(local_epochs=2), dict(objective="fedprox"),
                   dict(min_clients=3), dict(bn_stats="average"), dict(client_fraction=0.5)):
        with pytest.raises(FederatedError, match=r"written with other settings \(data, partition, model or training\)"):
            federate(copy.deepcopy(net), digits_settings(rounds=4, checkpoint_dir=str(tmp_path), **change), report=False)
    with pytest.raises(FederatedError, match="holds 3 rounds, more than rounds=2"):
        federate(copy.deepcopy(net), digits_settings(rounds=2, checkpoint_dir=str(tmp_path)), report=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files


@pytest.mark.slow
def test_capability_assignment_run(digits):
    s = digits_settings(rounds=1, num_clients=6, assignment="capability",
                        profile_mix=[["tiny", 0.01, 0.5], ["full", 1.0, 0.5]])
    result = federate(tiny_space().build(SAMPLE), s, data=FederatedData(s, bundle=digits), report=False)
    depths = {c["depth"] for c in result.history[0]["clients"]}
    assert depths == {3}  # "tiny" devices afford no branch; "full" ones train the deepest


@pytest.mark.slow
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


# ---- memory, retries, best round, learning-rate decay -------------------------------------------


def _live_copies(shape: torch.Size) -> int:
    """Distinct storages of the live tensors of ``shape`` (a parameter only the model holds)."""
    import gc

    gc.collect()  # what is only unreachable (an optimiser's momentum in a reference cycle) is not held
    return len({t.untyped_storage().data_ptr() for t in gc.get_objects() if torch.is_tensor(t) and t.shape == shape})


@pytest.mark.slow
def test_memory_holds_the_same_model_copies_for_3_and_15_clients(digits):
    """docs/federated.md: memory holds the global model, one client model, the running aggregate
    and the best round's weights, whatever the number of clients. Counted: the live copies of the
    stem's first convolution (every branch, update and aggregate holds it) while the last client's
    update of each round is in hand, over 2 rounds of every client."""
    model = MultiExitNetwork.from_architecture(tiny_space(), SAMPLE)
    shape = model.state_dict()["stem.0.weight"].shape
    assert sum(v.shape == shape for v in model.state_dict().values()) == 1  # a shape no other entry has

    def peak(num_clients):
        """The most copies held during the run beyond those alive before it (the test's model, and
        whatever earlier tests of the session still hold)."""
        before = _live_copies(shape)
        counts = []

        class Counting(SimulationBackend):
            def train_client(self, global_state, task):
                update = super().train_client(global_state, task)
                if task is self.last:  # updates kept until the round's end would show here
                    counts.append(_live_copies(shape))
                return update

            def run_round(self, global_state, tasks, on_update, on_failure):
                self.last = tasks[-1]
                super().run_round(global_state, tasks, on_update, on_failure)

        s = digits_settings(rounds=2, num_clients=num_clients, min_clients=2, bn_stats="average")
        federate(copy.deepcopy(model), s, data=FederatedData(s, bundle=digits), backend_factory=Counting, report=False)
        assert len(counts) == 2
        return max(counts) - before

    few, many = peak(3), peak(15)
    # by hand: the run's global model, the round's global state, the client model and its gradient,
    # the update in hand and the one before it (still the loop variable that handed it on), the
    # aggregate's running sum, the best round's weights: 8, whatever the number of clients
    assert many == few == 8, (few, many)


@pytest.mark.slow
def test_a_round_that_gets_too_few_updates_is_retried_with_new_draws_and_the_retry_counts(digits, caplog):
    """round_retries=1: every client of round 1's first attempt fails; the retry (its own seeds,
    drawn for attempt 1) trains from the same global weights, and round 1 is the weighted mean of
    the retry's updates, computed here by hand from each client's local training."""
    from nni_fedexit.federated.objectives import make_objective

    attempts = []

    class FirstAttemptFails(SimulationBackend):
        def run_round(self, global_state, tasks, on_update, on_failure):
            attempts.append([t.to_dict() for t in tasks])
            if len(attempts) == 1:
                for task in tasks:
                    on_failure(task, ConnectionError("network down"))
                return
            super().run_round(global_state, tasks, on_update, on_failure)

    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(), SAMPLE)
    start = copy.deepcopy(model)
    # no server step after the mean: the round's model is the mean itself
    s = digits_settings(rounds=1, num_clients=3, min_clients=2, bn_stats="average", round_retries=1, server_steps=0)
    data = FederatedData(s, bundle=digits)
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        result = federate(model, s, data=data, backend_factory=FirstAttemptFails, report=False)
    assert "Round 1: only 0 of 3 client updates accepted (min_clients=2); retrying" in caplog.text
    assert len(attempts) == 2 and [h["round"] for h in result.history] == [1]
    record = result.history[0]
    assert record["clients"] == attempts[1] and record["accepted"] == 3 and not record["failed"]
    assert {c["seed"] for c in attempts[0]}.isdisjoint(c["seed"] for c in attempts[1])  # drawn anew
    # by hand: each client of the retry trains its branch from the initial weights; then, per
    # entry, the sample-weighted mean over the clients that hold it (float64), the rest unchanged
    sums, weights = {}, {}
    for c in attempts[1]:
        client = copy.deepcopy(start)
        update = train_local(c["client"], client.branch(c["depth"], all_exits=True), data.clients[c["client"]],
                             s.local_settings(), c["lr"], c["seed"], make_objective(s))
        for k, v in update.state.items():
            sums[k] = sums.get(k, 0) + v.double() * len(data.clients[c["client"]])
            weights[k] = weights.get(k, 0) + len(data.clients[c["client"]])
    for k, v in start.state_dict().items():
        want = sums[k] / weights[k] if k in sums else v
        if k in sums and not v.is_floating_point():  # integer buffers (BatchNorm's batch count): the rounded mean
            want = want.round()
        assert torch.equal(result.model.state_dict()[k], want.to(v.dtype)), k


def test_best_round_ties_are_broken_as_the_docs_say(digits):
    """docs/federated.md: the lowest validation total loss rounded to 4 decimals; among equal
    losses the higher last-exit accuracy; then the earlier round."""
    from nni_fedexit.federated.rounds import RoundEngine, better

    def m(loss, acc):
        return {"total_loss": loss, "exit_accuracy": [0.1, acc]}

    # (new, old, new is better): a table written by hand
    table = [
        (m(0.49994, 0.1), m(0.50006, 0.9), True),    # 0.4999 < 0.5001: the loss decides, not the accuracy
        (m(0.50004, 0.9), m(0.50001, 0.8), True),    # both 0.5000: the higher accuracy wins, despite the loss
        (m(0.50001, 0.8), m(0.50004, 0.9), False),
        (m(0.50001, 0.8), m(0.50003, 0.8), False),   # a full tie: the earlier (old) round stays
        (m(0.5, 0.8), m(0.5, 0.8), False),
        (m(9.0, 0.0), None, True),                   # the first round is always the best so far
    ]
    for new, old, want in table:
        assert better(new, old) is want, (new, old)
    # the round engine: three rounds of the same weights validate the same (no server step changes
    # them after the aggregation); round 1 stays the best
    s = digits_settings(rounds=3, bn_stats="average", server_steps=0)
    data = FederatedData(s, bundle=digits)
    model = MultiExitNetwork.from_architecture(tiny_space(), SAMPLE)
    from nni_fedexit.exits import exit_costs

    engine = RoundEngine(model, s, exit_costs(model, data.val.images[:1]), data.val)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (1, 2, 3):
        engine.finish(engine.open(engine.plan(t), state), state)
    assert len({(h["total_loss"], tuple(h["exit_accuracy"])) for h in engine.history}) == 1
    assert engine.best_round == 1


@pytest.mark.slow
def test_lr_decay_sets_the_learning_rate_each_round_uses(digits, monkeypatch):
    """lr_decay: round t's clients train with lr * lr_decay ** (t - 1) (docs/federated.md), read
    from the optimiser at every step (a subclass of torch's SGD that records it)."""
    steps: list[list[float]] = []

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            steps.append([])

        def step(self, closure=None):
            steps[-1].append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    # every client at full depth, so each trains one part (no depth-wise segments); then the
    # server's own steps, at the round's learning rate too
    s = digits_settings(rounds=3, num_clients=2, min_clients=2, lr=0.05, lr_decay=0.5, bn_stats="average",
                        assignment="capability", profile_mix=[["full", 1.0, 1.0]], server_steps=4)
    result = federate(tiny_space().build(SAMPLE), s, data=FederatedData(s, bundle=digits), report=False)
    want = [0.05, 0.025, 0.0125]  # 0.05 * 0.5 ** (t - 1), t = 1, 2, 3
    # per round, in round order: one optimiser per client, then the server's
    assert len(steps) == 3 * 3 and all(steps)
    assert [len(lrs) for lrs in steps[2::3]] == [4, 4, 4]
    for i, lrs in enumerate(steps):
        assert set(lrs) == {want[i // 3]}, (i, set(lrs))
    assert [h["lr"] for h in result.history] == want
    assert [[c["lr"] for c in h["clients"]] for h in result.history] == [[w, w] for w in want]
