"""How each kind of NNI label becomes controller steps (nni_fedexit.search.decisions), and the
controller over them: draws stay in the space, values map back to their actions, state reloads."""

import io
from statistics import NormalDist

import numpy as np
import pytest
import torch

import nni
from nni.mutable import CategoricalMultiple, ExpressionConstraint, MutableDict, Numerical

from nni_fedexit.search.controller import ControllerSettings, PolicyGradient
from nni_fedexit.search.decisions import (
    DEFAULT_BINS,
    LABEL_KINDS,
    Bins,
    Choice,
    Decision,
    Subset,
    check_bins,
    decisions_of_space,
    quantised_grid,
)


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


# ---- settings and the label kinds ----------------------------------------------------------------


def test_check_bins_accepts_integers_from_two_and_names_the_setting():
    """numerical_bins: an int >= 2 passes through; anything else is refused by its key."""
    assert check_bins(2) == 2 and check_bins(8) == 8
    assert DEFAULT_BINS == 8 and LABEL_KINDS == ("Categorical", "CategoricalMultiple", "Numerical")
    with pytest.raises(ValueError, match=r"^numerical_bins must be an integer >= 2, got 1$"):
        check_bins(1)
    with pytest.raises(ValueError, match=r"^numerical_bins must be an integer >= 2, got True$"):
        check_bins(True)
    with pytest.raises(ValueError, match=r"^classArgs\.numerical_bins must be an integer >= 2, got 4\.0$"):
        check_bins(4.0, "classArgs.numerical_bins")
    with pytest.raises(ValueError, match=r"^numerical_bins must be an integer >= 2, got 1$"):
        Bins("x", nni.uniform("x", 0, 1), bins=1)


def test_a_choice_is_one_step_over_its_values_and_maps_each_back():
    """Choice: one step of len(values) options; value <-> action; names and identity by value."""
    c = Choice(3, ["a", 2, 0.5])
    assert c.label == "3" and c.sizes == [3] and not c.exclusive and c.parent is None
    assert [c.value([i], None) for i in range(3)] == ["a", 2, 0.5]
    assert [c.actions(v) for v in ("a", 2, 0.5)] == [[0], [1], [2]]
    assert c.first() == "a"
    assert c.identity() == ["'a'", "2", "0.5"]
    assert c.option_names() == [("3", ["a", "2", "0.5"])]
    with pytest.raises(ValueError, match=r"^label 'x' has no values to choose from$"):
        Choice("x", [])
    with pytest.raises(ValueError, match=r"^'b' is not one of \['a', 2, 0\.5\]$"):
        c.actions("b")


def test_a_value_maps_to_its_own_type_first_and_a_bool_never_to_a_number():
    """2.0 from JSON finds the 2; an exact-type match wins over an equal one; True is not 1."""
    mixed = Choice("m", [1, True, 1.0])
    assert mixed.actions(1) == [0] and mixed.actions(True) == [1] and mixed.actions(1.0) == [2]
    assert Choice("n", ["x", 2]).actions(2.0) == [1]
    assert Choice("f", [0.5, 3.0]).actions(3) == [1]
    with pytest.raises(ValueError, match=r"^True is not one of \[1, 2\]$"):
        Choice("n", [1, 2]).actions(True)
    with pytest.raises(ValueError, match=r"^1 is not one of \[True, False\]$"):
        Choice("b", [True, False]).actions(1)


def test_an_any_subset_is_one_include_or_skip_step_per_candidate():
    """Subset(n_chosen=None): a 2-option step per candidate; action 1 includes it."""
    s = Subset("in", ["x", "y", "z"], None)
    assert s.sizes == [2, 2, 2] and not s.exclusive and s.n_chosen is None
    assert s.value([1, 0, 1], None) == ["x", "z"] and s.value([0, 0, 0], None) == []
    assert s.actions(["z", "x"]) == [1, 0, 1] and s.actions([]) == [0, 0, 0] and s.actions(("y",)) == [0, 1, 0]
    assert s.first() == ["x"]
    assert s.identity() == ["n_chosen=None", "'x'", "'y'", "'z'"]
    assert s.option_names() == [("in/x", ["skip", "include"]), ("in/y", ["skip", "include"]),
                                ("in/z", ["skip", "include"])]
    with pytest.raises(ValueError, match=r"^\['x', 'x'\] repeats a candidate$"):
        s.actions(["x", "x"])


