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
    from nni.nas.hub.pytorch import NasBench201

    space = tiny_space(widths=(8, 16, 32))
    sample = {"stage1": "resnet50", "stage2": "resnet18", "stage3": "resnet50"}
    assert ParamsProfiler(space).profile(sample) == sum(p.numel() for p in space.build(sample).parameters())

    hub = NasBench201(stem_out_channels=4, num_modules_per_stack=1)
    hub_sample = {label: m.values[1] for label, m in hub.simplify().items()}
    expected = sum(p.numel() for p in hub.freeze(hub_sample).parameters())
    assert ParamsProfiler(hub).profile(hub_sample) == expected
