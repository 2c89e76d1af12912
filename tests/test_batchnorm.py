"""BatchNorm under label skew (issue 33): which entries are statistics, the server's re-estimation
of the running statistics after every aggregation (over several rounds), FedBN's local layers.

A planted model with hand-set weights on planted images, so every statistic is written out by hand;
one short federated run checks that the round engine re-estimates after every round, not once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nni_fedexit.data import ImageData
from nni_fedexit.federated.batchnorm import (
    BN_STATE_PREFIX, BN_STATS, bn_keys, is_bn_statistic, keep_local_bn, reestimate_bn_statistics, restore_local_bn,
)

STATS = ["running_mean", "running_var", "num_batches_tracked"]


class Planted(nn.Module):
    """Two tracked BatchNorm layers (one on the images, one after a hand-set linear map) and an untracked one.

    ``forward`` records torch's thread count at each call (the re-estimation runs on one thread).
    """

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.first = nn.BatchNorm2d(2, momentum=0.3)
        self.second = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
        self.untracked = nn.BatchNorm2d(2, track_running_stats=False)
        self.set_weight(weight)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([2.0, 3.0]))
            self.first.bias.copy_(torch.tensor([-1.0, 1.0]))
        self.threads: list[int] = []

    def set_weight(self, weight: list[list[float]]) -> None:
        with torch.no_grad():
            self.second[1].weight.copy_(torch.tensor(weight))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.threads.append(torch.get_num_threads())
        return self.first(x), self.second(x), self.untracked(x)


def images(ch0: list[float], ch1: list[float]) -> ImageData:
    """Images of 2 channels of 1 x 1 pixels."""
    x = torch.tensor([ch0, ch1]).T.reshape(-1, 2, 1, 1)
    return ImageData(x, torch.zeros(len(ch0), dtype=torch.int64))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def unbiased_var(values: list[float]) -> float:
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


@pytest.fixture
def one_thread_restored():
    """Run with 2 torch threads, so that the re-estimation's own single thread shows; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# ---- which entries are BatchNorm's -------------------------------------------------------------------


@pytest.mark.parametrize("key, statistic", [
    ("stem.1.running_mean", True), ("stages.0.bn.running_var", True), ("exits.2.1.num_batches_tracked", True),
    ("running_mean", True), ("stem.1.weight", False), ("stem.1.bias", False), ("running_mean.weight", False),
    ("stem.running_mean_x", False), ("stem.0.weight", False),
])
def test_is_bn_statistic(key, statistic):
    """A running statistic is an entry whose last name part is running_mean, running_var or num_batches_tracked."""
    assert is_bn_statistic(key) is statistic


def test_bn_keys_lists_every_batchnorm_entry_by_its_state_dict_name():
    """Affine parameters and statistics of every BatchNorm layer (nested, 1d/2d, without affine), nothing else."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2),
                          nn.Sequential(nn.Flatten(), nn.LayerNorm(2), nn.BatchNorm1d(2, affine=False)),
                          nn.GroupNorm(1, 2), nn.InstanceNorm2d(2))
    assert bn_keys(model) == ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
                              "2.2.running_mean", "2.2.running_var", "2.2.num_batches_tracked"]
    assert bn_keys(nn.BatchNorm1d(3)) == ["weight", "bias", *STATS]  # the model itself is the layer
    assert bn_keys(nn.Linear(2, 2)) == []
    assert BN_STATS == ("average", "server", "local")


# ---- server-side re-estimation ------------------------------------------------------------------------


def test_reestimation_gives_the_exact_statistics_of_the_data_and_touches_nothing_else(one_thread_restored):
    """One batch: running mean and unbiased variance of each layer's inputs over the data; parameters,
    mode, momenta and torch's thread count are as they were; the count of layers re-estimated is returned."""
    model = Planted([[1.0, 0.0], [1.0, 1.0]])
    model.eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    ch0, ch1 = [1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0]
    assert reestimate_bn_statistics(model, images(ch0, ch1)) == 2  # the untracked layer has no statistics
    assert model.threads == [1] and torch.get_num_threads() == 2
    # first layer: ch0 mean 3, var (4 + 1 + 0 + 9) / 3; ch1 mean 2, var 16 / 3
    assert torch.allclose(model.first.running_mean, torch.tensor([3.0, 2.0]))
    assert torch.allclose(model.first.running_var, torch.tensor([14 / 3, 16 / 3]))
    assert int(model.first.num_batches_tracked) == 1
    # second layer sees (ch0, ch0 + ch1) = (1, 2, 3, 6), (1, 2, 7, 10)
    f1 = [a + b for a, b in zip(ch0, ch1)]
    assert torch.allclose(model.second[2].running_mean, torch.tensor([mean(ch0), mean(f1)]))
    assert torch.allclose(model.second[2].running_var, torch.tensor([unbiased_var(ch0), unbiased_var(f1)]))
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert not model.training and not any(m.training for m in model.modules())
    assert model.first.momentum == 0.3 and model.second[2].momentum == 0.1 and model.untracked.momentum == 0.1
    model.train()
    reestimate_bn_statistics(model, images(ch0, ch1))
    assert model.training and all(m.training for m in model.modules())


