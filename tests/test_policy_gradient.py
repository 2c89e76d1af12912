"""The controller's maths pinned to hand computations (nni_fedexit.search.controller): the policy's
logits (temperature, tanh bound), one LSTM rollout written out gate by gate, masking of exclusive
steps, nested labels, and the REINFORCE step (loss, advantage sign, EMA baseline over two steps,
entropy bonus, Adam's first step, the gradient clip). Fast unit tests, no NNI experiment.

Most tests plant the policy: every head's weight is zeroed and its bias set, so each step's logits
are the bias whatever the LSTM state, and the probabilities are a softmax computed here by hand.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import warnings

import nni
import pytest
import torch

from nni_fedexit.search.controller import ControllerSettings, LSTMController, PolicyGradient, RewardBatch
from nni_fedexit.search.decisions import Bins, Choice, Subset


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def entropy_of(ps: list[float]) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


def plant(pg: PolicyGradient, biases: list[list[float]]) -> None:
    """Each step's logits become ``biases[step]`` (before temperature and tanh), whatever the state."""
    with torch.no_grad():
        for head, bias in zip(pg.controller.heads, biases):
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))


def flat(**kwargs) -> ControllerSettings:
    """Settings whose logits are the heads' output as it is (no temperature, no tanh)."""
    return ControllerSettings(**{"hidden_size": 8, "tanh_constant": None, **kwargs})


def params_of(pg: PolicyGradient) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pg.controller.named_parameters()}


# ---- settings --------------------------------------------------------------------------------------


def test_settings_defaults_are_the_documented_ones():
    """hidden 64, no temperature, tanh 1.5, entropy weight 1e-4, baseline decay 0.9, lr 0.01, clip 5, seed 0."""
    assert dataclasses.asdict(ControllerSettings()) == {
        "hidden_size": 64, "temperature": None, "tanh_constant": 1.5, "entropy_weight": 1e-4,
        "baseline_decay": 0.9, "lr": 0.01, "grad_clip": 5.0, "seed": 0}


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 0, r"^hidden_size must be >= 1, got 0$"),
    ("temperature", 0, r"^temperature must be > 0, got 0$"),
    ("temperature", -1.0, r"^temperature must be > 0, got -1\.0$"),
    ("tanh_constant", 0, r"^tanh_constant must be > 0, got 0$"),
    ("tanh_constant", -2.5, r"^tanh_constant must be > 0, got -2\.5$"),
    ("baseline_decay", 1.0, r"^baseline_decay must be in \[0, 1\), got 1\.0$"),
    ("baseline_decay", -0.1, r"^baseline_decay must be in \[0, 1\), got -0\.1$"),
    ("lr", 0, r"^lr must be > 0, got 0$"),
    ("lr", -0.01, r"^lr must be > 0, got -0\.01$"),
])
def test_settings_refuse_values_outside_their_range_by_name(field, value, message):
    """Each setting's range is checked when the settings are built; the message names the setting."""
    with pytest.raises(ValueError, match=message):
        ControllerSettings(**{field: value})


def test_settings_accept_the_edges_of_their_ranges():
    """hidden 1, tiny positive temperature/tanh/lr, decay 0 and just under 1 are all valid."""
    for kwargs in ({"hidden_size": 1}, {"temperature": 1e-6}, {"tanh_constant": 1e-6}, {"baseline_decay": 0.0},
                   {"baseline_decay": 0.999}, {"lr": 1e-9}, {"temperature": None, "tanh_constant": None}):
        ControllerSettings(**kwargs)


# ---- the policy network ------------------------------------------------------------------------------


def test_controller_refuses_a_label_without_choices():
    """Every step needs at least one option, and there must be a step."""
    with pytest.raises(ValueError, match=r"^every label needs at least one choice, got \[\]$"):
        LSTMController([], ControllerSettings())
    with pytest.raises(ValueError, match=r"^every label needs at least one choice, got \[2, 0\]$"):
        LSTMController([2, 0], ControllerSettings())
    one = LSTMController([1], ControllerSettings(hidden_size=4))
    assert one(greedy=True)[0] == [0]


def test_controller_shapes_and_initial_weights():
    """A start vector, one LSTM cell, one embedding and one head per step; weights uniform in [-0.1, 0.1]."""
    torch.manual_seed(0)
    c = LSTMController([3, 5], ControllerSettings(hidden_size=6))
    assert c.groups == [None, None]
    assert c.start.shape == (1, 6)
    assert (c.lstm.input_size, c.lstm.hidden_size) == (6, 6)
    assert [tuple(e.weight.shape) for e in c.embeddings] == [(3, 6), (5, 6)]
    assert [(h.in_features, h.out_features) for h in c.heads] == [(6, 3), (6, 5)]
    values = torch.cat([p.detach().flatten() for p in c.parameters()])
    assert values.abs().max() <= 0.1 and values.min() < -0.09 and values.max() > 0.09
    assert LSTMController([2, 2], ControllerSettings(hidden_size=2), groups=(0, 0)).groups == [0, 0]


