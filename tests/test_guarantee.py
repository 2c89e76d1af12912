"""Fast tests of nni_fedexit/exits/thresholds.py against hand-computed expectations: the pieces
(grid, confidence, evaluation of a setting, the rules' optimum against an exhaustive search), the
statistical early-exit guarantee (the upper confidence bound pinned to its formula and to its
coverage on planted draws) and the fixed-sequence test on the held-out split (the first failure
ends it). tests/test_thresholds.py holds the slower end-to-end checks on planted exit outputs (per
exit against shared, the margin on 100,000 unseen images); this file is the mutation shard's."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from nni_fedexit.exits.thresholds import (
    NEVER, CertifiedThresholds, ExitScores, ThresholdSetting, certified_thresholds, confidence, drop_upper_bound,
    per_exit_thresholds, shared_thresholds, threshold_grid,
)

#: one-sided standard normal quantiles (tables: z_0.95 = 1.644854, z_0.99 = 2.326348, z_0.80 = 0.841621)
Z95, Z99, Z80 = 1.6448536269514722, 2.3263478740408408, 0.8416212335729143


def hand_bound(lost: float, gained: float, n: int, z: float) -> float:
    """Agresti-Coull-adjusted normal upper bound on the paired drop, written out: add z^2/2 pseudo
    losses (and z^2 pseudo images), then mean + z * sqrt(variance / m) of the +1/-1/0 differences."""
    lost_ = lost + z * z / 2
    m = n + z * z
    mean = (lost_ - gained) / m
    variance = (lost_ + gained) / m - mean * mean
    return mean + z * math.sqrt(max(variance, 0.0) / m)


def paired(n: int, lost: int, gained: int, reference_wrong: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference_right, right) over n images: `lost` the reference gets right and `right` not,
    `gained` the other way round, `reference_wrong` both get wrong, the rest both right."""
    ref = [True] * lost + [False] * gained + [False] * reference_wrong
    mine = [False] * lost + [True] * gained + [False] * reference_wrong
    rest = n - len(ref)
    return torch.tensor(ref + [True] * rest), torch.tensor(mine + [True] * rest)


# ---- the bound itself ------------------------------------------------------------------------


@pytest.mark.parametrize("lost, gained, n, level, z", [
    (12, 3, 1000, 0.95, Z95),
    (12, 3, 1000, 0.99, Z99),
    (0, 0, 500, 0.95, Z95),       # no disagreement: the pseudo-losses alone give the margin
    (40, 0, 4000, 0.80, Z80),
    (3, 25, 800, 0.95, Z95),      # more gained than lost: a negative mean, still a positive margin
])
def test_the_drop_bound_is_the_agresti_coull_normal_bound_computed_by_hand(lost, gained, n, level, z):
    """One-sided bound at the stated confidence: z is the level's normal quantile, z^2/2 pseudo
    losses and z^2 pseudo images are added before the mean and variance of the paired difference."""
    ref, right = paired(n, lost, gained, reference_wrong=7)
    assert drop_upper_bound(ref, right, level) == pytest.approx(hand_bound(lost, gained, n, z), rel=1e-12, abs=1e-15)


def test_the_default_confidence_level_is_95_percent():
    ref, right = paired(1000, 12, 3)
    # (12 + z^2/2 - 3) / (1000 + z^2) + z sqrt(var/m), z = 1.6449: 0.01033 + 0.00661
    assert drop_upper_bound(ref, right) == pytest.approx(hand_bound(12, 3, 1000, Z95), rel=1e-12)
    assert drop_upper_bound(ref, right) == pytest.approx(0.016937, abs=5e-7)


def test_at_the_median_level_the_bound_is_the_plain_observed_drop():
    """z = 0 at 50 %: no pseudo-counts, no margin; the bound is (lost - gained) / n exactly."""
    ref, right = paired(1000, 30, 10)
    assert drop_upper_bound(ref, right, 0.5) == 0.02
    ref, right = paired(400, 400, 0)  # everything lost: the variance is 0, not negative
    assert drop_upper_bound(ref, right, 0.5) == 1.0


@pytest.mark.parametrize("level", [0.4999, 1.0, 1.5, -0.95])
def test_a_confidence_level_outside_half_to_one_is_refused(level):
    ref, right = paired(100, 1, 0)
    with pytest.raises(ValueError, match=r"^confidence_level must be in \[0\.5, 1\), got " + str(level).replace(".", r"\.") + "$"):
        drop_upper_bound(ref, right, level)


def _planted_bounds(level: float, draws: int, n: int = 800, p_lost: float = 0.03, p_gained: float = 0.01,
                    seed: int = 0) -> list[float]:
    """`draws` held-out splits of n images whose per-image outcome is lost with p_lost, gained with
    p_gained, else agreed (true drop 0.02); each split's bound at `level`."""
    g = torch.Generator().manual_seed(seed)
    bounds = []
    for _ in range(draws):
        u = torch.rand(n, generator=g, dtype=torch.float64)
        lost, gained = u < p_lost, (u >= p_lost) & (u < p_lost + p_gained)
        bounds.append(drop_upper_bound(~gained, ~lost, level))
    return bounds


def test_the_bound_covers_the_true_drop_at_about_its_stated_confidence():
    """On 2,000 planted held-out splits (true drop 2 points), the 95 % bound is at or above the
    truth in about 95 % of them; the 80 % bound in about 80 % (so a bound at a lower level than
    stated could not pass the first check), and the 99 % bound in about 99 %."""
    truth = 0.03 - 0.01
    coverage = {}
    for level in (0.8, 0.95, 0.99):
        bounds = _planted_bounds(level, 2000)
        coverage[level] = sum(b >= truth for b in bounds) / len(bounds)
    assert 0.93 <= coverage[0.95] <= 0.97, coverage
    assert 0.76 <= coverage[0.8] <= 0.85, coverage
    assert coverage[0.99] >= 0.98, coverage


