"""The size-aware reward (claim 4) and the exact p_h it is computed from."""

import logging
import re

import nni
import nni.nas.nn.pytorch as nas
import pytest
import torch.nn as nn
from nni.nas.space import RawFormatModelSpace, SimplifiedModelSpace

from nni_fedexit.search.reward import (
    COSTS,
    DEFAULT_BETA,
    HardBudgetReward,
    LinearPenaltyReward,
    SizeAwareReward,
    SizeTarget,
    TargetReward,
    check_beta,
    hard_budget_reward,
    linear_penalty_reward,
    parse_metric,
    size_aware_reward,
    target_reward,
)
from nni_fedexit.search.profiler import ParamsProfiler
from helpers import TINY_SAMPLE, tiny_space


def test_equals_accuracy_when_the_network_is_the_baseline_size():
    assert size_aware_reward(0.83, 1000, 1000, beta=14) == pytest.approx(0.83)
    assert SizeAwareReward(1000, beta=3)(0.5, 1000) == pytest.approx(0.5)


def test_monotone_in_accuracy():
    rewards = [size_aware_reward(a, 700, 1000) for a in (0.1, 0.5, 0.8, 0.95)]
    assert rewards == sorted(rewards) and len(set(rewards)) == 4


def test_smaller_network_earns_more_at_equal_accuracy():
    small, base, big = (size_aware_reward(0.8, p, 1000, beta=14) for p in (500, 1000, 2000))
    assert small > base > big
    # beta=14: halving the size is worth 2**(1/14) - 1 = 5.1 % more reward
    assert small / base == pytest.approx(2 ** (1 / 14))


def test_larger_beta_weighs_size_less():
    assert size_aware_reward(0.8, 500, 1000, beta=2) > size_aware_reward(0.8, 500, 1000, beta=20)


@pytest.mark.parametrize("beta", [0, -1, 1.5, True])
def test_beta_must_be_a_positive_integer(beta):
    with pytest.raises(ValueError, match="beta"):
        size_aware_reward(0.5, 10, 10, beta=beta)


def test_alternative_rewards():
    assert hard_budget_reward(0.9, 1000, 1000) == 0.9 and hard_budget_reward(0.9, 1001, 1000) == 0.0
    assert HardBudgetReward(500)(0.7, 600) == 0.0
    assert linear_penalty_reward(0.8, 1000, 1000) == pytest.approx(0.8)
    assert LinearPenaltyReward(1000, weight=0.1)(0.8, 2000) == pytest.approx(0.7)


def test_profiler_gives_the_frozen_module_parameter_count_of_any_space():
    import logging

    from nni.nas.hub.pytorch import NasBench201
    from nni.nas.profiler.pytorch.flops import NumParamsProfiler

    # the block-pool space: ours reads the space's pool tables (nothing built); NNI's profiler
    # infers the shapes of the space's modules and counts their parameters
    logging.getLogger("nni").setLevel(logging.ERROR)
    space = tiny_space(widths=(8, 16, 32))
    sample = {"stage1": "resnet50", "stage2": "resnet18", "stage3": "resnet50"}
    assert ParamsProfiler(space).profile(sample) == NumParamsProfiler(space, space.dummy_input()).profile(sample)

    # a space without count_params, NNI's NasBench201 (NNI's profiler has no shape formula for its
    # Zero op): counted by hand for stem 4 channels, one cell per stack (cells at C = 4, 8, 16).
    # Every sample has: stem conv 3*4*9 = 108 + BN 2*4 = 116; reduction block 4->8: conv_a 4*8*9 +
    # BN 16, conv_b 8*8*9 + BN 16, 1x1 downsample 4*8 = 928; reduction 8->16: 1152 + 32 + 2304 + 32
    # + 128 = 3648; last BN 2*16 = 32; classifier 16*10 + 10 = 170: 4,894 (all skip_connect).
    # The sample's edges are shared by the three cells: 0_1 conv_3x3 adds sum 9C^2 + 2C (BN) =
    # 152 + 592 + 2336 = 3080, 1_2 conv_1x1 adds sum C^2 + 2C = 24 + 80 + 288 = 392; none,
    # skip_connect and avg_pool_3x3 have no parameters: 4894 + 3080 + 392 = 8,366.
    hub = NasBench201(stem_out_channels=4, num_modules_per_stack=1)
    hub_sample = {label: "skip_connect" for label in hub.simplify()}
    hub_sample.update({"cell/0_1": "conv_3x3", "cell/1_2": "conv_1x1", "cell/0_3": "none", "cell/2_3": "avg_pool_3x3"})
    assert ParamsProfiler(hub).profile(hub_sample) == 8366
    assert ParamsProfiler(hub).profile({label: "skip_connect" for label in hub.simplify()}) == 4894


