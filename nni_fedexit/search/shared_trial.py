"""The shared search (S3, weight sharing) as one NNI trial: watched in the web UI and TensorBoard, resumed per epoch.

NNI runs a one-shot strategy on its sequential engine, which has no trials and no web UI. Here
one trial of a training-service experiment runs exactly that search: the same
:class:`~nni_fedexit.search.shared_strategy.SharedSizeAwarePolicyGradient`, the same Lightning evaluator
(:func:`shared_search_evaluator`) and the same seeds, on NNI's sequential engine inside the trial
process, so it chooses what the search chose before. Around it, a Lightning callback
(:class:`SearchMonitor`) does three things after every epoch:

* saves a checkpoint (:class:`SearchCheckpoint`): Lightning's own (supernet weights, its
  optimiser, the epoch), with the controller, its reward batch and the warm-up's permutations
  (the strategy's state) and the data order and random states (the callback's): an interrupted
  trial resumes from its last epoch to the result of an uninterrupted one;
* logs the epoch's curves to TensorBoard (Lightning's ``TensorBoardLogger``);
* reports them to NNI as the trial's intermediate result (the web UI's curve, ``default`` being
  the greedy architecture's reward).

At the end the trial reports the chosen architecture (with p_h, reward and the K finalists) as
its final result and writes everything the run keeps to ``result.json`` in the checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from pytorch_lightning import Callback

from nni_fedexit.nni_compat import import_nni

nni = import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.evaluator import MutableEvaluator  # noqa: E402

from nni_fedexit.data import DataBundle, ImageData, load_dataset, split_roles
from nni_fedexit.files import read_json, sha256_file, write_atomic, write_json
from nni_fedexit.search.nested_trial import OuterTrial
from nni_fedexit.search.strategy import SizeAwarePolicyGradient
from nni_fedexit.space import ResNetBlockPoolSpace, architecture_label, load_space_spec

__all__ = ["SearchCheckpoint", "SearchCheckpointError", "SearchMonitor", "SharedSearchEvaluator", "SharedSearchSettings",
           "block_pool_space", "lightning_device", "search_trainer_settings", "shared_search", "shared_search_evaluator"]

_logger = logging.getLogger(__name__)


@dataclass
class SharedSearchSettings:
    """Everything the trial needs to run the shared search of a run (plain values: NNI ships them)."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    server_fraction: float = 0.2
    val_fraction: float = 0.2
    #: the block-pool space: a preset name, or a mapping with ``preset`` and overrides
    space: Any = "resnet_pool"
    #: the strategy preset (``strategies/``) and the SizeAwarePolicyGradient arguments over it
    strategy: str = "size_aware_pg"
    strategy_arguments: dict = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 0.001
    #: cap on the server's search-train images (None: all)
    train_samples: int | None = None
    device: str = "cpu"
    seed: int = 0
    #: per-epoch checkpoints, TensorBoard log and result.json (None: the trial's NNI output folder)
    checkpoint_dir: str | None = None
    progress: bool = False


#: settings a checkpoint need not agree with to be resumed: where and how visibly it runs
RESUME_FREE = ("data_dir", "device", "checkpoint_dir", "progress")


def lightning_device(device: str) -> tuple[str, int | list[int]]:
    """Lightning's ``(accelerator, devices)`` for a run's ``device``: ``cpu`` -> ("cpu", 1),
    ``cuda`` -> ("gpu", 1) (the first visible GPU), ``cuda:N`` -> ("gpu", [N]) (that GPU: the one
    the federated clients use too, not Lightning's first)."""
    if device == "cpu":
        return "cpu", 1
    if device == "cuda":
        return "gpu", 1
    if device.startswith("cuda:") and device[5:].isdigit():
        return "gpu", [int(device[5:])]
    raise ValueError(f"device: must be cpu, cuda or cuda:N, got {device!r}")


