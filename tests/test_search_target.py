"""The size goal of the search: MnasNet's target reward, MACs the space counts without building,
the shared supernet's warm-up and BatchNorm evaluation, and the device settings of the search."""

import math

import pytest
import torch
import torch.nn as nn

from helpers import run_shared_experiment, tiny_space
from nni_fedexit.exits import MultiExitNetwork, exit_costs, exit_path_macs, expected_exit_macs
from nni_fedexit.macs import forward_macs
from nni_fedexit.search.reward import SizeTarget, target_reward
from nni_fedexit.search.enas_module import batch_statistics
from nni_fedexit.search.shared_strategy import FairPathSampler
from nni_fedexit.search.strategy import SizeAwarePolicyGradient


# ---- the reward ------------------------------------------------------------------------------


def test_target_reward_is_mild_under_the_target_and_steep_over_it():
    assert target_reward(0.8, 100, 100, -0.07, -1.0) == pytest.approx(0.8)
    assert target_reward(0.8, 50, 100, -0.07, -1.0) == pytest.approx(0.8 * 0.5 ** -0.07)  # +5 %
    assert target_reward(0.8, 200, 100, -0.07, -1.0) == pytest.approx(0.4)  # twice the target: half
    # at the demo's default, a network 10 % over T needs 10 % more accuracy to tie one at T
    reward = SizeTarget(share=1.0).reward(1000)
    assert reward.target == 1000 and reward(0.88, 1100) < reward(0.80, 1000)
    with pytest.raises(ValueError, match="positive"):
        target_reward(0.8, 0, 100, 0.0, -1.0)


@pytest.mark.parametrize("fields, message", [
    ({"cost": "flops"}, "target.cost must be one of"),
    ({"value": 10, "share": 1.0}, "not both"),
    ({"share": 0}, "target.share must be a positive number"),
    ({"above": 0.5}, "target.above must be a number <= 0"),
    ({"exit_shares": [0.5, -0.5]}, "target.exit_shares"),
    ({"sahre": 1.0}, r"unknown key\(s\) \['sahre'\]"),
])
def test_a_bad_target_is_refused_naming_its_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SizeTarget.of(fields)


# ---- MACs without building -------------------------------------------------------------------


def test_space_counts_the_macs_a_built_network_has(fmnist_space):
    for sample in ({label: list(pool)[-1] for label, pool in fmnist_space.pools.items()},
                   {label: list(pool)[1] for label, pool in fmnist_space.pools.items()}):
        built = fmnist_space.build(sample).eval()
        macs, _ = forward_macs(built, fmnist_space.dummy_input(1))
        assert fmnist_space.count_macs(sample) == macs > 0


def test_early_exit_macs_from_the_space_equal_those_of_the_multi_exit_network(fmnist_space):
    sample = {label: list(pool)[i % len(pool)] for i, (label, pool) in enumerate(fmnist_space.pools.items())}
    model = MultiExitNetwork.from_architecture(fmnist_space, sample, head="conv")
    measured = [c.early_exit_macs for c in exit_costs(model, fmnist_space.dummy_input(1))]
    assert exit_path_macs(fmnist_space, sample, head="conv") == measured
    # every input leaving at exit 1 costs exit 1's path; equal shares cost the mean of the paths
    assert expected_exit_macs(fmnist_space, sample, [1, 0, 0, 0]) == measured[0]
    assert expected_exit_macs(fmnist_space, sample, [1, 1, 1, 1]) == pytest.approx(sum(measured) / 4)
    with pytest.raises(ValueError, match="exit_shares: need 4"):
        expected_exit_macs(fmnist_space, sample, [1, 0])


def test_a_network_built_from_the_space_does_not_pretend_to_count_macs():
    space = tiny_space()
    net = space.build(space.baseline_sample())
    with pytest.raises(RuntimeError, match="counted on the search space itself"):
        net.count_macs(space.baseline_sample())


# ---- the strategy with a target --------------------------------------------------------------


def test_target_share_of_macs_is_resolved_against_the_baseline_network():
    space = tiny_space()
    strategy = SizeAwarePolicyGradient(mode="trials", target={"cost": "macs", "share": 0.5})
    strategy._setup_search(space, space)  # what NNI's initialize does with the space
    baseline = space.baseline_sample()
    assert strategy.reward_fn.target == pytest.approx(0.5 * space.count_macs(baseline))
    big = {label: list(pool)[-1] for label, pool in space.pools.items()}
    reward, costs = strategy.score(0.9, big)
    assert costs["macs"] == space.count_macs(big) and costs["params"] == space.count_params(big)
    assert reward == pytest.approx(0.9 * (costs["macs"] / strategy.reward_fn.target) ** -1.0)


def test_a_macs_target_on_a_space_without_macs_names_the_key(digits):
    from nni.nas.hub.pytorch import NasBench201

    space = NasBench201(stem_out_channels=4, num_modules_per_stack=1)
    strategy = SizeAwarePolicyGradient(mode="trials", target={"cost": "macs", "value": 1e6})
    strategy._setup_search(space, space)
    sample = {label: values[0] for label, values in strategy.learner.values.items()}
    with pytest.raises(ValueError, match="target.cost 'macs': NasBench201 does not count MACs"):
        strategy.score(0.5, sample)


