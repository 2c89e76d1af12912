"""S5 round engine (nni_fedexit/federated/rounds.py), unit by unit: the weight check and bound,
the best-round rule, planning (clients, depths, learning rates, seeds), the bookkeeping of
accepted / rejected / failed replies, aggregation, validation and the round's record.

Validation is pinned on planted models: every exit's linear layer has zero weights and a chosen
bias, so its logits are that bias for every image and the cross-entropies are hand-computed
(a bias of ln(91) on one class of ten gives it probability 91 / 100, every other class 1 / 100).
"""

from __future__ import annotations

import functools

import copy
import hashlib
import logging
import math
import warnings

import numpy as np
import pytest
import torch

from helpers import TINY_SAMPLE, digits_settings as shared_digits_settings, tiny_space
from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.exits.costs import exit_costs
from nni_fedexit.federated import FederatedError, UpdateRejected
from nni_fedexit.federated.aggregators import Aggregator, WeightedMean, register_aggregator
from nni_fedexit.federated.assign import ClientProfile, client_profiles
from nni_fedexit.federated.batchnorm import reestimate_bn_statistics
from nni_fedexit.federated.checkpoint import Checkpoint
from nni_fedexit.federated.rounds import (
    ClientTask,
    Participant,
    RoundEngine,
    RoundPlan,
    RoundResults,
    better,
    check_weight,
    metric_dict,
    stable_seed,
    tensor_bytes,
    validate,
)
from nni_fedexit.federated.server_pass import server_pass

LN91 = math.log(91.0)
LN9 = math.log(9.0)
#: the planted validation set's labels: three images of class 0, one of class 1
LABELS = [0, 0, 0, 1]


def hand_seed(*parts: int) -> int:
    """The documented seed: the first 8 bytes of SHA-256 of "a,b,c", little-endian, shifted to 63 bits."""
    text = ",".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


settings = functools.partial(shared_digits_settings, rounds=3, lr=0.1, bn_stats="average", server_steps=0)



@pytest.fixture(scope="module")
def template() -> MultiExitNetwork:
    torch.manual_seed(0)
    return MultiExitNetwork.from_architecture(tiny_space(), TINY_SAMPLE, loss_weights=(0.5, 1.0, 2.0))


@pytest.fixture
def model(template) -> MultiExitNetwork:
    return copy.deepcopy(template)


@pytest.fixture(scope="module")
def val() -> ImageData:
    g = torch.Generator().manual_seed(1)
    return ImageData(torch.randn(4, 1, 8, 8, generator=g), torch.tensor(LABELS))


def bias(top: int, value: float) -> torch.Tensor:
    b = torch.zeros(10)
    b[top] = value
    return b


