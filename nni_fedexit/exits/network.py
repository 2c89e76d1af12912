"""S4: the exit-point model: a multi-exit network, its branch models, early-exit inference.

The central server turns the searched network into an exit-point model: the input layer (stem),
the L stages, and a branch classifier (an *exit*) after every stage; the last exit is the output
layer. Branch model i is the stem, stages 1..i and exit i; its parameters and buffers carry
exactly the full model's names, so its state dict is a subset of the full one's and the server
can aggregate branches by name (S5).

Early exits: at inference a sample leaves at the first exit whose confidence reaches that exit's
threshold. :func:`calibrate` chooses the thresholds on validation data for a target (an accuracy
drop against the last exit, or a compute budget), one per exit or one shared, optionally with a
held-out margin (thresholds.py), and returns the accuracy-vs-MACs curve it saw. The segments a
device runs are exported and timed in runtime.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_fedexit.data import ImageData
from nni_fedexit.exits.thresholds import (
    RULES, ExitScores, ThresholdSetting, certified_thresholds, confidence, per_exit_thresholds, shared_thresholds,
    threshold_grid,
)
from nni_fedexit.macs import forward_macs

__all__ = [
    "EXIT_HEADS",
    "MultiExitNetwork",
    "BranchModel",
    "ExitCost",
    "exit_path_macs",
    "expected_exit_macs",
    "CalibrationResult",
    "multi_exit_loss",
    "exit_costs",
    "exit_outputs",
    "exit_scores",
    "exit_accuracies",
    "ensemble_accuracy",
    "ensemble_logits",
    "PREDICTIONS",
    "early_exit_metrics",
    "threshold_curve",
    "early_exit_predict",
    "calibrate",
    "export_branches",
    "onnx_available",
    "export_errors",
]

_logger = logging.getLogger(__name__)

#: exit head designs: "linear" = global average pool + linear (the ResNet head);
#: "conv" = 3x3 conv + BN + ReLU, then pool + linear (as in Shallow-Deep Networks)
EXIT_HEADS = ("linear", "conv")
#: how an exit predicts: "exit" (its own softmax) or "ensemble" (the mean of the probabilities of
#: every exit up to it: free at inference, since early exit has computed them already)
PREDICTIONS = ("exit", "ensemble")


def _make_exit(in_width: int, num_classes: int, head: str, head_width: int | None) -> nn.Sequential:
    if head == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_width, num_classes))
    if head == "conv":
        width = head_width or in_width
        return nn.Sequential(
            nn.Conv2d(in_width, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )
    raise ValueError(f"exit head must be one of {EXIT_HEADS}, got {head!r}")


class MultiExitNetwork(nn.Module):
    """Stem, L stages, and an exit after every stage (claim 1, S4).

    Build it from a frozen architecture of the block-pool space with :meth:`from_architecture`,
    or from any stem and ordered stage modules with their output widths. ``forward`` returns the
    logits of every exit, first to last.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        stage_widths: Sequence[int],
        num_classes: int,
        head: str = "linear",
        head_width: int | None = None,
        loss_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if len(stages) < 1 or len(stages) != len(stage_widths):
            raise ValueError(f"need one output width per stage: {len(stages)} stages, {len(stage_widths)} widths")
        if head not in EXIT_HEADS:
            raise ValueError(f"exit head must be one of {EXIT_HEADS}, got {head!r}")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(_make_exit(w, num_classes, head, head_width) for w in stage_widths)
        weights = [1.0] * len(stages) if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != len(stages) or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"loss_weights: need {len(stages)} finite non-negative weights, got {loss_weights}")
        self.loss_weights = tuple(weights)
        self.num_classes = num_classes
        self.head = head
        #: early-exit thresholds (one per exit; the last exit takes every remaining sample)
        self.thresholds: list[float] | None = None
        self.criterion = "max_prob"
        #: "exit" or "ensemble" (see PREDICTIONS): how early-exit inference predicts at each exit
        self.prediction = "exit"
        #: the architecture and space spec of the network it was made from (None for other stems/stages)
        self.arch: dict[str, Any] | None = None
        self.spec: Any = None

    @classmethod
    def from_architecture(
        cls, space: Any, sample: Mapping[str, Any], *, head: str = "linear", head_width: int | None = None,
        loss_weights: Sequence[float] | None = None,
    ) -> "MultiExitNetwork":
        """The exit-point model of one architecture of a :class:`~nni_fedexit.ResNetBlockPoolSpace`."""
        return cls.from_network(space.build(sample), head=head, head_width=head_width, loss_weights=loss_weights)

    @classmethod
    def from_network(
        cls, net: nn.Module, *, head: str = "linear", head_width: int | None = None,
        loss_weights: Sequence[float] | None = None,
    ) -> "MultiExitNetwork":
        """The exit-point model of a network frozen from the block-pool space (NNI's trial model).

        Takes over the network's own stem and stage modules (and weights); its head is replaced
        by the exits.
        """
        for attr in ("stem", "stages", "interface_widths", "spec"):
            if not hasattr(net, attr):
                raise TypeError(f"{type(net).__name__} is not a network of the block-pool space (no {attr!r})")
        model = cls(
            net.stem, list(net.stages.children()), net.interface_widths[1:], net.spec.num_classes,
            head=head, head_width=head_width, loss_weights=loss_weights,
        )
        model.arch = dict(net.arch) if getattr(net, "arch", None) else None
        model.spec = net.spec
        return model

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        outputs = []
        for stage, exit_ in zip(self.stages, self.exits):
            x = stage(x)
            outputs.append(exit_(x))
        return tuple(outputs)

    def branch(self, depth: int, all_exits: bool = False) -> "BranchModel":
        """Branch model ``depth`` (1-based): stem + stages 1..depth + exit ``depth``.

        With ``all_exits`` it also holds exits 1..depth-1 (deep supervision along its path).
        It shares its modules with this network: training it trains them.
        """
        if not 1 <= depth <= self.num_exits:
            raise ValueError(f"branch depth must be in 1..{self.num_exits}, got {depth}")
        held = list(range(1, depth + 1)) if all_exits else [depth]
        return BranchModel(self, depth, held)

    def segment(self, first: int, last: int) -> "BranchModel":
        """Stages ``first..last`` (1-based) and their exits, trained on top of a frozen prefix.

        The stem (when ``first > 1``) and stages ``1..first-1`` run in front of it without
        gradients, so backward keeps no activation of theirs; they are not parameters of the
        segment. ``segment(1, d)`` is ``branch(d, all_exits=True)``.
        """
        if not 1 <= first <= last <= self.num_exits:
            raise ValueError(f"a segment needs 1 <= first <= last <= {self.num_exits}, got {first}..{last}")
        return BranchModel(self, last, list(range(first, last + 1)), first=first)

    def exit_weights(self, exits: Iterable[int]) -> list[float]:
        """lambda_i of the given (1-based) exits."""
        return [self.loss_weights[i - 1] for i in exits]


