"""The clients' objectives pinned to hand-computed values (issue 33).

- ``multi_exit``: the weighted sum of the exits' cross-entropies, plus self-distillation between exits;
- ``fedprox`` and ``feddyn``: the drift terms, FedDyn's penalty and its per-client state over two rounds;
- ``logit_adjusted``: the loss on logits shifted by the client's label prior, cross-entropy when balanced.

The model is a tiny ``nn.Module`` with a few hand-set parameters and the two exits' loss weights
(an objective reads only a branch's parameters and ``loss_weights``); logits are planted tensors,
and every expected value is written out with ``math``.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nni_fedexit.federated.objectives import (
    FedDynObjective, FedProxObjective, LogitAdjusted, MultiExitObjective, ObjectiveContext, label_prior_shift,
    make_objective, self_distillation,
)
from nni_fedexit.federated.settings import FederatedSettings

# two exits, batch of two, three classes; labels 0 and 1
Z0 = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
Z1 = [[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]
LABELS = [0, 1]
WEIGHTS = (0.25, 1.0)


class TwoExitModel(nn.Module):
    """Parameters a (float32, trained), b (float64, trained), frozen (not trained), and the exits' loss weights."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor([[0.5]], dtype=torch.float64))
        self.frozen = nn.Parameter(torch.tensor([3.0]), requires_grad=False)
        self.loss_weights = WEIGHTS

    def set(self, a: list[float], b: float) -> None:
        with torch.no_grad():
            self.a.copy_(torch.tensor(a))
            self.b.copy_(torch.tensor([[b]]))


def num(x: torch.Tensor) -> float:
    """A 0-d tensor's value (detached: some carry gradients)."""
    return float(x.detach())


def outputs() -> list[torch.Tensor]:
    return [torch.tensor(Z0), torch.tensor(Z1)]


def labels() -> torch.Tensor:
    return torch.tensor(LABELS)


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_sum = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_sum for v in row]


def cross_entropy(logits: list[list[float]], ys: list[int]) -> float:
    return -sum(log_softmax(row)[y] for row, y in zip(logits, ys)) / len(ys)


def kl(teacher: list[list[float]], student: list[list[float]], temperature: float) -> float:
    """batchmean KL(softmax(teacher/T) || softmax(student/T))."""
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        lt = log_softmax([v / temperature for v in t_row])
        ls = log_softmax([v / temperature for v in s_row])
        total += sum(math.exp(p) * (p - q) for p, q in zip(lt, ls))
    return total / len(teacher)


def multi_exit_by_hand(z0=Z0, z1=Z1) -> float:
    return WEIGHTS[0] * cross_entropy(z0, LABELS) + WEIGHTS[1] * cross_entropy(z1, LABELS)


# ---- multi_exit -----------------------------------------------------------------------------------


def test_multi_exit_loss_is_the_weighted_sum_of_the_exits_cross_entropies():
    """claim 6: sum_i lambda_i CE(z_i, y), with the branch's loss weights (no distillation by default)."""
    ctx = ObjectiveContext(TwoExitModel(), {})
    # exit 0: rows CE log(e + 2) - 1 and log(e^2 + 2) - 2; exit 1: log 3 and log(2e + 1/e) - 1
    ce0 = ((math.log(math.e + 2) - 1) + (math.log(math.e ** 2 + 2) - 2)) / 2
    ce1 = (math.log(3) + math.log(2 * math.e + 1 / math.e) - 1) / 2
    assert math.isclose(multi_exit_by_hand(), 0.25 * ce0 + ce1)
    for objective in (MultiExitObjective(params=MultiExitObjective.Params(distill_weight=0.0)),
                      MultiExitObjective(FederatedSettings(objective={"name": "multi_exit", "distill_weight": 0.0})),
                      make_objective(FederatedSettings(objective={"name": "multi_exit", "distill_weight": 0.0}))):
        assert type(objective) is MultiExitObjective
        loss = objective.loss(ctx, outputs(), labels())
        assert loss.shape == () and math.isclose(num(loss), 0.25 * ce0 + ce1, rel_tol=1e-6)