# ---- the formulas pinned to hand-computed values ----------------------------------------------


def test_size_aware_reward_is_accuracy_times_size_ratio_to_the_minus_one_over_beta():
    """R = Acc * (p_h / P) ** (-1 / beta), on ratios whose roots are exact."""
    assert size_aware_reward(0.9, 250, 1000, beta=2) == pytest.approx(0.9 * 2.0)  # 0.25 ** -0.5 = 2
    assert size_aware_reward(0.6, 8000, 1000, beta=3) == pytest.approx(0.6 * 0.5)  # 8 ** (-1/3) = 1/2
    assert size_aware_reward(0.5, 2, 1, beta=1) == pytest.approx(0.25)
    # the default beta is 14: a network 2**14 times the baseline earns half its accuracy
    assert DEFAULT_BETA == 14
    assert size_aware_reward(0.7, 2 ** 14, 1) == pytest.approx(0.35)
    assert SizeAwareReward(1)(0.7, 2 ** 14) == pytest.approx(0.35)
    assert SizeAwareReward(2 ** 14, beta=2)(0.5, 2 ** 12) == pytest.approx(0.5 * 2.0)  # (1/4) ** -0.5


def test_size_aware_reward_refuses_counts_that_are_not_positive():
    """p_h and P must both be > 0; the message names both values."""
    with pytest.raises(ValueError, match=r"^parameter counts must be positive, got p_h=0, P=1000$"):
        size_aware_reward(0.5, 0, 1000)
    with pytest.raises(ValueError, match=r"^parameter counts must be positive, got p_h=10, P=0$"):
        size_aware_reward(0.5, 10, 0)
    with pytest.raises(ValueError, match="p_h=-1"):
        size_aware_reward(0.5, -1, 1000)
    with pytest.raises(ValueError, match="P=-5"):
        size_aware_reward(0.5, 10, -5)
    with pytest.raises(ValueError, match="P=0"):
        SizeAwareReward(0)
    with pytest.raises(ValueError, match=r"^beta must be a positive integer, got 0$"):
        SizeAwareReward(1000, beta=0)


def test_check_beta_returns_the_integer_or_names_the_setting():
    """check_beta passes a positive int through and names its key in the rejection."""
    assert check_beta(1) == 1 and check_beta(14) == 14
    with pytest.raises(ValueError, match=r"^beta must be a positive integer, got 0$"):
        check_beta(0)
    with pytest.raises(ValueError, match=r"^classArgs\.beta must be a positive integer, got 2\.0$"):
        check_beta(2.0, "classArgs.beta")
    with pytest.raises(ValueError, match=r"^beta must be a positive integer, got True$"):
        check_beta(True)


def test_target_reward_at_below_and_above_the_target():
    """R = Acc * (cost / T) ** w with w = below at or under T and above over it."""
    assert target_reward(0.8, 1000, 1000, -0.5, -1.0) == pytest.approx(0.8)  # at T: the accuracy
    assert target_reward(0.8, 250, 1000, -0.5, -1.0) == pytest.approx(0.8 * 2.0)  # 0.25 ** -0.5
    assert target_reward(0.8, 250, 1000, -1.0, -0.5) == pytest.approx(0.8 * 4.0)  # below weighs under T
    assert target_reward(0.8, 4000, 1000, -0.5, -1.0) == pytest.approx(0.8 * 0.25)  # 4 ** -1
    assert target_reward(0.8, 4000, 1000, -1.0, -0.5) == pytest.approx(0.8 * 0.5)  # above weighs over T
    assert target_reward(0.8, 1001, 1000, 0.0, -1.0) == pytest.approx(0.8 * 1000 / 1001)
    assert target_reward(0.8, 999, 1000, -1.0, 0.0) == pytest.approx(0.8 * 1000 / 999)
    assert target_reward(0.8, 0.25, 0.5, -1.0, -1.0) == pytest.approx(1.6)  # a target under 1 is positive


