"""S5 seams: a new aggregator, client objective or backend is a few lines plus its registration,
chosen by name in the settings, and its state survives rounds and checkpoints."""

import functools
import copy

import pytest
import torch
from safetensors.torch import load_file

from nni_fedexit.federated import (
    Aggregator, ClientObjective, FederatedData, MultiExitObjective, WeightedMean, federate,
    register_aggregator, register_backend, register_objective,
)
from nni_fedexit.federated.backends.simulation import run_simulation
from helpers import TINY_SAMPLE, digits_settings as shared_digits_settings, tiny_space


@register_aggregator("test-server-momentum")
class ServerMomentum(Aggregator):
    """FedAvgM (Hsu et al. 2019): ``v = 0.9 v + (global - mean)``, new global ``= global - v``; v is server state."""

    def __init__(self, settings):
        super().__init__(settings)
        self.velocity: dict[str, torch.Tensor] = {}

    def begin(self, global_state):
        aggregator = self

        class Momentum(WeightedMean):
            def result(self):
                out = {}
                for key, mean in super().result().items():
                    g = global_state[key]
                    if not g.is_floating_point():
                        out[key] = mean
                        continue
                    v = 0.9 * aggregator.velocity.get(key, torch.zeros_like(g)) + (g - mean)
                    aggregator.velocity[key] = v
                    out[key] = g - v
                return out

        return Momentum(global_state)

    def state_dict(self):
        return dict(self.velocity)

    def load_state_dict(self, state):
        self.velocity = {k: v.clone() for k, v in state.items()}


@register_objective("test-proximal-counting")
class ProximalCounting(ClientObjective):
    """FedProx's proximal term on the multi-exit loss (of the part being trained), and a per-client
    count of the rounds it trained."""

    def begin(self, ctx):
        self.base = MultiExitObjective()
        self.anchor = {k: v.detach().clone() for k, v in ctx.global_state.items()}
        assert set(dict(ctx.branch.named_parameters())) <= set(self.anchor), "the objective sees the global weights"

    def loss(self, ctx, outputs, labels):
        prox = sum(((p - self.anchor[k]) ** 2).sum() for k, p in ctx.branch.named_parameters())
        return self.base.loss(ctx, outputs, labels) + 0.5 * prox

    def end(self, ctx):
        if ctx.part == ctx.parts - 1:  # a depth-wise client trains several parts a round: count the round once
            ctx.client_state["rounds"] = ctx.client_state.get("rounds", torch.tensor(0)) + 1


settings = functools.partial(shared_digits_settings, client_fraction=0.5)



def run(s, digits, network):
    return federate(copy.deepcopy(network), s, data=FederatedData(s, bundle=digits), report=False)


@pytest.mark.slow
def test_a_registered_aggregator_keeps_its_server_state_across_a_resume(digits, tmp_path):
    net = tiny_space().build(TINY_SAMPLE)
    plain = run(settings(), digits, net)
    straight = run(settings(aggregator="test-server-momentum"), digits, net)
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), straight.model.state_dict().values()))

    run(settings(aggregator="test-server-momentum", rounds=1, checkpoint_dir=str(tmp_path)), digits, net)
    saved = load_file(str(tmp_path / "server.safetensors"))
    assert saved and all(k.startswith("aggregator/") for k in saved)
    resumed = run(settings(aggregator="test-server-momentum", checkpoint_dir=str(tmp_path)), digits, net)
    assert [h["round"] for h in resumed.history] == [1, 2]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


@pytest.mark.slow
def test_a_registered_objective_sees_the_global_weights_and_keeps_client_state(digits, tmp_path):
    net = tiny_space().build(TINY_SAMPLE)
    s = settings(objective="test-proximal-counting", rounds=1, checkpoint_dir=str(tmp_path))
    first = run(s, digits, net)
    resumed = run(settings(objective="test-proximal-counting", checkpoint_dir=str(tmp_path)), digits, net)
    trained: dict[int, int] = {}
    for record in resumed.history:
        assert record["accepted"] == len(record["clients"]), record  # no client failed in the objective
        for task in record["clients"]:
            trained[task["client"]] = trained.get(task["client"], 0) + 1
    counts = {int(k.split("/")[1]): int(v) for k, v in load_file(str(tmp_path / "server.safetensors")).items()
              if k.startswith("client/") and k.endswith("/rounds")}
    assert counts == trained and sum(counts.values()) == 2 * 2  # 2 of 4 clients a round, 2 rounds, resumed after 1
    plain = run(settings(rounds=1), digits, net)
    assert first.history[-1]["total_loss"] != plain.history[-1]["total_loss"]  # the objective changed the training


@pytest.mark.slow
def test_a_registered_backend_is_chosen_by_name(digits):
    calls = []

    def logged_simulation(model, s, data, costs, on_record, **options):
        calls.append(s.rounds)
        return run_simulation(model, s, data, costs, on_record, **options)

    register_backend("test-logged-simulation", logged_simulation)
    net = tiny_space().build(TINY_SAMPLE)
    result = run(settings(rounds=1, backend="test-logged-simulation"), digits, net)
    reference = run(settings(rounds=1), digits, net)
    assert calls == [1]
    assert result.history[0]["exit_accuracy"] == reference.history[0]["exit_accuracy"]


@pytest.mark.parametrize("key", ["aggregator", "objective", "backend"])
def test_an_unknown_name_is_refused_naming_the_key_and_the_choices(key):
    with pytest.raises(ValueError, match=rf"^{key}: must be one of \[.*\], got 'nope'"):
        settings(**{key: "nope"})