def test_self_distillation_by_hand_with_a_temperature():
    """sum_i mean_{j != i} T^2 KL(p_j || p_i) at T = 2 over two exits (each the other's teacher)."""
    value = self_distillation(outputs(), temperature=2.0)
    by_hand = 4.0 * (kl(Z1, Z0, 2.0) + kl(Z0, Z1, 2.0))  # n - 1 = 1 teacher each
    assert by_hand > 0.05
    assert math.isclose(num(value), by_hand, rel_tol=1e-5)
    assert math.isclose(num(self_distillation(outputs())), kl(Z1, Z0, 1.0) + kl(Z0, Z1, 1.0), rel_tol=1e-5)


def test_self_distillation_averages_over_the_other_exits():
    """With three exits each exit's KL terms are divided by n - 1 = 2."""
    z2 = [[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]]
    value = self_distillation([torch.tensor(Z0), torch.tensor(Z1), torch.tensor(z2)])
    zs = [Z0, Z1, z2]
    by_hand = sum(kl(zs[j], zs[i], 1.0) for i in range(3) for j in range(3) if i != j) / 2
    assert math.isclose(num(value), by_hand, rel_tol=1e-5)


def test_self_distillation_teachers_carry_no_gradient():
    """d/dz_i of the term is T (p_i - p_j) / (B (n-1)) from exit i as student only: teachers are detached."""
    z0 = torch.tensor(Z0, requires_grad=True)
    z1 = torch.tensor(Z1, requires_grad=True)
    self_distillation([z0, z1], temperature=2.0).backward()
    for row in range(2):
        p0 = [math.exp(v) for v in log_softmax([v / 2 for v in Z0[row]])]
        p1 = [math.exp(v) for v in log_softmax([v / 2 for v in Z1[row]])]
        # T^2 * (1/T) * (p_student - p_teacher) / B, with B = 2
        want0 = [2.0 * (a - b) / 2 for a, b in zip(p0, p1)]
        assert torch.allclose(z0.grad[row], torch.tensor(want0), atol=1e-6)
        want1 = [2.0 * (b - a) / 2 for a, b in zip(p0, p1)]
        assert torch.allclose(z1.grad[row], torch.tensor(want1), atol=1e-6)


def test_self_distillation_names_the_class_dimension():
    """The softmax is over the classes (dim 1), named explicitly: no deprecation warning from torch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        self_distillation(outputs())


def test_objectives_keep_the_runs_settings():
    """Every objective keeps the settings it was built with (a subclass may read its own options from them)."""
    for name in ("multi_exit", "fedprox", "feddyn", "logit_adjusted"):
        s = FederatedSettings(objective=name)
        assert make_objective(s).settings is s


def test_self_distillation_of_one_or_no_exit_is_zero():
    """A branch with one exit has nothing to distil."""
    one = self_distillation([torch.tensor(Z0, dtype=torch.float64)])
    assert one.shape == () and num(one) == 0.0 and one.dtype == torch.float64
    none = self_distillation([])
    assert none.shape == () and num(none) == 0.0


def test_multi_exit_objective_adds_the_weighted_distillation():
    """distill_weight * self_distillation(outputs, distill_temperature) on top of the weighted cross-entropies."""
    ctx = ObjectiveContext(TwoExitModel(), {})
    objective = MultiExitObjective(params=MultiExitObjective.Params(distill_weight=0.5, distill_temperature=2.0))
    by_hand = multi_exit_by_hand() + 0.5 * 4.0 * (kl(Z1, Z0, 2.0) + kl(Z0, Z1, 2.0))
    assert math.isclose(num(objective.loss(ctx, outputs(), labels())), by_hand, rel_tol=1e-6)
    # the parameters are declared (and checked) once, on the objective: weight 1, temperature 1 by default
    default = MultiExitObjective()
    by_hand_t1 = multi_exit_by_hand() + 1.0 * (kl(Z1, Z0, 1.0) + kl(Z0, Z1, 1.0))
    assert math.isclose(num(default.loss(ctx, outputs(), labels())), by_hand_t1, rel_tol=1e-6)
    off = MultiExitObjective(params=MultiExitObjective.Params(distill_weight=0.0))
    assert math.isclose(num(off.loss(ctx, outputs(), labels())), multi_exit_by_hand(), rel_tol=1e-6)
    for bad in ({"distill_weight": -0.5}, {"distill_temperature": 0.0}, {"distill_weight": None}):
        with pytest.raises(ValueError, match=f"objective.{next(iter(bad))}: "):
            FederatedSettings(objective={"name": "multi_exit", **bad})
    # one exit: the cross-entropy alone, whatever the weight
    single = TwoExitModel()
    single.loss_weights = (0.5,)
    alone = objective.loss(ObjectiveContext(single, {}), [torch.tensor(Z0)], labels())
    assert math.isclose(num(alone), 0.5 * cross_entropy(Z0, LABELS), rel_tol=1e-6)


# ---- fedprox and feddyn --------------------------------------------------------------------------------


def global_state(a: list[float], b: float) -> dict[str, torch.Tensor]:
    """The round's global model (float64 on the wire), with the frozen parameter and a key the branch lacks."""
    return {"a": torch.tensor(a, dtype=torch.float64), "b": torch.tensor([[b]], dtype=torch.float64),
            "frozen": torch.tensor([100.0]), "other": torch.tensor([5.0])}