@pytest.mark.parametrize("temperature, tanh_constant, logits", [
    (None, None, [2.0, 0.0, -1.0]),
    (2.0, None, [1.0, 0.0, -0.5]),
    (None, 1.5, [1.5 * math.tanh(2.0), 0.0, 1.5 * math.tanh(-1.0)]),
    (4.0, 2.5, [2.5 * math.tanh(0.5), 0.0, 2.5 * math.tanh(-0.25)]),
])
def test_logits_are_divided_by_the_temperature_then_bounded_by_tanh(temperature, tanh_constant, logits):
    """p = softmax(tanh_constant * tanh(head / temperature)), each transform only when it is set."""
    pg = PolicyGradient({"x": ["a", "b", "c"]},
                        ControllerSettings(hidden_size=8, temperature=temperature, tanh_constant=tanh_constant))
    plant(pg, [[2.0, 0.0, -1.0]])
    probs = pg.probabilities()["x"]
    assert list(probs) == ["a", "b", "c"]
    assert list(probs.values()) == pytest.approx(softmax(logits), abs=1e-6)


def test_tanh_bounds_the_most_probable_choice_however_large_the_logits():
    """With tanh_constant c, no choice of n gets more than e^c / (e^c + (n - 1) e^-c)."""
    pg = PolicyGradient({"x": list(range(5))}, ControllerSettings(hidden_size=8, tanh_constant=1.0))
    plant(pg, [[100.0, -100.0, -100.0, -100.0, -100.0]])
    top = math.e / (math.e + 4 / math.e)
    assert max(pg.probabilities()["x"].values()) == pytest.approx(top, abs=1e-6)


def lstm_rollout(pg: PolicyGradient, actions: list[int | None]) -> tuple[float, float, list[list[float] | None]]:
    """The ENAS rollout written out: the start vector, then the embedding of the previous decision,
    through LSTM gates i, f, g, o; logits / temperature, then tanh_constant * tanh. Returns the summed
    log-probability and entropy and each step's probabilities (None steps are left out)."""
    c = pg.controller
    s = pg.settings
    w_ih, w_hh, b_ih, b_hh = (t.detach() for t in (c.lstm.weight_ih, c.lstm.weight_hh, c.lstm.bias_ih, c.lstm.bias_hh))
    h = torch.zeros(1, s.hidden_size)
    cell = torch.zeros(1, s.hidden_size)
    x = c.start.detach()
    log_prob, entropy, probs = 0.0, 0.0, []
    for step, a in enumerate(actions):
        if a is None:
            probs.append(None)
            continue
        i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(cell)
        logits = (h @ c.heads[step].weight.detach().T + c.heads[step].bias.detach())[0]
        if s.temperature is not None:
            logits = logits / s.temperature
        if s.tanh_constant is not None:
            logits = s.tanh_constant * torch.tanh(logits)
        p = softmax([float(v) for v in logits])
        log_prob += math.log(p[a])
        entropy += entropy_of(p)
        probs.append(p)
        x = c.embeddings[step].weight.detach()[a:a + 1]
    return log_prob, entropy, probs


def scaled(pg: PolicyGradient, factor: float = 20.0) -> PolicyGradient:
    """Blow the small initial weights up so that every input of the rollout visibly matters."""
    with torch.no_grad():
        for p in pg.controller.parameters():
            p.mul_(factor)
    return pg


SPACE = {"a": ["x", "y", "z"], "b": [1, 2], "c": ["p", "q", "r", "s"]}


@pytest.mark.parametrize("settings", [
    ControllerSettings(hidden_size=8, seed=1),
    ControllerSettings(hidden_size=8, seed=2, temperature=3.0, tanh_constant=2.5),
    ControllerSettings(hidden_size=8, seed=3, tanh_constant=None),
])
def test_a_replayed_rollout_equals_the_lstm_written_out(settings):
    """log pi(a), the entropy and each step's probabilities of a replay match the rollout by hand."""
    pg = scaled(PolicyGradient(SPACE, settings))
    sample = {"a": "z", "b": 1, "c": "q"}
    log_prob, entropy, probs = lstm_rollout(pg, [2, 0, 1])
    assert pg.log_prob(sample).item() == pytest.approx(log_prob, abs=1e-5)
    assert pg.entropy(sample) == pytest.approx(entropy, abs=1e-5)
    actions, lp, ent, step_probs = pg.controller(actions=[2, 0, 1])
    assert actions == [2, 0, 1] and lp.item() == pytest.approx(log_prob, abs=1e-5)
    assert ent.item() == pytest.approx(entropy, abs=1e-5)
    for got, want in zip(step_probs, probs):
        assert got.tolist() == pytest.approx(want, abs=1e-6)
    # another first decision changes what the later steps see
    assert pg.log_prob({"a": "x", "b": 1, "c": "q"}).item() == pytest.approx(lstm_rollout(pg, [0, 0, 1])[0], abs=1e-5)


