"""Early-exit thresholds: one per exit, and a target that holds on images the calibration never saw.

A sample leaves at the first exit whose confidence reaches that exit's threshold. Two rules choose
the thresholds on labelled images:

* ``shared``: one threshold for every exit, swept over a grid (the rule S4 started with);
* ``per_exit``: a threshold per exit, searched by coordinate descent (single exits, then pairs of
  exits, so one exit can take images over from another) from the best shared setting: it never
  does worse than the shared rule on the same outputs.

Both pick the cheapest setting within an accuracy drop (or the most accurate within a cost
budget) *on the images they see*, which is optimistic on unseen ones. :func:`certified_thresholds`
adds the margin: it learns a path of settings of growing drop on one split and tests them in
that order on a held-out split, keeping the last one whose upper confidence bound on the accuracy
drop is within the target (fixed-sequence testing, as in "Learn then Test", Angelopoulos et al.
2021): with probability about ``confidence_level`` over the held-out draw, the chosen setting's
drop on new images from the same distribution is at most the target. The bound is the normal
approximation of the paired per-image drop (last exit right and early exit wrong minus the
reverse), with Agresti-Coull's pseudo-counts so a split without disagreements still has a margin.

Everything here works on :class:`ExitScores` (each exit's confidence and correctness per image,
and the cost of leaving at each exit: MACs, or measured latency), so it is pure tensor code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CRITERIA", "RULES", "confidence", "ExitScores", "ThresholdSetting", "CertifiedThresholds", "threshold_grid",
           "shared_thresholds", "per_exit_thresholds", "drop_upper_bound", "certified_thresholds"]

#: how thresholds are chosen: one for every exit, or one per exit
RULES = ("shared", "per_exit")

#: how an exit's confidence is measured
CRITERIA = ("max_prob", "entropy")

#: a threshold above every confidence: nothing leaves there (the last exit takes it)
NEVER = 1.0 + 1e-6


def confidence(logits: torch.Tensor, criterion: str = "max_prob") -> torch.Tensor:
    """Per-sample confidence in [0, 1]: the max softmax probability, or 1 - normalised entropy."""
    probs = F.softmax(logits.float(), dim=-1)
    if criterion == "max_prob":
        return probs.max(dim=-1).values
    if criterion == "entropy":
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        return 1.0 - ent / math.log(logits.shape[-1])
    raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")


def _as_compared(thresholds: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Thresholds as early-exit inference compares them: a float32 confidence against a Python
    float is compared in float32, so a threshold counts as its float32 value."""
    return torch.as_tensor(thresholds, dtype=torch.float64).float().double()


def threshold_grid(num_thresholds: int = 101) -> list[float]:
    """``num_thresholds`` values from 0 to 1, then :data:`NEVER`."""
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    return [i / (num_thresholds - 1) for i in range(num_thresholds)] + [NEVER]


@dataclass
class ThresholdSetting:
    """One setting of the thresholds and what it gives on some images."""

    #: one per exit, the last one 0.0 (everything left leaves there)
    thresholds: list[float]
    accuracy: float
    #: mean cost per image (MACs or seconds, as the scores' ``cost``)
    expected_cost: float
    #: share of the images leaving at each exit
    exit_share: list[float]
    #: the last exit's accuracy on the same images, minus ``accuracy``
    drop: float
    #: upper confidence bound on the drop (:func:`drop_upper_bound`), where it was asked for
    drop_bound: float | None = None

    def within(self, max_accuracy_drop: float) -> bool:
        """Whether the drop (its bound, where there is one) is within ``max_accuracy_drop``."""
        return (self.drop if self.drop_bound is None else self.drop_bound) <= max_accuracy_drop + 1e-12