def test_fedprox_penalty_by_hand():
    """fedprox: + mu/2 ||w - w_global||^2 over the trained parameters (frozen ones and other keys do not count)."""
    model = TwoExitModel()
    objective = make_objective(FederatedSettings(objective={"name": "fedprox", "mu": 0.4, "distill_weight": 0.0}))
    assert type(objective) is FedProxObjective
    ctx = ObjectiveContext(model, global_state([0.0, 4.0], 1.5))
    objective.begin(ctx)
    model.set([2.0, 1.0], -0.5)  # the client trains: the anchor stays the global model
    # ||w - g||^2 = (2 - 0)^2 + (1 - 4)^2 + (-0.5 - 1.5)^2 = 4 + 9 + 4 = 17
    penalty = objective.penalty(ctx)
    assert math.isclose(num(penalty), 0.2 * 17)
    loss = objective.loss(ctx, outputs(), labels())
    assert math.isclose(num(loss), multi_exit_by_hand() + 0.2 * 17, rel_tol=1e-6)
    loss.backward()  # d/dw = mu (w - g)
    assert torch.allclose(model.a.grad, torch.tensor([0.8, -1.2]))
    assert torch.allclose(model.b.grad, torch.tensor([[-0.8]], dtype=torch.float64))
    assert model.frozen.grad is None
    # mu defaults to 0.01 without settings; mu = 0 is the plain multi-exit loss
    plain = FedProxObjective()
    plain.begin(ctx)
    assert math.isclose(num(plain.penalty(ctx)), 0.005 * 17, rel_tol=1e-6)
    off = FedProxObjective(FederatedSettings(objective={"name": "fedprox", "mu": 0.0, "distill_weight": 0.0}))
    off.begin(ctx)
    assert math.isclose(num(off.loss(ctx, outputs(), labels())), multi_exit_by_hand(), rel_tol=1e-6)


