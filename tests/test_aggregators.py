"""The server's aggregation rules pinned to hand-computed values (issue 33).

- ``fedavg``: the depth-aware sample-weighted mean (keys held by some clients only, integer buffers
  rounded, untouched entries kept) and every reason an update is rejected;
- ``fedavgm``, ``fedadam``, ``fedyogi``: two rounds each with non-trivial hyper-parameters,
  computed with plain Python floats, including a Yogi step whose sign term differs from Adam's EMA.

Pure tensor maths on a hand-made global state; no model, no data.
"""

from __future__ import annotations

import math

import pytest
import torch

from nni_fedexit.federated.aggregators import make_aggregator
from nni_fedexit.federated.aggregators.fedavg import FedAvg, WeightedMean, aggregate, check_update
from nni_fedexit.federated.aggregators.server_opt import FedAdam, FedAvgM, FedYogi
from nni_fedexit.federated.errors import UpdateRejected
from nni_fedexit.federated.settings import FederatedSettings

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def run(aggregator, global_state, updates):
    acc = aggregator.begin(global_state)
    for update, weight in updates:
        acc.add(update, weight)
    return acc.result()


# ---- fedavg: the depth-aware weighted mean ---------------------------------------------------------


def test_weighted_mean_averages_each_key_over_the_clients_that_hold_it():
    """Each entry is the sample-weighted mean over the updates holding it; nobody's entries keep their value."""
    glob = {"stem": t(0.0, 0.0), "deep": t(5.0), "deepest": t(9.0, 9.0)}
    updates = [({"stem": t(1.0, 2.0)}, 1),                      # a shallow client
               ({"stem": t(3.0, 4.0), "deep": t(7.0)}, 3),      # a deeper one
               ({"stem": t(5.0, 0.0), "deep": t(1.0)}, 4)]      # and another
    out = aggregate(glob, updates)
    # stem: (1*1 + 3*3 + 4*5) / 8 = 30/8, (1*2 + 3*4 + 4*0) / 8 = 14/8
    assert torch.equal(out["stem"], t(30 / 8, 14 / 8))
    # deep: held by the last two only: (3*7 + 4*1) / 7 = 25/7
    assert torch.allclose(out["deep"], t(25 / 7), rtol=0, atol=1e-15)
    assert torch.equal(out["deepest"], t(9.0, 9.0))
    assert out["deepest"] is not glob["deepest"]  # a copy: the result does not alias the old model
    out["deepest"] += 1
    assert torch.equal(glob["deepest"], t(9.0, 9.0))
    assert set(out) == set(glob)


def test_weighted_mean_streams_counts_and_reports_the_updated_entries():
    """``add`` one update at a time; ``count`` and ``updated`` say what was added; FedAvg.begin is that stream."""
    glob = {"a": t(0.0), "b": t(0.0), "c": t(1.0)}
    acc = FedAvg().begin(glob)
    assert isinstance(acc, WeightedMean)
    assert acc.count == 0 and acc.updated == set()
    acc.add({"a": t(2.0)}, 2)
    acc.add({"a": t(4.0), "b": t(6.0)}, 2.0)
    acc.add({"b": t(3.0)}, 1)
    assert acc.count == 3
    assert acc.updated == {"a", "b"}
    out = acc.result()
    assert torch.equal(out["a"], t(3.0))          # (2*2 + 2*4) / 4
    assert torch.equal(out["b"], t(5.0))          # (2*6 + 1*3) / 3
    assert torch.equal(out["c"], t(1.0))
    assert type(make_aggregator(FederatedSettings(aggregator="fedavg"))) is FedAvg


def test_integer_buffers_take_the_rounded_mean_and_every_entry_keeps_its_dtype():
    """An integer entry (num_batches_tracked) gets the rounded, not truncated, weighted mean in its own dtype."""
    glob = {"n": torch.tensor(0), "w": torch.zeros(2, dtype=torch.float32)}
    out = aggregate(glob, [({"n": torch.tensor(1), "w": torch.tensor([0.25, 1.0])}, 1),
                           ({"n": torch.tensor(2), "w": torch.tensor([0.75, 2.0])}, 3)])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 2  # (1*1 + 3*2) / 4 = 1.75 -> 2
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], torch.tensor([0.625, 1.75]))  # floats are not rounded