@dataclass
class ExitScores:
    """Each exit's confidence and correctness on N labelled images, and the cost of leaving at each exit."""

    #: (L, N) confidence in [0, 1] (see :func:`nni_fedexit.exits.confidence`)
    confidence: torch.Tensor
    #: (L, N) whether the exit's prediction is right
    correct: torch.Tensor
    #: (L,) cost of an image that leaves at exit i: stages and exits 1..i
    cost: torch.Tensor

    def __post_init__(self) -> None:
        self.confidence = torch.as_tensor(self.confidence, dtype=torch.float64)
        self.correct = torch.as_tensor(self.correct, dtype=torch.bool)
        self.cost = torch.as_tensor(self.cost, dtype=torch.float64)
        if self.confidence.dim() != 2 or self.confidence.shape != self.correct.shape:
            raise ValueError(f"confidence and correct must both be (exits, images), got {tuple(self.confidence.shape)} "
                             f"and {tuple(self.correct.shape)}")
        if self.cost.shape != (self.confidence.shape[0],):
            raise ValueError(f"cost needs one value per exit ({self.confidence.shape[0]}), got {tuple(self.cost.shape)}")

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor, cost: Sequence[float],
                    criterion: str = "max_prob") -> "ExitScores":
        """From :func:`~nni_fedexit.exits.exit_outputs`'s (L, N, C) logits (or ensemble log-probabilities)."""
        conf = torch.stack([confidence(z, criterion) for z in logits])
        return cls(conf, logits.argmax(dim=-1) == labels.unsqueeze(0), torch.as_tensor(cost, dtype=torch.float64))

    @property
    def num_exits(self) -> int:
        return self.confidence.shape[0]

    @property
    def num_images(self) -> int:
        return self.confidence.shape[1]

    def exits_taken(self, thresholds: Sequence[float]) -> torch.Tensor:
        """(N,) 0-based exit each image leaves at."""
        t = _as_compared(list(thresholds)[: self.num_exits - 1]).view(-1, 1)
        leaves = torch.cat([self.confidence[:-1] >= t, torch.ones(1, self.num_images, dtype=torch.bool)])
        return leaves.to(torch.int8).argmax(dim=0)  # the first exit that lets it leave

    def right(self, thresholds: Sequence[float]) -> torch.Tensor:
        """(N,) whether early-exit inference with ``thresholds`` gets each image right."""
        return self.correct[self.exits_taken(thresholds), torch.arange(self.num_images)]

    def evaluate(self, thresholds: Sequence[float], confidence_level: float | None = None) -> ThresholdSetting:
        """What ``thresholds`` give on these images; with ``confidence_level``, the bound on the drop too."""
        t = [float(v) for v in list(thresholds)[: self.num_exits - 1]] + [0.0]
        taken = self.exits_taken(t)
        n = max(self.num_images, 1)
        share = torch.bincount(taken, minlength=self.num_exits).double() / n
        right = self.correct[taken, torch.arange(self.num_images)]
        accuracy = float(right.double().sum() / n)
        bound = None if confidence_level is None else drop_upper_bound(self.correct[-1], right, confidence_level)
        return ThresholdSetting(thresholds=t, accuracy=accuracy, expected_cost=float((share * self.cost).sum()),
                                exit_share=share.tolist(), drop=float(self.correct[-1].double().sum() / n) - accuracy,
                                drop_bound=bound)


def _target(max_accuracy_drop: float | None, cost_budget: float | None) -> None:
    if (max_accuracy_drop is None) == (cost_budget is None):
        raise ValueError("give exactly one target: max_accuracy_drop or cost_budget")
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")


def _better(a: ThresholdSetting, b: ThresholdSetting | None, max_accuracy_drop: float | None,
            cost_budget: float | None) -> bool:
    """Whether ``a`` is feasible and better than ``b`` for the target."""
    if max_accuracy_drop is not None:
        if not a.within(max_accuracy_drop):
            return False
        return b is None or (a.expected_cost, -a.accuracy) < (b.expected_cost - 1e-9, -b.accuracy)
    assert cost_budget is not None
    if a.expected_cost > cost_budget * (1 + 1e-12):
        return False
    return b is None or (a.accuracy, -a.expected_cost) > (b.accuracy + 1e-12, -b.expected_cost)


