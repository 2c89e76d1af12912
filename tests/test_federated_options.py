"""S5 training options: self-distillation, FedProx, FedDyn, server optimisers, BatchNorm under
skew, and the ensemble of exits; each checked against the behaviour it must reduce to."""

import functools
import copy

import pytest
import torch
import torch.nn.functional as F

from nni_fedexit.data import ImageData
from nni_fedexit.exits import (
    MultiExitNetwork, calibrate, early_exit_metrics, early_exit_predict, ensemble_accuracy, ensemble_logits,
    exit_costs, exit_outputs, multi_exit_loss,
)
from nni_fedexit.federated import (
    FederatedData, FederatedSettings, LocalSettings, ObjectiveContext, federate, train_local,
)
from nni_fedexit.federated.aggregators import FedAdam, FedAvg, FedAvgM, FedYogi, make_aggregator
from nni_fedexit.federated.batchnorm import bn_keys, is_bn_statistic, reestimate_bn_statistics
from nni_fedexit.federated.objectives import (
    FedDynObjective, FedProxObjective, MultiExitObjective, make_objective, self_distillation,
)
from helpers import TINY_SAMPLE as SAMPLE, digits_settings as shared_digits_settings, tiny_space


digits_settings = functools.partial(shared_digits_settings, head="conv")



def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MultiExitNetwork.from_architecture(tiny_space(), SAMPLE, head="conv")


def train_once(objective, data, model=None, local=None, client_state=None):
    model = model or tiny_model()
    branch = model.branch(3, all_exits=True)
    update = train_local(0, branch, data, local or LocalSettings(epochs=1, batch_size=32), 0.05, 7, objective,
                         client_state=client_state)
    return model, update


# ---- client objectives ---------------------------------------------------------------------------


@pytest.mark.slow
def test_distillation_with_weight_zero_is_the_multi_exit_loss(digits):
    model = tiny_model()
    branch = model.branch(3, all_exits=True)
    x, y = digits.train.images[:16], digits.train.labels[:16]
    outputs = branch(x)
    ctx = ObjectiveContext(branch, {})
    plain = multi_exit_loss(outputs, y, branch.loss_weights)
    assert torch.equal(MultiExitObjective(FederatedSettings(objective={"name": "logit_adjusted", "distill_weight": 0.0})).loss(ctx, outputs, y), plain)
    with_kd = MultiExitObjective(FederatedSettings(objective={"name": "logit_adjusted", "distill_weight": 0.5})).loss(ctx, outputs, y)
    assert float(with_kd) == pytest.approx(float(plain + 0.5 * self_distillation(outputs)))
    # the KL term: zero between identical exits, positive otherwise, and its teachers carry no gradient
    z = torch.randn(8, 10, requires_grad=True)
    assert float(self_distillation([z, z.detach().clone()])) == pytest.approx(0.0, abs=1e-7)
    a, b = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
    loss = self_distillation([a, b])
    assert float(loss) > 0
    loss.backward()
    by_hand = F.kl_div(F.log_softmax(a, 1), F.log_softmax(b.detach(), 1), reduction="batchmean", log_target=True)
    grad_a = torch.autograd.grad(by_hand, a)[0]
    assert torch.allclose(a.grad, grad_a, atol=1e-6)
    assert self_distillation([a]).item() == 0.0  # a branch with one exit has nothing to distil


@pytest.mark.slow
def test_fedprox_with_mu_zero_equals_fedavg_training_and_mu_pulls_towards_the_global_model(digits):
    data = FederatedData(digits_settings(), bundle=digits).clients[0]
    _, plain = train_once(MultiExitObjective(FederatedSettings()), data)  # same distillation as the rows below
    _, prox0 = train_once(FedProxObjective(FederatedSettings(objective={"name": "fedprox", "mu": 0.0})), data)
    for k, v in plain.state.items():
        assert torch.equal(v, prox0.state[k]), k
    start = tiny_model().state_dict()
    _, prox = train_once(FedProxObjective(FederatedSettings(objective={"name": "fedprox", "mu": 5.0})), data)

    def drift(update):
        return sum(float(((update.state[n] - start[n]) ** 2).sum()) for n, _ in tiny_model().named_parameters()
                   if n in update.state)

    assert drift(prox) < 0.8 * drift(plain)