def search_trainer_settings(epochs: int, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """The Lightning Trainer arguments of the shared search: on a GPU, a CPU run differs only in
    ``accelerator`` and ``devices`` (:func:`lightning_device`)."""
    accelerator, devices = lightning_device(device)
    return dict(max_epochs=epochs, accelerator=accelerator, devices=devices, enable_progress_bar=progress,
                logger=False, enable_checkpointing=False)


def shared_search_evaluator(
    train: ImageData, val: ImageData, num_classes: int, *, epochs: int, batch_size: int, learning_rate: float,
    device: str = "cpu", seed: int = 0, progress: bool = True, data_order: torch.Generator | None = None,
    **trainer: Any,
) -> Any:
    """NNI's Classification evaluator over the server's search split, for the ``shared`` search.
    ``data_order``: the generator that shuffles the training batches (a checkpoint saves it);
    ``trainer``: Lightning Trainer arguments over :func:`search_trainer_settings` (logger, callbacks)."""
    from nni.nas.evaluator.pytorch import Classification, DataLoader
    from torch.utils.data import TensorDataset

    g = data_order if data_order is not None else torch.Generator().manual_seed(seed)
    return Classification(
        train_dataloaders=DataLoader(TensorDataset(train.images, train.labels), batch_size=batch_size,
                                     shuffle=True, generator=g),
        val_dataloaders=DataLoader(TensorDataset(val.images, val.labels), batch_size=batch_size),
        num_classes=num_classes, learning_rate=learning_rate,
        **{**search_trainer_settings(epochs, device, progress), **trainer},
    )


def block_pool_space(space: Any, data: DataBundle, seed: int) -> ResNetBlockPoolSpace:
    """The run's block-pool space for ``data``'s images, built under ``seed`` (the supernet's
    initial weights of a shared search: reproducible runs)."""
    preset, overrides = (space, {}) if isinstance(space, str) else (space.get("preset", "resnet_pool"), dict(space))
    overrides.pop("preset", None)
    overrides.update(in_chans=data.in_chans, image_size=data.image_size, num_classes=data.num_classes)
    spec = load_space_spec(preset, **overrides)
    torch.manual_seed(seed)
    return ResNetBlockPoolSpace.from_spec(spec)


class SearchCheckpointError(RuntimeError):
    """A search checkpoint that cannot be resumed: the message names the file and what to do."""


class SearchCheckpoint:
    """``state.json`` (the commit point: the epoch, the settings, the checkpoint file and its
    SHA-256) beside ``epoch-N.ckpt``, Lightning's checkpoint of that epoch, in one folder.

    A checkpoint loads with ``torch.load(weights_only=True)`` (Lightning's ``weights_only``): it
    holds tensors and plain values only, nothing is unpickled. A kill at any instant leaves the
    last committed epoch; a damaged or replaced file is refused by name."""

    STATE = "state.json"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def state_path(self) -> Path:
        return self.folder / self.STATE

    def _fix(self) -> str:
        return f"move {self.folder} away (or delete it) to search from the start, or restore it from a copy"

    def state(self) -> dict[str, Any] | None:
        """The committed state, None when there is none yet; damaged: an error naming the file."""
        if not self.state_path.exists():
            return None
        state = read_json(self.state_path, SearchCheckpointError, self._fix())
        if (not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or not isinstance(state.get("file"), str)
                or not isinstance(state.get("sha256"), str) or not isinstance(state.get("settings"), dict)):
            raise SearchCheckpointError(f"{self.state_path} is corrupt (not a search checkpoint's state): {self._fix()}")
        return state

    def resume_point(self, settings: SharedSearchSettings) -> Path | None:
        """The checkpoint file to resume ``settings``' search from (None: start from the first epoch).
        Written for other settings, or damaged: :class:`SearchCheckpointError` naming the key or file."""
        state = self.state()
        if state is None:
            return None
        mine = settings_record(settings)
        for key in sorted(set(mine) | set(state["settings"])):
            if state["settings"].get(key) != mine.get(key):
                raise SearchCheckpointError(
                    f"search.{key}: {self.folder} holds a search of {key} = {json.dumps(state['settings'].get(key))}, "
                    f"this run has {json.dumps(mine.get(key))}; set it back to resume after epoch {state['epoch']}, "
                    f"or {self._fix()}")
        if state["epoch"] > settings.epochs:
            raise SearchCheckpointError(f"search.epochs: {self.folder} holds {state['epoch']} epochs, more than "
                                        f"epochs = {settings.epochs}: {self._fix()}")
        path = self.folder / state["file"]
        if Path(state["file"]).name != state["file"] or not path.is_file():
            raise SearchCheckpointError(f"{path} is missing (named by {self.state_path}): {self._fix()}")
        if sha256_file(path) != state["sha256"]:
            raise SearchCheckpointError(f"{path} is damaged or was replaced (its SHA-256 is not the one "
                                        f"{self.state_path} names): {self._fix()}")
        return path

    def save(self, trainer: Any, epoch: int, settings: SharedSearchSettings) -> None:
        """Lightning's checkpoint of ``trainer`` after ``epoch``, then ``state.json`` naming it."""
        name = f"epoch-{epoch}.ckpt"
        path = write_atomic(self.folder / name, lambda p: trainer.save_checkpoint(str(p), weights_only=False))
        write_json(self.state_path, {"epoch": epoch, "file": name, "sha256": sha256_file(path),
                                     "settings": settings_record(settings)})
        for old in self.folder.glob("epoch-*.ckpt"):
            if old.name != name:
                old.unlink(missing_ok=True)


def settings_record(settings: SharedSearchSettings) -> dict[str, Any]:
    """The settings a checkpoint is only resumed with, as JSON values."""
    record = {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESUME_FREE}
    return json.loads(json.dumps(record, default=str))


def _random_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [str(np_state[0]), np_state[1].tolist(), *(v for v in np_state[2:])]}