def test_greedy_follows_the_most_probable_option_of_each_step():
    """greedy: the argmax at every step, along the path it takes; probabilities() are those of that path."""
    pg = scaled(PolicyGradient(SPACE, ControllerSettings(hidden_size=8, seed=4)))
    path = []
    for step in range(3):
        probs = lstm_rollout(pg, path + [0])[2][step]
        path.append(max(range(len(probs)), key=probs.__getitem__))
    assert pg.sample(greedy=True) == {label: SPACE[label][a] for label, a in zip(SPACE, path)}
    _, _, probs = lstm_rollout(pg, path)
    shown = pg.probabilities()
    assert list(shown) == ["a", "b", "c"] and list(shown["c"]) == ["p", "q", "r", "s"]
    for label, p in zip(SPACE, probs):
        assert list(shown[label].values()) == pytest.approx(p, abs=1e-6)
    assert pg.entropy() == pytest.approx(lstm_rollout(pg, path)[1], abs=1e-5)


def test_draws_follow_the_policy_probabilities():
    """Sampling is a categorical draw from the step's probabilities (seeded, reproducible)."""
    pg = PolicyGradient({"x": ["a", "b", "c"]}, flat())
    plant(pg, [[math.log(0.7), math.log(0.2), math.log(0.1)]])
    draws = [pg.sample()["x"] for _ in range(1500)]
    assert [draws.count(v) / len(draws) for v in "abc"] == pytest.approx([0.7, 0.2, 0.1], abs=0.035)
    again = PolicyGradient({"x": ["a", "b", "c"]}, flat())
    plant(again, [[math.log(0.7), math.log(0.2), math.log(0.1)]])
    assert [again.sample()["x"] for _ in range(50)] == draws[:50]
    g = torch.Generator().manual_seed(7)
    actions = [pg.controller(generator=g)[0][0] for _ in range(60)]  # the network itself samples by default
    assert set(actions) == {0, 1, 2}


def test_sampling_with_another_generator_leaves_the_learners_own():
    """sample(generator=g) draws with g: g moves, the learner's own generator does not."""
    pg = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, seed=3))
    own = pg.generator.get_state()
    g = torch.Generator().manual_seed(11)
    drawn = [pg.sample(generator=g) for _ in range(20)]
    assert torch.equal(pg.generator.get_state(), own)
    g2 = torch.Generator().manual_seed(11)
    assert [pg.sample(generator=g2) for _ in range(20)] == drawn
    assert len({tuple(d.values()) for d in drawn}) > 3


def test_greedy_sample_of_a_continuous_label_is_the_middle_of_its_bin():
    """greedy draws nothing: a Bins label's value is the middle of the most probable bin."""
    pg = PolicyGradient({"lr": Bins("lr", nni.uniform("lr", 0.0, 1.0), bins=4)}, flat())
    plant(pg, [[0.0, 0.0, 3.0, 0.0]])
    own = pg.generator.get_state()
    assert pg.sample(greedy=True) == {"lr": pytest.approx(0.625)}
    assert torch.equal(pg.generator.get_state(), own)
    draws = {pg.sample()["lr"] for _ in range(30)}
    assert len(draws) == 30 and all(0.0 <= v < 1.0 for v in draws)


# ---- exclusive steps (Subset of n_chosen) -----------------------------------------------------------


def test_an_exclusive_step_renormalises_over_the_options_not_taken():
    """Subset(n_chosen=2): step 2 masks step 1's pick; log pi and entropy use the renormalised step."""
    pg = PolicyGradient({"in": Subset("in", ["x", "y", "z"], 2)}, flat())
    bias = [math.log(0.5), math.log(0.3), math.log(0.2)]
    plant(pg, [bias, bias])
    first = [0.5, 0.3, 0.2]
    second = [0.0, 0.3 / 0.5, 0.2 / 0.5]  # x taken
    assert pg.log_prob({"in": ["x", "z"]}).item() == pytest.approx(math.log(0.5) + math.log(0.4), abs=1e-6)
    assert pg.entropy({"in": ["x", "z"]}) == pytest.approx(entropy_of(first) + entropy_of(second), abs=1e-6)
    _, _, _, probs = pg.controller(actions=[0, 2])
    assert probs[1].tolist() == pytest.approx(second, abs=1e-6)
    draws = [pg.sample()["in"] for _ in range(300)]
    assert all(len(set(d)) == 2 for d in draws)
    assert {tuple(d) for d in draws} == {(a, b) for a in "xyz" for b in "xyz" if a != b}