def test_target_reward_refuses_costs_and_targets_that_are_not_positive():
    """cost and T must be > 0; the message names both."""
    with pytest.raises(ValueError, match=r"^cost and target must be positive, got cost=0, target=1000$"):
        target_reward(0.8, 0, 1000, -0.5, -1.0)
    with pytest.raises(ValueError, match=r"^cost and target must be positive, got cost=10, target=0$"):
        target_reward(0.8, 10, 0, -0.5, -1.0)
    with pytest.raises(ValueError, match="cost=-1"):
        target_reward(0.8, -1, 1000, -0.5, -1.0)
    with pytest.raises(ValueError, match="target=-2"):
        target_reward(0.8, 10, -2, -0.5, -1.0)


def test_target_reward_defaults_are_claim_4s_exponent_under_and_minus_one_over():
    """TargetReward weighs params by default, with below = -1/14 and above = -1."""
    reward = TargetReward(1000)
    assert reward.cost == "params" and reward.below == pytest.approx(-1 / 14) and reward.above == -1.0
    assert reward(0.8, 2000) == pytest.approx(0.4)
    assert TargetReward(2 ** 14)(0.7, 1) == pytest.approx(1.4)  # (2 ** -14) ** (-1/14) = 2
    assert TargetReward(100, "macs", -0.5, -2.0)(0.9, 25) == pytest.approx(1.8)
    assert TargetReward(100, "macs", -0.5, -2.0)(0.9, 200) == pytest.approx(0.225)
    assert COSTS == ("params", "macs", "early_exit_macs")


def test_alternative_rewards_pinned():
    """Hard budget: accuracy up to max_params inclusive, 0 over; linear: Acc - w * (p_h / P - 1), w = 0.1."""
    assert hard_budget_reward(1, 5, 5) == 1.0 and isinstance(hard_budget_reward(1, 5, 5), float)
    assert HardBudgetReward(500)(0.7, 500) == 0.7 and HardBudgetReward(500)(0.7, 499) == 0.7
    assert linear_penalty_reward(0.8, 3000, 1000) == pytest.approx(0.8 - 0.1 * 2)
    assert linear_penalty_reward(0.8, 500, 1000, weight=0.5) == pytest.approx(0.8 + 0.5 * 0.5)
    assert LinearPenaltyReward(1000)(0.8, 3000) == pytest.approx(0.6)
    assert LinearPenaltyReward(1000, weight=1.0)(0.8, 1500) == pytest.approx(0.3)
    assert isinstance(linear_penalty_reward(1, 1000, 1000), float)


# ---- the size goal a user states ----------------------------------------------------------------


def test_size_target_defaults():
    """No field given: params, T = the baseline's cost, claim 4's exponent under, -1 over, conv heads."""
    t = SizeTarget()
    assert (t.cost, t.value, t.share, t.exit_shares, t.head, t.head_width) == ("params", None, None, None, "conv", None)
    assert t.below == pytest.approx(-1 / 14) and t.above == -1.0
    assert t.reward(1234) == TargetReward(1234.0, "params", -1 / 14, -1.0)


def test_size_target_resolves_t_from_value_share_or_the_baseline():
    """T is value, or share * the baseline cost, or the baseline cost; the rest carries over as floats."""
    by_value = SizeTarget(cost="macs", value=300, below=-1, above=-2).reward(1000)
    assert by_value == TargetReward(300.0, "macs", -1.0, -2.0)
    assert all(type(x) is float for x in (by_value.target, by_value.below, by_value.above))
    by_share = SizeTarget(cost="early_exit_macs", share=0.25).reward(2000)
    assert by_share.target == pytest.approx(500.0) and by_share.cost == "early_exit_macs"
    assert type(SizeTarget().reward(7).target) is float
    # at 10 % over a target of 500, a reward is 1/1.1 of the accuracy
    assert by_share(0.88, 550) == pytest.approx(0.8)


