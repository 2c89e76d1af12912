"""What one NNI trial of an architecture search does: train the sampled network briefly, report.

Used as the evaluator of a ``trials`` search on the block-pool space (and any space whose
networks classify images): ``search_evaluator(dataset="fashion-mnist", ...)`` is an NNI
``FunctionalEvaluator`` that runs in the trial process, loads the data there, trains, and reports
``{"default": validation accuracy, "params": p_h}`` so the strategy's reward uses the exact size
and the web UI shows both, with the architecture as a label (``stage1=resnet34 ...``) and, when
the strategy's reward function is passed along, the reward the strategy will compute.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn

from nni_fedexit.nni_compat import import_nni

nni = import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.evaluator import FunctionalEvaluator  # noqa: E402

from nni_fedexit.data import DataBundle, ImageData, load_dataset, split_roles
from nni_fedexit.space import architecture_label
from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier

__all__ = ["TrialSettings", "search_split", "train_and_report", "search_evaluator"]


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
    #: the strategy's ``reward(accuracy, params)`` (e.g. ``strategy.reward_for(P)``): reported as
    #: "reward" so the web UI shows it next to the accuracy; None leaves it out
    reward: Callable[[float, int], float] | None = None


def search_split(s: TrialSettings, data: DataBundle | None = None) -> tuple[ImageData, ImageData]:
    """The server's search-train and validation images a trial trains and scores on (capped)."""
    data = data or load_dataset(s.dataset, data_dir=s.data_dir)
    roles = split_roles(len(data.train), s.server_fraction, s.val_fraction, seed=s.seed)
    return data.train.subset(roles.search_train[: s.train_samples]), data.train.subset(roles.search_val[: s.val_samples])


def train_and_report(model: nn.Module, **settings: Any) -> dict[str, Any]:
    """Train ``model`` on the server's search-train split, report validation accuracy and p_h."""
    s = TrialSettings(**settings)
    train, val = search_split(s)
    train_classifier(model, train, TrainSettings(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed))
    accuracy = evaluate_accuracy(model, val)
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {"default": accuracy, "params": float(params)}
    if s.reward is not None:
        result["reward"] = float(s.reward(accuracy, params))
    if getattr(model, "arch", None):
        result["architecture"] = architecture_label(model.arch)
    nni.report_final_result(result)
    return result


class SeededEvaluator(FunctionalEvaluator):
    """A FunctionalEvaluator whose trial seeds torch with its ``seed`` argument *before* NNI builds
    the network, so a trial's initial weights (and with them its result) are reproducible."""

    def _execute(self, model: Any) -> Any:
        torch.manual_seed(int(self.arguments.get("seed", 0)))
        return super()._execute(model)


def search_evaluator(**settings: Any) -> FunctionalEvaluator:
    """An NNI evaluator running :func:`train_and_report` with these :class:`TrialSettings`."""
    s = TrialSettings(**settings)  # unknown keys fail here, not in the trial
    return SeededEvaluator(train_and_report, **{f.name: getattr(s, f.name) for f in fields(s)})