def test_exclusive_steps_of_different_labels_do_not_mask_each_other():
    """The mask is per label: a second label may take the option the first one took."""
    pg = PolicyGradient({"a": Subset("a", ["x", "y"], 1), "b": Subset("b", ["x", "y"], 1)}, flat())
    plant(pg, [[0.0, 0.0], [0.0, 0.0]])
    assert pg.log_prob({"a": ["x"], "b": ["x"]}).item() == pytest.approx(2 * math.log(0.5), abs=1e-6)
    assert pg.entropy({"a": ["x"], "b": ["x"]}) == pytest.approx(2 * math.log(2), abs=1e-6)


def test_an_include_or_skip_subset_is_not_exclusive():
    """Subset(n_chosen=None): independent 2-option steps, named label/candidate."""
    pg = PolicyGradient({"any": Subset("any", ["x", "y"], None)}, flat())
    plant(pg, [[0.0, math.log(3)], [math.log(3), 0.0]])
    assert pg.probabilities() == {"any/x": {"skip": pytest.approx(0.25), "include": pytest.approx(0.75)},
                                  "any/y": {"skip": pytest.approx(0.75), "include": pytest.approx(0.25)}}
    assert pg.sample(greedy=True) == {"any": ["x"]}
    assert pg.log_prob({"any": ["x", "y"]}).item() == pytest.approx(math.log(0.75 * 0.25), abs=1e-6)


# ---- nested labels ---------------------------------------------------------------------------------------


def nested_space() -> dict:
    child = Choice("model/0/depth", [1, 2, 3])
    child.parent = ("model", 0)
    return {"model": ["cnn", "mlp"], "model/0/depth": child, "act": ["relu", "tanh"]}


def test_a_nested_label_takes_a_step_only_under_its_parent_option():
    """The child is decided (an LSTM step, a log-probability term) only when the parent took its option;
    the next label then follows the last step taken."""
    pg = scaled(PolicyGradient(nested_space(), ControllerSettings(hidden_size=8, seed=5)))
    under = {"model": "cnn", "model/0/depth": 3, "act": "tanh"}
    assert pg.log_prob(under).item() == pytest.approx(lstm_rollout(pg, [0, 2, 1])[0], abs=1e-5)
    other = {"model": "mlp", "act": "tanh"}
    assert pg.log_prob(other).item() == pytest.approx(lstm_rollout(pg, [1, None, 1])[0], abs=1e-5)
    assert pg.entropy(other) == pytest.approx(lstm_rollout(pg, [1, None, 1])[1], abs=1e-5)
    unplanted = PolicyGradient(nested_space(), flat())
    draws = [unplanted.sample() for _ in range(60)]
    assert all(("model/0/depth" in d) == (d["model"] == "cnn") for d in draws)
    assert {d["model"] for d in draws} == {"cnn", "mlp"}


def test_probabilities_show_a_nested_label_only_on_the_greedy_path_through_its_parent():
    """probabilities() walks the greedy path: the child is listed iff the greedy parent is its option."""
    pg = PolicyGradient(nested_space(), flat())
    plant(pg, [[0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0]])
    assert list(pg.probabilities()) == ["model", "act"]
    assert pg.sample(greedy=True) == {"model": "mlp", "act": "relu"}
    plant(pg, [[1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0]])
    probs = pg.probabilities()
    assert list(probs) == ["model", "model/0/depth", "act"]
    assert list(probs["model/0/depth"].values()) == pytest.approx(softmax([0.0, 2.0, 0.0]), abs=1e-6)
    assert pg.sample(greedy=True) == {"model": "cnn", "model/0/depth": 2, "act": "relu"}


def test_a_sample_that_breaks_the_nesting_is_refused():
    """A child given where its parent leaves it out, or missing where it is needed, is not in the space."""
    pg = PolicyGradient(nested_space(), flat())
    message = (r"^label 'model/0/depth' is given where its parent choice leaves it out, "
               r"or missing where it is needed$")
    for bad in ({"model": "mlp", "model/0/depth": 1, "act": "relu"}, {"model": "cnn", "act": "relu"}):
        assert not pg.contains(bad)
        with pytest.raises(ValueError, match=message):
            pg.log_prob(bad)
        with pytest.raises(ValueError, match=message):
            pg.update([bad], [1.0])
    assert pg.contains({"model": "mlp", "act": "relu"})
    assert pg.contains({"model": "cnn", "model/0/depth": 2, "act": "relu"})
    assert not pg.contains({"model": "cnn", "model/0/depth": 7, "act": "relu"})
    assert not pg.contains({"model": "mlp"})