def test_feddyn_penalty_and_client_state_over_two_rounds_by_hand():
    """feddyn: - <h, w> + alpha/2 ||w - g||^2, and h <- h - alpha (w_k - g) after each local training."""
    alpha = 0.5
    model = TwoExitModel()
    objective = make_objective(FederatedSettings(objective={"name": "feddyn", "alpha": alpha, "distill_weight": 0.0}))
    assert type(objective) is FedDynObjective
    client_state: dict[str, torch.Tensor] = {}

    # round 1: no state yet, so the penalty is alpha/2 ||w - g1||^2 only
    g1 = ([0.0, 4.0], 1.5)
    ctx = ObjectiveContext(model, global_state(*g1), client_state=client_state, round=1)
    model.set(*g1)
    objective.begin(ctx)
    model.set([2.0, 1.0], -0.5)  # ||w - g1||^2 = 17 (as in the FedProx test)
    assert math.isclose(num(objective.penalty(ctx)), alpha / 2 * 17)
    objective.end(ctx)
    h1 = {"a": [-alpha * (2.0 - 0.0), -alpha * (1.0 - 4.0)], "b": -alpha * (-0.5 - 1.5)}  # (-1, 1.5), 1
    assert sorted(client_state) == ["dyn/a", "dyn/b"]  # trained parameters only
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in client_state.values())
    assert torch.equal(client_state["dyn/a"], torch.tensor(h1["a"]))
    assert torch.equal(client_state["dyn/b"], torch.tensor([[h1["b"]]]))

    # round 2: a new global model; the state from round 1 enters the penalty linearly
    g2 = ([1.0, 1.0], 0.0)
    ctx = ObjectiveContext(model, global_state(*g2), client_state=client_state, round=2)
    model.set(*g2)
    objective.begin(ctx)
    w2 = ([3.0, -1.0], 2.0)
    model.set(*w2)
    # ||w2 - g2||^2 = 4 + 4 + 4 = 12; <h1, w2> = -1*3 + 1.5*(-1) + 1*2 = -2.5
    inner = h1["a"][0] * w2[0][0] + h1["a"][1] * w2[0][1] + h1["b"] * w2[1]
    assert inner == -2.5
    penalty = alpha / 2 * 12 - inner  # 3 + 2.5 = 5.5
    assert math.isclose(num(objective.penalty(ctx)), penalty)
    loss = objective.loss(ctx, outputs(), labels())
    assert math.isclose(num(loss), multi_exit_by_hand() + penalty, rel_tol=1e-6)
    loss.backward()  # the gradient of the penalty: alpha (w - g2) - h1
    assert torch.allclose(model.a.grad, torch.tensor([alpha * 2 - h1["a"][0], alpha * -2 - h1["a"][1]]))
    assert torch.allclose(model.b.grad, torch.tensor([[alpha * 2 - h1["b"]]], dtype=torch.float64))
    objective.end(ctx)
    # h2 = h1 - alpha (w2 - g2) = (-1 - 1, 1.5 + 1), 1 - 1
    assert torch.equal(client_state["dyn/a"], torch.tensor([-2.0, 2.5]))
    assert torch.equal(client_state["dyn/b"], torch.tensor([[0.0]]))


def test_feddyn_defaults_and_alpha_zero():
    """alpha defaults to 0.01; alpha = 0 is the plain multi-exit loss and keeps no state."""
    model = TwoExitModel()
    state = {"dyn/a": torch.tensor([1.0, 1.0])}
    default = FedDynObjective()
    ctx = ObjectiveContext(model, global_state([0.0, 0.0], 0.0), client_state=dict(state))
    default.begin(ctx)
    # 0.01/2 * (1 + 4 + 0.25) - (1*1 + 1*2)
    assert math.isclose(num(default.penalty(ctx)), 0.005 * 5.25 - 3.0, rel_tol=1e-6)
    off = FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.0, "distill_weight": 0.0}))
    ctx = ObjectiveContext(model, global_state([0.0, 0.0], 0.0), client_state=dict(state))
    off.begin(ctx)
    assert math.isclose(num(off.loss(ctx, outputs(), labels())), multi_exit_by_hand(), rel_tol=1e-6)
    off.end(ctx)
    assert ctx.client_state.keys() == {"dyn/a"} and torch.equal(ctx.client_state["dyn/a"], state["dyn/a"])
    fresh = ObjectiveContext(model, global_state([0.0, 0.0], 0.0))
    off.begin(fresh)
    off.end(fresh)
    assert fresh.client_state == {}