def test_the_bound_tightens_with_more_images_at_the_same_drop():
    few, many = drop_upper_bound(*paired(1000, 20, 0)), drop_upper_bound(*paired(4000, 80, 0))
    assert few == pytest.approx(hand_bound(20, 0, 1000, Z95), rel=1e-12)
    assert many == pytest.approx(hand_bound(80, 0, 4000, Z95), rel=1e-12)
    assert few > many > 0.02


# ---- the bound inside the threshold rules -------------------------------------------------------


def _two_exits(n_sure: int, n_lost: int, n_rest: int) -> ExitScores:
    """Two exits (cost 1 and 4), the last always right: n_sure images exit 1 gets right at
    confidence 0.75, n_lost it gets wrong at 0.75, n_rest it gets wrong at 0.25."""
    conf = torch.tensor([[0.75] * (n_sure + n_lost) + [0.25] * n_rest, [1.0] * (n_sure + n_lost + n_rest)])
    correct = torch.tensor([[True] * n_sure + [False] * (n_lost + n_rest), [True] * (n_sure + n_lost + n_rest)])
    return ExitScores(conf, correct, [1.0, 4.0])


def test_with_a_confidence_level_the_threshold_rules_keep_the_bound_not_the_mean_within_the_drop():
    """Letting the 0.75 images out loses 5 of 1,000 (a 0.5-point drop, within a 1-point target);
    its 95 % bound is hand_bound(5, 0, 1000) = 1.18 points, over the target: with the level both
    rules keep everything at the last exit, without it they let the 0.75 images out."""
    scores = _two_exits(395, 5, 600)
    grid = [0.0, 0.5, 1.0, NEVER]
    assert hand_bound(5, 0, 1000, Z95) > 0.01 > 0.005
    for rule in (shared_thresholds, per_exit_thresholds):
        plain = rule(scores, grid, max_accuracy_drop=0.01)
        assert plain.thresholds == [0.5, 0.0] and plain.drop == pytest.approx(0.005) and plain.drop_bound is None
        bounded = rule(scores, grid, max_accuracy_drop=0.02, confidence_level=0.95)
        assert bounded.thresholds == [0.5, 0.0]
        assert bounded.drop_bound == pytest.approx(hand_bound(5, 0, 1000, Z95), rel=1e-12)
    start = shared_thresholds(scores, grid, max_accuracy_drop=0.01, confidence_level=0.95)
    assert start.thresholds == [1.0, 0.0] and start.drop_bound == pytest.approx(hand_bound(0, 0, 1000, Z95), rel=1e-12)
    assert per_exit_thresholds(scores, grid, max_accuracy_drop=0.01, confidence_level=0.95).thresholds == [1.0, 0.0]
    # nothing disagrees at threshold 1.0, but the pseudo-losses alone bound the drop at 0.33 points
    assert 0.003 < hand_bound(0, 0, 1000, Z95) < 0.0033
    with pytest.raises(ValueError, match=r"^no setting of the grid keeps the drop's upper bound within 0\.3000% on 1,000 "
                                         r"images: give a larger max_accuracy_drop, or more images$"):
        shared_thresholds(scores, grid, max_accuracy_drop=0.003, confidence_level=0.95)


def test_per_exit_moves_use_the_same_bound_as_the_evaluation():
    """The per-exit search's vectorised bound (_pick) and the evaluation's agree: at 80 %
    (z = 0.84) the 5 lost images' bound, hand_bound(5, 0, 1000, z80) = 0.729 points, is within a
    0.73-point target and the search lets them out; at 0.72 points it does not."""
    scores = _two_exits(395, 5, 600)
    grid = [0.0, 0.5, 1.0, NEVER]
    want = hand_bound(5, 0, 1000, Z80)
    assert 0.0072 < want < 0.0073
    start = ThresholdSetting([NEVER, 0.0], accuracy=1.0, expected_cost=4.0, exit_share=[0.0, 1.0], drop=0.0)
    out = per_exit_thresholds(scores, grid, max_accuracy_drop=0.0073, confidence_level=0.8, start=start)
    assert out.thresholds == [0.5, 0.0] and out.drop_bound == pytest.approx(want, rel=1e-12)
    assert out.expected_cost == pytest.approx(0.4 * 1 + 0.6 * 4)
    out = per_exit_thresholds(scores, grid, max_accuracy_drop=0.0072, confidence_level=0.8, start=start)
    assert out is start


# ---- certification: the fixed-sequence test -------------------------------------------------------


def _banded(n_a: int, n_b: int, n_c: int, a: tuple[int, int], b: tuple[int, int], c: tuple[int, int]) -> ExitScores:
    """Two exits (cost 1 and 4) and three bands of exit-1 confidence: A at 0.875, B at 0.625, C at
    0.375. In each band (lost, gained) gives how many images exit 1 gets wrong where the last exit
    is right, and right where the last exit is wrong; every other image both get right."""
    conf, first, last = [], [], []
    for size, value, (lost, gained) in ((n_a, 0.875, a), (n_b, 0.625, b), (n_c, 0.375, c)):
        conf += [value] * size
        first += [False] * lost + [True] * gained + [True] * (size - lost - gained)
        last += [True] * lost + [False] * gained + [True] * (size - lost - gained)
    n = len(conf)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    return ExitScores(torch.tensor([conf, [1.0] * n])[:, order], torch.tensor([first, last])[:, order], [1.0, 4.0])


GRID = [0.375, 0.625, 0.875, NEVER]


def _learn() -> ExitScores:
    """10,000 images; letting band A out loses 0.4 points, A and B 0.9 points, A, B and C 20 points:
    with a 1-point target in 2 steps the path is [all at the last exit, A out, A and B out]."""
    return _banded(3000, 3000, 4000, a=(40, 0), b=(50, 0), c=(2000, 0))


