"""Early-exit thresholds (nni_fedexit/exits/thresholds.py): per-exit against shared, and a target
that holds on unseen images, on synthetic exit outputs whose behaviour is planted."""

import pytest
import torch

from nni_fedexit.exits import early_exit_metrics
from nni_fedexit.exits.costs import ExitCost
from nni_fedexit.exits.thresholds import (
    ExitScores, certified_thresholds, drop_upper_bound, per_exit_thresholds, shared_thresholds, threshold_grid,
)
from helpers import torch_threads

COST = [1.0, 2.0, 4.0, 6.0]  # leaving at exit 1..4 (exit 4: the network without early exits)
GRID = threshold_grid(41)


def planted(n: int, seed: int, skill=(-0.2, 0.8, 1.5, 1.9), noise: float = 0.5) -> ExitScores:
    """N images of a latent ease h: exit i is right with probability sigmoid(skill_i + 2h), on the
    same images for every exit (one uniform draw per image: an image a shallow exit gets right, the
    deeper ones get right too), and its confidence is that probability seen through noise."""
    g = torch.Generator().manual_seed(seed)
    ease = torch.randn(n, generator=g, dtype=torch.float64)
    logit = torch.tensor(skill, dtype=torch.float64).view(-1, 1) + 2 * ease
    right = torch.rand(1, n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)
    seen = torch.sigmoid(logit + noise * torch.randn(len(skill), n, generator=g, dtype=torch.float64))
    return ExitScores(seen, right, COST)