def test_a_child_whose_parent_comes_later_or_takes_no_step_is_never_decided():
    """The parent's decision must come before the child's step, and be a step at all."""
    late = Choice("child", [1, 2])
    late.parent = ("model", 0)
    pg = PolicyGradient({"child": late, "model": ["cnn", "mlp"]}, flat())
    assert all("child" not in pg.sample() for _ in range(20))
    stepless = Choice("child", [1, 2])
    stepless.parent = ("none", 0)
    pg = PolicyGradient({"none": Subset("none", [1, 2], 0), "op": ["a", "b"], "child": stepless}, flat())
    assert all(s == {"none": [], "op": s["op"]} for s in (pg.sample() for _ in range(30)))
    assert all("child" not in pg.sample_uniform() for _ in range(30))


def test_uniform_samples_respect_the_nesting_and_cover_the_space():
    """sample_uniform draws every label uniformly with the learner's generator; a child only under its parent."""
    pg = PolicyGradient(nested_space(), flat(seed=2))
    draws = [pg.sample_uniform() for _ in range(400)]
    assert all(("model/0/depth" in d) == (d["model"] == "cnn") for d in draws)
    cnn = [d for d in draws if d["model"] == "cnn"]
    assert len(cnn) / len(draws) == pytest.approx(0.5, abs=0.07)
    assert sorted({d["model/0/depth"] for d in cnn}) == [1, 2, 3]
    assert {d["act"] for d in draws} == {"relu", "tanh"}
    again = PolicyGradient(nested_space(), flat(seed=2))
    assert [again.sample_uniform() for _ in range(400)] == draws


def test_uniform_samples_of_every_label_kind():
    """A stepless subset is empty, exclusive picks never repeat, bins draw inside their range."""
    pg = PolicyGradient({"none": Subset("none", [1, 2], 0), "in": Subset("in", ["x", "y", "z"], 2),
                         "lr": Bins("lr", nni.uniform("lr", 0.0, 1.0), bins=4), "op": ["a", "b"]}, flat())
    draws = [pg.sample_uniform() for _ in range(200)]
    assert all(list(d) == ["none", "in", "lr", "op"] and d["none"] == [] for d in draws)
    assert all(len(set(d["in"])) == 2 for d in draws) and len({tuple(d["in"]) for d in draws}) == 6
    assert len({d["lr"] for d in draws}) == 200 and all(0.0 <= d["lr"] < 1.0 for d in draws)
    assert {d["op"] for d in draws} == {"a", "b"}


# ---- the space the learner holds -----------------------------------------------------------------------


def test_labels_values_and_steps_of_a_mixed_space():
    """Labels become strings in order; values lists the candidates of categorical labels only."""
    pg = PolicyGradient({1: ["a", "b"], "in": Subset("in", [0, 1, 2], 2),
                         "lr": Bins("lr", nni.uniform("lr", 0.0, 1.0), bins=4)}, ControllerSettings(hidden_size=4))
    assert pg.labels == ["1", "in", "lr"]
    assert pg.values == {"1": ["a", "b"], "in": [0, 1, 2]}
    assert isinstance(pg.decisions["1"], Choice) and pg.decisions["1"].label == "1"
    assert [len(h.bias) for h in pg.controller.heads] == [2, 3, 3, 4]
    assert pg.controller.groups == [None, 1, 1, None]
    assert pg.baseline is None and pg.steps == 0 and pg.history == []
    assert pg.sample(greedy=True)["1"] in ("a", "b")


def test_a_space_without_steps_is_refused():
    """No labels, or only labels that take no step: nothing to search."""
    for space in ({}, {"none": Subset("none", [1, 2], 0)}):
        with pytest.raises(ValueError, match=r"^the search space has no choices to search$"):
            PolicyGradient(space)


def test_a_sample_outside_the_space_is_refused_naming_the_label():
    """A missing label or a value the label cannot take: the message names the sample and the label."""
    pg = PolicyGradient({"x": [0, 1], "none": Subset("none", [1, 2], 0)}, flat())
    with pytest.raises(ValueError, match=r"^sample \{\} is not in the controller's space: label 'x': 'x'$"):
        pg.log_prob({})
    with pytest.raises(ValueError, match=(r"^sample \{'x': 7\} is not in the controller's space: label 'x': "
                                          r"7 is not one of \[0, 1\]$")):
        pg.log_prob({"x": 7})
    assert pg.contains({"x": 1}) and pg.contains({"x": 1, "none": []}) and not pg.contains({"x": 2})
    assert pg.log_prob({"x": 1}).item() == pg.log_prob({"x": 1, "none": []}).item()