def test_the_new_global_model_lives_where_the_old_one_did():
    """Each new entry is put on the old entry's device (torch's meta device stands in for a GPU here)."""
    glob = {"w": torch.zeros(2, device="meta"), "n": torch.zeros((), dtype=torch.int64, device="meta"),
            "kept": torch.zeros(1, device="meta")}
    out = aggregate(glob, [({"w": torch.ones(2), "n": torch.tensor(3)}, 1)])
    assert {k: v.device.type for k, v in out.items()} == {"w": "meta", "n": "meta", "kept": "meta"}
    assert out["n"].dtype == torch.int64 and out["w"].dtype == torch.float32


def test_weighted_mean_accumulates_in_float64():
    """float32 updates are summed in float64: 2^24 + 1 + 1 is not lost to float32 rounding."""
    glob = {"w": torch.zeros(1)}
    big, one = torch.tensor([2.0 ** 24]), torch.tensor([1.0])
    out = aggregate(glob, [({"w": big}, 1), ({"w": one}, 1), ({"w": one}, 1)])
    # float64: (2^24 + 2) / 3 = 5592406 exactly; a float32 sum would give 2^24 / 3 -> 5592405.5
    assert float(out["w"]) == 5592406.0


@pytest.mark.parametrize("weight", [0, -1, 0.0, float("nan")])
def test_an_update_needs_a_positive_weight(weight):
    """The weight (sample count) must be > 0; the update is refused before anything is added."""
    acc = WeightedMean({"a": t(0.0)})
    with pytest.raises(UpdateRejected, match=r"the update's weight \(sample count\) must be > 0, got"):
        acc.add({"a": t(1.0)}, weight)
    assert acc.count == 0 and acc.updated == set()
    acc.add({"a": t(1.0)}, 1e-9)  # any positive weight is fine
    assert acc.count == 1


@pytest.mark.parametrize("update, reason", [
    ({}, "the update is empty"),
    ({"b": torch.zeros(2)}, "unknown key 'b' (not in the global model)"),
    ({"a": [0.0, 0.0]}, "'a' is a list, not a tensor"),
    ({"a": torch.zeros(3)}, "'a' has shape (3,), the global model (2,)"),
    ({"a": torch.zeros(1, 2)}, "'a' has shape (1, 2), the global model (2,)"),
    ({"a": torch.zeros(2, dtype=torch.int64)}, "'a' has dtype torch.int64, the global model torch.float32"),
    ({"n": torch.zeros((), dtype=torch.float32)}, "'n' has dtype torch.float32, the global model torch.int64"),
    ({"a": torch.tensor([0.0, float("nan")])}, "'a' holds NaN or Inf values"),
    ({"a": torch.tensor([float("-inf"), 0.0])}, "'a' holds NaN or Inf values"),
])
def test_check_update_names_each_rejection_reason(update, reason):
    """Each kind of bad update is rejected with a message naming the key and the reason."""
    glob = {"a": torch.zeros(2), "n": torch.tensor(3)}
    with pytest.raises(UpdateRejected) as caught:
        check_update(glob, update)
    assert str(caught.value) == reason
    acc = WeightedMean(glob)
    with pytest.raises(UpdateRejected):
        acc.add(update, 1)
    assert acc.count == 0


def test_check_update_accepts_fitting_updates_of_any_float_or_integer_dtype():
    """A partial update, float64 for float32 and int32 for int64 entries, fits; nothing is rejected."""
    glob = {"a": torch.zeros(2), "n": torch.tensor(3), "b": torch.zeros(1)}
    check_update(glob, {"a": torch.ones(2, dtype=F64), "n": torch.tensor(5, dtype=torch.int32)})
    check_update(glob, {"b": torch.tensor([1e30])})


# ---- server optimisers: two rounds by hand -----------------------------------------------------------

