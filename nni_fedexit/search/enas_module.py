"""S3, ``shared`` mode's training loop: a Lightning module that trains the supernet's shared weights
on training batches and lets the controller score paths on validation batches.

:class:`TaggedConcatLoader` feeds it both kinds of batch, tagged; :func:`batch_statistics`
evaluates one path with BatchNorm on each batch's own statistics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from nni_fedexit.nni_compat import import_nni

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.oneshot.pytorch.base_lightning import BaseOneShotLightningModule  # noqa: E402

__all__ = ["SizeAwareEnasModule", "TaggedConcatLoader", "batch_statistics"]

_logger = logging.getLogger("nni_fedexit.search.strategy")


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Evaluate with every BatchNorm normalising by the batch's own statistics, its running
    statistics untouched (train mode, momentum 0). The shared weights' running statistics mix
    every path's activations; one path's accuracy measured with them says little about the path."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    try:
        for m in norms:
            m.train()
            m.momentum = 0.0
        yield
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum


class TaggedConcatLoader:
    """Each epoch: every training batch, then every validation batch, tagged "train" / "val".

    NNI's own ConcatLoader relies on Lightning passing the dataloader index to
    ``training_step``; Lightning 2.6 drops it (so NNI 3.0's ENAS cannot tell the two apart
    there). Tagging the batches ourselves works on every Lightning version.
    """

    def __init__(self, train: Any, val: Any):
        self.train, self.val = train, val

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        for batch in self.train:
            yield batch, "train"
        for batch in self.val:
            yield batch, "val"

    def __len__(self) -> int:
        return len(self.train) + len(self.val)


class SizeAwareEnasModule(BaseOneShotLightningModule):
    """The training loop of ``shared`` mode: shared weights on train batches, controller on val batches."""

    def __init__(self, training_module: Any, strategy: Any):
        """``strategy``: the :class:`~nni_fedexit.search.shared_strategy.SharedSizeAwarePolicyGradient`
        that configured this module (it draws the paths, scores them and holds the warm-up sampler)."""
        super().__init__(training_module)
        self._strategy = [strategy]  # in a list so Lightning does not treat it as a submodule

    @property
    def strategy(self) -> Any:
        return self._strategy[0]

    @property
    def automatic_optimization(self) -> bool:
        return False

    def _use_path(self, sample: Mapping[str, Any]) -> None:
        for module in self.supernet_modules():
            module.resample(memo=dict(sample))

    def resample(self) -> dict[str, Any]:
        sample = self.strategy.draw()
        if sample is None:
            raise RuntimeError("no sample of the controller keeps the space's constraints: see the warning above")
        self._use_path(sample)
        return sample

    @property
    def warming_up(self) -> bool:
        return self.trainer.current_epoch < self.strategy.warmup_epochs

    def training_step(self, tagged: tuple[Any, str], batch_idx: int) -> Any:
        batch, mode = tagged
        output = None
        if mode == "train":
            if self.warming_up or self.strategy.path_sampling == "warmup":
                path = self.strategy.draw(self.strategy.warmup_sampler.sample, learn=False)
                if path is None:
                    raise RuntimeError("no warm-up path keeps the space's constraints: see the warning above")
                self._use_path(path)
            else:
                self.resample()
            output = self.training_module.training_step(batch, batch_idx)
            loss = output["loss"] if isinstance(output, dict) else output
            self.advance_optimization(loss, batch_idx)
        elif not self.warming_up:  # the controller starts after the warm-up
            sample = self.resample()
            accuracy = self._batch_accuracy(batch)
            reward = self.strategy.observe(sample, accuracy)
            self.log("search/reward", reward, batch_size=len(batch[1]))
            self.log("search/val_acc", accuracy, batch_size=len(batch[1]))
        self.advance_lr_schedulers(batch_idx)
        return output

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_started = time.monotonic()
        phase = f"warm-up ({self.strategy.warmup_sampling} paths)" if self.warming_up else "controller"
        device = next(self.model.parameters()).device
        _logger.info("[search] epoch %d/%s on %s: %s", self.trainer.current_epoch + 1, self.trainer.max_epochs,
                     device, phase)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        learner = self.strategy.learner
        _logger.info("[search] epoch %d done in %.0f s; %d controller steps so far", self.trainer.current_epoch + 1,
                     time.monotonic() - getattr(self, "_epoch_started", time.monotonic()),
                     learner.steps if learner is not None else 0)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode, BatchNorm on batch statistics unless the strategy's ``bn_eval`` is ``running``."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.strategy.bn_eval == "batch":
                with batch_statistics(self.model):
                    yield
            else:
                yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _batch_accuracy(self, batch: Any) -> float:
        x, y = batch
        with self._evaluating():
            return float((self.model(x).argmax(dim=1) == y).float().mean())

    @torch.no_grad()
    def evaluate_path(self, sample: Mapping[str, Any], loader: Any, max_batches: int | None = None) -> float:
        """Accuracy of one path of the supernet (shared weights) on ``loader``."""
        self._use_path(sample)
        device = next(self.model.parameters()).device
        correct = total = 0
        with self._evaluating():
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device), y.to(device)
                correct += int((self.model(x).argmax(dim=1) == y).sum())
                total += len(y)
        return correct / max(total, 1)

    def export(self) -> dict[str, Any]:
        return self.strategy.select_final()

    def export_probs(self) -> dict[str, Any]:
        learner = self.strategy.learner
        return learner.probabilities() if learner is not None else {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["size_aware_pg"] = self.strategy._search_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "size_aware_pg" in checkpoint:
            self.strategy._load_search_state(checkpoint["size_aware_pg"])