def test_a_subset_of_n_chosen_is_n_steps_without_replacement_in_draw_order():
    """Subset(n_chosen=k): k exclusive steps over the candidates; the value keeps the draw order."""
    s = Subset("in", ["x", "y", "z"], 2)
    assert s.sizes == [3, 3] and s.exclusive
    assert s.value([2, 0], None) == ["z", "x"] and s.actions(["z", "x"]) == [2, 0]
    assert s.first() == ["x", "y"]
    assert s.identity() == ["n_chosen=2", "'x'", "'y'", "'z'"]
    assert s.option_names() == [("in#1", ["x", "y", "z"]), ("in#2", ["x", "y", "z"])]
    with pytest.raises(ValueError, match=r"^\['x'\] does not have n_chosen=2 candidates$"):
        s.actions(["x"])
    with pytest.raises(ValueError, match=r"^'x' is not a list of candidates$"):
        s.actions("x")
    with pytest.raises(ValueError, match=r"^'w' is not one of \['x', 'y', 'z'\]$"):
        s.actions(["x", "w"])
    assert Subset("all", [0, 1], 2).sizes == [2, 2] and Subset("none", [0, 1], 0).sizes == []
    assert Subset("none", [0, 1], 0).first() == []
    assert Subset("in", ["x", "y", "z"], 3).sizes == [3, 3, 3]
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=rf"^label 'in': n_chosen {bad} for 3 candidates$"):
            Subset("in", ["x", "y", "z"], bad)


class Pick(Decision):
    """A decision that keeps the base class's first(): an exclusive pick of two of three."""

    def __init__(self):
        self.label, self.sizes, self.exclusive = "pick", [3, 3], True

    def value(self, actions, generator):
        return list(actions)


def test_the_first_value_of_an_exclusive_decision_takes_distinct_options():
    """Decision.first: every step's first option, or for exclusive steps the first distinct ones."""
    assert Pick().first() == [0, 1]
    p = Pick()
    p.exclusive = False
    assert p.first() == [0, 0]


def test_uniform_actions_cover_every_option_and_exclusive_steps_never_repeat():
    """A uniform draw stays in range, reaches every option, and an exclusive draw is a partial permutation."""
    g = torch.Generator().manual_seed(0)
    choice = Choice("c", list("abcd"))
    draws = [choice.uniform_actions(g) for _ in range(200)]
    assert all(len(d) == 1 for d in draws) and {d[0] for d in draws} == {0, 1, 2, 3}
    pick = Subset("in", ["x", "y", "z"], 2)
    pairs = [tuple(pick.uniform_actions(g)) for _ in range(300)]
    assert set(pairs) == {(a, b) for a in range(3) for b in range(3) if a != b}
    anyof = Subset("any", [0, 1, 2], None)
    masks = [tuple(anyof.uniform_actions(g)) for _ in range(300)]
    assert len(set(masks)) == 8 and all(len(m) == 3 for m in masks)


# ---- continuous and quantised labels -------------------------------------------------------------


def test_the_middle_of_a_bin_without_a_generator_and_draws_inside_it_with_one():
    """u = (a + r) / bins with r = 0.5 without a generator; the value is the distribution's ppf(u)."""
    u = Bins("u", nni.uniform("u", 0.0, 1.0), bins=4)
    assert u.sizes == [4] and u.grid is None and u.bins == 4 and Bins.EDGE == 1e-9
    assert [u.value([a], None) for a in range(4)] == pytest.approx([0.125, 0.375, 0.625, 0.875])
    lg = Bins("lg", nni.loguniform("lg", 1e-4, 1e-1), bins=3)
    assert lg.value([1], None) == pytest.approx(10 ** -2.5)  # u = 1.5 / 3: the middle of log10 -4 .. -1
    g = torch.Generator().manual_seed(1)
    draws = [u.value([2], g) for _ in range(200)]
    assert all(0.5 <= v < 0.75 for v in draws) and max(draws) - min(draws) > 0.2
    assert all(type(v) is float for v in draws)
    normal = Bins("n", Numerical(mu=0.0, sigma=1.0, label="n"), bins=2)
    assert normal.value([1], None) == pytest.approx(0.6744897501960817)  # the normal's 75 % quantile