def test_the_seed_fixes_the_initial_policy_without_touching_the_global_generator():
    """Same seed, same weights and draws; another seed, other weights; torch's global RNG is left alone."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, seed=9))
    assert torch.equal(torch.rand(3), expected)
    b = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, seed=9))
    c = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, seed=10))
    for (name, p), q, r in zip(a.controller.named_parameters(), b.controller.parameters(), c.controller.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, r), name
    assert a.generator.initial_seed() == 9
    assert [a.sample() for _ in range(10)] == [b.sample() for _ in range(10)]


# ---- REINFORCE ----------------------------------------------------------------------------------------------


def test_update_refuses_mismatched_empty_or_non_finite_rewards():
    """As many rewards as samples, at least one, all finite."""
    pg = PolicyGradient({"x": [0, 1]}, flat())
    message = r"^update needs as many rewards as samples, and at least one$"
    with pytest.raises(ValueError, match=message):
        pg.update([], [])
    with pytest.raises(ValueError, match=message):
        pg.update([{"x": 0}], [1.0, 2.0])
    with pytest.raises(ValueError, match=message):
        pg.update([{"x": 0}, {"x": 1}], [1.0])
    with pytest.raises(ValueError, match=r"^rewards must be finite, got \[1\.0, nan\]$"):
        pg.update([{"x": 0}, {"x": 1}], [1, float("nan")])
    with pytest.raises(ValueError, match=r"^rewards must be finite, got \[-inf\]$"):
        pg.update([{"x": 0}], [float("-inf")])
    assert pg.steps == 0 and pg.baseline is None


def test_baseline_starts_at_the_first_batch_mean_then_moves_as_an_ema_of_each_reward():
    """Two updates, decay 0.9, computed by hand: b0 = mean; b <- 0.9 b + 0.1 r per reward, in order;
    each update's advantage uses the baseline from before it."""
    pg = PolicyGradient({"x": [0, 1]}, flat())
    first = pg.update([{"x": 0}, {"x": 1}], [1.0, 0.0])
    assert first["baseline"] == pytest.approx(0.5)
    b = 0.5
    b = 0.9 * b + 0.1 * 1.0  # 0.55
    b = 0.9 * b + 0.1 * 0.0  # 0.495
    assert pg.baseline == pytest.approx(0.495) == pytest.approx(b)
    second = pg.update([{"x": 1}], [2.0])
    assert second["baseline"] == pytest.approx(0.495)
    assert pg.baseline == pytest.approx(0.9 * 0.495 + 0.1 * 2.0)  # 0.6455
    assert [h["baseline"] for h in pg.history] == pytest.approx([0.5, 0.495])
    assert [h["step"] for h in pg.history] == [1, 2] and pg.steps == 2


def test_baseline_decay_zero_follows_the_last_reward():
    """decay 0: the baseline is the last reward of the previous batch."""
    pg = PolicyGradient({"x": [0, 1]}, flat(baseline_decay=0.0))
    pg.update([{"x": 0}, {"x": 1}], [3.0, 1.0])
    assert pg.baseline == 1.0
    assert pg.update([{"x": 0}], [5.0])["baseline"] == 1.0 and pg.baseline == 5.0


def test_update_stats_and_loss_are_the_reinforce_objective_by_hand():
    """loss = mean_i[-(r_i - b) log pi(a_i) - w H(pi)], with p = (0.75, 0.25), b = mean reward, w = 0.1."""
    pg = PolicyGradient({"x": ["a", "b"]}, flat(entropy_weight=0.1))
    plant(pg, [[math.log(3.0), 0.0]])
    h = entropy_of([0.75, 0.25])
    rewards = [1.0, 0.0, 0.5]
    b = sum(rewards) / 3
    loss = (-(1.0 - b) * math.log(0.75) - (0.0 - b) * math.log(0.25) - (0.5 - b) * math.log(0.25) - 3 * 0.1 * h) / 3
    stats = pg.update([{"x": "a"}, {"x": "b"}, {"x": "b"}], rewards)
    assert stats == {"step": 1, "mean_reward": pytest.approx(0.5), "max_reward": 1.0, "baseline": pytest.approx(0.5),
                     "entropy": pytest.approx(h, abs=1e-6), "loss": pytest.approx(loss, abs=1e-6)}
    assert pg.history == [stats]


def test_a_positive_advantage_raises_the_log_probability_and_a_negative_one_lowers_it():
    """The gradient step moves pi(a) up for the better-than-baseline sample and down for the worse one."""
    pg = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, entropy_weight=0.0, seed=1))
    good, bad = {"a": "x", "b": 1, "c": "p"}, {"a": "z", "b": 2, "c": "s"}
    before = pg.log_prob(good).item(), pg.log_prob(bad).item()
    pg.update([good, bad], [1.0, 0.0])  # baseline 0.5: advantages +0.5 and -0.5
    assert pg.log_prob(good).item() > before[0] + 0.01
    assert pg.log_prob(bad).item() < before[1] - 0.01
    # a learner that already holds a baseline (0.45) takes the advantage against it: 0.4 is negative
    resumed = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, entropy_weight=0.0, seed=1))
    resumed.baseline = 0.45
    resumed.update([good], [0.4])
    assert resumed.log_prob(good).item() < before[0] - 0.01
    assert resumed.history[-1]["baseline"] == 0.45