def _set_random_states(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


class SearchMonitor(Callback):
    """After every epoch of the shared search: checkpoint, TensorBoard, and the trial's
    intermediate result. Its own checkpointed state: the data order and the random states."""

    def __init__(self, strategy: Any, val_loader: Any, data_order: torch.Generator, settings: SharedSearchSettings,
                 checkpoint: SearchCheckpoint | None = None, outer: OuterTrial | None = None):
        self.strategy = strategy
        self.val_loader = val_loader
        self.data_order = data_order
        self.settings = settings
        self.checkpoint = checkpoint
        self.outer = outer
        #: draws the paths the epoch's mean reward is measured on: its own, so the search's are untouched
        self.policy_draws = torch.Generator().manual_seed(settings.seed)
        #: every epoch's metrics, as reported
        self.epochs: list[dict[str, Any]] = []

    def epoch_metrics(self, epoch: int, pl_module: Any) -> dict[str, Any]:
        """The greedy architecture (its accuracy with the shared weights, size and reward), the
        controller's entropy along it, and the mean reward and accuracy of ``samples_per_update``
        paths drawn from the controller's policy, all with the epoch's final weights: every key in
        every epoch (NNI's web UI offers the keys of the first point only), the warm-up's too."""
        strategy, learner = self.strategy, self.strategy.learner
        greedy = learner.sample(greedy=True)
        accuracy = pl_module.evaluate_path(greedy, self.val_loader, strategy.final_eval_batches)
        reward, costs = strategy.score(accuracy, greedy)
        drawn = []
        for _ in range(strategy.samples_per_update):
            path = learner.sample(generator=self.policy_draws)
            path_accuracy = pl_module.evaluate_path(path, self.val_loader, strategy.final_eval_batches)
            drawn.append((strategy.score(path_accuracy, path)[0], path_accuracy))
        return {
            "default": reward, "epoch": epoch,
            "phase": "warm-up" if epoch <= strategy.warmup_epochs else "controller",
            "architecture": architecture_label(greedy), "params": costs["params"], "val_acc": accuracy,
            "entropy": learner.entropy(greedy), "controller_steps": learner.steps,
            "mean_reward": sum(r for r, _ in drawn) / len(drawn),
            "sampled_val_acc": sum(a for _, a in drawn) / len(drawn),
        }

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        metrics = self.epoch_metrics(epoch, pl_module)
        self.epochs.append(metrics)
        # before the report: a point in the web UI is an epoch saved. Not after the last epoch: a
        # resumed trial then always trains an epoch (a fit of no epochs breaks NNI's Classification)
        if self.checkpoint is not None and epoch < self.settings.epochs:
            self.checkpoint.save(trainer, epoch, self.settings)
        if trainer.logger is not None:
            # per epoch, beside the per-step search/reward and search/val_acc the training loop logs
            numbers = {f"search_epoch/{'greedy_reward' if k == 'default' else k}": float(v) for k, v in metrics.items()
                       if isinstance(v, (int, float)) and k != "epoch"}
            trainer.logger.log_metrics(numbers, step=epoch)
            trainer.logger.save()
        _logger.info("[search] epoch %d/%d: greedy %s, val accuracy %.4f, %s params, reward %.4f, entropy %.3f",
                     epoch, self.settings.epochs, metrics["architecture"], metrics["val_acc"], f"{metrics['params']:,}",
                     metrics["default"], metrics["entropy"])
        if self.outer is not None:
            self.outer.report_intermediate(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"data_order": self.data_order.get_state(), "policy_draws": self.policy_draws.get_state(),
                "random": _random_states(), "epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data_order.set_state(state_dict["data_order"])
        self.policy_draws.set_state(state_dict["policy_draws"])
        _set_random_states(state_dict["random"])
        self.epochs = list(state_dict["epochs"])


def _tensorboard(folder: Path) -> Any:
    from pytorch_lightning.loggers import TensorBoardLogger

    # one fixed version folder: a resumed trial writes its epochs beside the first attempt's
    return TensorBoardLogger(save_dir=str(folder), name="", version="search", default_hp_metric=False)


def shared_search(settings: SharedSearchSettings, outer: OuterTrial | None = None) -> dict[str, Any]:
    """Run (or resume, from a checkpoint of these settings) the shared search; returns and, with a
    checkpoint folder, writes ``result.json``: the chosen sample, its costs, the strategy's summary
    and every epoch's metrics."""
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace

    s = settings
    data = load_dataset(s.dataset, data_dir=s.data_dir, download=s.download)
    roles = split_roles(len(data.train), s.server_fraction, s.val_fraction, seed=s.seed)
    space = block_pool_space(s.space, data, s.seed)
    strategy = SizeAwarePolicyGradient.from_preset(s.strategy, **s.strategy_arguments)
    if strategy.mode != "shared":
        raise ValueError(f"search.strategy: the shared search needs mode 'shared', got {strategy.mode!r}")
    checkpoint = SearchCheckpoint(s.checkpoint_dir) if s.checkpoint_dir else None
    resume_from = checkpoint.resume_point(s) if checkpoint is not None else None
    data_order = torch.Generator().manual_seed(s.seed)
    monitor = SearchMonitor(strategy, None, data_order, s, checkpoint, outer)
    trainer: dict[str, Any] = {"callbacks": [monitor]}
    if checkpoint is not None:
        trainer["logger"] = _tensorboard(checkpoint.folder / "tensorboard")
    evaluator = shared_search_evaluator(
        data.train.subset(roles.search_train[: s.train_samples]), data.train.subset(roles.search_val),
        data.num_classes, epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate, device=s.device,
        seed=s.seed, progress=s.progress, data_order=data_order, **trainer)
    monitor.val_loader = evaluator.val_dataloaders
    if resume_from is not None:
        _logger.info("[search] resuming from %s", resume_from)
        evaluator.fit_kwargs.update(ckpt_path=str(resume_from), weights_only=True)
    engine = SequentialExecutionEngine()
    strategy.initialize(RawFormatModelSpace.from_model(space, evaluator), engine)
    try:
        strategy.run()
        sample = dict(next(iter(strategy.list_models(limit=1))).sample)
    finally:
        if outer is not None:
            outer.restore()
        engine.shutdown()
    costs = strategy.costs.costs(sample)
    result = {"sample": sample, "architecture": architecture_label(sample), **costs,
              "summary": strategy.summary(), "epochs": monitor.epochs}
    if checkpoint is not None:
        write_json(checkpoint.folder / "result.json", result)
    if outer is not None:
        chosen = max(strategy.final_candidates, key=lambda c: c["reward"])
        outer.report_final({
            "default": chosen["reward"], "architecture": result["architecture"], "params": costs["params"],
            "accuracy": chosen["accuracy"], "reward": chosen["reward"],
            "finalists": [{"architecture": architecture_label(c["sample"]), "accuracy": c["accuracy"],
                           "params": c["params"], "reward": c["reward"]} for c in strategy.final_candidates],
        })
    return result


@nni.trace
class SharedSearchEvaluator(MutableEvaluator):
    """An NNI evaluator whose one trial runs the shared search (:func:`shared_search`).

    Keyword arguments are :class:`SharedSearchSettings` fields. The network NNI builds for the
    trial (the space's baseline, see the run's search stage) is not what it evaluates: the search
    builds its own supernet from the settings."""

    def __init__(self, **settings: Any):
        self.settings = SharedSearchSettings(**settings)
        self.result: dict[str, Any] | None = None

    def extra_repr(self) -> str:
        return f"epochs={self.settings.epochs}, strategy={self.settings.strategy!r}"

    def evaluate(self, model: Any) -> dict[str, Any]:
        settings = self.settings
        if settings.checkpoint_dir is None and nni.get_trial_id() != "STANDALONE":
            out = os.environ.get("NNI_OUTPUT_DIR")
            if out:
                settings = dataclasses.replace(settings, checkpoint_dir=str(Path(out) / "search"))
        self.result = shared_search(settings, OuterTrial())
        return self.result