def planted(model: MultiExitNetwork, biases) -> dict[str, torch.Tensor]:
    """The model's state with every exit's logits fixed to ``biases[i]`` (zero weights)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, b in enumerate(biases):
        state[f"exits.{i}.2.weight"].zero_()
        state[f"exits.{i}.2.bias"].copy_(b)
    return state


#: exit 1 favours class 1 (p = 0.91), exit 2 class 0 (p = 0.91), exit 3 class 0 (p = 0.5, others 1/18)
MIXED = [bias(1, LN91), bias(0, LN91), bias(0, LN9)]
# per-image cross-entropies: p = 0.91 -> -ln 0.91; p = 0.01 -> ln 100; p = 0.5 -> ln 2; p = 1/18 -> ln 18
MIXED_LOSSES = [(3 * math.log(100) - math.log(0.91)) / 4, (3 * -math.log(0.91) + math.log(100)) / 4,
                (3 * math.log(2) + math.log(18)) / 4]


def engine_for(model, val, s=None, **kwargs) -> RoundEngine:
    return RoundEngine(model, s or settings(), exit_costs(model, val.images[:1]), val, **kwargs)


# ---- small functions -----------------------------------------------------------------------------


def test_tensor_bytes_counts_elements_times_their_size():
    """Bytes moved: 3 float32 (12) + one int64 (8) + 2x2 float64 (32); ``keys`` restricts the count."""
    state = {"a": torch.zeros(3), "n": torch.tensor(5), "d": torch.zeros(2, 2, dtype=torch.float64)}
    assert tensor_bytes(state) == 12 + 8 + 32
    assert tensor_bytes(state, ["a", "d"]) == 44
    assert tensor_bytes(state, []) == 0


def test_stable_seed_is_the_documented_63_bit_hash():
    """The seed is SHA-256 of the parts joined by commas (first 8 bytes, little-endian, >> 1):
    stable across processes, below 2**63, and order-sensitive."""
    assert stable_seed(0, 1, 0, 3) == hand_seed(0, 1, 0, 3)
    assert stable_seed(7) == hand_seed(7)
    assert stable_seed(12, -1) == hand_seed(12, -1)
    seeds = {stable_seed(a, b) for a in range(4) for b in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2 ** 63 for x in seeds)
    assert stable_seed(1, 2) != stable_seed(2, 1) and stable_seed(1, 23) != stable_seed(12, 3)
    assert any(x >= 2 ** 62 for x in seeds)  # the full 63 bits are used


def test_validate_gives_hand_computed_losses_accuracies_and_weighted_total(model, val):
    """validate: per-exit CE and accuracy of planted logits, total = sum lambda_i * CE_i with
    lambda = (0.5, 1, 2), and the ensemble (mean of probabilities) accuracy."""
    model.load_state_dict(planted(model, MIXED))
    m = validate(model, val)
    assert m["exit_accuracy"] == pytest.approx([0.25, 0.75, 0.75])
    assert m["exit_loss"] == pytest.approx(MIXED_LOSSES, rel=1e-5)
    assert m["total_loss"] == pytest.approx(0.5 * MIXED_LOSSES[0] + MIXED_LOSSES[1] + 2 * MIXED_LOSSES[2], rel=1e-5)
    # ensemble: class 0 gets (0.01 + 0.91 + 0.5) / 3, class 1 (0.91 + 0.01 + 1/18) / 3: predicts 0
    assert m["ensemble_accuracy"] == pytest.approx(0.75)
    assert set(m) == {"exit_accuracy", "ensemble_accuracy", "exit_loss", "total_loss"}


def metrics(loss: float, last: float, first: float = 0.0) -> dict:
    """Validation metrics of a 3-exit model (the middle exit at 0.5)."""
    return {"total_loss": loss, "exit_accuracy": [first, 0.5, last]}


def test_better_by_total_loss_then_last_exit_then_earlier_round():
    """best_by total_loss: the lower total loss rounded to 4 decimals wins; equal rounded losses go
    to the higher last-exit accuracy; a full tie keeps the old (earlier) round."""
    assert better(metrics(9.0, 0.0), None) is True
    assert better(metrics(1.0, 0.1), metrics(2.0, 0.9)) is True
    assert better(metrics(2.0, 0.9), metrics(1.0, 0.1)) is False
    # 0.12341 and 0.12344 round to the same 0.1234: the accuracy decides, either way
    assert better(metrics(0.12344, 0.6), metrics(0.12341, 0.5)) is True
    assert better(metrics(0.12341, 0.5), metrics(0.12344, 0.6)) is False
    # 0.12344 and 0.12346 round apart (0.1234 < 0.1235): the loss decides despite the accuracy
    assert better(metrics(0.12346, 0.9), metrics(0.12344, 0.1)) is False
    assert better(metrics(0.12344, 0.1), metrics(0.12346, 0.9)) is True
    assert better(metrics(0.5, 0.5), metrics(0.5, 0.5)) is False  # a tie keeps the earlier round
    # only the last exit's accuracy breaks the tie, not the first's
    assert better(metrics(0.5, 0.5, first=0.9), metrics(0.5, 0.5, first=0.1)) is False
    assert better(metrics(0.5, 0.5, first=0.1), metrics(0.5, 0.6, first=0.9)) is False
    assert better(metrics(0.5, 0.6), metrics(0.5, 0.5), by="total_loss") is True


def test_better_by_last_exit_then_total_loss():
    """best_by last_exit: the higher last-exit accuracy rounded to 4 decimals wins; equal rounded
    accuracies go to the lower total loss; a full tie keeps the old round."""
    assert better(metrics(9.0, 0.0), None, by="last_exit") is True
    assert better(metrics(5.0, 0.8), metrics(1.0, 0.7), by="last_exit") is True
    assert better(metrics(1.0, 0.7), metrics(5.0, 0.8), by="last_exit") is False
    # 0.70001 and 0.70004 round to 0.7: the lower loss decides
    assert better(metrics(1.0, 0.70001), metrics(2.0, 0.70004), by="last_exit") is True
    assert better(metrics(2.0, 0.70004), metrics(1.0, 0.70001), by="last_exit") is False
    # 0.70004 and 0.70006 round apart: the accuracy decides despite the loss
    assert better(metrics(9.0, 0.70006), metrics(1.0, 0.70004), by="last_exit") is True
    assert better(metrics(1.0, 0.70004), metrics(9.0, 0.70006), by="last_exit") is False
    assert better(metrics(1.0, 0.7), metrics(1.0, 0.7), by="last_exit") is False
    # the first exit does not count
    assert better(metrics(1.0, 0.7, first=0.9), metrics(1.0, 0.7, first=0.1), by="last_exit") is False


def test_better_refuses_an_unknown_rule():
    """Any other best_by is a ValueError naming the two rules."""
    with pytest.raises(ValueError, match=r"^best_by must be 'total_loss' or 'last_exit', got 'accuracy'$"):
        better(metrics(1.0, 0.5), metrics(2.0, 0.5), by="accuracy")


def test_metric_dict_is_what_nni_shows():
    """default = last exit's accuracy, every exit as exitN, the total loss, the ensemble when there."""
    m = {"exit_accuracy": [0.25, 0.5, 0.75], "total_loss": 1.5, "ensemble_accuracy": 0.8, "exit_loss": [1, 2, 3]}
    assert metric_dict(m) == {"default": 0.75, "total_loss": 1.5, "exit1": 0.25, "exit2": 0.5, "exit3": 0.75,
                              "ensemble": 0.8}
    assert metric_dict({"exit_accuracy": [1], "total_loss": 2}) == {"default": 1.0, "total_loss": 2.0, "exit1": 1.0}
    assert all(type(v) is float for v in metric_dict(m).values())