def test_zero_advantage_and_no_entropy_weight_leaves_the_policy_as_it_was():
    """A first batch of one: the baseline is its reward, the advantage 0; with w = 0 nothing moves."""
    pg = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, entropy_weight=0.0))
    before = params_of(pg)
    pg.update([{"a": "x", "b": 1, "c": "p"}], [0.7])
    assert all(torch.equal(before[k], v) for k, v in params_of(pg).items())


def test_the_entropy_bonus_raises_the_entropy():
    """With zero advantage the step only follows +w H: the policy becomes less decided."""
    pg = PolicyGradient({"x": ["a", "b", "c"]}, flat(entropy_weight=1.0, lr=0.05))
    plant(pg, [[2.0, 0.0, -1.0]])
    before = pg.entropy({"x": "a"})
    pg.update([{"x": "a"}], [1.0])
    assert pg.entropy({"x": "a"}) > before + 0.01


def test_the_first_step_is_adams_lr_times_the_sign_of_the_gradient():
    """Adam's first step is lr * g / (|g| + eps): every parameter with a real gradient moves by lr."""
    pg = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, lr=0.05, grad_clip=None, entropy_weight=0.0))
    before = params_of(pg)
    pg.update([{"a": "x", "b": 1, "c": "p"}, {"a": "y", "b": 2, "c": "q"}], [1.0, 0.0])
    moved = torch.cat([(v - before[k]).abs().flatten() for k, v in params_of(pg).items()])
    assert moved.max().item() == pytest.approx(0.05, rel=1e-3)
    assert (moved > 0.049).sum() > 100


def test_the_gradient_clip_bounds_the_step():
    """The clip scales the gradient to norm grad_clip before Adam: a tiny clip against Adam's eps
    leaves a step far smaller than lr."""
    pg = PolicyGradient(SPACE, ControllerSettings(hidden_size=8, lr=0.05, grad_clip=1e-12, entropy_weight=0.0))
    before = params_of(pg)
    pg.update([{"a": "x", "b": 1, "c": "p"}, {"a": "y", "b": 2, "c": "q"}], [1.0, 0.0])
    moved = torch.cat([(v - before[k]).abs().flatten() for k, v in params_of(pg).items()])
    assert 0 < moved.max().item() < 0.05 * 1e-3


def test_a_step_that_did_not_use_a_head_leaves_it_alone():
    """Gradients are cleared to None between updates: Adam's momentum does not move a head the batch
    did not reach (here the nested child's, when the parent took the other option)."""
    pg = PolicyGradient(nested_space(), flat())
    pg.update([{"model": "cnn", "model/0/depth": 1, "act": "relu"}, {"model": "mlp", "act": "tanh"}], [1.0, 0.0])
    child = pg.controller.heads[1].weight.detach().clone()
    pg.update([{"model": "mlp", "act": "relu"}, {"model": "mlp", "act": "tanh"}], [1.0, 0.0])
    assert torch.equal(pg.controller.heads[1].weight, child)


# ---- checkpoints ----------------------------------------------------------------------------------------------


def test_state_holds_everything_a_resume_needs_and_copies_it():
    """state_dict: settings, labels, identities, weights, optimiser, generator, baseline, steps, history."""
    pg = PolicyGradient({"x": [0, 1], "in": Subset("in", ["a", "b"], None)}, flat(seed=3))
    pg.update([{"x": 0, "in": ["a"]}, {"x": 1, "in": []}], [1.0, 0.5])
    state = pg.state_dict()
    assert set(state) == {"settings", "labels", "values", "controller", "optimizer", "generator", "baseline",
                          "steps", "history"}
    assert state["settings"] == dataclasses.asdict(pg.settings) and state["settings"]["seed"] == 3
    assert state["labels"] == ["x", "in"]
    assert state["values"] == {"x": ["0", "1"], "in": ["n_chosen=None", "'a'", "'b'"]}
    assert state["baseline"] == pg.baseline and state["steps"] == 1
    state["history"][0]["step"] = 99
    state["labels"].append("y")
    assert pg.history[0]["step"] == 1 and pg.labels == ["x", "in"]

    other = PolicyGradient({"x": [0, 1], "in": Subset("in", ["a", "b"], None)}, flat(seed=8))
    buffer = io.BytesIO()
    torch.save(pg.state_dict(), buffer)  # as a checkpoint does
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved["steps"] = 1.0
    other.load_state_dict(saved)
    assert other.steps == 1 and type(other.steps) is int and other.baseline == pg.baseline
    assert other.history == pg.history
    saved["history"][0]["step"] = 42
    assert other.history[0]["step"] == 1
    assert [other.sample() for _ in range(5)] == [pg.sample() for _ in range(5)]
    other.update([{"x": 0, "in": ["b"]}], [0.3])
    pg.update([{"x": 0, "in": ["b"]}], [0.3])
    for (name, p), q in zip(pg.controller.named_parameters(), other.controller.parameters()):
        assert torch.equal(p, q), name