def test_tuner_takes_the_same_target():
    from nni_fedexit.search.tuner import SizeAwarePGTuner

    tuner = SizeAwarePGTuner(baseline_params=1000, target={"share": 1.0})
    assert tuner.reward(0.9, 1000) == pytest.approx(0.9) and tuner.reward(0.9, 2000) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="classArgs.target.cost"):
        SizeAwarePGTuner(baseline_params=1000, target={"cost": "macs"})
    with pytest.raises(ValueError, match="classArgs.target.share needs classArgs.baseline_params"):
        SizeAwarePGTuner(target={"share": 1.0})


# ---- warm-up and evaluation of the shared weights --------------------------------------------


def test_fair_sampling_uses_every_candidate_once_in_every_run_of_n():
    values = {"a": ["x", "y", "z"], "b": ["p", "q", "r"]}
    sampler = FairPathSampler(values, torch.Generator().manual_seed(0), "fair")
    draws = [sampler.sample() for _ in range(30)]
    for label, options in values.items():
        for start in range(0, 30, 3):
            assert sorted(d[label] for d in draws[start:start + 3]) == sorted(options)
    again = FairPathSampler(values, torch.Generator().manual_seed(0), "fair")
    assert [again.sample() for _ in range(30)] == draws  # seeded: the same paths
    uniform = FairPathSampler(values, torch.Generator().manual_seed(0), "uniform")
    assert {uniform.sample()["a"] for _ in range(50)} == {"x", "y", "z"}


def test_batch_statistics_normalise_by_the_batch_and_leave_running_stats_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    bn = net[1]
    before = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(16, 1, 6, 6) * 3 + 2
    with torch.no_grad(), batch_statistics(net):
        y = net(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert not bn.training and bn.momentum == 0.1  # restored
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-4 + bn.bias.abs().max()  # the batch's own mean


@pytest.mark.slow
@pytest.mark.parametrize("path_sampling", ["controller", "warmup"])
def test_warm_up_trains_every_block_alike_before_the_controller_learns(digits, tmp_path, path_sampling):
    """Also the search's CPU run with the Trainer settings a CUDA run gets (bar accelerator, devices),
    and a target only one network meets: the final choice meets it."""
    from nni_fedexit.job.pipeline import search_trainer_settings, shared_search_evaluator

    torch.manual_seed(0)
    space = tiny_space(widths=(8, 16, 32))
    smallest = min(space.count_params(s) for s in _all_samples(space))
    strategy = SizeAwarePolicyGradient(final_samples=4, samples_per_update=2, warmup_epochs=1, seed=0,
                                       path_sampling=path_sampling, target={"value": smallest, "above": -50.0})
    drawn = []
    original = FairPathSampler.sample

    def recording(self):
        drawn.append(original(self))
        return drawn[-1]

    train, val = digits.train.subset(list(range(1000))), digits.train.subset(list(range(1000, len(digits.train))))
    evaluator = shared_search_evaluator(train, val, 10, epochs=2, batch_size=64, learning_rate=0.01,
                                        progress=False)
    assert evaluator.trainer.trace_kwargs == search_trainer_settings(2, "cpu", progress=False)
    FairPathSampler.sample = recording
    try:
        (sample,) = run_shared_experiment(space, evaluator, strategy, tmp_path)
    finally:
        FairPathSampler.sample = original
    # the 16 training batches of the warm-up epoch (and of the second one with path_sampling=warmup)
    assert len(drawn) == (16 if path_sampling == "controller" else 32)
    for label, pool in space.pools.items():
        counts = [sum(d[label] == c for d in drawn) for c in pool]
        assert counts == [len(drawn) // len(pool)] * len(pool)
    val_batches = math.ceil(len(val) / 64)
    assert strategy.learner.steps == val_batches // 2  # the controller learned in epoch 2 only
    assert len(strategy.records) == val_batches
    assert space.contains(sample)
    # the one network within the target is a final candidate (drawn within the target), and with
    # a steep exponent over it, the choice
    assert any(c["params"] == smallest for c in strategy.final_candidates)
    assert space.count_params(sample) == smallest
    (accuracy,) = strategy.path_accuracies([sample])  # the shared weights' score, as the final choice saw it
    assert accuracy == next(c["accuracy"] for c in strategy.final_candidates if c["sample"] == sample)


def _all_samples(space):
    import itertools

    return [dict(zip(space.labels, combo)) for combo in itertools.product(*[list(p) for p in space.pools.values()])]


def test_device_settings_of_the_search():
    from nni_fedexit.job.pipeline import PipelineError, check_device, lightning_device, search_trainer_settings

    assert lightning_device("cpu") == ("cpu", 1)
    assert lightning_device("cuda") == ("gpu", 1)
    assert lightning_device("cuda:1") == ("gpu", [1])  # the GPU the clients use, not Lightning's first
    cuda = search_trainer_settings(3, "cuda:1", progress=False)
    cpu = search_trainer_settings(3, "cpu", progress=False)
    assert {k for k in cuda if cuda[k] != cpu[k]} == {"accelerator", "devices"}
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        lightning_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="sees no CUDA GPU"):
            check_device("cuda")
