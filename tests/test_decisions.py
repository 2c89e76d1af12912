"""How each kind of NNI label becomes controller steps (nni_fedexit.search.decisions), and the
controller over them: draws stay in the space, values map back to their actions, state reloads."""

import io

import pytest
import torch

import nni
from nni.mutable import CategoricalMultiple, Numerical

from nni_fedexit.search.controller import ControllerSettings, PolicyGradient
from nni_fedexit.search.decisions import Bins, Choice, Subset


def test_bins_of_a_continuous_label_sample_its_distribution_and_map_back_to_their_bin():
    lr = Bins("lr", nni.loguniform("lr", 1e-4, 1e-1), bins=4)
    g = torch.Generator().manual_seed(0)
    edges = [1e-4 * 10 ** (0.75 * i) for i in range(5)]  # quartiles of a log-uniform
    for a in range(4):
        values = [lr.value([a], g) for _ in range(50)]
        assert all(edges[a] * (1 - 1e-9) <= v <= edges[a + 1] * (1 + 1e-9) for v in values)
        assert all(lr.actions(v) == [a] for v in values)
    with pytest.raises(ValueError, match="outside"):
        lr.actions(0.5)


def test_a_small_quantised_grid_is_a_choice_of_its_values_as_nni_rounds_and_clips_them():
    a = Bins("a", nni.quniform("a", 1, 3, 0.75), bins=8)
    assert a.grid == [1, 1.5, 2.25, 3]  # qclip: round(x / q) * q, clipped to [1, 3]
    assert [a.value([i], None) for i in range(4)] == a.grid
    with pytest.raises(ValueError, match="not one of the values"):
        a.actions(2.0)
    wide = Bins("w", nni.quniform("w", 0, 100, 1), bins=8)  # 101 values: bins of the range
    g = torch.Generator().manual_seed(0)
    assert wide.grid is None and all(float(wide.value([3], g)).is_integer() for _ in range(20))


def test_normal_bins_never_draw_infinity():
    n = Bins("n", Numerical(mu=0.0, sigma=1.0, label="n"), bins=8)
    g = torch.Generator().manual_seed(0)
    assert all(abs(n.value([a], g)) < 10 for a in (0, 7) for _ in range(200))


def test_a_subset_of_n_chosen_inputs_never_repeats_one_and_any_subset_is_include_or_skip():
    pick2 = Subset("in", ["x", "y", "z"], n_chosen=2)
    pg = PolicyGradient({"in": pick2, "any": Subset("any", [0, 1, 2], None)}, ControllerSettings(seed=0))
    draws = [pg.sample() for _ in range(200)]
    assert all(len(d["in"]) == 2 and len(set(d["in"])) == 2 for d in draws)
    assert {tuple(sorted(d["in"])) for d in draws} == {("x", "y"), ("x", "z"), ("y", "z")}
    assert {len(d["any"]) for d in draws} == {0, 1, 2, 3}
    mutable = CategoricalMultiple(["x", "y", "z"], n_chosen=2, label="in")
    assert all(mutable.check_contains({"in": d["in"]}) is None for d in draws)
    with pytest.raises(ValueError, match="repeats"):
        pick2.actions(["x", "x"])


def test_learning_raises_the_probability_of_the_rewarded_subset_and_bin():
    pg = PolicyGradient({"in": Subset("in", ["x", "y", "z"], n_chosen=1),
                         "lr": Bins("lr", nni.uniform("lr", 0.0, 1.0), bins=4)},
                        ControllerSettings(seed=0, lr=0.1))
    good = {"in": ["z"], "lr": 0.9}
    before = pg.log_prob(good).item()
    for _ in range(30):
        batch = [pg.sample() for _ in range(4)]
        pg.update(batch, [1.0 if s["in"] == ["z"] and s["lr"] >= 0.75 else 0.0 for s in batch])
    assert pg.log_prob(good).item() > before + 1.0


def test_a_nested_label_is_decided_only_under_its_parent_option():
    child = Choice("model/0/depth", [1, 2, 3])
    child.parent = ("model", 0)
    pg = PolicyGradient({"model": ["cnn", "mlp"], "model/0/depth": child}, ControllerSettings(seed=0))
    draws = [pg.sample() for _ in range(50)]
    assert all(("model/0/depth" in d) == (d["model"] == "cnn") for d in draws)
    assert not pg.contains({"model": "mlp", "model/0/depth": 1}) and pg.contains({"model": "mlp"})
    pg.update(draws[:4], [1.0, 0.0, 0.5, 0.2])  # the mixed batch replays


def test_state_of_every_label_kind_reloads_with_weights_only_and_resumes_exactly():
    space = {"op": ["conv", "pool"], "in": Subset("in", [0, 1, 2], n_chosen=2),
             "lr": Bins("lr", nni.loguniform("lr", 1e-3, 1.0), bins=5)}
    first = PolicyGradient(space, ControllerSettings(seed=4))
    batch = [first.sample() for _ in range(4)]
    first.update(batch, [0.1, 0.5, 0.2, 0.9])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = PolicyGradient(space, ControllerSettings(seed=4))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [resumed.sample() for _ in range(5)] == [first.sample() for _ in range(5)]
    other = PolicyGradient({**space, "lr": Bins("lr", nni.loguniform("lr", 1e-3, 1.0), bins=6)})
    with pytest.raises(ValueError, match="another search space"):
        other.load_state_dict(first.state_dict())