def shared_thresholds(scores: ExitScores, grid: Sequence[float] | None = None, *, max_accuracy_drop: float | None = None,
                      cost_budget: float | None = None, confidence_level: float | None = None) -> ThresholdSetting:
    """The best single threshold for every exit: cheapest within ``max_accuracy_drop`` of the last
    exit (with ``confidence_level``: its upper confidence bound within it), or most accurate
    within ``cost_budget``."""
    _target(max_accuracy_drop, cost_budget)
    best = _best_shared(scores, grid, max_accuracy_drop, cost_budget, confidence_level)
    if best is None and max_accuracy_drop is not None:
        raise ValueError(f"no setting of the grid keeps the drop's upper bound within {max_accuracy_drop:.4%} on "
                         f"{scores.num_images:,} images: give a larger max_accuracy_drop, or more images")
    if best is None:
        cheapest = scores.evaluate([0.0] * (scores.num_exits - 1)).expected_cost
        raise ValueError(f"cost_budget {cost_budget:,.6g} is below the cheapest setting ({cheapest:,.6g} per image, "
                         "every image at exit 1): raise the budget")
    return best


def _best_shared(scores: ExitScores, grid: Sequence[float] | None, max_accuracy_drop: float | None,
                 cost_budget: float | None, confidence_level: float | None) -> ThresholdSetting | None:
    """The best single threshold for the target, None where no grid value meets it."""
    best: ThresholdSetting | None = None
    for v in grid if grid is not None else threshold_grid():
        setting = scores.evaluate([v] * (scores.num_exits - 1), confidence_level)
        if _better(setting, best, max_accuracy_drop, cost_budget):
            best = setting
    return best


@dataclass
class _Sweep:
    """What every grid value of one exit's threshold gives, the others fixed: accuracy, expected
    cost, and the images lost and gained against the last exit."""

    accuracy: torch.Tensor
    cost: torch.Tensor
    lost: torch.Tensor
    gained: torch.Tensor


def _sweep(scores: ExitScores, thresholds: Sequence[float], i: int, values: torch.Tensor) -> _Sweep:
    """An image that reaches exit i leaves there if confident enough, else where it would have
    without exit i. One sort and cumulative sums for the whole grid."""
    t = list(thresholds)
    t[i] = NEVER
    cont = scores.exits_taken(t)
    images = torch.arange(scores.num_images)
    right = scores.correct[cont, images]
    reference = scores.correct[-1]
    cost = scores.cost[cont]
    reach = cont > i
    conf, order = torch.sort(scores.confidence[i, reach], descending=True)
    here, there, ref = scores.correct[i, reach], right[reach], reference[reach]

    def gain(delta: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.float64), delta.double()[order].cumsum(0)])

    gain_right = gain(here.double() - there.double())
    gain_cost = gain(scores.cost[i] - cost[reach])
    gain_lost = gain((ref & ~here).double() - (ref & ~there).double())
    gain_gained = gain((~ref & here).double() - (~ref & there).double())
    leaving = conf.numel() - torch.searchsorted(conf.flip(0).contiguous(), _as_compared(values), side="left")
    n = max(scores.num_images, 1)
    return _Sweep(accuracy=(right.double().sum() + gain_right[leaving]) / n, cost=(cost.sum() + gain_cost[leaving]) / n,
                  lost=float((reference & ~right).sum()) + gain_lost[leaving],
                  gained=float((~reference & right).sum()) + gain_gained[leaving])