def test_feddyn_uses_the_state_of_every_parameter_that_has_one():
    """A parameter without state (new to this client) does not stop the next ones' state from counting."""
    model = TwoExitModel()
    objective = FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.5}))
    ctx = ObjectiveContext(model, global_state([1.0, 2.0], 0.5), client_state={"dyn/b": torch.tensor([[2.0]])})
    objective.begin(ctx)
    # at w = g: ||w - g||^2 = 0; <h, w> = 2 * b = 1
    assert math.isclose(num(objective.penalty(ctx)), -1.0)


class Float32Model(nn.Module):
    """One float32 parameter and one exit."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.25, 0.5]))
        self.loss_weights = (1.0,)


def test_drift_penalties_are_in_the_parameters_dtype():
    """A float64 global model or client state is cast to the parameter's dtype: the loss stays float32."""
    glob = {"a": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    for objective, state in ((FedProxObjective(FederatedSettings(objective={"name": "fedprox", "mu": 0.5})), {}),
                             (FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.5})), {}),
                             (FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.5})),
                              {"dyn/a": torch.tensor([0.3, -0.7], dtype=torch.float64)})):
        ctx = ObjectiveContext(Float32Model(), glob, client_state=state)
        objective.begin(ctx)
        assert objective.penalty(ctx).dtype == torch.float32, (objective, state)
        assert objective.loss(ctx, [torch.tensor(Z0)], labels()).dtype == torch.float32


def test_feddyn_rejects_a_state_of_the_wrong_shape():
    """A client state that does not fit the parameter (another architecture) is refused by name."""
    model = TwoExitModel()
    objective = FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.1}))
    ctx = ObjectiveContext(model, global_state([0.0, 0.0], 0.0), client_state={"dyn/a": torch.zeros(3)})
    with pytest.raises(ValueError) as caught:
        objective.begin(ctx)
    assert str(caught.value) == "FedDyn state 'dyn/a' has shape (3,), the parameter (2,)"


# ---- logit_adjusted ---------------------------------------------------------------------------------------


def test_label_prior_shift_by_hand():
    """tau * log p with p the class shares; an absent class counts as one example; float32."""
    shift = label_prior_shift(torch.tensor([3, 1, 0]), tau=0.5)  # counts (3, 1, 1) of 5
    assert shift.dtype == torch.float32
    assert torch.allclose(shift, torch.tensor([0.5 * math.log(3 / 5), 0.5 * math.log(1 / 5), 0.5 * math.log(1 / 5)]))
    assert torch.allclose(label_prior_shift(torch.tensor([2, 6])), torch.tensor([math.log(0.25), math.log(0.75)]))
    # the shares are taken in float64: the result is the float32 rounding of the exact log-share
    # (float32 shares would be one float32 step off for some classes of these counts)
    counts = [44, 239, 933, 760, 963, 379, 427, 503, 497, 683]
    exact = torch.tensor([math.log(c / sum(counts)) for c in counts], dtype=torch.float32)
    assert torch.equal(label_prior_shift(torch.tensor(counts)), exact)