def test_bins_of_a_wide_quantised_range_draw_multiples_of_q():
    """More grid points than bins: bins of the range, values rounded to q and kept as ints."""
    wide = Bins("w", Numerical(0, 100, quantize=2, label="w"), bins=5)
    assert wide.grid is None and wide.sizes == [5]
    assert wide.value([0], None) == 10 and type(wide.value([0], None)) is int  # u = 0.1: 10.0 -> 10
    assert wide.value([2], None) == 50 and wide.value([4], None) == 90


def test_a_value_maps_back_to_the_bin_its_cdf_falls_in_and_the_range_edges_are_tolerant():
    """bin = floor(cdf * bins), clamped; values a hair outside the range (1e-9 relative) still map."""
    u = Bins("u", nni.uniform("u", 0.0, 1.0), bins=4)
    assert [u.actions(v) for v in (0.0, 0.2499, 0.25, 0.5, 0.99, 1.0)] == [[0], [0], [1], [2], [3], [3]]
    assert u.actions(1.0 + 0.5e-9) == [3] and u.actions(-0.5e-9) == [0]
    for bad in (1.0 + 1.5e-9, -1.5e-9, 2.0):
        with pytest.raises(ValueError, match=r" is outside Numerical\(0"):
            u.actions(bad)
    big = Bins("b", nni.uniform("b", -1000.0, 1000.0), bins=2)
    assert big.actions(1000.0 + 0.5e-6) == [1] and big.actions(-1000.0 - 0.5e-6) == [0]
    with pytest.raises(ValueError, match="is outside"):
        big.actions(1000.0 + 1.5e-6)
    with pytest.raises(ValueError, match="is outside"):
        big.actions(-1000.0 - 1.5e-6)
    for bad in (True, "0.5", float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match=r"^.* is not a finite number$"):
            u.actions(bad)


def test_a_grid_value_maps_to_its_point_within_a_relative_tolerance():
    """A quantised label's value maps to its grid point if within 1e-9 * max(1, |value|)."""
    half = Bins("h", Numerical(0, 1, quantize=0.5, label="h"), bins=8)
    assert half.grid == [0, 0.5, 1] and half.sizes == [3]
    assert [half.actions(v) for v in (0, 0.5, 1.0)] == [[0], [1], [2]]
    assert half.actions(0.5 + 0.5e-9) == [1]
    with pytest.raises(ValueError, match=r"^0\.5000000015 is not one of the values \[0\.0, 0\.5, 1\.0\] of Numerical\(0, 1, q=0\.5"):
        half.actions(0.5 + 1.5e-9)
    thousands = Bins("t", Numerical(0, 3000, quantize=1000, label="t"), bins=8)
    assert thousands.grid == [0, 1000, 2000, 3000]
    assert thousands.actions(2000 + 1e-6) == [2]
    with pytest.raises(ValueError, match="is not one of the values"):
        thousands.actions(2000 + 1e-5)
    with pytest.raises(ValueError, match="is not one of the values"):
        thousands.actions(3500)


def test_quantised_grid_is_every_clipped_multiple_of_q_up_to_the_limit():
    """Each multiple of q from floor(low/q) to ceil(high/q), qclipped, as plain numbers; None past the limit."""
    assert quantised_grid(Numerical(1, 3, quantize=0.75, label="a"), 8) == [1, 1.5, 2.25, 3]
    assert quantised_grid(Numerical(0, 7, quantize=1, label="b"), 8) == list(range(8))  # 8 points, limit 8
    assert quantised_grid(Numerical(0, 8, quantize=1, label="c"), 8) is None  # 9 points
    assert quantised_grid(Numerical(0, 7, quantize=1, label="d"), 7) is None
    assert quantised_grid(Numerical(0.5, 2.5, quantize=1, label="e"), 8) == [0.5, 1, 2, 2.5]
    assert quantised_grid(Numerical(2, 2, label="f"), 8) == [2]  # a range of one value
    assert quantised_grid(nni.uniform("g", 0, 1), 8) is None  # not quantised
    assert quantised_grid(Numerical(mu=0, sigma=1, quantize=0.5, label="h"), 8) is None  # unbounded
    grid = quantised_grid(Numerical(0, 10, quantize=2, label="i"), 8)
    assert grid == [0, 2, 4, 6, 8, 10] and all(type(x) is int for x in grid)
    assert all(type(x) is float for x in quantised_grid(Numerical(0, 1, quantize=0.25, label="j"), 8))
    one = Bins("one", Numerical(2, 2, label="one"), bins=4)
    assert one.sizes == [1] and one.value([0], None) == 2 and one.actions(2) == [0]