def test_the_first_failure_ends_the_test_even_if_a_later_setting_would_pass():
    """On the held-out split band A loses 90 images (bound 1.07 points > 1), band B gains 90 back
    (A and B out: bound 0.24 points): the second setting fails, so the third is never tested and
    everything stays at the last exit, although the third alone would pass."""
    held_out = _banded(3000, 3000, 4000, a=(90, 0), b=(0, 90), c=(0, 0))
    fail, later = hand_bound(90, 0, 10000, Z95), hand_bound(90, 90, 10000, Z95)
    assert later < 0.01 < fail  # the planted path fails, then would pass
    cert = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=2, learn_margin=False)
    assert [t["thresholds"] for t in cert.tested] == [[NEVER, 0.0], [0.875, 0.0]]
    assert [t["passed"] for t in cert.tested] == [True, False]
    assert cert.tested[1]["drop_bound"] == pytest.approx(fail, rel=1e-12)
    assert cert.tested[1]["learn_drop"] == pytest.approx(0.004)
    assert cert.thresholds == [NEVER, 0.0] and cert.drop_bound == 0.0
    assert cert.held_out.expected_cost == 4.0 and cert.held_out.drop == 0.0


def test_certification_keeps_the_last_setting_of_a_passing_path():
    """Band A loses 30 held-out images and B gains 30: both settings pass; the cheapest is kept,
    with its held-out bound and what it gives on the held-out images."""
    held_out = _banded(3000, 3000, 4000, a=(30, 0), b=(0, 30), c=(0, 0))
    cert = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=2, learn_margin=False)
    assert [t["passed"] for t in cert.tested] == [True, True, True]
    assert [t["drop_bound"] for t in cert.tested] == pytest.approx(
        [0.0, hand_bound(30, 0, 10000, Z95), hand_bound(30, 30, 10000, Z95)], rel=1e-12)
    assert [t["learn_drop"] for t in cert.tested] == pytest.approx([0.0, 0.004, 0.009])
    assert cert.thresholds == [0.625, 0.0] and cert.learnt.thresholds == [0.625, 0.0]
    assert cert.drop_bound == pytest.approx(hand_bound(30, 30, 10000, Z95), rel=1e-12)
    assert cert.held_out.expected_cost == pytest.approx(0.6 * 1 + 0.4 * 4) and cert.held_out.drop == 0.0
    assert cert.held_out.drop_bound is None and cert.learnt.drop == pytest.approx(0.009)
    assert cert.rule == "shared" and cert.max_accuracy_drop == 0.01 and cert.confidence_level == 0.95


def test_a_bound_exactly_at_the_target_passes():
    """At the 50 % level (z = 0) the bound is the observed drop: band A losing exactly 100 of
    10,000 held-out images is a bound of exactly 1 point, which is within a 1-point target."""
    held_out = _banded(3000, 3000, 4000, a=(100, 0), b=(0, 0), c=(0, 0))
    cert = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=2, learn_margin=False,
                                confidence_level=0.5)
    assert [t["drop_bound"] for t in cert.tested] == [0.0, 0.01, 0.01]
    assert [t["passed"] for t in cert.tested] == [True, True, True]
    assert cert.thresholds == [0.625, 0.0] and cert.drop_bound == 0.01


def test_the_learnt_path_grows_by_steps_of_the_target():
    """With one step the path jumps straight to the cheapest setting within the whole target
    (A and B out); with two it passes through A out first."""
    held_out = _banded(3000, 3000, 4000, a=(0, 0), b=(0, 0), c=(0, 0))
    one = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=1, learn_margin=False)
    assert [t["thresholds"] for t in one.tested] == [[NEVER, 0.0], [0.625, 0.0]]
    two = certified_thresholds(_learn(), held_out, 0.01, rule="per_exit", grid=GRID, steps=2, learn_margin=False)
    assert [t["thresholds"] for t in two.tested] == [[NEVER, 0.0], [0.875, 0.0], [0.625, 0.0]]
    # a step that finds nothing cheaper adds nothing: 4 steps of 0.25 points give A out (0.4) at step 2 only
    four = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=4, learn_margin=False)
    assert [t["thresholds"] for t in four.tested] == [[NEVER, 0.0], [0.875, 0.0], [0.625, 0.0]]


def test_the_learning_margin_uses_the_confidence_level_on_the_learning_split():
    """With the margin, a step is on the path only if its bound on the learning split is within the
    step's drop: A out (40 lost of 10,000: bound hand_bound(40, 0, 10000) = 0.53 points) is within
    the 1-point target but not half of it, A and B out (0.9 points observed) not at all."""
    held_out = _banded(3000, 3000, 4000, a=(0, 0), b=(0, 0), c=(0, 0))
    assert 0.005 < hand_bound(40, 0, 10000, Z95) < 0.01 < hand_bound(90, 0, 10000, Z95)
    cert = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=2)
    assert [t["thresholds"] for t in cert.tested] == [[NEVER, 0.0], [0.875, 0.0]]
    assert cert.learnt.drop_bound == pytest.approx(hand_bound(40, 0, 10000, Z95), rel=1e-12)
    assert cert.tested[1]["learn_drop"] == pytest.approx(0.004)


def test_certification_refuses_a_bad_rule_target_or_step_count():
    learn = held_out = _banded(10, 10, 10, a=(0, 0), b=(0, 0), c=(0, 0))
    with pytest.raises(ValueError, match=r"^rule must be one of \['shared', 'per_exit'\], got 'mine'$"):
        certified_thresholds(learn, held_out, 0.01, rule="mine")
    with pytest.raises(ValueError, match=r"^steps must be at least 1, got 0$"):
        certified_thresholds(learn, held_out, 0.01, steps=0)
    with pytest.raises(ValueError, match=r"^max_accuracy_drop must be >= 0, got -0\.01$"):
        certified_thresholds(learn, held_out, -0.01)
    cert = certified_thresholds(learn, held_out, 0.01, steps=1)  # defaults: per_exit, 95 %
    assert cert.rule == "per_exit" and cert.confidence_level == 0.95


def test_the_guarantee_in_words_states_level_target_and_bound():
    setting = ThresholdSetting([0.5, 0.0], accuracy=0.9, expected_cost=2.0, exit_share=[0.5, 0.5], drop=0.001)
    cert = CertifiedThresholds(rule="shared", max_accuracy_drop=0.0125, confidence_level=0.9, learnt=setting,
                               held_out=setting, drop_bound=0.00875)
    assert cert.guarantee() == ("with about 90% confidence (over the draw of the held-out images), the accuracy drop on "
                                "new images from the same distribution is at most 1.25% (upper bound 0.88% from the "
                                "held-out split)")
    assert cert.tested == []
    got = cert.thresholds
    got.append(1.0)
    assert cert.thresholds == [0.5, 0.0]  # a copy: editing it does not change the result