class BranchModel(nn.Module):
    """A part of a MultiExitNetwork whose parameter and buffer names are the full model's names.

    Stages ``first..depth`` (``stages.<i-1>``) and the exits it holds (``exits.<i-1>``); the stem
    too when ``first`` is 1, so its ``state_dict()`` keys are a subset of the full model's. With
    ``first > 1`` the stem and the earlier stages are a frozen prefix: run without gradients, in
    the segment's train/eval mode, and not registered (not in ``parameters()`` or the state
    dict). ``forward`` returns the logits of the exits it holds, in order.
    """

    def __init__(self, full: MultiExitNetwork, depth: int, exits: Sequence[int], first: int = 1):
        super().__init__()
        if first == 1:
            self.stem = full.stem
        self.stages = nn.ModuleDict(OrderedDict((str(i), full.stages[i]) for i in range(first - 1, depth)))
        self.exits = nn.ModuleDict(OrderedDict((str(i - 1), full.exits[i - 1]) for i in exits))
        #: the frozen prefix (a tuple, so nn.Module does not register its modules)
        self.prefix: tuple[nn.Module, ...] = (full.stem, *list(full.stages)[: first - 1]) if first > 1 else ()
        self.depth = depth
        self.first = first
        self.loss_weights = tuple(full.exit_weights(exits))
        #: the network it is part of (set past nn.Module, which would register it as a child)
        self.full_model: MultiExitNetwork
        object.__setattr__(self, "full_model", full)

    def train(self, mode: bool = True) -> "BranchModel":
        super().train(mode)
        for module in self.prefix:
            module.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.prefix:
            with torch.no_grad():
                for module in self.prefix:
                    x = module(x)
        else:
            x = self.stem(x)
        outputs = []
        for key, stage in self.stages.items():
            x = stage(x)
            if key in self.exits:
                outputs.append(self.exits[key](x))
        return tuple(outputs)