def test_bins_first_value_identity_and_option_names():
    """first: the qclipped median; identity: the label and its step size; names: the grid or the bin edges."""
    assert Bins("u", nni.uniform("u", 0, 10), bins=4).first() == pytest.approx(5.0)
    assert Bins("l", nni.loguniform("l", 1, 100), bins=4).first() == pytest.approx(10.0)
    q = Bins("q", nni.quniform("q", 0, 10, 3), bins=8)
    assert q.grid == [0, 3, 6, 9, 10] and q.first() == 6  # round(5 / 3) * 3
    u = Bins("u", nni.uniform("u", 0, 1), bins=4)
    assert u.identity() == ["Numerical(0, 1, label='u')", "bins=4"]
    assert q.identity() == [repr(q.numerical), "bins=5"]
    assert u.option_names() == [("u", ["[0, 0.25)", "[0.25, 0.5)", "[0.5, 0.75)", "[0.75, 1)"])]
    assert q.option_names() == [("q", ["0", "3", "6", "9", "10"])]
    lg = Bins("lg", nni.loguniform("lg", 1e-4, 1e-1), bins=3)
    assert lg.option_names() == [("lg", ["[0.0001, 0.001)", "[0.001, 0.01)", "[0.01, 0.1)"])]


# ---- a space's labels ----------------------------------------------------------------------------


def _space():
    op = nni.choice("op", ["conv", "pool"])
    return MutableDict({
        "op": op,
        "ok": ExpressionConstraint(op == "conv", label="ok"),
        "in": CategoricalMultiple(["x", "y", "z"], n_chosen=2, label="in"),
        "lr": nni.uniform("lr", 0.0, 1.0),
    })


def test_decisions_of_a_space_follow_simplify_order_and_skip_constraints():
    """One decision per label, of its kind; a constraint takes no step; numerical_bins sizes the bins."""
    found = decisions_of_space(_space(), numerical_bins=5)
    assert list(found) == ["op", "in", "lr"]
    assert isinstance(found["op"], Choice) and found["op"].values == ["conv", "pool"]
    assert isinstance(found["in"], Subset) and found["in"].n_chosen == 2 and found["in"].values == ["x", "y", "z"]
    assert isinstance(found["lr"], Bins) and found["lr"].sizes == [5] and found["lr"].label == "lr"
    assert decisions_of_space(_space())["lr"].sizes == [8]


def test_a_label_kind_the_mode_cannot_run_is_refused_by_name():
    """allow limits the kinds; the refusal names the caller, the label, its kind and (for numbers) what to do."""
    with pytest.raises(ValueError, match=(
            r"^SizeAwarePolicyGradient cannot search label 'lr': it is Numerical, and this mode supports "
            r"Categorical, CategoricalMultiple\. The shared \(one-shot\) mode's supernet takes categorical "
            r"choices only: use mode='trials' for continuous labels, or make the label an nni\.choice of a "
            r"few values\.$")):
        decisions_of_space(_space(), allow=("Categorical", "CategoricalMultiple"))
    with pytest.raises(ValueError, match=(r"^Tuner cannot search label 'in': it is CategoricalMultiple, and this "
                                          r"mode supports Categorical, Numerical\.$")):
        decisions_of_space(_space(), allow=("Categorical", "Numerical"), who="Tuner")
    with pytest.raises(ValueError, match=r"^X cannot search label 'op': it is Categorical, and this mode supports "
                                         r"CategoricalMultiple, Numerical\.$"):
        decisions_of_space(_space(), allow=("CategoricalMultiple", "Numerical"), who="X")