@pytest.mark.slow
def test_feddyn_keeps_a_gradient_state_per_client_that_follows_its_update_rule(digits):
    data = FederatedData(digits_settings(), bundle=digits).clients[0]
    objective = FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.1}))
    start = tiny_model().state_dict()
    model, first = train_once(objective, data)
    names = [n for n, _ in model.branch(3, all_exits=True).named_parameters()]
    assert sorted(first.client_state) == sorted(f"dyn/{n}" for n in names)
    for n in names:  # g_1 = 0 - alpha * (w_1 - w_global)
        assert torch.allclose(first.client_state[f"dyn/{n}"], -0.1 * (first.state[n] - start[n]), atol=1e-6), n
    _, second = train_once(objective, data, client_state=first.client_state)
    assert any(not torch.equal(second.state[n], first.state[n]) for n in names)
    assert all(torch.isfinite(v).all() for v in second.client_state.values())
    # alpha = 0: the plain multi-exit training, and no state
    _, zero = train_once(FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.0})), data)
    _, plain = train_once(MultiExitObjective(FederatedSettings()), data)
    assert not zero.client_state and all(torch.equal(v, plain.state[k]) for k, v in zero.state.items())


@pytest.mark.slow
def test_feddyn_client_state_survives_a_checkpoint_resume_exactly(digits, tmp_path):
    net = tiny_space().build(SAMPLE)
    opts = dict(aggregator="fedadam", bn_stats="server", objective={"name": "feddyn", "alpha": 0.05})
    full = federate(copy.deepcopy(net), digits_settings(rounds=3, **opts), report=False)
    federate(copy.deepcopy(net), digits_settings(rounds=2, checkpoint_dir=str(tmp_path), **opts), report=False)
    from safetensors.torch import load_file

    server = load_file(tmp_path / "server.safetensors")
    assert any(k.startswith("client/") and "/dyn/" in k for k in server)
    assert any(k.startswith("aggregator/m/") for k in server)
    resumed = federate(copy.deepcopy(net), digits_settings(rounds=3, checkpoint_dir=str(tmp_path), **opts), report=False)
    assert [h["round"] for h in resumed.history] == [1, 2, 3]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.test_accuracy == full.test_accuracy


def test_every_objective_is_named_in_the_settings_and_refuses_bad_values():
    for name, cls in (("multi_exit", MultiExitObjective), ("fedprox", FedProxObjective), ("feddyn", FedDynObjective)):
        assert type(make_objective(FederatedSettings(objective=name))) is cls
    for key, value in (("objective.distill_weight", -1.0), ("objective.mu", float("inf")), ("objective.alpha", -0.1),
                       ("aggregator.lr", 0.0), ("aggregator.momentum", 1.0)):
        kind, param = key.split(".")
        name = {"mu": "fedprox", "alpha": "feddyn", "distill_weight": "multi_exit"}.get(param, "fedavgm")
        with pytest.raises(ValueError, match=f"^{key}: "):
            FederatedSettings(**{kind: {"name": name, param: value}})
    with pytest.raises(ValueError, match="^bn_stats: "):
        FederatedSettings(bn_stats="batch")


# ---- server optimisers ---------------------------------------------------------------------------


def random_state(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
            for k, v in model.state_dict().items()}


def branch_update(model, depth, seed):
    keys = model.branch(depth, all_exits=True).state_dict()
    full = random_state(model, seed)
    return {k: full[k] for k in keys}


