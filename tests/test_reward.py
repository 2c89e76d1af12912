"""The size-aware reward (claim 4) and the exact p_h it is computed from."""

import pytest

from nni_fedexit.search.reward import (
    HardBudgetReward,
    LinearPenaltyReward,
    ParamsProfiler,
    SizeAwareReward,
    hard_budget_reward,
    linear_penalty_reward,
    size_aware_reward,
)
from helpers import tiny_space


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