# ---- the weight check ------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1, 7.5, np.int64(3), np.float32(2.5), np.int32(100), 100])
def test_check_weight_accepts_finite_positive_numbers_up_to_the_bound(weight):
    """A number in (0, bound] (Python or numpy, the bound itself included) is the weight, as a float."""
    value = check_weight(weight, 100.0)
    assert value == float(weight) and type(value) is float
    assert check_weight(weight, None) == float(weight)


@pytest.mark.parametrize("weight,needle", [
    (True, "its sample count is a bool, not a number"),
    ("12", "its sample count is a str, not a number"),
    (None, "its sample count is a NoneType, not a number"),
    (torch.tensor(3.0), "its sample count is a Tensor, not a number"),
    (0, "its sample count must be a finite number > 0, got 0"),
    (-3, "its sample count must be a finite number > 0, got -3"),
    (float("nan"), "its sample count must be a finite number > 0, got nan"),
    (float("inf"), "its sample count must be a finite number > 0, got inf"),
    (np.float64("-inf"), "its sample count must be a finite number > 0, got -inf"),
])
def test_check_weight_refuses_non_numbers_and_non_positive_counts(weight, needle):
    """Booleans, strings, tensors, 0, negatives, NaN and Inf are refused with the reason."""
    with pytest.raises(UpdateRejected) as err:
        check_weight(weight, None)
    assert str(err.value) == needle


def test_check_weight_refuses_a_claim_above_the_bound_naming_both():
    """One more than the bound is refused; the message names the claim and the bound."""
    assert check_weight(50, 50.0) == 50.0
    with pytest.raises(UpdateRejected, match=r"^it reports 51 examples, more than the 50 it may count for "
                                             r"\(its partition's size, or max_client_samples\)$"):
        check_weight(51, 50.0)
    with pytest.raises(UpdateRejected, match=r"^it reports 50.5 examples, more than the 50 it may"):
        check_weight(50.5, 50.0)
    assert check_weight(1e18, None) == 1e18  # no bound: no limit


# ---- participants, tasks, plans ----------------------------------------------------------------------


def test_participant_and_task_describe_themselves_and_their_record():
    """A simulated client is 'client c' and recorded as {"client": c}; a Flower node is 'node n'
    and recorded with its node and partition."""
    assert Participant(3).describe() == "client 3"
    assert Participant(None, node=17).describe() == "node 17"
    assert Participant(2, node=17).describe() == "node 17"
    task = ClientTask(2, depth=3, lr=0.5, seed=11)
    assert task.describe() == "client 2" and task.ref() == {"client": 2}
    assert task.to_dict() == {"client": 2, "depth": 3, "lr": 0.5, "seed": 11}
    node = ClientTask(None, depth=1, lr=0.1, seed=5, node=17, max_weight=4.0)
    assert node.describe() == "node 17" and node.ref() == {"node": 17, "client": None}
    assert node.to_dict() == {"node": 17, "client": None, "depth": 1, "lr": 0.1, "seed": 5}


def test_plan_selects_seeds_and_schedules_the_learning_rate(model, val):
    """Round t, attempt a: the clients are drawn by a generator seeded (seed, t, a), each gets a
    depth in 1..3, the round's lr = lr * decay**(t - 1) and the seed stable_seed(seed, t, a, client);
    replanning the same round gives the same plan."""
    s = settings(num_clients=6, client_fraction=0.5, min_clients=2, lr=0.1, lr_decay=0.5, seed=3)
    engine = engine_for(model, val, s)
    for t, attempt in [(1, 0), (2, 0), (2, 1), (3, 0)]:
        plan = engine.plan(t, attempt)
        rng = np.random.default_rng([3, t, attempt])
        want = sorted(int(c) for c in rng.choice(6, size=3, replace=False))  # round(0.5 * 6) = 3 clients
        assert [task.client for task in plan.tasks] == want
        assert plan.round == t and plan.lr == pytest.approx(0.1 * 0.5 ** (t - 1))
        assert all(task.lr == plan.lr and 1 <= task.depth <= 3 and task.node is None for task in plan.tasks)
        assert [task.seed for task in plan.tasks] == [hand_seed(3, t, attempt, c) for c in want]
        assert engine.plan(t, attempt).tasks == plan.tasks
    default = engine.plan(2)  # the first attempt unless told otherwise
    assert [task.seed for task in default.tasks] == [hand_seed(3, 2, 0, task.client) for task in default.tasks]
    assert default.tasks == engine.plan(2, 0).tasks
    lrs = [engine.plan(t).lr for t in (1, 2, 3)]
    assert lrs == pytest.approx([0.1, 0.05, 0.025])