def test_a_space_with_nothing_to_decide_is_refused():
    """A space without labels has no choices to search; one label of one value is a search."""
    with pytest.raises(ValueError, match=r"^the model space has no choices to search$"):
        decisions_of_space(MutableDict({}))
    assert list(decisions_of_space(MutableDict({"op": nni.choice("op", ["a"])}))) == ["op"]


def test_decisions_keep_their_labels():
    """Each decision carries its own label (it names the steps the web UI shows)."""
    found = decisions_of_space(_space())
    assert [d.label for d in found.values()] == ["op", "in", "lr"]
    assert found["in"].option_names()[0][0] == "in#1"


def test_quantised_grids_of_offset_negative_and_half_open_ranges():
    """The multiples of q are counted from floor(low / q): far from 0, below 0, or without an upper end."""
    assert quantised_grid(Numerical(10, 11, quantize=0.5, label="a"), 4) == [10, 10.5, 11]
    assert quantised_grid(Numerical(100, 101, quantize=1, label="b"), 8) == [100, 101]
    assert quantised_grid(Numerical(-1, 1, quantize=0.5, label="c"), 8) == [-1, -0.5, 0, 0.5, 1]
    half_open = Numerical(low=0.0, high=float("inf"), mu=0, sigma=1, quantize=1.0, label="d")
    assert quantised_grid(half_open, 8) is None
    assert Bins("d", half_open, bins=4).sizes == [4]


def test_numpy_bounds_give_plain_python_numbers():
    """Values go out as plain int/float (JSON-able), also when the space was written with numpy numbers."""
    one = quantised_grid(Numerical(np.int64(2), np.int64(2), label="z"), 8)
    assert one == [2] and type(one[0]) is int
    grid = quantised_grid(Numerical(np.float32(0.5), np.float32(0.5), label="f"), 8)
    assert grid == [0.5] and type(grid[0]) is float


def test_the_edges_of_the_range_and_of_the_grid_are_inclusive():
    """A value exactly at low - 1e-9, high + 1e-9, or 1e-9 from a grid point still maps."""
    u = Bins("u", nni.uniform("u", 0.0, 1.0), bins=4)
    assert u.actions(-1e-9) == [0] and u.actions(1.0 + 1e-9) == [3]
    half = Bins("h", Numerical(0, 1, quantize=0.5, label="h"), bins=8)
    assert half.actions(1e-9) == [0]


def test_draws_inside_a_bin_have_double_precision():
    """r is drawn as a float64: a bin's values are not limited to 2**24 steps (a float32 draw)."""
    u = Bins("u", nni.uniform("u", 0.0, 1.0), bins=2)
    g = torch.Generator().manual_seed(0)
    rs = [2 * u.value([0], g) for _ in range(20)]  # value = r / 2 in the first half of [0, 1)
    assert any((r * 2 ** 24) % 1 != 0 for r in rs)


def test_draws_in_the_outermost_bins_stay_clipped_1e9_from_the_ends():
    """u is clipped to [1e-9, 1 - 1e-9]: with 10**9 bins the outermost bins always give the normal's
    quantiles at 1e-9 and 1 - 1e-9 (from the standard library's NormalDist), never infinity."""
    bins = 10 ** 9
    n = Bins("n", Numerical(mu=0.0, sigma=1.0, label="n"), bins=bins)
    g = torch.Generator().manual_seed(0)
    top, bottom = NormalDist().inv_cdf(1 - 1e-9), NormalDist().inv_cdf(1e-9)
    assert [n.value([bins - 1], g) for _ in range(5)] == pytest.approx([top] * 5, rel=1e-6)
    assert [n.value([0], g) for _ in range(5)] == pytest.approx([bottom] * 5, rel=1e-6)


def test_uniform_actions_use_only_the_given_generator():
    """The same generator seed gives the same draws whatever torch's global generator holds."""
    labels = [Choice("c", list("abcd")), Subset("in", ["x", "y", "z"], 2), Subset("one", ["x", "y", "z"], 1),
              Subset("any", [0, 1, 2], None)]
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(5)
    first = [d.uniform_actions(g) for d in labels for _ in range(10)]
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(5)
    assert [d.uniform_actions(g) for d in labels for _ in range(10)] == first
    assert all(len(a) == 1 and 0 <= a[0] < 3 for a in first[20:30])