def multi_exit_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i lambda_i * CE(softmax(z_i), y)`` over the exits given (claims 6 and 7)."""
    if len(logits) != len(weights) or not logits:
        raise ValueError(f"need one weight per exit output: {len(logits)} outputs, {len(weights)} weights")
    total = logits[0].new_zeros(())
    for z, w in zip(logits, weights):
        total = total + w * F.cross_entropy(z, target)
    return total


# ---------------------------------------------------------------------------------------------
# Cost per exit
# ---------------------------------------------------------------------------------------------


@dataclass
class ExitCost:
    """Cost of leaving at one exit (MACs for one input image)."""

    exit: int
    #: parameters of branch model i (stem + stages 1..i + exit i)
    params: int
    #: MACs of branch model i alone
    macs: int
    #: MACs of early-exit inference that stops here: stem + stages 1..i + exits 1..i
    early_exit_macs: int


@torch.no_grad()
def exit_costs(model: MultiExitNetwork, example: torch.Tensor) -> list[ExitCost]:
    """Parameters and MACs of the path to every exit, for one image shaped like ``example``."""
    was_training = model.training
    model.eval()
    try:
        x = example[:1]
        stem_macs, x = forward_macs(model.stem, x)
        path_macs, exits_so_far, costs = stem_macs, 0, []
        for i, (stage, exit_) in enumerate(zip(model.stages, model.exits), start=1):
            stage_macs, x = forward_macs(stage, x)
            exit_macs, _ = forward_macs(exit_, x)
            path_macs += stage_macs
            exits_so_far += exit_macs
            params = sum(p.numel() for p in model.branch(i).parameters())
            costs.append(ExitCost(i, params, path_macs + exit_macs, path_macs + exits_so_far))
    finally:
        model.train(was_training)
    return costs


def exit_path_macs(space: Any, sample: Mapping[str, Any], head: str = "conv", head_width: int | None = None) -> list[int]:
    """MACs of early-exit inference that stops at each exit (:attr:`ExitCost.early_exit_macs`), for
    the multi-exit network of ``sample``, from the costs a block-pool space counts: nothing is built
    but the exit heads (once per shape)."""
    stage_macs = space.stage_path_macs(sample)  # counts the space's MACs on first use
    path = space.stem_macs
    out, exits_so_far = [], 0
    for macs, shape in zip(stage_macs, space.stage_shapes):
        path += macs
        exits_so_far += _exit_head_macs(shape, space.spec.num_classes, head, head_width)
        out.append(path + exits_so_far)
    return out


_EXIT_HEAD_MACS: dict[tuple, int] = {}


def _exit_head_macs(shape: tuple[int, int, int], num_classes: int, head: str, head_width: int | None) -> int:
    key = (shape, num_classes, head, head_width)
    if key not in _EXIT_HEAD_MACS:
        exit_ = _make_exit(shape[0], num_classes, head, head_width).eval()
        _EXIT_HEAD_MACS[key], _ = forward_macs(exit_, torch.zeros(1, *shape))
    return _EXIT_HEAD_MACS[key]


def expected_exit_macs(
    space: Any, sample: Mapping[str, Any], exit_shares: Sequence[float], head: str = "conv", head_width: int | None = None,
) -> float:
    """The mean MACs per image of early-exit inference when ``exit_shares[i]`` of the inputs leave at
    exit i+1: ``sum_i share_i * early_exit_macs_i``. The shares are what calibration measures
    (``evaluation.json``: ``validation.exit_share``); before training they are an assumption the
    user states."""
    costs = exit_path_macs(space, sample, head, head_width)
    shares = [float(q) for q in exit_shares]
    if len(shares) != len(costs) or any(q < 0 or not math.isfinite(q) for q in shares) or sum(shares) <= 0:
        raise ValueError(f"exit_shares: need {len(costs)} non-negative shares (one per exit), got {list(exit_shares)}")
    total = sum(shares)
    return sum(q / total * c for q, c in zip(shares, costs))


# ---------------------------------------------------------------------------------------------
# Early-exit inference
# ---------------------------------------------------------------------------------------------


def _check_thresholds(model: MultiExitNetwork, thresholds: Sequence[float]) -> list[float]:
    t = [float(v) for v in thresholds]
    if len(t) == model.num_exits - 1:
        t.append(0.0)
    if len(t) != model.num_exits:
        raise ValueError(f"need {model.num_exits} thresholds (or {model.num_exits - 1}), got {len(t)}")
    return t


@torch.no_grad()
def early_exit_predict(
    model: MultiExitNetwork, x: torch.Tensor, thresholds: Sequence[float] | None = None, criterion: str | None = None,
    prediction: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, 1-based exit taken) per sample, computing each stage only for the
    samples still inside the network. ``prediction="ensemble"`` predicts at exit i with the mean
    of the probabilities of exits 1..i (default: the model's ``prediction``)."""
    t = _check_thresholds(model, thresholds if thresholds is not None else (model.thresholds or [2.0] * model.num_exits))
    criterion = criterion or model.criterion
    prediction = _check_prediction(prediction or model.prediction)
    model.eval()
    n = x.shape[0]
    preds = torch.empty(n, dtype=torch.long, device=x.device)
    taken = torch.empty(n, dtype=torch.long, device=x.device)
    alive = torch.arange(n, device=x.device)
    h = model.stem(x)
    prob_sum: torch.Tensor | None = None
    for i, (stage, exit_) in enumerate(zip(model.stages, model.exits), start=1):
        h = stage(h)
        logits = exit_(h)
        if prediction == "ensemble":
            probs = F.softmax(logits.float(), dim=-1)
            prob_sum = probs if prob_sum is None else prob_sum + probs
            logits = (prob_sum / i).clamp_min(1e-12).log()
        leave = confidence(logits, criterion) >= t[i - 1] if i < model.num_exits else torch.ones_like(alive, dtype=torch.bool)
        preds[alive[leave]] = logits[leave].argmax(dim=-1)
        taken[alive[leave]] = i
        alive, h = alive[~leave], h[~leave]
        if prob_sum is not None:
            prob_sum = prob_sum[~leave]
        if alive.numel() == 0:
            break
    return preds, taken