def test_state_of_another_space_is_refused_naming_both_label_lists():
    """Other labels, or the same labels with other values: refused."""
    pg = PolicyGradient({"x": [0, 1]}, flat())
    with pytest.raises(ValueError, match=(r"^controller state is for another search space: saved labels \['y'\], "
                                          r"this space \['x'\]$")):
        pg.load_state_dict(PolicyGradient({"y": [0, 1]}, flat()).state_dict())
    with pytest.raises(ValueError, match=r"saved labels \['x'\], this space \['x'\]$"):
        pg.load_state_dict(PolicyGradient({"x": [0, 2]}, flat()).state_dict())


# ---- the batch of rewarded samples -----------------------------------------------------------------------------


def test_reward_batch_steps_once_per_size_samples_and_starts_again():
    """add() returns None until size samples wait, then the learner's stats; pending then empties."""
    pg = PolicyGradient({"x": [0, 1]}, flat())
    batch = RewardBatch(2)
    assert batch.size == 2 and len(batch) == 0
    sample = {"x": 0}
    assert batch.add(pg, sample, 1) is None
    sample["x"] = 1  # the batch kept its own copy
    assert len(batch) == 1 and batch.state() == [[{"x": 0}, 1.0]] and type(batch.state()[0][1]) is float
    stats = batch.add(pg, {"x": 1}, 0.0)
    assert stats["step"] == 1 and stats["mean_reward"] == pytest.approx(0.5) and pg.steps == 1
    assert len(batch) == 0 and batch.state() == []
    assert batch.add(pg, {"x": 1}, 0.2) is None and pg.steps == 1


def test_reward_batch_state_reloads_and_clears():
    """state() / load_state() keep the waiting pairs as plain values; clear() drops them."""
    batch = RewardBatch(3)
    batch.load_state([[{"x": 0}, 1], ({"x": 1}, "0.5")])
    assert batch.pending == [({"x": 0}, 1.0), ({"x": 1}, 0.5)] and len(batch) == 2
    saved = batch.state()
    saved[0][0]["x"] = 9
    assert batch.pending[0][0] == {"x": 0}
    pg = PolicyGradient({"x": [0, 1]}, flat())
    assert batch.add(pg, {"x": 0}, 0.0)["mean_reward"] == pytest.approx(0.5)
    batch.load_state([[{"x": 0}, 1.0]])
    batch.clear()
    assert len(batch) == 0


def test_reward_batch_size_must_be_a_positive_integer():
    """samples_per_update: an int >= 1."""
    assert RewardBatch(1).size == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"^samples_per_update: expected a positive integer, got "):
            RewardBatch(bad)


def test_reward_batch_logs_each_step_to_its_owners_logger(caplog):
    """Each controller step is logged on the owner's logger (the module's own when none is given)."""
    pg = PolicyGradient({"x": [0, 1]}, flat())
    owner = logging.getLogger("test.owner")
    with caplog.at_level(logging.INFO):
        RewardBatch(1, owner).add(pg, {"x": 0}, 1.0)
        RewardBatch(1).add(pg, {"x": 1}, 0.0)
    steps = [(r.name, r.getMessage()) for r in caplog.records if "controller step" in r.getMessage()]
    assert [name for name, _ in steps] == ["test.owner", "nni_fedexit.search.controller"]
    assert steps[0][1].startswith("[controller step 1] mean reward 1.0000, baseline 1.0000, entropy ")


def test_a_replay_must_give_every_step():
    """The network refuses a replay with a hole in it, naming the step."""
    pg = PolicyGradient(SPACE, ControllerSettings(hidden_size=8))
    with pytest.raises(ValueError, match=r"^replayed actions lack step 1$"):
        pg.controller(actions=[0, None, 1])


def test_sampling_and_learning_raise_no_warnings():
    """A search's log stays clean: rollouts, draws and a step emit no (deprecation) warnings."""
    pg = PolicyGradient({"in": Subset("in", ["x", "y", "z"], 2), **SPACE}, ControllerSettings(hidden_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = [pg.sample() for _ in range(2)]
        pg.update(samples, [1.0, 0.0])
        pg.probabilities()
        pg.entropy()