# Round 1: client A (weight 1) moves w by (4, -4, 2), client B (weight 3) does not move it, so the
# mean is w0 + (4, -4, 2) / 4 and the pseudo-gradient d1 = (1, -1, 0.5). Round 2: one client
# (weight 2) sends w1 + d2, d2 = (0.1, -2, 0.05). Element 0 and 2 have v1 > d2^2 (Yogi lowers v by
# (1 - b2) d2^2, Adam's EMA by (1 - b2)(v1 - d2^2)), element 1 has v1 < d2^2 (both raise it).
W0 = [1.0, -2.0, 0.5]
MOVE_A = [4.0, -4.0, 2.0]
D1 = [1.0, -1.0, 0.5]
D2 = [0.1, -2.0, 0.05]
LR, BETA1, BETA2, TAU = 0.5, 0.8, 0.9, 0.01


def server_state() -> dict[str, torch.Tensor]:
    """The global model: a parameter, BatchNorm statistics, and a deep parameter no client holds."""
    return {"w": t(*W0), "u": t(3.0), "bn.weight": t(1.0), "bn.running_mean": t(0.0, 0.0),
            "bn.running_var": t(1.0, 1.0), "bn.num_batches_tracked": torch.tensor(4), "deep.w": t(7.0)}


def round_one() -> list[tuple[dict[str, torch.Tensor], float]]:
    a = {"w": t(*(w + m for w, m in zip(W0, MOVE_A))), "u": t(5.0), "bn.weight": t(2.0),
         "bn.running_mean": t(1.0, 2.0), "bn.running_var": t(2.0, 4.0), "bn.num_batches_tracked": torch.tensor(10)}
    b = {"w": t(*W0), "bn.weight": t(1.0), "bn.running_mean": t(5.0, 6.0),
         "bn.running_var": t(6.0, 8.0), "bn.num_batches_tracked": torch.tensor(20)}
    return [(a, 1), (b, 3)]


def round_two(w1: list[float]) -> list[tuple[dict[str, torch.Tensor], float]]:
    return [({"w": t(*(w + d for w, d in zip(w1, D2)))}, 2)]


def settings(aggregator: str) -> FederatedSettings:
    params = {"lr": LR, "momentum": BETA1} if aggregator == "fedavgm" else {"lr": LR, "beta_1": BETA1, "beta_2": BETA2,
                                                                             "tau": TAU}
    return FederatedSettings(aggregator={"name": aggregator, **params})