def exit_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Top-1 accuracy of every exit, from :func:`exit_outputs`."""
    return (logits.argmax(dim=-1) == labels.unsqueeze(0)).double().mean(dim=1).tolist()


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
    return prediction


def ensemble_logits(logits: torch.Tensor) -> torch.Tensor:
    """(L, N, C) log-probabilities: entry i is the log of the mean softmax of exits 1..i.

    Their softmax is that mean, so every function taking exit logits (confidence, early-exit
    metrics, calibration) works on the ensemble unchanged.
    """
    probs = F.softmax(logits.double(), dim=-1)
    counts = torch.arange(1, logits.shape[0] + 1, dtype=probs.dtype).view(-1, 1, 1)
    return (probs.cumsum(dim=0) / counts).clamp_min(1e-12).log().to(logits.dtype)


def ensemble_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the ensemble of every exit (the mean of their probabilities)."""
    return float((F.softmax(logits.double(), dim=-1).mean(dim=0).argmax(dim=-1) == labels).double().mean())


@torch.no_grad()
def exit_outputs(model: MultiExitNetwork, data: ImageData, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of every exit (L, N, C), labels (N,)) on ``data``; the basis of calibration."""
    model.eval()
    device = next(model.parameters()).device
    outs: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    for start in range(0, len(data), batch_size):
        for i, z in enumerate(model(data.images[start : start + batch_size].to(device))):
            outs[i].append(z.cpu())
    return torch.stack([torch.cat(o) for o in outs]), data.labels


def early_exit_metrics(
    logits: torch.Tensor, labels: torch.Tensor, thresholds: Sequence[float], costs: Sequence[ExitCost],
    criterion: str = "max_prob",
) -> dict[str, Any]:
    """Accuracy, expected MACs and exit shares of early-exit inference, from precomputed logits."""
    return _metrics(ExitScores.from_logits(logits, labels, [c.early_exit_macs for c in costs], criterion)
                    .evaluate(thresholds))


def _metrics(setting: ThresholdSetting) -> dict[str, Any]:
    return {"thresholds": setting.thresholds, "accuracy": setting.accuracy, "expected_macs": setting.expected_cost,
            "exit_share": setting.exit_share}


def threshold_curve(
    logits: torch.Tensor, labels: torch.Tensor, costs: Sequence[ExitCost], criterion: str = "max_prob",
    num_thresholds: int = 101,
) -> list[dict[str, Any]]:
    """Early-exit metrics for one threshold shared by all exits, swept over ``num_thresholds``
    values in [0, 1] plus one above 1 (every sample to the last exit), in that order."""
    return _shared_curve(ExitScores.from_logits(logits, labels, [c.early_exit_macs for c in costs], criterion),
                         threshold_grid(num_thresholds))


def _shared_curve(scores: ExitScores, grid: Sequence[float]) -> list[dict[str, Any]]:
    return [_metrics(scores.evaluate([v] * (scores.num_exits - 1))) for v in grid]


@dataclass
class CalibrationResult:
    """Chosen thresholds, what they give on the calibration data, and the curve explored."""

    thresholds: list[float]
    accuracy: float
    expected_macs: float
    exit_share: list[float]
    target: dict[str, float]
    last_exit_accuracy: float
    #: MACs of the last exit's branch alone: the network without early exits
    last_exit_macs: float
    #: one shared threshold swept over the grid: {"thresholds", "accuracy", "expected_macs", "exit_share"}
    curve: list[dict[str, Any]] = field(default_factory=list)
    #: "shared" or "per_exit" (see :data:`~nni_fedexit.exits.thresholds.RULES`)
    rule: str = "shared"
    #: with a held-out split: its size, what the thresholds give on it, the upper confidence
    #: bound on their drop, at what confidence, and the guarantee in words
    held_out_images: int = 0
    held_out: dict[str, Any] | None = None
    drop_bound: float | None = None
    confidence_level: float | None = None
    guarantee: str | None = None

    @property
    def macs_saved(self) -> float:
        """Fraction of compute saved against the same network without early exits (last exit only)."""
        return 1.0 - self.expected_macs / self.last_exit_macs


def exit_scores(model: MultiExitNetwork, data: ImageData, costs: Sequence[ExitCost], criterion: str = "max_prob",
                prediction: str = "exit") -> ExitScores:
    """Each exit's confidence and correctness on ``data`` as early-exit inference with ``prediction``
    sees them, and the MACs of leaving at each exit (:attr:`ExitCost.early_exit_macs`)."""
    logits, labels = exit_outputs(model, data)
    if _check_prediction(prediction) == "ensemble":
        logits = ensemble_logits(logits)
    return ExitScores.from_logits(logits, labels, [c.early_exit_macs for c in costs], criterion)


def calibrate(
    model: MultiExitNetwork,
    data: ImageData,
    *,
    max_accuracy_drop: float | None = 0.01,
    macs_budget: float | None = None,
    criterion: str = "max_prob",
    num_thresholds: int = 101,
    costs: Sequence[ExitCost] | None = None,
    prediction: str = "exit",
    rule: str = "per_exit",
    held_out: ImageData | None = None,
    confidence_level: float = 0.95,
) -> CalibrationResult:
    """Choose early-exit thresholds on validation ``data`` and store them on ``model``.

    ``rule="per_exit"`` searches a threshold per exit (never worse than the shared rule on the
    same images); ``rule="shared"`` sweeps one threshold for all exits (``num_thresholds`` values
    from 0 to 1, plus one above 1 that sends everything to the last exit). Targets:
    ``max_accuracy_drop`` (absolute, against the last exit's accuracy): the cheapest setting
    within the drop; or ``macs_budget`` (expected MACs per image): the most accurate setting
    within the budget. With ``held_out`` images (labelled, unseen by ``data``'s fit) the drop
    target holds on unseen images with about ``confidence_level`` confidence
    (:func:`~nni_fedexit.exits.thresholds.certified_thresholds`). With ``prediction="ensemble"``
    each exit predicts, and is confident, with the mean of the probabilities of the exits up to it
    (:func:`ensemble_logits`); the drop is then measured against the ensemble of all exits.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if (max_accuracy_drop is None) == (macs_budget is None):
        raise ValueError("give exactly one target: max_accuracy_drop or macs_budget")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    if held_out is not None and max_accuracy_drop is None:
        raise ValueError("a held-out margin keeps an accuracy drop: give max_accuracy_drop, or no held_out")
    if costs is None:
        costs = exit_costs(model, data.images[:1].to(next(model.parameters()).device))
    scores = exit_scores(model, data, costs, criterion, prediction)
    grid = threshold_grid(num_thresholds)
    curve = _shared_curve(scores, grid)
    cheapest = curve[0]["expected_macs"]
    if macs_budget is not None and macs_budget < cheapest:
        raise ValueError(
            f"macs_budget {macs_budget:,.0f} is below the cheapest setting ({cheapest:,.0f} MACs per image, "
            "every sample at exit 1): raise the budget"
        )
    choose = per_exit_thresholds if rule == "per_exit" else shared_thresholds
    extra: dict[str, Any] = {}
    if held_out is not None:
        assert max_accuracy_drop is not None
        cert = certified_thresholds(scores, exit_scores(model, held_out, costs, criterion, prediction), max_accuracy_drop,
                                    rule=rule, confidence_level=confidence_level, grid=grid)
        best = cert.learnt
        extra = {"held_out_images": len(held_out), "drop_bound": cert.drop_bound, "confidence_level": confidence_level,
                 "guarantee": cert.guarantee(),
                 "held_out": {"accuracy": cert.held_out.accuracy, "drop": cert.held_out.drop,
                              "expected_macs": cert.held_out.expected_cost, "exit_share": cert.held_out.exit_share}}
        target = {"max_accuracy_drop": float(max_accuracy_drop)}
    elif max_accuracy_drop is not None:
        best = choose(scores, grid, max_accuracy_drop=max_accuracy_drop)
        target = {"max_accuracy_drop": float(max_accuracy_drop)}
    else:
        best = choose(scores, grid, cost_budget=macs_budget)
        target = {"macs_budget": float(macs_budget)}
    model.thresholds = list(best.thresholds)
    model.criterion = criterion
    model.prediction = prediction
    return CalibrationResult(
        thresholds=list(best.thresholds), accuracy=best.accuracy, expected_macs=best.expected_cost,
        exit_share=best.exit_share, target=target, last_exit_accuracy=curve[-1]["accuracy"],
        last_exit_macs=float(costs[-1].macs), curve=curve, rule=rule, **extra,
    )


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def export_branches(
    model: MultiExitNetwork, out_dir: str | Path, example: torch.Tensor, onnx: bool | None = None, atol: float = 1e-5,
) -> list[dict[str, Any]]:
    """Export every branch model to TorchScript (and ONNX, when onnx/onnxruntime are installed).

    Each file is loaded back and run on ``example``; its outputs must match PyTorch's within
    ``atol`` or a RuntimeError names the file. A branch that cannot be written, exported or run
    back raises a RuntimeError naming the branch and the file too (the exporter's error chained).
    Returns one record per file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    if onnx is None:
        onnx = onnx_available()
    records = []
    for depth in range(1, model.num_exits + 1):
        branch = model.branch(depth).eval()
        want = branch(example)[0]
        path = out / f"branch{depth}.pt"
        with export_errors("torchscript", f"branch {depth}", path), warnings.catch_warnings():
            # torch 2.14 deprecates TorchScript; it is still what we ship
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            torch.jit.trace(branch, example).save(str(path))
            got = torch.jit.load(str(path))(example)[0]
        records.append(_check_export(path, want, got, atol, "torchscript", depth))
        if onnx:
            onnx_path = out / f"branch{depth}.onnx"
            with export_errors("onnx", f"branch {depth}", onnx_path):
                torch.onnx.export(branch, (example,), str(onnx_path), input_names=["image"],
                                  output_names=[f"exit{depth}"], dynamo=True, external_data=False, verbose=False)
                import onnxruntime

                session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(session.run(None, {"image": example.cpu().numpy()})[0])
            records.append(_check_export(onnx_path, want.cpu(), got, atol, "onnx", depth))
    return records


@contextlib.contextmanager
def export_errors(fmt: str, part: str, path: Path) -> Iterator[None]:
    """One error naming the part ("branch 2", "segment 1") and the file for whatever the exporter
    or the runtime raises."""
    try:
        yield
    except Exception as err:
        first = (re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines() or [""])[0]  # no terminal colours
        raise RuntimeError(f"could not export {part} to {fmt} {path}: {type(err).__name__}: {first}") from err


def _check_export(path: Path, want: torch.Tensor, got: torch.Tensor, atol: float, fmt: str, depth: int) -> dict[str, Any]:
    err = float((want - got).abs().max())
    if not err <= atol:
        raise RuntimeError(f"exported {fmt} branch {path} differs from PyTorch by {err:.2e} (> {atol:.0e})")
    return {"branch": depth, "format": fmt, "path": str(path), "max_abs_error": err}


def onnx_available() -> bool:
    """Whether onnx, onnxruntime and onnxscript (the ``onnx`` extra) are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True
