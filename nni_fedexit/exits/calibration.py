"""S4: early-exit inference and the choice of its thresholds.

At inference a sample leaves at the first exit whose confidence reaches that exit's threshold.
:func:`calibrate` chooses the thresholds on validation data for a target (an accuracy drop
against the last exit, or a compute budget), one per exit or one shared, optionally with a
held-out margin (the rules: thresholds.py), and returns the accuracy-vs-MACs curve it saw. The
metrics of every exit and of their ensemble are here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nni_fedexit.data import ImageData
from nni_fedexit.exits.costs import ExitCost, exit_costs
from nni_fedexit.exits.network import PREDICTIONS, MultiExitNetwork
from nni_fedexit.exits.thresholds import (
    RULES, ExitScores, ThresholdSetting, certified_thresholds, confidence, per_exit_thresholds, shared_thresholds,
    threshold_grid,
)

__all__ = ['early_exit_predict', 'exit_accuracies', 'ensemble_logits', 'ensemble_accuracy', 'exit_outputs', 'early_exit_metrics', 'threshold_curve', 'CalibrationResult', 'exit_scores', 'calibrate']



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