def test_the_all_at_the_last_exit_setting_carries_its_learning_bound_when_kept():
    """With the margin, the first setting of the path (nothing leaves early) is evaluated with the
    bound too: when the held-out test fails at once, the kept setting's learning bound is the
    pseudo-losses' alone, hand_bound(0, 0, 10000)."""
    held_out = _banded(3000, 3000, 4000, a=(90, 0), b=(0, 0), c=(0, 0))
    cert = certified_thresholds(_learn(), held_out, 0.01, rule="shared", grid=GRID, steps=2)
    assert [t["passed"] for t in cert.tested] == [True, False]
    assert cert.thresholds == [NEVER, 0.0] and cert.learnt.drop == 0.0
    assert cert.learnt.drop_bound == pytest.approx(hand_bound(0, 0, 10000, Z95), rel=1e-12)


def test_the_path_starts_at_the_first_step_not_at_zero_drop():
    """Band A loses nothing, B 0.4 points: the first step (0.5 points) already lets A and B out, so
    the path is [all at the last exit, A and B out]; a setting of zero drop (A out alone) is not a
    step of its own."""
    learn = _banded(3000, 3000, 4000, a=(0, 0), b=(40, 0), c=(2000, 0))
    held_out = _banded(3000, 3000, 4000, a=(0, 0), b=(0, 0), c=(0, 0))
    cert = certified_thresholds(learn, held_out, 0.01, rule="shared", grid=GRID, steps=2, learn_margin=False)
    assert [t["thresholds"] for t in cert.tested] == [[NEVER, 0.0], [0.625, 0.0]]


def test_the_path_has_20_steps_by_default():
    """20,000 images; A out loses 10 (0.05 points), A and B out 19 (0.095 points); target 1 point.
    In 20 steps (0.05, 0.1, ... points) A out is a step of its own; in 21 steps (0.0476, 0.0952,
    ...) the path goes from nothing to A and B at once."""
    learn = _banded(6000, 6000, 8000, a=(10, 0), b=(9, 0), c=(4000, 0))
    held_out = _banded(6000, 6000, 8000, a=(0, 0), b=(0, 0), c=(0, 0))
    want = [[NEVER, 0.0], [0.875, 0.0], [0.625, 0.0]]
    cert = certified_thresholds(learn, held_out, 0.01, rule="shared", grid=GRID, learn_margin=False)
    assert [t["thresholds"] for t in cert.tested] == want
    assert [t["thresholds"] for t in certified_thresholds(learn, held_out, 0.01, rule="shared", grid=GRID, steps=21,
                                                          learn_margin=False).tested] == [want[0], want[2]]


# ---- the pieces, on hand-made scores ------------------------------------------------------------


def test_the_grid_is_evenly_spaced_from_0_to_1_then_a_value_nothing_reaches():
    assert threshold_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0 + 1e-6]
    assert threshold_grid(2) == [0.0, 1.0, 1.0 + 1e-6]
    default = threshold_grid()
    assert len(default) == 102 and default[1] == 0.01 and default[100] == 1.0 and default[-1] == NEVER
    with pytest.raises(ValueError, match=r"^num_thresholds must be at least 2, got 1$"):
        threshold_grid(1)
    # a confidence of exactly 1 does not leave at NEVER (compared in float32, as inference does)
    scores = ExitScores([[1.0, 1.0], [1.0, 1.0]], [[True, True], [True, True]], [1.0, 2.0])
    assert scores.exits_taken([NEVER]).tolist() == [1, 1]
    assert scores.exits_taken([1.0]).tolist() == [0, 0]


