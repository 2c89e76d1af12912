"""The LSTM controller and its REINFORCE learner, on synthetic rewards."""

import io

import pytest
import torch

from nni_fedexit.search.controller import ControllerSettings, PolicyGradient

CHOICES = {f"stage{i}": ["resnet18", "resnet34", "resnet50", "resnet18-d1", "resnet50-d1"] for i in range(1, 5)}
PLANTED = {"stage1": "resnet34", "stage2": "resnet18", "stage3": "resnet50-d1", "stage4": "resnet18-d1"}


def planted_reward(sample):
    return sum(sample[k] == v for k, v in PLANTED.items()) / len(PLANTED)


def _train(pg, updates, batch=4):
    for _ in range(updates):
        samples = [pg.sample() for _ in range(batch)]
        pg.update(samples, [planted_reward(s) for s in samples])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_policy_finds_the_planted_choice_of_every_label(seed):
    pg = PolicyGradient(CHOICES, ControllerSettings(seed=seed))
    _train(pg, 100)
    assert pg.sample(greedy=True) == PLANTED
    probs = pg.probabilities()
    assert all(probs[label][value] > 0.5 for label, value in PLANTED.items())


def test_samples_follow_simplify_order_and_values():
    pg = PolicyGradient({"b": [1, 2], "a": ["x", "y", "z"]}, ControllerSettings(seed=0))
    s = pg.sample()
    assert list(s) == ["b", "a"] and s["b"] in (1, 2) and s["a"] in ("x", "y", "z")


def test_same_seed_same_samples():
    a, b = PolicyGradient(CHOICES, ControllerSettings(seed=5)), PolicyGradient(CHOICES, ControllerSettings(seed=5))
    assert [a.sample() for _ in range(10)] == [b.sample() for _ in range(10)]


def test_a_look_at_the_policy_with_another_generator_leaves_the_search_samples_as_they_were():
    """What the shared search's per-epoch report does: drawing paths with its own generator does not
    change what the learner samples next."""
    looked, untouched = (PolicyGradient(CHOICES, ControllerSettings(seed=5)) for _ in range(2))
    own = torch.Generator().manual_seed(0)
    drawn = [looked.sample(generator=own) for _ in range(8)]
    assert len({tuple(d.values()) for d in drawn}) > 1  # real draws from the policy, not the greedy path
    assert [looked.sample() for _ in range(10)] == [untouched.sample() for _ in range(10)]


def test_tanh_constant_bounds_the_probabilities():
    pg = PolicyGradient({"x": list(range(5))}, ControllerSettings(seed=0, tanh_constant=1.0, lr=0.2))
    for _ in range(200):
        pg.update([{"x": 0}], [1.0])
        pg.update([{"x": 1}], [0.0])
    top = max(pg.probabilities()["x"].values())
    bound = torch.tensor(1.0).exp() / (torch.tensor(1.0).exp() + 4 * torch.tensor(-1.0).exp())
    assert top <= float(bound) + 1e-6


def test_baseline_is_an_exponential_moving_average():
    pg = PolicyGradient({"x": [0, 1]}, ControllerSettings(seed=0, baseline_decay=0.5))
    pg.update([{"x": 0}], [1.0])  # first reward initialises the baseline
    assert pg.baseline == pytest.approx(1.0)
    pg.update([{"x": 1}], [0.0])
    assert pg.baseline == pytest.approx(0.5)
    assert pg.history[-1]["baseline"] == pytest.approx(1.0)  # advantage used the old baseline


def test_resumed_learner_ends_in_the_same_state():
    full = PolicyGradient(CHOICES, ControllerSettings(seed=3))
    _train(full, 20)

    first = PolicyGradient(CHOICES, ControllerSettings(seed=3))
    _train(first, 8)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # as NNI's checkpoint does
    buf.seek(0)
    resumed = PolicyGradient(CHOICES, ControllerSettings(seed=3))
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _train(resumed, 12)

    assert resumed.steps == full.steps == 20
    for (name, a), b in zip(full.controller.state_dict().items(), resumed.controller.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.baseline == full.baseline
    assert resumed.sample() == full.sample()


def test_state_of_another_space_is_refused():
    pg = PolicyGradient(CHOICES)
    other = PolicyGradient({"stage1": ["a", "b"]})
    with pytest.raises(ValueError, match="another search space"):
        other.load_state_dict(pg.state_dict())


def test_bad_inputs():
    pg = PolicyGradient({"x": [0, 1]})
    with pytest.raises(ValueError, match="finite"):
        pg.update([{"x": 0}], [float("nan")])
    with pytest.raises(ValueError, match="not in the controller's space"):
        pg.update([{"x": 7}], [1.0])
    with pytest.raises(ValueError, match="temperature"):
        ControllerSettings(temperature=0)