def _pick(sweep: _Sweep, n: int, reference: float, best: ThresholdSetting, max_accuracy_drop: float | None,
          cost_budget: float | None, confidence_level: float | None) -> int | None:
    """Index of the grid value that beats ``best`` most for the target, None if none does."""
    accuracy, cost = sweep.accuracy, sweep.cost
    if max_accuracy_drop is not None:
        drop = reference - accuracy if confidence_level is None else _bound(sweep.lost, sweep.gained, n, confidence_level)
        feasible = drop <= max_accuracy_drop + 1e-12
        key = torch.where(feasible, -cost + accuracy * 1e-9, torch.tensor(-math.inf, dtype=torch.float64))
        current = -best.expected_cost + best.accuracy * 1e-9
    else:
        feasible = cost <= cost_budget * (1 + 1e-12)
        key = torch.where(feasible, accuracy - cost * 1e-15, torch.tensor(-math.inf, dtype=torch.float64))
        current = best.accuracy - best.expected_cost * 1e-15
    index = int(key.argmax())
    return index if bool(feasible[index]) and float(key[index]) > current + 1e-12 else None


def per_exit_thresholds(scores: ExitScores, grid: Sequence[float] | None = None, *,
                        max_accuracy_drop: float | None = None, cost_budget: float | None = None,
                        start: ThresholdSetting | None = None, sweeps: int = 8,
                        confidence_level: float | None = None) -> ThresholdSetting:
    """The best threshold per exit for the target, by coordinate descent over ``grid`` from
    ``start`` (default: the best shared setting): moves of one exit's threshold, then of two at
    once, until none improves (at most ``sweeps`` rounds). Never worse than ``start``. With
    ``confidence_level`` a setting is within the drop when its upper confidence bound is."""
    _target(max_accuracy_drop, cost_budget)
    values = torch.tensor(list(grid if grid is not None else threshold_grid()), dtype=torch.float64)
    best = start if start is not None else shared_thresholds(scores, values.tolist(), max_accuracy_drop=max_accuracy_drop,
                                                              cost_budget=cost_budget, confidence_level=confidence_level)
    reference = float(scores.correct[-1].double().mean()) if scores.num_images else 0.0
    free = scores.num_exits - 1

    def improve(t: list[float], i: int) -> ThresholdSetting | None:
        index = _pick(_sweep(scores, t, i, values), scores.num_images, reference, best, max_accuracy_drop, cost_budget,
                      confidence_level)
        if index is None:
            return None
        t = list(t)
        t[i] = float(values[index])
        return scores.evaluate(t, confidence_level)

    for _ in range(sweeps):
        improved = False
        for i in range(free):  # one exit at a time
            better = improve(best.thresholds, i)
            if better is not None:
                best, improved = better, True
        if improved:
            continue
        for i in range(free):  # two at once: one exit takes images over from another
            for j in range(i + 1, free):
                for v in values.tolist():
                    t = list(best.thresholds)
                    t[i] = v
                    better = improve(t, j)
                    if better is not None:
                        best, improved = better, True
        if not improved:
            break
    return best


def _bound(lost: Any, gained: Any, n: int, confidence_level: float) -> Any:
    """The normal upper bound of :func:`drop_upper_bound` from counts (floats or tensors)."""
    if not 0.5 <= confidence_level < 1:
        raise ValueError(f"confidence_level must be in [0.5, 1), got {confidence_level}")
    z = NormalDist().inv_cdf(confidence_level)
    lost = lost + z * z / 2
    m = n + z * z
    mean = (lost - gained) / m
    variance = (lost + gained) / m - mean * mean
    variance = variance.clamp_min(0.0) if isinstance(variance, torch.Tensor) else max(variance, 0.0)
    return mean + z * (variance / m) ** 0.5


def drop_upper_bound(reference_right: torch.Tensor, right: torch.Tensor, confidence_level: float = 0.95) -> float:
    """One-sided upper confidence bound on the mean accuracy drop of ``right`` against
    ``reference_right`` (per image, paired): normal approximation of the per-image difference
    (+1 lost, -1 gained), with z^2/2 pseudo-losses added (Agresti-Coull) so that few or no
    disagreements still leave a margin."""
    reference_right, right = torch.as_tensor(reference_right, dtype=torch.bool), torch.as_tensor(right, dtype=torch.bool)
    lost = float((reference_right & ~right).sum())
    gained = float((~reference_right & right).sum())
    return float(_bound(lost, gained, reference_right.numel(), confidence_level))