@pytest.mark.parametrize("fields, message", [
    ({"cost": "flops"}, r"^target\.cost must be one of \('params', 'macs', 'early_exit_macs'\), got 'flops'$"),
    ({"value": 10, "share": 1.0},
     r"^target: give value \(T in the cost's unit\) or share \(T as a share of the baseline's cost\), not both$"),
    ({"value": 0}, r"^target\.value must be a positive number, got 0$"),
    ({"value": -3}, r"^target\.value must be a positive number, got -3$"),
    ({"value": True}, r"^target\.value must be a positive number, got True$"),
    ({"value": "10"}, r"^target\.value must be a positive number, got '10'$"),
    ({"value": float("inf")}, r"^target\.value must be a positive number, got inf$"),
    ({"share": 0}, r"^target\.share must be a positive number, got 0$"),
    ({"share": float("nan")}, r"^target\.share must be a positive number, got nan$"),
    ({"below": 0.5}, r"^target\.below must be a number <= 0 \(the exponent of cost / T\), got 0\.5$"),
    ({"above": 1e-9}, r"^target\.above must be a number <= 0 \(the exponent of cost / T\), got 1e-09$"),
    ({"above": True}, r"^target\.above must be a number <= 0"),
    ({"below": "x"}, r"^target\.below must be a number <= 0"),
    ({"below": float("-inf")}, r"^target\.below must be a number <= 0"),
    ({"exit_shares": []}, r"^target\.exit_shares must list non-negative shares, one per exit, got \[\]$"),
    ({"exit_shares": [0, 0]}, r"^target\.exit_shares must list"),
    ({"exit_shares": [0.5, -0.1]}, r"^target\.exit_shares must list"),
    ({"exit_shares": [True, 1]}, r"^target\.exit_shares must list"),
    ({"exit_shares": [1, "a"]}, r"^target\.exit_shares must list"),
    ({"exit_shares": [1, float("nan")]}, r"^target\.exit_shares must list"),
    ({"exit_shares": "ab"}, r"^target\.exit_shares must list"),
    ({"exit_shares": 5}, r"^target\.exit_shares must list non-negative shares, one per exit, got 5$"),
    ({"exit_shares": {0.5}}, r"^target\.exit_shares must list non-negative shares, one per exit, got \{0\.5\}$"),
])
def test_size_target_refuses_bad_fields_by_name(fields, message):
    """Every bad field is refused with a message that names it and the value."""
    with pytest.raises(ValueError, match=message):
        SizeTarget(**fields)


def test_size_target_accepts_the_edges_of_its_ranges():
    """Exponents of exactly 0, a tiny positive T, a zero share among exits; shares become a float tuple."""
    t = SizeTarget(value=1e-9, below=0, above=0.0, exit_shares=[1, 0])
    assert t.exit_shares == (1.0, 0.0) and all(type(q) is float for q in t.exit_shares)
    assert SizeTarget(share=2).reward(10).target == pytest.approx(20.0)
    assert SizeTarget(exit_shares=(0.0, 0.5)).exit_shares == (0.0, 0.5)


def test_size_target_of_a_mapping_names_the_setting_in_its_errors():
    """SizeTarget.of: itself unchanged, a mapping's fields, errors renamed under the caller's key."""
    t = SizeTarget(share=0.5)
    assert SizeTarget.of(t) is t
    assert SizeTarget.of({"cost": "macs", "value": 5}) == SizeTarget(cost="macs", value=5)
    known = "['above', 'below', 'cost', 'exit_shares', 'head', 'head_width', 'share', 'value']"
    with pytest.raises(ValueError, match=r"^target must be a mapping of " + re.escape(known) + r", got 3$"):
        SizeTarget.of(3)
    with pytest.raises(ValueError, match=r"^classArgs\.target must be a mapping of "):
        SizeTarget.of([("share", 1.0)], "classArgs.target")
    with pytest.raises(ValueError, match=r"^target: unknown key\(s\) \['sahre', 'x'\]; known: " + re.escape(known) + "$"):
        SizeTarget.of({"x": 1, "sahre": 1.0})
    with pytest.raises(ValueError, match=r"^search\.target: unknown key\(s\) \['x'\]"):
        SizeTarget.of({"x": 1}, "search.target")
    with pytest.raises(ValueError, match=r"^classArgs\.target\.share must be a positive number, got 0$"):
        SizeTarget.of({"share": 0}, "classArgs.target")
    with pytest.raises(ValueError, match=r"^k\.value must be a positive number, got 'target'$"):
        SizeTarget.of({"value": "target"}, "k")  # only the field's prefix is renamed
    with pytest.raises(ValueError, match=r"^k: give value \(T in the cost's unit\) or share"):
        SizeTarget.of({"value": 1, "share": 2}, "k")


# ---- p_h of a sample -----------------------------------------------------------------------------


class TwoLinears(nas.ModelSpace):
    """A planted space without count_params: Linear(2, 3) has 9 parameters, Linear(2, 5, bias=False) 10."""

    def __init__(self):
        super().__init__()
        self.fc = nas.LayerChoice([nn.Linear(2, 3), nn.Linear(2, 5, bias=False)], label="fc")
        self.frozen = 0

    def forward(self, x):
        return self.fc(x)

    def freeze(self, sample):
        self.frozen += 1
        return super().freeze(sample)