def run_rounds(aggregator, global_state, rounds):
    state = global_state
    for updates in rounds:
        acc = aggregator.begin(state)
        for update, weight in updates:
            acc.add(update, weight)
        state = acc.result()
    return state


def test_server_momentum_with_beta_zero_and_lr_one_equals_fedavg():
    model = tiny_model()
    start = model.state_dict()
    rounds = [[(branch_update(model, 3, 1), 10), (branch_update(model, 1, 2), 30)],
              [(branch_update(model, 2, 3), 5), (branch_update(model, 2, 4), 5)]]
    fedavg = run_rounds(FedAvg(), start, rounds)
    fedavgm = run_rounds(FedAvgM(FederatedSettings(aggregator={"name": "fedavgm", "lr": 1.0, "momentum": 0.0})),
                         start, rounds)
    for k, v in fedavg.items():
        assert torch.allclose(v.double(), fedavgm[k].double(), atol=1e-6), k


def test_server_optimisers_step_only_the_parameters_some_client_held_and_checkpoint_their_moments():
    model = tiny_model()
    start = model.state_dict()
    shallow = [[(branch_update(model, 1, 5), 10), (branch_update(model, 1, 6), 10)]]
    deep_only = [k for k in start if k not in shallow[0][0][0]]
    for cls in (FedAvgM, FedAdam, FedYogi):
        agg = cls(FederatedSettings(aggregator=cls.__name__.lower()))
        new = run_rounds(agg, start, shallow)
        for k in deep_only:  # stages no client trained keep their value and get no moments
            assert torch.equal(new[k], start[k]), (cls, k)
        state = agg.state_dict()
        assert state and all(k.split("/", 1)[1] not in deep_only for k in state)
        assert not any(is_bn_statistic(k.split("/", 1)[1]) for k in state)  # statistics take the plain mean
        twin = cls(FederatedSettings(aggregator=cls.__name__.lower()))
        twin.load_state_dict(state)
        more = [[(branch_update(model, 3, 7), 10), (branch_update(model, 2, 8), 10)]]
        a, b = run_rounds(agg, new, more), run_rounds(twin, new, more)
        assert all(torch.equal(a[k], b[k]) for k in a), cls
        with pytest.raises(ValueError, match="moments"):
            twin.load_state_dict({"velocity/stem.0.weight": torch.zeros(1)})
    # FedAdam's first step: lr * (1 - b1) d / (sqrt(1 - b2) |d| + tau), at most lr with b1 = 0.9, b2 = 0.99
    adam = FedAdam(FederatedSettings(aggregator={"name": "fedadam", "lr": 0.01}))
    new = run_rounds(adam, start, shallow)
    moved = [float((new[k] - start[k]).abs().max()) for k in shallow[0][0][0]
             if start[k].is_floating_point() and not is_bn_statistic(k)]
    assert max(moved) <= 0.01 + 1e-6 and min(moved) > 0
    assert type(make_aggregator(FederatedSettings(aggregator="fedyogi"))) is FedYogi


# ---- BatchNorm under skew ------------------------------------------------------------------------


def test_bn_reestimation_changes_only_running_statistics_and_gives_the_data_statistics(digits):
    model = tiny_model()
    model.train()
    model(digits.train.images[:64])  # move the running statistics off their initial values
    before = copy.deepcopy(model.state_dict())
    data = ImageData(digits.train.images[:300], digits.train.labels[:300])
    model.eval()
    assert reestimate_bn_statistics(model, data, batch_size=300) > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_bn_statistic(k) for k in changed)
    assert not model.training  # its mode is restored, and so are the momenta
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the first BatchNorm layer's statistics are those of its inputs over the data
    stem = model.stem
    conv, bn = stem[0], stem[1]
    with torch.no_grad():
        h = conv(data.images)
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_server_bn_statistics_are_reestimated_in_every_round(digits):
    s = digits_settings(rounds=1, bn_stats="server", bn_samples=200)
    data = FederatedData(s, bundle=digits)
    assert len(data.server_train) == 200
    result = federate(tiny_space().build(SAMPLE), s, data=data, report=False)
    expected = copy.deepcopy(result.model)
    reestimate_bn_statistics(expected, data.server_train)
    for k, v in expected.state_dict().items():
        assert torch.allclose(v.double(), result.model.state_dict()[k].double(), atol=1e-5), k