def test_plan_depths_follow_the_proportional_sampling_over_many_rounds(model, val):
    """depth_sampling proportional: depth d is drawn with probability d / 6 (1/6, 2/6, 3/6); every
    client of a round takes part (client_fraction 1)."""
    engine = engine_for(model, val, settings(num_clients=4, min_clients=1))
    depths = [task.depth for t in range(1, 301) for task in engine.plan(t).tasks]
    assert len(depths) == 1200
    shares = [depths.count(d) / len(depths) for d in (1, 2, 3)]
    assert shares == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.04)
    uniform = engine_for(model, val, settings(num_clients=4, min_clients=1, depth_sampling="uniform"))
    depths = [task.depth for t in range(1, 301) for task in uniform.plan(t).tasks]
    assert [depths.count(d) / len(depths) for d in (1, 2, 3)] == pytest.approx([1 / 3] * 3, abs=0.04)


def test_plan_with_fewer_participants_than_min_clients_takes_them_all(model, val):
    """A Flower round with one node online and min_clients 2 plans that one node (the round then
    fails for too few updates, not the plan); a node without a partition is seeded by its node id."""
    engine = engine_for(model, val, settings(num_clients=4, min_clients=2))
    plan = engine.plan(2, 1, participants=[Participant(None, node=99)])
    assert len(plan.tasks) == 1
    task = plan.tasks[0]
    assert task.node == 99 and task.client is None and task.seed == hand_seed(0, 2, 1, 99)
    assert task.max_weight is None  # the server knows no size: no bound without client_sizes or a cap


def test_plan_bounds_each_client_by_its_partition_size(model, val):
    """Default participants carry their partition's size as the weight bound; a partition the
    sizes do not cover is bound by the largest known partition."""
    engine = engine_for(model, val, settings(num_clients=4), client_sizes=[10, 20, 30])
    plan = engine.plan(1)
    assert [task.client for task in plan.tasks] == [0, 1, 2, 3]
    assert [task.max_weight for task in plan.tasks] == [10.0, 20.0, 30.0, 30.0]
    assert all(type(task.max_weight) is float for task in plan.tasks)


def test_weight_bound_is_the_partition_or_the_largest_one_capped_by_max_client_samples(model, val):
    """weight_bound: the participant's known samples; else the largest partition; never above
    max_client_samples; None when nothing bounds it."""
    sized = engine_for(model, val, client_sizes=[10, 40, 25])
    assert sized.weight_bound(Participant(0, samples=10)) == 10.0
    assert sized.weight_bound(Participant(None, node=1)) == 40.0
    capped = engine_for(model, val, settings(max_client_samples=30), client_sizes=[10, 40, 25])
    assert capped.weight_bound(Participant(0, samples=10)) == 10.0
    assert capped.weight_bound(Participant(1, samples=40)) == 30.0
    assert capped.weight_bound(Participant(None, node=1)) == 30.0
    only_cap = engine_for(model, val, settings(max_client_samples=30))
    assert only_cap.weight_bound(Participant(None, node=1)) == 30.0
    assert only_cap.weight_bound(Participant(0, samples=50)) == 30.0
    assert engine_for(model, val).weight_bound(Participant(None, node=1)) is None
    assert engine_for(model, val, client_sizes=[]).weight_bound(Participant(None, node=1)) is None
    assert type(sized.weight_bound(Participant(2, samples=25))) is float


def test_plan_in_capability_mode_uses_reported_budgets(model, val, caplog):
    """assignment capability: a participant's reported budget picks the deepest branch it affords
    (1.0: all 3 exits); one too small for the first exit sits out; without a report the profile
    mix decides."""
    costs = exit_costs(model, val.images[:1])
    engine = engine_for(model, val, settings(assignment="capability", num_clients=3, min_clients=1))
    shallow = costs[0].macs / costs[-1].macs  # exactly the first exit's share
    parts = [Participant(0, budget=1.0), Participant(1, budget=shallow / 2), Participant(2, budget=shallow)]
    with caplog.at_level(logging.INFO, logger="nni_fedexit"):
        plan = engine.plan(1, participants=parts)
    assert [(task.client, task.depth) for task in plan.tasks] == [(0, 3), (2, 1)]
    assert [rec.getMessage() for rec in caplog.records] == [
        f"Round 1: client 1 (budget {shallow / 2}) affords no branch; it sits out"]
    unreported = engine.plan(1)
    assert len(unreported.tasks) >= 1 and all(1 <= task.depth <= 3 for task in unreported.tasks)


def test_plan_in_capability_mode_draws_unreported_budgets_from_the_profile_mix(model, val):
    """Without reported budgets, client i's budget is profile i of the mix drawn with the run's
    seed: a mix of one profile with budget 0.6 gives every client branch 1 (exit 1 needs 54 % of
    the full model's MACs, exit 2 96 %); a reported budget overrides its client's profile."""
    one = engine_for(model, val, settings(assignment="capability", num_clients=4, min_clients=1,
                                          profile_mix=[["mid", 0.6, 1.0]]))
    assert [(task.client, task.depth) for task in one.plan(1).tasks] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    mixed = one.plan(1, participants=[Participant(0), Participant(1, budget=1.0), Participant(2, budget=0.1)])
    assert [(task.client, task.depth) for task in mixed.tasks] == [(0, 1), (1, 3)]
    mix = [["low", 0.1, 0.5], ["high", 1.0, 0.5]]
    by_seed = {}
    for seed in (0, 5):
        engine = engine_for(model, val, settings(assignment="capability", num_clients=12, min_clients=1,
                                                 profile_mix=mix, seed=seed))
        drawn = client_profiles(12, [(ClientProfile(n, b), w) for n, b, w in mix], seed=seed)
        want = [(c, 3) for c in range(12) if drawn[c].budget == 1.0]  # low-end clients sit out
        by_seed[seed] = [(task.client, task.depth) for task in engine.plan(1).tasks]
        assert by_seed[seed] == want
    assert by_seed[0] != by_seed[5]