def test_exits_taken_and_metrics_agree_with_a_loop_over_images():
    """Image by image: leave at the first exit whose max softmax probability reaches its
    threshold, else at the last; pay that exit's cost."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 300, 5, generator=g) * 2, torch.randint(0, 5, (300,), generator=g)
    conf = torch.softmax(logits, dim=-1).max(dim=-1).values.tolist()
    correct = (logits.argmax(dim=-1) == labels).tolist()
    scores = ExitScores.from_logits(logits, labels, COST)
    costs = [ExitCost(exit=i + 1, params=0, macs=int(c), early_exit_macs=int(c)) for i, c in enumerate(COST)]
    for t in ([0.5, 0.6, 0.7], [0.0, 1.0, 0.3], [1.1, 1.1, 1.1]):
        exits = [next((i for i in range(3) if conf[i][s] >= t[i]), 3) for s in range(300)]
        got = scores.evaluate(t)
        assert scores.exits_taken(t).tolist() == exits
        assert got.accuracy == pytest.approx(sum(correct[e][s] for s, e in enumerate(exits)) / 300)
        assert got.exit_share == pytest.approx([exits.count(i) / 300 for i in range(4)])
        assert got.expected_cost == pytest.approx(sum(COST[e] for e in exits) / 300)
        assert got.drop == pytest.approx(sum(correct[3]) / 300 - got.accuracy)
        want = early_exit_metrics(logits, labels, t, costs)  # the network module's view is the same numbers
        assert (want["accuracy"], want["exit_share"], want["expected_macs"]) == (got.accuracy, got.exit_share,
                                                                                 got.expected_cost)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.0, 0.005, 0.02])
def test_per_exit_thresholds_never_do_worse_than_the_shared_rule_on_the_same_outputs(seed, target):
    scores = planted(1500, seed)
    shared = shared_thresholds(scores, GRID, max_accuracy_drop=target)
    mine = per_exit_thresholds(scores, GRID, max_accuracy_drop=target)
    assert mine.drop <= target + 1e-12 and shared.drop <= target + 1e-12
    assert mine.expected_cost <= shared.expected_cost + 1e-12


def test_per_exit_thresholds_find_savings_one_shared_threshold_cannot():
    """Exit 2 is nearly as good as the last, exit 1 is poor: the best thresholds differ by exit."""
    scores = planted(3000, 7, skill=(-1.5, 1.8, 1.9, 2.0))
    shared = shared_thresholds(scores, GRID, max_accuracy_drop=0.005)
    mine = per_exit_thresholds(scores, GRID, max_accuracy_drop=0.005)
    assert mine.expected_cost < 0.95 * shared.expected_cost
    assert len(set(mine.thresholds[:-1])) > 1


def test_a_cost_budget_gets_the_most_accurate_setting_within_it():
    scores = planted(1500, 3)
    budget = 3.0
    shared = shared_thresholds(scores, GRID, cost_budget=budget)
    mine = per_exit_thresholds(scores, GRID, cost_budget=budget)
    assert mine.expected_cost <= budget and mine.accuracy >= shared.accuracy
    with pytest.raises(ValueError, match="raise the budget"):
        shared_thresholds(scores, GRID, cost_budget=0.5)


def test_the_drop_bound_is_above_the_observed_drop_and_tightens_with_more_images():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(4000, generator=g) < 0.9
    right = reference.clone()
    right[:40] = False  # 40 images lost (some were already wrong), none gained
    observed = float(reference.double().mean() - right.double().mean())
    few, many = drop_upper_bound(reference[:1000], right[:1000]), drop_upper_bound(reference, right)
    assert few > many > observed
    assert 0 < drop_upper_bound(reference, reference) < 0.002  # no disagreement: still a small margin
    with pytest.raises(ValueError, match="confidence_level"):
        drop_upper_bound(reference, right, confidence_level=1.0)


def _calibrate_twice(seed: int, skill, target: float, grid):
    """Certified thresholds (learn 3,000, held out 3,000), and plain ones fitted to all 6,000."""
    learn, held_out = planted(3000, 100 + seed, skill), planted(3000, 200 + seed, skill)
    cert = certified_thresholds(learn, held_out, target, rule="per_exit", grid=grid, steps=5)
    both = ExitScores(torch.cat([learn.confidence, held_out.confidence], 1),
                      torch.cat([learn.correct, held_out.correct], 1), COST)
    return cert, per_exit_thresholds(both, grid, max_accuracy_drop=target)


@pytest.mark.slow
def test_the_margin_rule_keeps_a_planted_target_on_unseen_images_where_the_plain_rule_does_not():
    """10 calibrations on fresh draws of 2 x 3,000 images, each judged on 100,000 new images of the
    same distribution: the certified thresholds keep the 0.5-point target in at least 9 of 10
    (95 % confidence); per-exit thresholds fitted to all 6,000 images without a margin break it in
    several, and the margin keeps a good part of their savings."""
    skill, target, grid = (1.2, 1.7, 1.9, 2.0), 0.005, threshold_grid(21)
    population = planted(100_000, 12345, skill)
    reference = float(population.correct[-1].double().mean())
    kept = plain_kept = 0
    saved = []
    with torch_threads(1):  # small tensors: one thread is the fastest
        results = [_calibrate_twice(seed, skill, target, grid) for seed in range(10)]
    for cert, plain in results:
        unseen = population.evaluate(cert.thresholds)
        kept += reference - unseen.accuracy <= target
        saved.append(1 - unseen.expected_cost / COST[-1])
        plain_kept += reference - population.evaluate(plain.thresholds).accuracy <= target
    assert kept >= 9 and plain_kept <= 7, (kept, plain_kept)
    assert sum(saved) / len(saved) > 0.15, saved


def test_certification_tests_in_order_and_reports_its_guarantee():
    learn, held_out = planted(1500, 1), planted(1500, 2)
    cert = certified_thresholds(learn, held_out, 0.01, rule="shared", grid=GRID, steps=5)
    assert cert.tested[0]["drop_bound"] == 0.0 and cert.tested[0]["passed"]
    passed = [t["passed"] for t in cert.tested]
    assert passed == sorted(passed, reverse=True)  # passes, then at most one failure that ends the test
    assert cert.drop_bound <= 0.01 and cert.held_out.drop <= cert.drop_bound
    assert "95%" in cert.guarantee() and "1.00%" in cert.guarantee()
    with pytest.raises(ValueError, match="rule"):
        certified_thresholds(learn, held_out, 0.01, rule="mine")


def _offsetting(n: int) -> ExitScores:
    """Two exits (cost 1 and 4). 60 % easy images: both exits right, exit 1 sure (0.95). 20 % that
    only the last exit gets right and 20 % that only exit 1 gets right, exit 1 unsure (0.6) of both:
    letting the unsure ones out early loses exactly as many images as it gains."""
    easy, lost = int(0.6 * n), int(0.2 * n)
    gained = n - easy - lost
    conf = torch.tensor([[0.95] * easy + [0.6] * (lost + gained), [1.0] * n])
    correct = torch.tensor([[True] * easy + [False] * lost + [True] * gained,
                            [True] * easy + [True] * lost + [False] * gained])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    return ExitScores(conf[:, order], correct[:, order], [1.0, 4.0])


def test_the_learnt_path_keeps_to_settings_whose_drop_is_bounded_not_only_zero_on_average():
    """Judged by its mean drop alone, letting every image out at exit 1 costs nothing here (as many
    gained as lost), so the path jumps to it, the held-out bound rejects it, and nothing is saved.
    With the bound on the learning split too, the path takes the easy images out first: that
    passes the held-out test and saves 45 % of the cost at no drop."""
    learn, held_out = _offsetting(2400), _offsetting(9600)
    loose = certified_thresholds(learn, held_out, 0.005, rule="per_exit", grid=GRID, learn_margin=False)
    assert loose.thresholds[0] > 1 and not loose.tested[1]["passed"]  # everything at the last exit
    assert loose.tested[1]["learn_drop"] == 0.0 and loose.tested[1]["thresholds"][0] <= 0.6
    bounded = certified_thresholds(learn, held_out, 0.005, rule="per_exit", grid=GRID)
    assert 0.6 < bounded.thresholds[0] <= 0.95
    assert bounded.held_out.drop == 0.0 and bounded.held_out.expected_cost == pytest.approx(0.6 * 1 + 0.4 * 4)