def test_confidence_is_the_max_probability_or_one_minus_the_normalised_entropy():
    """Logits (2, 0, 0): softmax (e^2, 1, 1) / (e^2 + 2); max_prob is its first entry and entropy
    confidence is 1 - H / log 3. Uniform logits: 1/3 and 0; a certain one: 1 and 1."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1000.0, 0.0, 0.0]], dtype=torch.float64)
    e2 = math.exp(2)
    p = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    entropy = -sum(q * math.log(q) for q in p)
    got = confidence(logits, "max_prob")
    assert got.dtype == torch.float32  # as inference computes it, whatever the logits' dtype
    assert got.tolist() == pytest.approx([p[0], 1 / 3, 1.0], rel=1e-6)
    assert confidence(logits).tolist() == got.tolist()  # max_prob is the default
    ent = confidence(logits, "entropy")
    assert ent.tolist() == pytest.approx([1 - entropy / math.log(3), 0.0, 1.0], rel=1e-6, abs=1e-6)
    assert not torch.isnan(ent).any()  # zero probabilities count 0 * log 0 = 0
    with pytest.raises(ValueError, match=r"^criterion must be one of \['max_prob', 'entropy'\], got 'margin'$"):
        confidence(logits, "margin")


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _entropy_confidence(row):
    p = _softmax(row)
    return 1 - -sum(q * math.log(q) for q in p) / math.log(len(row))


def test_scores_from_logits_use_the_criterion_and_the_labels():
    logits = [[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]],
              [[0.0, 0.0, 1.0], [0.0, 5.0, 0.0]]]  # (exits, images, classes)
    labels = torch.tensor([0, 0])
    scores = ExitScores.from_logits(torch.tensor(logits), labels, [1, 2], criterion="entropy")
    assert scores.correct.tolist() == [[True, False], [False, False]]
    assert scores.confidence.dtype == torch.float64 and scores.cost.tolist() == [1.0, 2.0]
    for i in range(2):
        assert scores.confidence[i].tolist() == pytest.approx([_entropy_confidence(r) for r in logits[i]], rel=1e-6)
    default = ExitScores.from_logits(torch.tensor(logits), labels, [1, 2])
    for i in range(2):
        assert default.confidence[i].tolist() == pytest.approx([max(_softmax(r)) for r in logits[i]], rel=1e-6)
    assert (scores.num_exits, scores.num_images) == (2, 2)


def test_scores_of_the_wrong_shapes_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"^confidence and correct must both be \(exits, images\), got \(2, 3\) and \(2, 2\)$"):
        ExitScores(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.bool), [1, 2])
    with pytest.raises(ValueError, match=r"^confidence and correct must both be \(exits, images\), got \(3,\) and \(3,\)$"):
        ExitScores(torch.zeros(3), torch.zeros(3, dtype=torch.bool), [1, 2, 3])
    with pytest.raises(ValueError, match=r"^cost needs one value per exit \(2\), got \(3,\)$"):
        ExitScores(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), [1, 2, 3])


def test_a_threshold_counts_as_its_float32_value_as_inference_compares_it():
    """0.7 in float32 is 0.699999988...: a float32 confidence of 0.7 reaches a 0.7 threshold (as on a
    device), although it is below 0.7 as a float64."""
    c = float(torch.tensor(0.7, dtype=torch.float32))
    assert c < 0.7
    scores = ExitScores([[c, 0.69], [1.0, 1.0]], [[True, True], [True, False]], [1.0, 3.0])
    assert scores.exits_taken([0.7]).tolist() == [0, 1]
    assert scores.right([0.7]).tolist() == [True, False]


def test_evaluate_reports_thresholds_accuracy_cost_shares_and_drop():
    """Three exits, four images: thresholds (0.5, 0.75) send image 0 out at exit 1 (0.5 reaches
    0.5), image 1 at exit 2 and images 2, 3 at exit 3; extra thresholds are ignored, the last is 0."""
    conf = [[0.5, 0.25, 0.25, 0.0], [0.0, 0.75, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    correct = [[False, True, True, True], [True, True, True, True], [True, False, True, True]]
    scores = ExitScores(conf, correct, [1.0, 2.0, 8.0])
    got = scores.evaluate([0.5, 0.75, 0.9, 0.1])
    assert got.thresholds == [0.5, 0.75, 0.0]
    assert scores.exits_taken([0.5, 0.75]).tolist() == [0, 1, 2, 2]
    assert got.exit_share == [0.25, 0.25, 0.5]
    assert got.accuracy == 0.75  # image 0 wrong at exit 1
    assert got.expected_cost == (1 + 2 + 8 + 8) / 4
    assert got.drop == pytest.approx(0.75 - 0.75) and got.drop_bound is None
    one = ExitScores([[0.9], [0.1]], [[False], [True]], [1.0, 2.0]).evaluate([0.5])
    assert (one.accuracy, one.expected_cost, one.exit_share, one.drop) == (0.0, 1.0, [1.0, 0.0], 1.0)


def test_a_setting_is_within_a_drop_by_its_bound_where_it_has_one():
    plain = ThresholdSetting([0.5, 0.0], accuracy=0.9, expected_cost=2.0, exit_share=[0.5, 0.5], drop=0.01)
    assert plain.within(0.01) and plain.within(0.01 - 5e-13) and not plain.within(0.01 - 2e-12)
    bounded = ThresholdSetting([0.5, 0.0], accuracy=0.9, expected_cost=2.0, exit_share=[0.5, 0.5], drop=0.0,
                               drop_bound=0.02)
    assert not bounded.within(0.01) and bounded.within(0.02)


def test_a_target_is_one_of_a_drop_or_a_budget_and_a_drop_is_not_negative():
    scores = _two_exits(8, 1, 1)
    grid = threshold_grid(5)
    for kwargs in ({}, {"max_accuracy_drop": 0.01, "cost_budget": 3.0}):
        for rule in (shared_thresholds, per_exit_thresholds):
            with pytest.raises(ValueError, match=r"^give exactly one target: max_accuracy_drop or cost_budget$"):
                rule(scores, grid, **kwargs)
    for bad in (-0.001, float("nan")):
        with pytest.raises(ValueError, match=r"^max_accuracy_drop must be >= 0, got (-0\.001|nan)$"):
            per_exit_thresholds(scores, grid, max_accuracy_drop=bad)
    assert shared_thresholds(scores, grid, max_accuracy_drop=0.0).thresholds == [1.0, 0.0]  # zero is a target


def test_a_budget_below_every_setting_names_the_cheapest():
    scores = ExitScores([[0.5, 0.5], [0.5, 0.5]], [[True, True], [True, True]], [1234.5, 5000.0])
    with pytest.raises(ValueError, match=r"^cost_budget 1,000 is below the cheapest setting \(1,234\.5 per image, every "
                                         r"image at exit 1\): raise the budget$"):
        shared_thresholds(scores, threshold_grid(5), cost_budget=1000.0)


def test_a_budget_met_exactly_is_within_it():
    """Half the images at exit 1 (cost 1) and half at exit 2 (cost 4): 2.5 per image, a budget of
    exactly 2.5 allows it and it is the most accurate setting within it."""
    conf = [[0.75, 0.75, 0.25, 0.25], [1.0] * 4]
    correct = [[True, True, False, False], [True] * 4]
    scores = ExitScores(conf, correct, [1.0, 4.0])
    for rule in (shared_thresholds, per_exit_thresholds):
        got = rule(scores, threshold_grid(5), cost_budget=2.5)
        assert got.thresholds == [0.5, 0.0] and got.expected_cost == 2.5 and got.accuracy == 1.0
        assert rule(scores, threshold_grid(5), cost_budget=4.0).accuracy == 1.0
    got = per_exit_thresholds(scores, threshold_grid(5), cost_budget=2.5, start=scores.evaluate([0.0]))
    assert got.thresholds == [0.5, 0.0] and got.expected_cost == 2.5  # the search moves onto the budget exactly


def _brute(conf, correct, cost, settings, *, target=None, budget=None, z=None):
    """Every setting of ``settings``, image by image in plain Python: (cost, accuracy) of each;
    then the cheapest within the drop (most accurate among equals; with ``z``, the drop's bound
    hand_bound(lost, gained) is within it), or the most accurate within the budget."""
    exits, n = len(cost), len(conf[0])
    reference = sum(correct[-1]) / n
    found = []
    for t in settings:
        taken = [next((i for i in range(exits - 1) if conf[i][s] >= t[i]), exits - 1) for s in range(n)]
        right = [correct[e][s] for s, e in enumerate(taken)]
        lost = sum(r and not m for r, m in zip(correct[-1], right))
        gained = sum(m and not r for r, m in zip(correct[-1], right))
        drop = reference - sum(right) / n if z is None else hand_bound(lost, gained, n, z)
        found.append((sum(cost[e] for e in taken) / n, sum(right) / n, drop))
    if target is not None:
        c, a = min((c, -a) for c, a, d in found if d <= target + 1e-12)
        return c, -a
    found = [(c, a) for c, a, _ in found]
    return max((a, -c) for c, a in found if c <= budget + 1e-9)[0]


def _small(seed: int, n: int = 48):
    """Three exits, n images, confidences on the grid of eighths (exact in float32), deeper exits
    right more often; as plain lists."""
    g = torch.Generator().manual_seed(seed)
    conf = (torch.randint(0, 9, (3, n), generator=g) / 8).tolist()
    u = torch.rand(n, generator=g).tolist()
    correct = [[x < p for x in u] for p in (0.55, 0.75, 0.85)]
    return conf, correct


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_per_exit_thresholds_find_the_best_setting_of_an_exhaustive_search(seed):
    """Two free exits: coordinate descent with pair moves reaches the optimum of trying every pair
    of grid values (the cheapest within the drop; the most accurate within the budget), and the
    shared rule the optimum over equal pairs."""
    conf, correct = _small(seed)
    cost = [1.0, 2.5, 4.0]
    grid = threshold_grid(9)
    scores = ExitScores(conf, correct, cost)
    pairs, equal = list(product(grid, repeat=2)), [(v, v) for v in grid]
    for target in (0.0, 0.03, 0.1):
        got = per_exit_thresholds(scores, grid, max_accuracy_drop=target)
        assert (got.expected_cost, got.accuracy) == pytest.approx(_brute(conf, correct, cost, pairs, target=target))
        shared = shared_thresholds(scores, grid, max_accuracy_drop=target)
        assert shared.thresholds[0] == shared.thresholds[1]
        assert (shared.expected_cost, shared.accuracy) == pytest.approx(_brute(conf, correct, cost, equal, target=target))
    for target in (0.1, 0.2):  # with the bound at 80 %: (lost, gained) of each pair, by hand
        got = per_exit_thresholds(scores, grid, max_accuracy_drop=target, confidence_level=0.8)
        assert (got.expected_cost, got.accuracy) == pytest.approx(_brute(conf, correct, cost, pairs, target=target, z=Z80))
        shared = shared_thresholds(scores, grid, max_accuracy_drop=target, confidence_level=0.8)
        assert (shared.expected_cost, shared.accuracy) == pytest.approx(_brute(conf, correct, cost, equal, target=target,
                                                                               z=Z80))
    for budget in (1.5, 2.0, 3.0):
        got = per_exit_thresholds(scores, grid, cost_budget=budget)
        assert got.accuracy == pytest.approx(_brute(conf, correct, cost, pairs, budget=budget)), (budget, got)
        assert got.expected_cost <= budget + 1e-9
        shared = shared_thresholds(scores, grid, cost_budget=budget)
        assert shared.accuracy == pytest.approx(_brute(conf, correct, cost, equal, budget=budget)), (budget, shared)


def test_confidence_is_per_sample_over_the_last_dimension_whatever_the_batch_shape():
    """(exits, images, classes) logits give (exits, images) confidences, one logit vector gives
    one value: the softmax and the entropy run over the classes."""
    rows = [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]
    logits = torch.tensor(rows).view(2, 2, 3)
    assert confidence(logits).tolist()[1] == pytest.approx([max(_softmax(r)) for r in rows[2:]], rel=1e-6)
    assert confidence(logits, "entropy").tolist()[0] == pytest.approx([_entropy_confidence(r) for r in rows[:2]],
                                                                       rel=1e-6)
    wide = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])  # 5 classes: the entropy is normalised by log 5
    assert confidence(wide, "entropy").item() == pytest.approx(_entropy_confidence(wide[0].tolist()), abs=1e-6)
    assert confidence(torch.tensor(rows[0]), "entropy").item() == pytest.approx(_entropy_confidence(rows[0]), rel=1e-6)
    assert confidence(torch.tensor(rows[1])).item() == pytest.approx(max(_softmax(rows[1])), rel=1e-6)


def test_scores_keep_costs_as_given_in_float64():
    logits = torch.zeros(2, 3, 4)
    scores = ExitScores.from_logits(logits, torch.zeros(3, dtype=torch.long), [0.1, 0.3])
    assert scores.cost.tolist() == [0.1, 0.3]  # not float32's 0.10000000149
    direct = ExitScores([[0.5, 0.5, 0.5]] * 2, [[True] * 3] * 2, [0.1, 0.3])
    assert direct.cost.dtype == torch.float64 and direct.cost.tolist() == [0.1, 0.3]


def test_within_a_budget_the_cheapest_of_equally_accurate_settings_wins():
    """Costs in MACs (millions): every image is right at both exits, so every setting is equally
    accurate; from everything at the last exit, the per-exit search moves everything to exit 1."""
    scores = ExitScores([[0.25, 0.5, 0.75, 1.0], [1.0] * 4], [[True] * 4, [True] * 4], [1e6, 4e6])
    start = scores.evaluate([NEVER])
    assert start.expected_cost == 4e6
    got = per_exit_thresholds(scores, threshold_grid(5), cost_budget=4e6, start=start)
    assert got.thresholds == [0.0, 0.0] and got.expected_cost == 1e6 and got.accuracy == 1.0


def test_per_exit_search_starts_from_the_shared_rule_and_stops_after_its_sweeps():
    """No sweep at all gives the start (default: the shared rule's best); the search never ends up
    worse than where it started."""
    conf, correct = _small(5)
    scores = ExitScores(conf, correct, [1.0, 2.5, 4.0])
    grid = threshold_grid(9)
    shared = shared_thresholds(scores, grid, max_accuracy_drop=0.05)
    assert per_exit_thresholds(scores, grid, max_accuracy_drop=0.05, sweeps=0) == shared
    start = scores.evaluate([NEVER, NEVER])
    assert per_exit_thresholds(scores, grid, max_accuracy_drop=0.05, start=start, sweeps=0) is start
    one = per_exit_thresholds(scores, grid, max_accuracy_drop=0.05, start=start, sweeps=1)
    assert one.expected_cost < start.expected_cost and one.drop <= 0.05 + 1e-12


def test_correctness_given_as_zeros_and_ones_counts_as_booleans():
    scores = ExitScores([[0.75, 0.25], [1.0, 1.0]], [[1, 0], [0, 1]], [1.0, 2.0])
    assert scores.correct.dtype == torch.bool
    got = scores.evaluate([0.5])
    assert got.accuracy == 1.0 and got.drop == -0.5
    assert drop_upper_bound(torch.tensor([0, 1]), torch.tensor([1, 1]), 0.5) == -0.5
    assert drop_upper_bound(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]), 0.5) == pytest.approx(1 / 3)


def test_the_rules_do_not_depend_on_the_order_of_the_grid():
    """The same optimum from a grid given high to low (and from the default grid for the shared
    rule): cheapest within the drop, most accurate within the budget."""
    conf, correct = _small(7)
    scores = ExitScores(conf, correct, [1.0, 2.5, 4.0])
    grid = threshold_grid(9)
    for kwargs in ({"max_accuracy_drop": 0.05}, {"max_accuracy_drop": 0.0}, {"cost_budget": 2.0}):
        up = shared_thresholds(scores, grid, **kwargs)
        down = shared_thresholds(scores, grid[::-1], **kwargs)
        assert (down.expected_cost, down.accuracy) == (up.expected_cost, up.accuracy), kwargs
    close = _two_exits(395, 5, 600)  # from high to low: every cheaper feasible setting replaces the last
    close.cost = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert shared_thresholds(close, [NEVER, 1.0, 0.5, 0.0], max_accuracy_drop=0.01).expected_cost == pytest.approx(3.6)
    fine = shared_thresholds(scores, max_accuracy_drop=0.05)  # threshold_grid(): hundredths
    assert fine.thresholds[0] * 100 == pytest.approx(round(fine.thresholds[0] * 100))
    assert fine.expected_cost == shared_thresholds(scores, grid, max_accuracy_drop=0.05).expected_cost


def test_a_drop_equal_to_the_target_up_to_1e_12_is_within_it():
    """Two images, letting both out at exit 1 loses one (a drop of exactly 0.5): a target of
    0.5 - 1e-12 still allows it, for both rules and from any start."""
    scores = ExitScores([[0.75, 0.75], [1.0, 1.0]], [[True, False], [True, True]], [1.0, 4.0])
    for rule in (shared_thresholds, per_exit_thresholds):
        assert rule(scores, threshold_grid(5), max_accuracy_drop=0.5 - 1e-12).thresholds == [0.0, 0.0]
    got = per_exit_thresholds(scores, threshold_grid(5), max_accuracy_drop=0.5 - 1e-12, start=scores.evaluate([NEVER]))
    assert got.thresholds == [0.0, 0.0] and got.drop == 0.5
    assert per_exit_thresholds(scores, threshold_grid(5), max_accuracy_drop=0.4999, start=scores.evaluate([NEVER])
                               ).thresholds == [NEVER, 0.0]


def test_per_exit_thresholds_on_a_single_image():
    """One image that exit 1 gets right: the search lets it out there (accuracy 1 of 1, no drop)."""
    scores = ExitScores([[0.75], [1.0]], [[True], [True]], [1.0, 4.0])
    got = per_exit_thresholds(scores, threshold_grid(5), max_accuracy_drop=0.0, start=scores.evaluate([NEVER]))
    assert got.thresholds == [0.0, 0.0] and got.accuracy == 1.0 and got.expected_cost == 1.0


def test_per_exit_thresholds_report_the_grid_values_themselves():
    """Thresholds are the grid's values as given (0.3, not its float32 0.30000001192), and the
    default grid is threshold_grid()'s hundredths (0.26: the first above the wrong image's 0.25)."""
    scores = ExitScores([[0.375, 0.25], [1.0, 1.0]], [[True, False], [True, True]], [1.0, 4.0])
    start = scores.evaluate([NEVER])
    got = per_exit_thresholds(scores, [0.1, 0.3, 0.7, NEVER], max_accuracy_drop=0.0, start=start)
    assert got.thresholds == [0.3, 0.0]
    got = per_exit_thresholds(scores, max_accuracy_drop=0.0, start=start)
    assert got.thresholds == [0.26, 0.0] and got.expected_cost == 2.5


def _three_exits(n: int, lost_at_2: int = 0) -> ExitScores:
    """Three exits (cost 1, 2, 4), n images in two halves. G1: exit 1 sure (0.875) and wrong, exit 2
    sure and right; G2: every exit right, exits 1 and 2 unsure (0.375). One threshold for both
    exits cannot let G2 out at exit 2 without G1 out (wrong) at exit 1; per-exit thresholds
    (NEVER, 0.375) send every image out at exit 2, losing ``lost_at_2`` images of G2 there."""
    half = n // 2
    conf = torch.tensor([[0.875] * half + [0.375] * half, [0.875] * half + [0.375] * half, [1.0] * n])
    first = [False] * half + [True] * half
    second = [True] * half + [False] * lost_at_2 + [True] * (half - lost_at_2)
    return ExitScores(conf, torch.tensor([first, second, [True] * n]), [1.0, 2.0, 4.0])


def test_certification_with_the_per_exit_rule_learns_per_exit_thresholds():
    """The held-out split is judged against its last exit (exit 3), not exit 2: exit 2 loses 3
    held-out images, so the bound is hand_bound(3, 0, 1000)."""
    held_out = _three_exits(1000, lost_at_2=3)
    cert = certified_thresholds(_three_exits(1000), held_out, 0.01, rule="per_exit", grid=GRID, steps=1,
                                learn_margin=False)
    assert cert.thresholds == [NEVER, 0.375, 0.0] and cert.held_out.expected_cost == 2.0
    assert cert.drop_bound == pytest.approx(hand_bound(3, 0, 1000, Z95), rel=1e-12)
    shared = certified_thresholds(_three_exits(1000), held_out, 0.01, rule="shared", grid=GRID, steps=1,
                                  learn_margin=False)
    assert shared.thresholds == [NEVER, NEVER, 0.0] and len(shared.tested) == 1


def test_the_learning_margin_holds_for_per_exit_moves_too():
    """Letting G2 out at exit 2 loses 3 of 1,000 learning images: a 0.3-point drop, within a
    0.5-point target, but its bound hand_bound(3, 0, 1000) = 0.85 points is not, so with the
    margin the per-exit search lets only G1 out at exit 2 (threshold 0.625, nothing lost)."""
    assert 0.005 < hand_bound(3, 0, 1000, Z95)
    learn, held_out = _three_exits(1000, lost_at_2=3), _three_exits(1000)
    loose = certified_thresholds(learn, held_out, 0.005, rule="per_exit", grid=GRID, steps=1, learn_margin=False)
    assert loose.thresholds == [NEVER, 0.375, 0.0] and loose.learnt.drop == pytest.approx(0.003)
    cert = certified_thresholds(learn, held_out, 0.005, rule="per_exit", grid=GRID, steps=1)
    assert cert.thresholds == [NEVER, 0.625, 0.0] and cert.learnt.drop == 0.0
    assert cert.learnt.drop_bound == pytest.approx(hand_bound(0, 0, 1000, Z95), rel=1e-12)


def test_per_exit_thresholds_of_three_free_exits_reach_the_exhaustive_optimum():
    """Four exits (three free thresholds): after a pair move improves, the search goes on with
    single moves and pairs (i, j > i) until nothing improves, and here reaches the most accurate
    setting within the budget of all 1,000 combinations."""
    g = torch.Generator().manual_seed(3)
    conf = (torch.randint(0, 9, (4, 48), generator=g) / 8).tolist()
    u = torch.rand(48, generator=g).tolist()
    correct = [[x < p for x in u] for p in (0.5, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3, 0.9)]
    cost = [1.0, 2.5, 4.0, 6.0]
    grid = threshold_grid(9)
    want = _brute(conf, correct, cost, list(product(grid, repeat=3)), budget=3.0)
    got = per_exit_thresholds(ExitScores(conf, correct, cost), grid, cost_budget=3.0)
    assert got.accuracy == pytest.approx(want) and got.expected_cost <= 3.0 + 1e-9


@pytest.mark.parametrize("k, moves", [(0, True), (30, False)])
def test_per_exit_moves_count_the_losses_and_gains_they_undo(k, moves):
    """Three exits (cost 1, 2, 4), 1,000 images, exit 2 taking 200 + k of them: G (100) it gets
    wrong where exits 1 and 3 are right, H (100) it gets right where both are wrong, K (k) exits 2
    and 3 get right and exit 1 not. Moving those images to exit 1 undoes G's 100 losses and H's
    100 gains and loses K: bound hand_bound(k, 0, 1000) at 80 %, within a 2-point target for
    k = 0 (the search moves), not for k = 30 (it stays)."""
    groups = [(100, True, False, True), (100, False, True, False), (k, False, True, True),
              (800 - k, False, False, True)]  # (size, exit 1 right, exit 2 right, exit 3 right)
    conf1 = [0.875] * (200 + k) + [0.375] * (800 - k)
    correct = [[r[e] for size, *r in groups for _ in range(size)] for e in range(3)]
    scores = ExitScores([conf1, conf1, [1.0] * 1000], correct, [1.0, 2.0, 4.0])
    start = scores.evaluate([NEVER, 0.625], 0.8)
    assert start.drop_bound == pytest.approx(hand_bound(100, 100, 1000, Z80), rel=1e-12) and start.drop_bound < 0.02
    assert (hand_bound(k, 0, 1000, Z80) <= 0.02) is moves
    got = per_exit_thresholds(scores, GRID, max_accuracy_drop=0.02, confidence_level=0.8, start=start)
    if moves:
        assert got.thresholds == [0.625, 0.625, 0.0] and got.expected_cost == pytest.approx((200 * 1 + 800 * 4) / 1000)
        assert got.drop_bound == pytest.approx(hand_bound(0, 0, 1000, Z80), rel=1e-12)
    else:
        assert got is start


def test_one_sweep_is_one_round_of_single_exit_moves_counting_undone_losses():
    """G, H as above (exit 2 takes them at 0.875), S (100) every exit gets right, seen by exit 2
    at 0.625, the rest (700) only the last exit gets right. One sweep moves exit 1 (G and H out
    there: G's loss undone, H's gain undone, bound hand_bound(0, 0, 1000)) and then exit 2 (S out
    at 0.625): thresholds (0.625, 0.625), cost (200 + 200 + 2,800) / 1,000."""
    groups = [(100, True, False, True), (100, False, True, False), (100, True, True, True), (700, False, False, True)]
    conf1 = [0.875] * 200 + [0.375] * 800
    conf2 = [0.875] * 200 + [0.625] * 100 + [0.375] * 700
    correct = [[r[e] for size, *r in groups for _ in range(size)] for e in range(3)]
    scores = ExitScores([conf1, conf2, [1.0] * 1000], correct, [1.0, 2.0, 4.0])
    start = scores.evaluate([NEVER, 0.875], 0.8)
    got = per_exit_thresholds(scores, GRID, max_accuracy_drop=0.02, confidence_level=0.8, start=start, sweeps=1)
    assert got.thresholds == [0.625, 0.625, 0.0] and got.expected_cost == pytest.approx(3.2)
    assert got.drop_bound == pytest.approx(hand_bound(0, 0, 1000, Z80), rel=1e-12)