def test_logit_adjusted_loss_by_hand():
    """The multi-exit loss (and distillation) of z + tau log p at every exit; needs the class counts."""
    counts = torch.tensor([1, 3, 0])  # shares (1, 3, 1) / 5
    tau = 2.0
    shift = [tau * math.log(c / 5) for c in (1, 3, 1)]
    z0 = [[v + s for v, s in zip(row, shift)] for row in Z0]
    z1 = [[v + s for v, s in zip(row, shift)] for row in Z1]
    objective = make_objective(FederatedSettings(objective={"name": "logit_adjusted", "tau": tau, "distill_weight": 0.0}))
    assert type(objective) is LogitAdjusted
    ctx = ObjectiveContext(TwoExitModel(), {}, class_counts=counts)
    objective.begin(ctx)
    by_hand = multi_exit_by_hand(z0, z1)
    assert abs(by_hand - multi_exit_by_hand()) > 0.1
    assert math.isclose(num(objective.loss(ctx, outputs(), labels())), by_hand, rel_tol=1e-6)
    # with distillation, between the shifted exits
    kd = LogitAdjusted(FederatedSettings(objective={"name": "logit_adjusted", "tau": tau, "distill_weight": 0.5}))
    kd.begin(ctx)
    with_kd = by_hand + 0.5 * (kl(z1, z0, 1.0) + kl(z0, z1, 1.0))
    assert math.isclose(num(kd.loss(ctx, outputs(), labels())), with_kd, rel_tol=1e-5)
    # tau defaults to 1
    default = LogitAdjusted(params=LogitAdjusted.Params(distill_weight=0.0))
    default.begin(ctx)
    shift1 = [math.log(c / 5) for c in (1, 3, 1)]
    by_hand1 = multi_exit_by_hand([[v + s for v, s in zip(row, shift1)] for row in Z0],
                                  [[v + s for v, s in zip(row, shift1)] for row in Z1])
    assert math.isclose(num(default.loss(ctx, outputs(), labels())), by_hand1, rel_tol=1e-6)
    with pytest.raises(ValueError) as caught:
        objective.begin(ObjectiveContext(TwoExitModel(), {}))
    assert str(caught.value) == ("objective 'logit_adjusted' needs the client's class counts "
                                 "(ObjectiveContext.class_counts)")


def test_logit_adjusted_with_one_exit():
    """A branch with one exit: the cross-entropy of its shifted logits."""
    model = TwoExitModel()
    model.loss_weights = (0.5,)
    objective = LogitAdjusted(FederatedSettings(objective={"name": "logit_adjusted", "tau": 1.0, "distill_weight": 0.5}))
    ctx = ObjectiveContext(model, {}, class_counts=torch.tensor([1, 3, 1]))
    objective.begin(ctx)
    shift = [math.log(c / 5) for c in (1, 3, 1)]
    by_hand = 0.5 * cross_entropy([[v + s for v, s in zip(row, shift)] for row in Z0], LABELS)
    assert math.isclose(num(objective.loss(ctx, [torch.tensor(Z0)], labels())), by_hand, rel_tol=1e-6)


def test_logit_adjusted_equals_cross_entropy_on_balanced_priors():
    """Balanced classes shift every logit by the same amount: exactly the multi-exit cross-entropy."""
    objective = LogitAdjusted(FederatedSettings(objective={"name": "logit_adjusted", "tau": 3.0, "distill_weight": 0.0}))
    ctx = ObjectiveContext(TwoExitModel(), {}, class_counts=torch.tensor([7, 7, 7]))
    objective.begin(ctx)
    assert math.isclose(num(objective.loss(ctx, outputs(), labels())), multi_exit_by_hand(), rel_tol=1e-6)


def test_objectives_move_what_they_read_to_the_models_device():
    """The global model, the client's FedDyn state and the label-prior shift arrive on the CPU and are moved
    to the device of the parameters and logits (torch's meta device stands in for a GPU here)."""
    model = TwoExitModel().to("meta")
    state = {"dyn/a": torch.tensor([1.0, -1.0]), "dyn/b": torch.tensor([[2.0]])}
    for objective in (FedProxObjective(FederatedSettings(objective={"name": "fedprox", "mu": 0.5})),
                      FedDynObjective(FederatedSettings(objective={"name": "feddyn", "alpha": 0.5}))):
        ctx = ObjectiveContext(model, global_state([0.0, 4.0], 1.5), client_state=dict(state))
        objective.begin(ctx)
        assert objective.penalty(ctx).device.type == "meta"
    adjusted = LogitAdjusted(FederatedSettings(objective={"name": "logit_adjusted", "distill_weight": 0.0}))
    ctx = ObjectiveContext(model, {}, class_counts=torch.tensor([1, 3, 1]))
    adjusted.begin(ctx)
    loss = adjusted.loss(ctx, [z.to("meta") for z in outputs()], labels().to("meta"))
    assert loss.device.type == "meta"