def test_plan_seeds_a_flower_node_by_its_partition_when_it_has_one(model, val):
    """A node with a partition is seeded by the partition, one without by its node id; both keep
    their node in the task, and their weight bound is their known samples or the largest partition."""
    engine = engine_for(model, val, settings(num_clients=4, min_clients=2), client_sizes=[10, 50])
    plan = engine.plan(3, 0, participants=[Participant(2, node=17, samples=30), Participant(None, node=99)])
    assert [(t.client, t.node, t.seed, t.max_weight) for t in plan.tasks] == [
        (2, 17, hand_seed(0, 3, 0, 2), 30.0), (None, 99, hand_seed(0, 3, 0, 99), 50.0)]


# ---- one round's results -------------------------------------------------------------------------------


def results_for(tasks, global_state) -> RoundResults:
    return RoundResults(RoundPlan(1, 0.1, list(tasks)), WeightedMean(global_state))


def test_round_results_log_each_rejection_and_failure_with_who_and_why(caplog):
    """Each rejected or failed reply is logged as a warning naming the round, the client (or the
    reply's ref) and its branch, and the reason; with neither task nor ref the record is the reason."""
    task = ClientTask(2, depth=3, lr=0.1, seed=0, max_weight=10.0)
    r = results_for([task], {"a": torch.zeros(1)})
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        r.accept(task, {"a": torch.zeros(1)}, 11, 0.1)
        r.fail(task, "TimeoutError: slow")
        r.reject(None, "not asked", ref={"node": 43})
        r.fail(None, "unknown sender")
        r.reject(None, "anonymous")
    assert [rec.getMessage() for rec in caplog.records] == [
        "Round 1: update of client 2 (branch 3) rejected: it reports 11 examples, more than the 10 it may count for "
        "(its partition's size, or max_client_samples)",
        "Round 1: client 2 (branch 3) failed and is dropped from the round: TimeoutError: slow",
        "Round 1: update of {'node': 43} (branch None) rejected: not asked",
        "Round 1: {} (branch None) failed and is dropped from the round: unknown sender",
        "Round 1: update of {} (branch None) rejected: anonymous",
    ]
    assert all(rec.levelno == logging.WARNING for rec in caplog.records)
    assert r.failed[-1] == {"reason": "unknown sender"} and r.rejected[-1] == {"reason": "anonymous"}


def test_round_results_accept_reject_and_fail_with_reasons_and_summary():
    """accept adds a fitting update (weight, loss kept); a claim over the task's bound, a non-finite
    loss, entries outside the branch or an update the aggregator refuses are rejected with the
    reason; failures are recorded; the summary lists all of it with the mean training loss."""
    g = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([4.0])}
    tasks = [ClientTask(c, depth=1, lr=0.1, seed=c, max_weight=10.0) for c in range(6)]
    r = results_for(tasks, g)
    assert r.accept(tasks[0], {"a": torch.tensor([3.0, 5.0])}, 3, 0.5) is True
    assert r.accept(tasks[1], {"a": torch.tensor([7.0, 1.0])}, 1.0, 1.5, allowed=["a"]) is True
    assert r.accept(tasks[2], {"a": torch.tensor([0.0, 0.0])}, 11, 0.1) is False
    assert r.accept(tasks[3], {"a": torch.tensor([0.0, 0.0])}, 1, float("nan")) is False
    assert r.accept(tasks[4], {"a": torch.zeros(2), "b": torch.zeros(1)}, 1, 0.1, allowed=["a"]) is False
    assert r.accept(tasks[5], {"zzz": torch.zeros(1)}, 1, 0.1) is False
    r.fail(tasks[5], "TimeoutError: slow")
    r.fail(None, "a reply from nowhere", ref={"node": 42})
    r.reject(None, "not asked", ref={"node": 43})
    assert r.accepted == 2
    new = r.aggregate.result()
    assert torch.allclose(new["a"], torch.tensor([(3 * 3.0 + 7.0) / 4, (3 * 5.0 + 1.0) / 4]))
    assert torch.equal(new["b"], torch.tensor([4.0]))
    r.bytes_sent, r.bytes_received = 100, 60
    summary = r.summary()
    assert summary["clients"] == [t.to_dict() for t in tasks]
    assert summary["accepted"] == 2 and summary["train_loss"] == pytest.approx((0.5 + 1.5) / 2)
    assert summary["bytes_sent"] == 100 and summary["bytes_received"] == 60
    reasons = summary["rejected"]
    assert [x.get("client", x.get("node")) for x in reasons] == [2, 3, 4, 5, 43]
    assert reasons[0]["reason"].startswith("it reports 11 examples, more than the 10")
    assert reasons[1]["reason"] == "its training loss is nan"
    assert reasons[2]["reason"] == "it holds entries outside its branch 1: ['b']"
    assert "unknown key 'zzz'" in reasons[3]["reason"]
    assert reasons[4] == {"node": 43, "reason": "not asked"}
    assert summary["failed"] == [{"client": 5, "reason": "TimeoutError: slow"}, {"node": 42, "reason": "a reply from nowhere"}]
    assert set(summary) == {"clients", "accepted", "rejected", "failed", "train_loss", "bytes_sent", "bytes_received"}