@dataclass
class CertifiedThresholds:
    """Thresholds learnt on one split and certified on a held-out one (:func:`certified_thresholds`)."""

    rule: str
    max_accuracy_drop: float
    confidence_level: float
    #: the chosen setting, on the learning split and on the held-out split
    learnt: ThresholdSetting
    held_out: ThresholdSetting
    #: upper confidence bound on the chosen setting's drop, from the held-out split
    drop_bound: float
    #: every setting tested on the held-out split, in order, with its bound (the first one failing ends the test)
    tested: list[dict[str, Any]] = field(default_factory=list)

    @property
    def thresholds(self) -> list[float]:
        return list(self.learnt.thresholds)

    def guarantee(self) -> str:
        """The guarantee in words, for reports."""
        return (f"with about {self.confidence_level:.0%} confidence (over the draw of the held-out images), the accuracy "
                f"drop on new images from the same distribution is at most {self.max_accuracy_drop:.2%} "
                f"(upper bound {self.drop_bound:.2%} from the held-out split)")


def certified_thresholds(learn: ExitScores, held_out: ExitScores, max_accuracy_drop: float, *, rule: str = "per_exit",
                         confidence_level: float = 0.95, grid: Sequence[float] | None = None,
                         steps: int = 20, learn_margin: bool = True) -> CertifiedThresholds:
    """Thresholds whose accuracy drop holds on unseen images: on ``learn``, the rule's best setting
    for drops target/steps, 2 target/steps, ..., target (a path of growing drop and falling
    cost; with ``learn_margin``, the drop's upper confidence bound on ``learn`` must be within
    each, which keeps settings whose losses are only offset by lucky gains off the path); on
    ``held_out``, each is tested in that order and kept while its upper confidence bound
    (:func:`drop_upper_bound`) is within ``max_accuracy_drop``. The all-at-the-last-exit setting
    comes first and is kept without a test (it drops nothing)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    _target(max_accuracy_drop, None)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    values = list(grid if grid is not None else threshold_grid())
    level = confidence_level if learn_margin else None
    path = [learn.evaluate([NEVER] * (learn.num_exits - 1), level)]
    for k in range(1, steps + 1):
        drop = max_accuracy_drop * k / steps
        # None: no shared setting's bound is within this drop yet (the grid's NEVER is only nearly so)
        setting = _best_shared(learn, values, drop, None, level) or path[-1]
        if rule == "per_exit":  # from the shared setting or the last step, whichever is cheaper: a path of small moves
            start = min(setting, path[-1], key=lambda s: s.expected_cost)
            setting = per_exit_thresholds(learn, values, max_accuracy_drop=drop, start=start, confidence_level=level)
        if setting.expected_cost < path[-1].expected_cost - 1e-9:
            path.append(setting)
    reference = held_out.correct[-1]
    chosen, chosen_bound, tested = 0, 0.0, []
    for index, setting in enumerate(path):
        bound = drop_upper_bound(reference, held_out.right(setting.thresholds), confidence_level) if index else 0.0
        passed = bound <= max_accuracy_drop
        tested.append({"thresholds": setting.thresholds, "learn_drop": setting.drop, "drop_bound": bound,
                       "passed": passed})
        if not passed:
            break
        chosen, chosen_bound = index, bound
    return CertifiedThresholds(rule=rule, max_accuracy_drop=float(max_accuracy_drop),
                               confidence_level=float(confidence_level), learnt=path[chosen],
                               held_out=held_out.evaluate(path[chosen].thresholds), drop_bound=chosen_bound,
                               tested=tested)