def test_local_bn_keeps_each_clients_batchnorm_layers_out_of_the_update(digits):
    data = FederatedData(digits_settings(), bundle=digits).clients[0]
    local = LocalSettings(epochs=1, batch_size=32, local_bn=True)
    model, first = train_once(MultiExitObjective(), data, local=local)
    keys = bn_keys(model.branch(3, all_exits=True))
    assert keys and not set(keys) & set(first.state)
    assert sorted(first.client_state) == sorted(f"bn/{k}" for k in keys)
    # next round: the client starts from its own BatchNorm layers, whatever the server sent
    fresh = tiny_model(seed=3)
    seen = {}

    class Spy(MultiExitObjective):
        def begin(self, ctx):
            seen.update({k: v.clone() for k, v in ctx.branch.state_dict().items() if k in keys})

    train_once(Spy(), data, model=fresh, local=local, client_state=first.client_state)
    assert all(torch.equal(seen[k], first.client_state[f"bn/{k}"]) for k in keys)


# ---- ensemble of exits ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ensemble_of_exits_in_evaluation_and_early_exit_calibration(digits):
    s = digits_settings(rounds=1)
    data = FederatedData(s, bundle=digits)
    result = federate(tiny_space().build(SAMPLE), s, data=data, report=False)
    model = result.model
    logits, labels = exit_outputs(model, data.test)
    probs = F.softmax(logits.double(), dim=-1)
    assert result.ensemble_accuracy == pytest.approx(float((probs.mean(0).argmax(-1) == labels).double().mean()))
    assert result.ensemble_accuracy == ensemble_accuracy(logits, labels)
    assert "ensemble_accuracy" in result.history[0]
    cumulative = F.softmax(ensemble_logits(logits).double(), dim=-1)
    assert torch.allclose(cumulative[0], probs[0], atol=1e-5)
    assert torch.allclose(cumulative[-1], probs.mean(0), atol=1e-5)
    costs = exit_costs(model, data.val.images[:1])
    cal = calibrate(model, data.val, max_accuracy_drop=0.02, costs=costs, prediction="ensemble")
    assert model.prediction == "ensemble"
    # early-exit inference with the ensemble makes the predictions its calibration measured
    preds, taken = early_exit_predict(model, data.test.images)
    want = early_exit_metrics(ensemble_logits(logits), labels, cal.thresholds, costs)
    assert float((preds == labels).double().mean()) == pytest.approx(want["accuracy"], abs=1e-9)
    share = torch.bincount(taken - 1, minlength=model.num_exits).double() / len(labels)
    assert share.tolist() == pytest.approx(want["exit_share"])
    with pytest.raises(ValueError, match="prediction"):
        calibrate(model, data.val, prediction="vote")


# ---- branch depths -------------------------------------------------------------------------------


def test_proportional_depth_sampling_draws_deep_branches_in_proportion_to_their_depth():
    import numpy as np

    from nni_fedexit.federated import assign_branches

    rng = np.random.default_rng(0)
    depths = [d for _ in range(400) for d in assign_branches(range(10), 4, "random", rng,
                                                             depth_sampling="proportional").values()]
    share = np.bincount(depths, minlength=5)[1:] / len(depths)
    assert share == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.02)
    uniform = assign_branches(range(10), 4, "random", np.random.default_rng(1))
    assert uniform == assign_branches(range(10), 4, "random", np.random.default_rng(1), depth_sampling="uniform")
    with pytest.raises(ValueError, match="depth_sampling"):
        FederatedSettings(depth_sampling="deepest")