def test_reestimation_in_batches_is_the_cumulative_average_over_the_batches():
    """Batches of 2: the running statistics are the plain average of the batches' means and variances."""
    model = Planted([[1.0, 0.0], [0.0, 1.0]])
    # ch0 batches (1, 2), (3, 6): means 1.5, 4.5, unbiased variances 0.5, 4.5; ch1 (0, 0), (4, 4): 0, 4 and 0, 0
    assert reestimate_bn_statistics(model, images([1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0]), batch_size=2) == 2
    assert len(model.threads) == 2
    assert torch.allclose(model.first.running_mean, torch.tensor([(1.5 + 4.5) / 2, (0.0 + 4.0) / 2]))
    assert torch.allclose(model.first.running_var, torch.tensor([(0.5 + 4.5) / 2, 0.0]))
    assert int(model.first.num_batches_tracked) == 2


def test_reestimation_after_every_aggregation_follows_each_rounds_weights_and_data():
    """Three rounds of (new weights, re-estimate): each time the statistics are those of this round's
    model on this round's data alone, never a mix with an earlier round's."""
    model = Planted([[1.0, 0.0], [0.0, 1.0]])
    rounds = [([[1.0, 0.0], [0.0, 1.0]], [1.0, 2.0, 3.0], [4.0, 4.0, 7.0]),
              ([[2.0, 0.0], [1.0, -1.0]], [0.0, 10.0, 20.0], [1.0, 1.0, 4.0]),
              ([[0.5, 0.5], [0.0, 3.0]], [-1.0, 1.0, 0.0], [2.0, 0.0, 1.0])]
    for weight, ch0, ch1 in rounds:
        model.set_weight(weight)  # the aggregation changed the weights
        model.train()
        model(images([9.0, -9.0], [5.0, 3.0]).images)  # and client-style batches moved the statistics
        assert reestimate_bn_statistics(model, images(ch0, ch1)) == 2
        (a, b), (c, d) = weight
        f0 = [a * x + b * y for x, y in zip(ch0, ch1)]
        f1 = [c * x + d * y for x, y in zip(ch0, ch1)]
        assert torch.allclose(model.first.running_mean, torch.tensor([mean(ch0), mean(ch1)]))
        assert torch.allclose(model.first.running_var, torch.tensor([unbiased_var(ch0), unbiased_var(ch1)]))
        assert torch.allclose(model.second[2].running_mean, torch.tensor([mean(f0), mean(f1)]), atol=1e-6)
        assert torch.allclose(model.second[2].running_var, torch.tensor([unbiased_var(f0), unbiased_var(f1)]))
        assert int(model.first.num_batches_tracked) == 1 and int(model.second[2].num_batches_tracked) == 1
        assert model.first.momentum == 0.3