def test_round_results_reject_lists_up_to_three_extra_entries_and_a_ref_overrides_the_task():
    """Entries outside the branch are named, sorted, at most three; a given ref replaces the task's."""
    g = {k: torch.zeros(1) for k in "abcde"}
    task = ClientTask(1, depth=2, lr=0.1, seed=0, node=8)
    r = results_for([task], g)
    assert r.accept(task, {k: torch.zeros(1) for k in "edcba"}, 1, 0.1, allowed=["a"]) is False
    assert r.rejected == [{"node": 8, "client": 1, "reason": "it holds entries outside its branch 2: ['b', 'c', 'd']"}]
    r.fail(task, "gone", ref={"node": 9})
    assert r.failed == [{"node": 9, "reason": "gone"}]
    r.reject(task, "late")
    assert r.rejected[-1] == {"node": 8, "client": 1, "reason": "late"}


def test_round_results_summary_without_accepted_updates_has_a_nan_training_loss():
    """No accepted update: the training loss is NaN (without numpy's warning of an empty mean), nothing accepted."""
    r = results_for([ClientTask(0, 1, 0.1, 0)], {"a": torch.zeros(1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = r.summary()
    assert summary["accepted"] == 0 and math.isnan(summary["train_loss"])
    assert summary["rejected"] == [] and summary["failed"] == [] and summary["bytes_sent"] == 0
    assert summary["bytes_received"] == 0 and summary["clients"] == [{"client": 0, "depth": 1, "lr": 0.1, "seed": 0}]


# ---- the engine: construction, close, finish -------------------------------------------------------------


def test_engine_refuses_settings_that_need_server_data_it_was_not_given(model, val):
    """bn_stats server/local need the server's training split; server_steps need labelled images."""
    with pytest.raises(FederatedError, match=r"^bn_stats='server' re-estimates BatchNorm statistics on the server's "
                                             r"training split, but none was given; pass server_train, or use "
                                             r"bn_stats='average'$"):
        engine_for(model, val, settings(bn_stats="server"))
    with pytest.raises(FederatedError, match="bn_stats='local'"):
        engine_for(model, val, settings(bn_stats="local"), server_train=ImageData(val.images[:0], val.labels[:0]))
    engine_for(model, val, settings(bn_stats="local"), server_train=val)  # given: fine
    with pytest.raises(FederatedError, match=r"^server_steps=2 trains the global model on the server's labelled "
                                             r"images, but none were given; pass server_labelled, or set server_steps: 0$"):
        engine_for(model, val, settings(server_steps=2))
    with pytest.raises(FederatedError, match="server_steps=None"):
        engine_for(model, val, settings(server_steps=None), server_labelled=ImageData(val.images[:0], val.labels[:0]))
    engine_for(model, val, settings(server_steps=None), server_labelled=val)


def test_close_needs_min_clients_accepted_updates(model, val):
    """close: fewer accepted updates than min_clients give None (the round is retried or fails);
    exactly min_clients give the weighted mean."""
    engine = engine_for(model, val, settings(min_clients=2))
    g = model.state_dict()
    plan = engine.plan(1)
    results = engine.open(plan, g)
    key = "exits.0.2.bias"
    results.accept(plan.tasks[0], {key: torch.full((10,), 1.0)}, 1, 0.1)
    assert engine.close(results) is None
    results.accept(plan.tasks[1], {key: torch.full((10,), 4.0)}, 3, 0.1)
    new = engine.close(results)
    assert torch.allclose(new[key], torch.full((10,), (1 + 3 * 4.0) / 4))
    assert torch.equal(new["exits.0.2.weight"], g["exits.0.2.weight"])


@register_aggregator("test-rounds-nan-result")
class NanResult(Aggregator):
    """A broken custom rule whose result holds a NaN in four float entries (its int entries are fine)."""

    def begin(self, global_state):
        class Broken(WeightedMean):
            def result(self):
                out = super().result()
                for key in ("exits.0.2.bias", "exits.1.2.bias", "exits.2.2.weight", "exits.2.2.bias"):
                    out[key] = out[key].clone()
                    out[key].view(-1)[3] = float("nan")
                return out

        return Broken(global_state)


def test_close_refuses_a_non_finite_aggregate(model, val, caplog):
    """An aggregate holding NaN is not a new global model: close gives None and the log names the
    first three entries that hold NaN."""
    engine = engine_for(model, val, settings(aggregator="test-rounds-nan-result", min_clients=1))
    plan = engine.plan(1)
    results = engine.open(plan, model.state_dict())
    assert results.accept(plan.tasks[0], {"exits.0.2.bias": torch.ones(10)}, 1, 0.1)
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        assert engine.close(results) is None
    assert [rec.getMessage() for rec in caplog.records] == [
        "Round 1: the aggregate holds NaN or Inf (exits.0.2.bias, exits.1.2.bias, exits.2.2.weight); "
        "the global model is kept"]  # the first three, in the model's order


def run_round(engine: RoundEngine, t: int, state: dict[str, torch.Tensor], weight: int = 5) -> dict:
    """One round whose only accepted update is ``state`` (the whole model), the others failing."""
    plan = engine.plan(t)
    results = engine.open(plan, {k: v.clone() for k, v in engine.model.state_dict().items()})
    results.accept(plan.tasks[0], state, weight, 0.25)
    for task in plan.tasks[1:]:
        results.fail(task, "offline")
    new = engine.close(results)
    assert new is not None
    return engine.finish(results, new)


def test_finish_loads_validates_records_and_keeps_the_best_round(model, val, caplog):
    """finish: the new state becomes the model, the round's record holds its lr, clients, losses
    and validation metrics; the best round follows the total loss (round 2 beats 1, 3 does not
    beat 2); on_record sees every record; done follows the rounds."""
    seen = []
    s = settings(num_clients=2, min_clients=1, lr=0.2, lr_decay=0.5)
    engine = engine_for(model, val, s, on_record=seen.append)
    uniform = planted(model, [torch.zeros(10)] * 3)  # every exit: ln 10 per image, predicts class 0
    good = planted(model, [bias(0, LN91)] * 3)  # every exit: p(class 0) = 0.91
    bad = planted(model, [bias(1, LN91)] * 3)  # every exit: p(class 0) = 0.01
    with caplog.at_level(logging.INFO, logger="nni_fedexit.federated.rounds"):
        r1 = run_round(engine, 1, uniform)
    assert [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO] == [
        f"Round 1/3: val accuracy per exit 0.7500 0.7500 0.7500, total loss {3.5 * math.log(10):.4f} (best)"]
    assert engine.done == 1 and engine.best_round == 1
    assert r1["round"] == 1 and r1["lr"] == pytest.approx(0.2) and r1["accepted"] == 1
    assert r1["total_loss"] == pytest.approx(3.5 * math.log(10), rel=1e-5)  # (0.5 + 1 + 2) * ln 10
    assert r1["exit_accuracy"] == pytest.approx([0.75] * 3) and r1["train_loss"] == 0.25
    assert r1["failed"] == [{"client": 1, "reason": "offline"}] and 0 <= r1["seconds"] < 600
    assert "server_loss" not in r1
    r2 = run_round(engine, 2, good)
    assert r2["lr"] == pytest.approx(0.1) and engine.best_round == 2 and engine.done == 2
    assert r2["total_loss"] == pytest.approx(3.5 * (3 * -math.log(0.91) + math.log(100)) / 4, rel=1e-5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nni_fedexit.federated.rounds"):
        r3 = run_round(engine, 3, bad)
    assert [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO] == [
        f"Round 3/3: val accuracy per exit 0.2500 0.2500 0.2500, total loss {r3['total_loss']:.4f}"]
    assert engine.best_round == 2 and engine.done == 3
    assert r3["exit_accuracy"] == pytest.approx([0.25] * 3)
    for k, v in model.state_dict().items():  # the model is round 3's, the best state round 2's
        assert torch.equal(v, bad[k]), k
        assert torch.equal(engine.best_state[k], good[k]), k
    assert seen == engine.history == [r1, r2, r3]
    outcome = engine.outcome([{"client": 0}])
    assert outcome.best_round == 2 and outcome.history == [r1, r2, r3] and outcome.clients == [{"client": 0}]


def test_finish_keeps_the_earlier_round_on_a_tie_and_follows_best_by_last_exit(model, val):
    """Equal metrics keep the earlier round; with best_by last_exit a higher last-exit accuracy
    wins although its total loss is higher."""
    engine = engine_for(model, val, settings(num_clients=2, min_clients=1))
    state = planted(model, [bias(0, LN9)] * 3)
    run_round(engine, 1, state)
    run_round(engine, 2, state)
    assert engine.best_round == 1
    by_exit = engine_for(copy.deepcopy(model), val, settings(num_clients=2, min_clients=1, best_by="last_exit"))
    run_round(by_exit, 1, planted(model, [torch.zeros(10), torch.zeros(10), bias(1, LN9)]))  # last exit 0.25, low loss
    run_round(by_exit, 2, planted(model, [bias(1, 10.0), bias(1, 10.0), bias(0, 0.001)]))  # last exit 0.75, high loss
    assert by_exit.history[1]["total_loss"] > by_exit.history[0]["total_loss"]
    assert by_exit.best_round == 2
    by_loss = engine_for(copy.deepcopy(model), val, settings(num_clients=2, min_clients=1))
    run_round(by_loss, 1, planted(model, [torch.zeros(10), torch.zeros(10), bias(1, LN9)]))
    run_round(by_loss, 2, planted(model, [bias(1, 10.0), bias(1, 10.0), bias(0, 0.001)]))
    assert by_loss.best_round == 1


def test_finish_without_a_new_state_keeps_the_model(model, val):
    """A round that produced no aggregate (None) is recorded on the unchanged model."""
    engine = engine_for(model, val, settings(num_clients=2, min_clients=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = engine.plan(1)
    results = engine.open(plan, before)
    record = engine.finish(results, None)
    assert record["accepted"] == 0 and engine.done == 1 and engine.best_round == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_finish_re_estimates_batchnorm_statistics_on_the_server_split(model, val):
    """bn_stats server: after loading the aggregate, every BatchNorm's running statistics are the
    exact ones on server_train (as reestimate_bn_statistics computes them); bn_stats average
    keeps the aggregated ones."""
    g = torch.Generator().manual_seed(5)
    server_train = ImageData(torch.randn(16, 1, 8, 8, generator=g) * 3 + 1, torch.zeros(16, dtype=torch.long))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model)
    expected.load_state_dict(state)
    reestimate_bn_statistics(expected, server_train)
    engine = engine_for(model, val, settings(num_clients=2, min_clients=1, bn_stats="server"), server_train=server_train)
    run_round(engine, 1, state)
    key = "stem.1.running_mean"
    assert not torch.equal(expected.state_dict()[key], state[key])
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected.state_dict()[k]), k
    plain = copy.deepcopy(expected)
    kept = engine_for(plain, val, settings(num_clients=2, min_clients=1), server_train=server_train)
    run_round(kept, 1, state)
    assert torch.equal(plain.state_dict()[key], state[key])


def test_finish_runs_the_server_pass_seeded_by_the_round(model, val):
    """server_steps: after aggregation the server trains the model on its labelled images with the
    seed stable_seed(seed, t, -1) and the round's lr; the record holds that pass's loss."""
    g = torch.Generator().manual_seed(6)
    labelled = ImageData(torch.randn(8, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    s = settings(num_clients=2, min_clients=1, server_steps=2, batch_size=4, lr=0.05, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model)
    expected.load_state_dict(state)
    loss = server_pass(expected, labelled, s, 0.05, hand_seed(4, 1, -1))
    engine = engine_for(model, val, s, server_labelled=labelled)
    record = run_round(engine, 1, state)
    assert record["server_loss"] == loss and math.isfinite(loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected.state_dict()[k]), k


def test_finish_writes_the_checkpoint_with_the_best_weights_only_when_they_change(model, val, tmp_path):
    """Each round saves state.json (fingerprint, round, best round, history, backend extras) and
    last.safetensors; best.safetensors is written in the rounds that improve and kept otherwise."""
    s = settings(num_clients=2, min_clients=1)
    ckpt = Checkpoint(tmp_path)
    engine = engine_for(model, val, s, checkpoint=ckpt, checkpoint_extra=lambda: {"nodes": [7]})
    good = planted(model, [bias(0, LN91)] * 3)
    bad = planted(model, [bias(1, LN91)] * 3)
    run_round(engine, 1, good)
    best_bytes = (tmp_path / "best.safetensors").read_bytes()
    best_mtime = (tmp_path / "best.safetensors").stat().st_mtime_ns
    run_round(engine, 2, bad)
    state = ckpt.state()
    assert state["round"] == 2 and state["best_round"] == 1 and state["nodes"] == [7]
    assert state["fingerprint"] == s.fingerprint() and [h["round"] for h in state["history"]] == [1, 2]
    assert state["history"] == engine.history
    assert (tmp_path / "best.safetensors").read_bytes() == best_bytes
    assert (tmp_path / "best.safetensors").stat().st_mtime_ns == best_mtime
    loaded = ckpt.load()
    for k in good:
        assert torch.equal(loaded.best[k], good[k]) and torch.equal(loaded.last[k], bad[k]), k
    assert loaded.server == {}  # fedavg keeps no server state, and no client has objective state


def test_server_state_flattens_the_aggregator_and_client_states(model, val):
    """server.safetensors' entries: aggregator/<name> and client/<c>/<name>."""
    engine = engine_for(model, val, settings(aggregator="fedavgm", num_clients=3, min_clients=1))
    engine.aggregator.state = {"momentum": {"exits.0.2.bias": torch.ones(10)}}
    engine.client_states = {2: {"h": torch.zeros(3)}, 0: {"g": torch.ones(1), "h": torch.ones(2)}}
    flat = engine.server_state()
    assert set(flat) == {"aggregator/momentum/exits.0.2.bias", "client/2/h", "client/0/g", "client/0/h"}
    assert torch.equal(flat["client/0/h"], torch.ones(2))


def test_outcome_before_any_round_is_an_error(model, val):
    """A run with no round (rounds not above the checkpoint's) has no best state to hand on."""
    with pytest.raises(FederatedError, match="^no round was run: rounds must be larger than the checkpoint's last round$"):
        engine_for(model, val).outcome([])