def test_profiler_counts_a_frozen_module_once_per_sample():
    """Without count_params, p_h is sum(numel) of the frozen module, built once per distinct sample."""
    space = TwoLinears()
    profiler = ParamsProfiler(space)
    assert profiler.space is space
    assert profiler.profile({"fc": 0}) == 9 and profiler.profile({"fc": 1}) == 10
    assert profiler.profile({"fc": 0}) == 9 and profiler.profile({"fc": 1}) == 10
    assert space.frozen == 2


class CountedLinears(TwoLinears):
    """The planted space with its own count_params (deliberately not the built module's count)."""

    def count_params(self, sample):
        return 100.0 + sample["fc"]


def test_profiler_takes_the_space_count_params_without_building_anything():
    """A space's count_params wins over freezing, and its count comes back as an int."""
    space = CountedLinears()
    profiler = ParamsProfiler(space)
    assert profiler.profile({"fc": 1}) == 101 and type(profiler.profile({"fc": 1})) is int
    assert space.frozen == 0


def test_profiler_unwraps_what_an_experiment_hands_a_strategy():
    """A raw-format space is unwrapped to its model space; a simplified one is rebuilt from its trace."""
    space = TwoLinears()
    raw = ParamsProfiler(RawFormatModelSpace(space, None))
    assert raw.space is space and raw.space is raw.space
    assert raw.profile({"fc": 1}) == 10
    simplified = ParamsProfiler(SimplifiedModelSpace.from_model(TwoLinears(), None))
    assert isinstance(simplified.space, TwoLinears) and simplified.space is simplified.space
    assert simplified.profile({"fc": 0}) == 9


def test_profiler_uses_the_space_count_params_and_says_when_there_is_nothing_to_count(caplog):
    """count_params wins (its result as an int); a space whose samples are not modules has no size (None),
    which is logged once."""
    space = tiny_space(widths=(8, 16, 32))
    assert ParamsProfiler(space).profile(TINY_SAMPLE) == space.count_params(TINY_SAMPLE)
    assert type(ParamsProfiler(space).profile(TINY_SAMPLE)) is int
    profiler = ParamsProfiler(nni.choice("x", [1, 2]))
    message = ["Categorical has no parameters to count: the reward is the accuracy alone"]
    with caplog.at_level(logging.INFO, logger="nni_fedexit.search.profiler"):
        assert profiler.profile({"x": 1}) is None
        assert [r.getMessage() for r in caplog.records] == message
        assert profiler.profile({"x": 2}) is None and profiler.profile({"x": 1}) is None
    assert [r.getMessage() for r in caplog.records] == message


# ---- what a trial reports -------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (0.5, (0.5, None)),
    (3, (3.0, None)),
    ("0.25", (0.25, None)),
    ('{"default": 0.5, "params": 10}', (0.5, 10)),
    ({"default": 0.5, "params": 10}, (0.5, 10)),
    ({"default": 0.5, "params": 10.7}, (0.5, 10)),
    ({"default": 0.5, "params": 1}, (0.5, 1)),
    ({"default": 0.5, "params": 0}, (0.5, None)),
    ({"default": 0.5, "params": -3}, (0.5, None)),
    ({"default": 0.5, "params": True}, (0.5, None)),
    ({"default": 0.5, "params": "10"}, (0.5, None)),
    ({"default": 0.5, "params": float("inf")}, (0.5, None)),
    ({"default": 0.5, "params": float("nan")}, (0.5, None)),
    ({"default": 0.5}, (0.5, None)),
    ({"params": 10}, (None, 10)),
    ({"default": float("inf"), "params": 5}, (None, 5)),
    ({"default": "x", "params": 5}, (None, 5)),
    ({"default": True}, (None, None)),
    ("not json", (None, None)),
    ("NaN", (None, None)),
    (float("nan"), (None, None)),
    (float("-inf"), (None, None)),
    (False, (None, None)),
    (None, (None, None)),
    ([0.5], (None, None)),
])
def test_parse_metric_reads_numbers_mappings_and_json(value, expected):
    """(metric, p_h): a finite non-bool number; p_h a positive finite count, else None."""
    got = parse_metric(value)
    assert got == expected
    assert got[0] is None or type(got[0]) is float
    assert got[1] is None or type(got[1]) is int