def test_reestimation_without_data_or_without_batchnorm_does_nothing():
    """No images, or no tracked BatchNorm layer: 0 layers, no forward pass, the statistics untouched."""
    model = Planted([[1.0, 0.0], [0.0, 1.0]])
    model.train()
    model(images([1.0, 5.0], [2.0, 8.0]).images)
    before = copy.deepcopy(model.state_dict())
    model.threads.clear()
    empty = ImageData(torch.zeros(0, 2, 1, 1), torch.zeros(0, dtype=torch.int64))
    assert reestimate_bn_statistics(model, empty) == 0
    assert model.threads == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    class NoBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.linear(x.flatten(1))

    plain = NoBatchNorm()
    assert reestimate_bn_statistics(plain, images([1.0], [2.0])) == 0
    assert plain.calls == 0


@pytest.mark.slow
def test_the_round_engine_reestimates_after_every_round(digits):
    """bn_stats 'server' over two rounds: the final model's statistics are its own weights' statistics
    on the server's images (a run that re-estimated only after the first round would not match)."""
    from helpers import TINY_SAMPLE, tiny_space

    from nni_fedexit.federated import FederatedData, FederatedSettings, federate

    s = FederatedSettings(dataset="digits", rounds=2, num_clients=4, min_clients=2, batch_size=32, lr=0.05, seed=0,
                          head="conv", bn_stats="server", bn_samples=200)
    data = FederatedData(s, bundle=digits)
    result = federate(tiny_space().build(TINY_SAMPLE), s, data=data, report=False)
    expected = copy.deepcopy(result.model)
    reestimate_bn_statistics(expected, data.server_train)
    got = result.model.state_dict()
    for k, v in expected.state_dict().items():
        assert torch.allclose(v.double(), got[k].double(), atol=1e-5), k


# ---- FedBN: the client's own BatchNorm layers ---------------------------------------------------------


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))


def test_keep_local_bn_moves_the_batchnorm_entries_into_the_client_state():
    """FedBN: the update loses its BatchNorm entries (all five), the client keeps them under bn/."""
    model = bn_model()
    update = {k: v.clone() for k, v in model.state_dict().items()}
    del update["1.running_var"]  # an entry the update does not hold is skipped
    running_mean = update["1.running_mean"]
    client_state = {"dyn/0.weight": torch.zeros(2, 1, 1, 1)}
    keep_local_bn(model, update, client_state)
    assert sorted(update) == ["0.bias", "0.weight"]
    assert sorted(client_state) == ["bn/1.bias", "bn/1.num_batches_tracked", "bn/1.running_mean", "bn/1.weight",
                                    "dyn/0.weight"]
    assert client_state["bn/1.running_mean"] is running_mean
    assert BN_STATE_PREFIX == "bn/"


def test_restore_local_bn_loads_the_clients_own_entries_over_the_global_ones():
    """Only bn/<key> entries the model holds are loaded; other state (FedDyn's, deeper layers') is left alone."""
    model = bn_model()
    conv = model[0].weight.detach().clone()
    own = {"bn/1.weight": torch.tensor([5.0, 6.0]), "bn/1.running_mean": torch.tensor([0.5, -0.5]),
           "bn/1.num_batches_tracked": torch.tensor(7),
           "bn/4.weight": torch.tensor([1.0]),           # a deeper layer than this branch holds
           "xx/0.bias": torch.tensor([9.0, 9.0]),        # not a bn/ entry, though its tail names one of the model's
           "dyn/0.weight": torch.ones(2, 1, 1, 1)}
    restore_local_bn(model, own)
    assert torch.equal(model[1].weight.detach(), torch.tensor([5.0, 6.0]))
    assert torch.equal(model[1].running_mean, torch.tensor([0.5, -0.5]))
    assert int(model[1].num_batches_tracked) == 7
    assert torch.equal(model[1].bias.detach(), torch.zeros(2))  # the client kept no bias: the global one stays
    assert torch.equal(model[0].weight.detach(), conv) and not torch.equal(model[0].bias.detach(), torch.ones(2) * 9)
    own["bn/1.weight"] += 1  # a copy, not the client's tensor
    assert torch.equal(model[1].weight.detach(), torch.tensor([5.0, 6.0]))
    with pytest.raises(ValueError) as caught:
        restore_local_bn(model, {"bn/1.running_var": torch.ones(3)})
    assert str(caught.value) == "the client's BatchNorm entry '1.running_var' has shape (3,), the model (2,)"