def check_plain_entries(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    """What a server optimiser does not optimise: statistics, integers, untouched entries."""
    # BatchNorm statistics take the plain weighted mean: (1*1 + 3*5) / 4 = 4, (1*2 + 3*6) / 4 = 5, ...
    assert torch.equal(first["bn.running_mean"], t(4.0, 5.0))
    assert torch.equal(first["bn.running_var"], t(5.0, 7.0))
    assert int(first["bn.num_batches_tracked"]) == 18  # (10 + 60) / 4 = 17.5 -> 18
    assert torch.equal(first["deep.w"], t(7.0))  # no client holds it
    # round 2 held only "w": everything else keeps its round-1 value
    for key in ("u", "bn.weight", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "deep.w"):
        assert torch.equal(second[key], first[key]), key


def test_fedavgm_two_rounds_by_hand():
    """FedAvgM: v <- beta v + d; w <- w + lr v, over two rounds with beta 0.8 and lr 0.5."""
    agg = make_aggregator(settings("fedavgm"))
    assert type(agg) is FedAvgM
    v1 = list(D1)                                                  # v0 = 0
    w1 = [w + LR * v for w, v in zip(W0, v1)]                      # (1.5, -2.5, 0.75)
    v2 = [BETA1 * v + d for v, d in zip(v1, D2)]                   # (0.9, -2.8, 0.45)
    w2 = [w + LR * v for w, v in zip(w1, v2)]                      # (1.95, -3.9, 0.975)
    assert w1 == [1.5, -2.5, 0.75] and all(math.isclose(a, b) for a, b in zip(w2, [1.95, -3.9, 0.975]))
    first = run(agg, server_state(), round_one())
    assert torch.allclose(first["w"], t(*w1), rtol=0, atol=1e-12)
    # u: held by A only (weight 1): d = 2, v = 2, u = 3 + 0.5 * 2 = 4; bn.weight: d = (2 + 3)/4 - 1 = 0.25
    assert torch.allclose(first["u"], t(4.0), rtol=0, atol=1e-12)
    assert torch.allclose(first["bn.weight"], t(1.125), rtol=0, atol=1e-12)
    second = run(agg, first, round_two(w1))
    assert torch.allclose(second["w"], t(*w2), rtol=0, atol=1e-12)
    check_plain_entries(first, second)
    state = agg.state_dict()
    assert sorted(state) == ["momentum/bn.weight", "momentum/u", "momentum/w"]
    assert torch.allclose(state["momentum/w"], t(*v2), rtol=0, atol=1e-12)
    assert torch.allclose(state["momentum/u"], t(2.0), rtol=0, atol=1e-12)  # kept through round 2


def adam_by_hand(yogi: bool) -> tuple[list[float], list[float], list[float], list[float]]:
    """(w1, w2, m2, v2) of FedAdam (or FedYogi) on W0, D1, D2, with plain floats."""
    w1, w2, m2, v2 = [], [], [], []
    for w, d1, d2 in zip(W0, D1, D2):
        m = BETA1 * 0.0 + (1 - BETA1) * d1
        v = (1 - BETA2) * d1 ** 2           # Adam: b2*0 + (1-b2) d1^2; Yogi: 0 - (1-b2) d1^2 sign(0 - d1^2): the same
        w = w + LR * m / (math.sqrt(v) + TAU)
        w1.append(w)
        m = BETA1 * m + (1 - BETA1) * d2
        if yogi:
            v = v - (1 - BETA2) * d2 ** 2 * (1.0 if v > d2 ** 2 else -1.0)
        else:
            v = BETA2 * v + (1 - BETA2) * d2 ** 2
        w2.append(w + LR * m / (math.sqrt(v) + TAU))
        m2.append(m)
        v2.append(v)
    return w1, w2, m2, v2


def test_fedadam_two_rounds_by_hand():
    """FedAdam: m <- b1 m + (1-b1) d; v <- b2 v + (1-b2) d^2; w <- w + lr m / (sqrt(v) + tau), two rounds."""
    agg = make_aggregator(settings("fedadam"))
    assert type(agg) is FedAdam
    w1, w2, m2, v2 = adam_by_hand(yogi=False)
    # element 0 written out: m1 = 0.2, v1 = 0.1, w1 = 1 + 0.5 * 0.2 / (sqrt(0.1) + 0.01);
    # m2 = 0.8 * 0.2 + 0.2 * 0.1 = 0.18, v2 = 0.9 * 0.1 + 0.1 * 0.01 = 0.091
    assert math.isclose(w1[0], 1 + 0.1 / (math.sqrt(0.1) + 0.01))
    assert math.isclose(m2[0], 0.18) and math.isclose(v2[0], 0.091)
    assert math.isclose(w2[0], w1[0] + 0.5 * 0.18 / (math.sqrt(0.091) + 0.01))
    first = run(agg, server_state(), round_one())
    assert torch.allclose(first["w"], t(*w1), rtol=0, atol=1e-12)
    # u: d = 2 (client A alone): m = 0.4, v = 0.4, u = 3 + 0.5 * 0.4 / (sqrt(0.4) + 0.01)
    assert torch.allclose(first["u"], t(3 + 0.2 / (math.sqrt(0.4) + 0.01)), rtol=0, atol=1e-12)
    second = run(agg, first, round_two(w1))
    assert torch.allclose(second["w"], t(*w2), rtol=0, atol=1e-12)
    check_plain_entries(first, second)
    state = agg.state_dict()
    assert sorted(state) == ["m/bn.weight", "m/u", "m/w", "v/bn.weight", "v/u", "v/w"]
    assert torch.allclose(state["m/w"], t(*m2), rtol=0, atol=1e-12)
    assert torch.allclose(state["v/w"], t(*v2), rtol=0, atol=1e-12)
    assert torch.allclose(state["v/u"], t(0.4), rtol=0, atol=1e-12)


def test_fedyogi_two_rounds_by_hand_where_its_sign_term_differs_from_adam():
    """FedYogi: v <- v - (1-b2) d^2 sign(v - d^2); its first step is Adam's, its second is not."""
    agg = make_aggregator(settings("fedyogi"))
    assert type(agg) is FedYogi
    w1, w2, m2, v2 = adam_by_hand(yogi=True)
    _, adam_w2, _, adam_v2 = adam_by_hand(yogi=False)
    # element 0: v1 = 0.1 > d2^2 = 0.01: Yogi v2 = 0.1 - 0.1 * 0.01 = 0.099 (Adam: 0.091)
    # element 1: v1 = 0.1 < d2^2 = 4:    Yogi v2 = 0.1 + 0.1 * 4 = 0.5      (Adam: 0.49)
    assert math.isclose(v2[0], 0.099) and math.isclose(adam_v2[0], 0.091)
    assert math.isclose(v2[1], 0.5) and math.isclose(adam_v2[1], 0.49)
    assert math.isclose(v2[2], 0.025 - 0.1 * 0.0025)
    first = run(agg, server_state(), round_one())
    assert torch.allclose(first["w"], t(*w1), rtol=0, atol=1e-12)  # the first step is Adam's
    second = run(agg, first, round_two(w1))
    assert torch.allclose(second["w"], t(*w2), rtol=0, atol=1e-12)
    assert not torch.allclose(second["w"], t(*adam_w2), rtol=0, atol=1e-6)
    check_plain_entries(first, second)
    state = agg.state_dict()
    assert torch.allclose(state["m/w"], t(*m2), rtol=0, atol=1e-12)
    assert torch.allclose(state["v/w"], t(*v2), rtol=0, atol=1e-12)


def test_yogi_leaves_v_unchanged_where_it_equals_the_squared_pseudo_gradient():
    """sign(v - d^2) = 0: Yogi keeps v (Adam would still move it towards d^2)."""
    agg = FedYogi(params=FedYogi.Params(lr=1.0, beta_1=0.5, beta_2=0.75, tau=1.0))
    agg.load_state_dict({"m/w": t(0.0), "v/w": t(4.0)})
    out = run(agg, {"w": t(0.0)}, [({"w": t(2.0)}, 1)])  # d = 2, d^2 = 4 = v
    assert torch.equal(agg.state_dict()["v/w"], t(4.0))
    # m = 0.5 * 2 = 1; w = 0 + 1 * 1 / (sqrt(4) + 1) = 1/3
    assert torch.allclose(out["w"], t(1 / 3), rtol=0, atol=1e-15)


def test_server_optimiser_defaults_without_settings():
    """Built without settings: FedAvgM lr 1, beta 0.9; FedAdam/FedYogi lr 0.01, b1 0.9, b2 0.99, tau 1e-3."""
    momentum = FedAvgM()
    w = run(momentum, {"w": t(0.0)}, [({"w": t(1.0)}, 1)])         # v = 1, w = 1
    w = run(momentum, w, [({"w": w["w"] + 1.0}, 1)])               # v = 0.9 + 1, w = 1 + 1.9
    assert torch.allclose(w["w"], t(2.9), rtol=0, atol=1e-12)
    for cls in (FedAdam, FedYogi):
        agg = cls()
        out = run(agg, {"w": t(0.0)}, [({"w": t(2.0)}, 1)])
        # m = 0.1 * 2 = 0.2; v = 0.01 * 4 = 0.04; w = 0.01 * 0.2 / (0.2 + 0.001)
        assert torch.allclose(out["w"], t(0.002 / 0.201), rtol=0, atol=1e-15), cls
    # a run's settings that leave lr out: the optimiser's own default learning rate
    for name, lr in (("fedavgm", 1.0), ("fedadam", 0.01), ("fedyogi", 0.01)):
        others = {"momentum": 0.0} if name == "fedavgm" else {"beta_1": 0.0, "beta_2": 0.0, "tau": 1.0}
        agg = make_aggregator(FederatedSettings(aggregator={"name": name, **others}))
        out = run(agg, {"w": t(0.0)}, [({"w": t(3.0)}, 1)])
        # fedavgm: w = lr * 3; adam/yogi with b1 = b2 = 0: w = lr * 3 / (3 + 1)
        expected = lr * 3.0 if name == "fedavgm" else lr * 3.0 / 4.0
        assert torch.allclose(out["w"], t(expected), rtol=0, atol=1e-15), name


def test_server_step_keeps_the_parameters_dtype_and_rejects_bad_updates():
    """A float32 model stays float32; a server optimiser's round refuses what the plain mean refuses."""
    agg = FedAvgM(params=FedAvgM.Params(lr=0.5, momentum=0.8))
    out = run(agg, {"w": torch.tensor([1.0])}, [({"w": torch.tensor([3.0])}, 2)])
    assert out["w"].dtype == torch.float32 and float(out["w"]) == 2.0  # 1 + 0.5 * 2
    acc = agg.begin({"w": torch.tensor([1.0])})
    with pytest.raises(UpdateRejected, match="holds NaN or Inf"):
        acc.add({"w": torch.tensor([float("nan")])}, 1)
    with pytest.raises(UpdateRejected, match="must be > 0"):
        acc.add({"w": torch.tensor([1.0])}, 0)


def test_server_optimiser_state_round_trips_and_a_loaded_moment_is_used():
    """load_state_dict replaces the moments (stored in float64) and the next step starts from them."""
    agg = FedAvgM(params=FedAvgM.Params(lr=0.5, momentum=0.8))
    run(agg, {"w": t(0.0), "u": t(0.0)}, [({"w": t(1.0), "u": t(1.0)}, 1)])
    agg.load_state_dict({"momentum/w": torch.tensor([2.0], dtype=torch.float32)})
    state = agg.state_dict()
    assert list(state) == ["momentum/w"] and state["momentum/w"].dtype == F64
    out = run(agg, {"w": t(10.0)}, [({"w": t(11.0)}, 1)])
    # v = 0.8 * 2 + 1 = 2.6; w = 10 + 0.5 * 2.6 = 11.3
    assert torch.allclose(out["w"], t(11.3), rtol=0, atol=1e-12)
    state["momentum/w"] += 100  # state_dict hands out copies
    assert torch.allclose(agg.state_dict()["momentum/w"], t(2.6), rtol=0, atol=1e-12)
    twin = FedAvgM(params=FedAvgM.Params(lr=0.5, momentum=0.8))
    twin.load_state_dict(agg.state_dict())
    assert torch.equal(twin.state_dict()["momentum/w"], agg.state_dict()["momentum/w"])


@pytest.mark.parametrize("cls, state, message", [
    (FedAvgM, {"velocity/w": t(0.0)},
     "FedAvgM keeps the moments ['momentum'], but the checkpoint holds 'velocity/w'"),
    (FedAdam, {"m": t(0.0)}, "FedAdam keeps the moments ['m', 'v'], but the checkpoint holds 'm'"),
    (FedYogi, {"v/": t(0.0)}, "FedYogi keeps the moments ['m', 'v'], but the checkpoint holds 'v/'"),
    (FedAdam, {"m/w": t(0.0), "v/w": t(float("nan"))}, "its moment 'v/w' holds NaN or Inf values"),
    (FedAvgM, {"momentum/w": t(float("inf"))}, "its moment 'momentum/w' holds NaN or Inf values"),
])
def test_load_state_dict_rejects_foreign_or_non_finite_moments(cls, state, message):
    """A checkpoint with moments this rule does not keep, or NaN/Inf ones, is refused and nothing is loaded."""
    agg = cls(FederatedSettings(aggregator=cls.__name__.lower()))
    agg.load_state_dict({f"{cls.moments[0]}/keep": t(1.0)})
    with pytest.raises(ValueError) as caught:
        agg.load_state_dict(state)
    assert str(caught.value) == message
    assert list(agg.state_dict()) == [f"{cls.moments[0]}/keep"]


def test_server_optimiser_state_round_trips_keys_holding_a_slash():
    """The moment's name is the part before the first '/': a key with '/' of its own comes back whole."""
    agg = FedAvgM(params=FedAvgM.Params(lr=0.5, momentum=0.8))
    run(agg, {"block/w": t(0.0)}, [({"block/w": t(1.0)}, 1)])
    state = agg.state_dict()
    assert list(state) == ["momentum/block/w"]
    twin = FedAvgM(params=FedAvgM.Params(lr=0.5, momentum=0.8))
    twin.load_state_dict(state)
    out = run(twin, {"block/w": t(0.5)}, [({"block/w": t(1.5)}, 1)])
    # v = 0.8 * 1 + 1 = 1.8; w = 0.5 + 0.5 * 1.8 = 1.4
    assert torch.allclose(out["block/w"], t(1.4), rtol=0, atol=1e-12)


def test_aggregators_keep_the_runs_settings():
    """Every rule keeps the settings it was built with (a subclass may read its own options from them)."""
    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi"):
        s = FederatedSettings(aggregator={"name": name} if name == "fedavg" else {"name": name, "lr": 0.3})
        agg = make_aggregator(s)
        assert agg.settings is s and agg.params == type(agg).Params(**{k: v for k, v in s.aggregator.items()
                                                                       if k != "name"})
        assert name == "fedavg" or agg.params.lr == 0.3


def test_server_optimisers_declare_their_parameters_once_and_refuse_others_by_dotted_key():
    """Each rule's parameters, defaults and documentation are on the rule (its Params); the run's
    section holds every one of them; an unknown or impossible one is refused naming aggregator.<key>."""
    assert FederatedSettings(aggregator="fedadam").aggregator == {"name": "fedadam", "lr": 0.01, "beta_1": 0.9,
                                                                  "beta_2": 0.99, "tau": 0.001}
    assert FederatedSettings(aggregator="fedavgm").aggregator == {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}
    assert FedAdam.Params.model_fields["tau"].description
    with pytest.raises(ValueError, match=r"^aggregator\.beta_1: unknown key; aggregator takes \['lr', 'momentum'\]$"):
        FederatedSettings(aggregator={"name": "fedavgm", "beta_1": 0.5})
    with pytest.raises(ValueError, match=r"^aggregator\.lr: Input should be greater than 0 \(got -1\.0\)$"):
        FederatedSettings(aggregator={"name": "fedadam", "lr": -1.0})
    with pytest.raises(ValueError, match=r"^aggregator\.beta_2: Input should be a valid number \(got '0\.9'\)$"):
        FederatedSettings(aggregator={"name": "fedyogi", "beta_2": "0.9"})
    with pytest.raises(ValueError, match=r"^aggregator\.name: must be one of \['fedadam', .*got 'fedsgd'$"):
        FederatedSettings(aggregator={"name": "fedsgd"})


def test_settings_of_earlier_versions_move_into_the_aggregators_section_with_a_warning():
    """``server_lr`` & co. at the top level (configs and checkpoints of earlier versions) still load:
    moved to the chosen rule's parameter, with a FutureWarning that names the new key; ignored, as
    before, where the rule has no such parameter; the checkpoint fingerprint is that of those versions."""
    with pytest.warns(FutureWarning, match=r"server_lr is now aggregator\.lr"):
        old = FederatedSettings(aggregator="fedadam", server_lr=0.05, server_beta2=0.9)
    assert old.aggregator == {"name": "fedadam", "lr": 0.05, "beta_1": 0.9, "beta_2": 0.9, "tau": 0.001}
    assert old == FederatedSettings(aggregator={"name": "fedadam", "lr": 0.05, "beta_2": 0.9})
    # written by the version before the move (same arguments): a checkpoint of it resumes
    assert old.fingerprint() == "ac3a7f1e00ad5b88577100d26bb109b36b400538"
    assert FederatedSettings().fingerprint() == "79defdb26397c9261879d0eb6e131d8ceeba83fd"
    with pytest.warns(FutureWarning, match=r"server_momentum is now aggregator\.momentum"):
        assert FederatedSettings(aggregator="fedavgm", server_momentum=0.5).fingerprint() == \
            "737976c176512acbb370a925458dc86f281bf9e8"
    assert FederatedSettings(server_lr=0.3).aggregator == {"name": "fedavg"}  # fedavg has no lr: ignored, as before
    with pytest.raises(ValueError, match=r"^server_lr: given twice, here and as aggregator\.lr; keep aggregator\.lr$"):
        FederatedSettings(aggregator={"name": "fedadam", "lr": 0.1}, server_lr=0.2)
