"""What one NNI trial of an architecture search does: train the sampled network briefly, report.

Used as the evaluator of a ``trials`` search on the block-pool space (and any space whose
networks classify images): ``search_evaluator(dataset="fashion-mnist", ...)`` is an NNI
``FunctionalEvaluator`` that runs in the trial process, loads the data there, trains, and reports
``{"default": validation accuracy, "params": p_h}`` so the strategy's reward uses the exact size
and the web UI shows both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from . import _nni  # noqa: F401
import nni
from nni.nas.evaluator import FunctionalEvaluator

from .data import load_dataset, split_roles
from .training import TrainSettings, evaluate_accuracy, train_classifier

__all__ = ["TrialSettings", "train_and_report", "search_evaluator"]


@dataclass
class TrialSettings:
    """Data and training budget of one search trial (CPU-sized defaults)."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    server_fraction: float = 0.2
    val_fraction: float = 0.2
    #: cap on the server's search-train images a trial trains on (None: all)
    train_samples: int | None = 2000
    #: cap on validation images (None: all)
    val_samples: int | None = 1000
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0


def train_and_report(model: nn.Module, **settings: Any) -> dict[str, float]:
    """Train ``model`` on the server's search-train split, report validation accuracy and p_h."""
    s = TrialSettings(**settings)
    data = load_dataset(s.dataset, data_dir=s.data_dir)
    roles = split_roles(len(data.train), s.server_fraction, s.val_fraction, seed=s.seed)
    train = data.train.subset(roles.search_train[: s.train_samples])
    val = data.train.subset(roles.search_val[: s.val_samples])
    train_classifier(model, train, TrainSettings(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed))
    accuracy = evaluate_accuracy(model, val)
    result = {"default": accuracy, "params": float(sum(p.numel() for p in model.parameters()))}
    nni.report_final_result(result)
    return result


def search_evaluator(**settings: Any) -> FunctionalEvaluator:
    """An NNI evaluator running :func:`train_and_report` with these :class:`TrialSettings`."""
    return FunctionalEvaluator(train_and_report, **asdict(TrialSettings(**settings)))
