"""The main job: S1 to S5 end to end, one NNI experiment per stage, everything in a run directory.

Stages (each skipped on ``resume`` once it has finished):

``search``    SizeAwarePolicyGradient on the block-pool space (shared or trials mode)
              -> search/architecture.json, search/history.json
``federate``  FederatedEvaluator on the chosen architecture, as one NNI trial (web UI: a curve
              per round) -> federated/ (checkpoints, state.json with every round), model.safetensors
``evaluate``  per-exit test accuracy, early-exit thresholds calibrated on the server's
              validation split, the accuracy-vs-MACs curve on the test set -> evaluation.json
``export``    every branch model to TorchScript (and ONNX) -> export/
``report``    report.md and plots/*.png, every number read from the files above
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from nni_fedexit.nni_compat import accept_import_data
from nni_fedexit.job.config import ConfigError, RunConfig
from nni_fedexit.data import DataBundle, DataError, DataRoles, ImageData, load_dataset, split_roles
from nni_fedexit.exits import (
    PREDICTIONS, EarlyExitRuntime, LatencySettings, MultiExitNetwork, calibrate, early_exit_metrics, ensemble_accuracy,
    ensemble_logits, exit_accuracies, exit_costs, exit_outputs, export_branches, export_early_exit, measure_latency,
    onnx_available, threshold_curve,
)
from nni_fedexit.federated import FederatedData
from nni_fedexit.federated.checkpoint import Checkpoint
from nni_fedexit.checks import reason
from nni_fedexit.files import read_json, write_atomic, write_json, write_text
from nni_fedexit.space import ResNetBlockPoolSpace
from nni_fedexit.search.shared_trial import (
    SearchCheckpoint, SharedSearchEvaluator, block_pool_space, lightning_device, search_trainer_settings, shared_search,
    shared_search_evaluator,
)
from nni_fedexit.search.labelled import FixedArchitecture
from nni_fedexit.nni_tools.webui import nni_manager_env, web_ui_message

__all__ = ["PipelineError", "Run", "STAGES", "check_device", "lightning_device", "search_trainer_settings",
           "shared_search_evaluator"]

_logger = logging.getLogger(__name__)

STAGES = ("search", "federate", "evaluate", "export", "report")


class PipelineError(RuntimeError):
    """A run directory, or a file in it, that the run cannot go on with; the message names it and says what to do."""



#: the settings that decide how the federated stage trains, as the report states them
TRAINING_OPTIONS = ("assignment", "depth_sampling", "client_training", "bn_stats", "server_steps", "server_samples",
                    "best_by", "client_fraction", "local_epochs")


def training_options(settings: Any) -> dict[str, Any]:
    """The run's training options (``TRAINING_OPTIONS``, the aggregator's and the objective's names
    and parameters), for ``federated/metrics.json`` and the report."""
    objective = settings.objective
    return {**{k: getattr(settings, k) for k in TRAINING_OPTIONS}, "objective": objective["name"],
            "logit_tau": objective.get("tau", 1.0), "distill_weight": objective.get("distill_weight", 0.0),
            "aggregator": settings.aggregator["name"],
            "components": {"aggregator": dict(settings.aggregator), "objective": dict(objective)}}


def server_training(settings: Any, search_train: int) -> dict[str, int]:
    """How much the server trained each round: its labelled images and its steps on them."""
    images = settings.server_images(search_train)
    return {"server_images": images, "server_step_count": settings.server_step_count(images)}


def _read_json(path: Path, fix: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object the pipeline wrote, with ``keys`` in it; unreadable, corrupt (a truncated write,
    an edit) or of another shape: :class:`PipelineError` naming the file, with ``fix``."""
    data = read_json(path, PipelineError, fix)
    if not isinstance(data, dict):
        raise PipelineError(f"{path} is corrupt (a JSON {type(data).__name__}, not an object): {fix}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise PipelineError(f"{path} is corrupt (no {missing[0]!r}): {fix}")
    return data


def _load_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file of the run; missing or damaged: :class:`PipelineError` naming it, with ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise PipelineError(f"{path} is missing, unreadable or corrupt ({reason(err)}): {fix}") from err


def check_device(device: str) -> None:
    """A CUDA device the run names must be there: one clear error now, not Lightning's later."""
    if device == "cpu":
        return
    _, devices = lightning_device(device)
    if not torch.cuda.is_available():
        raise PipelineError(f"device: {device!r}, but torch {torch.__version__} sees no CUDA GPU on this machine "
                            "(torch.cuda.is_available() is False): set device: cpu, or run where a GPU is")
    index = devices[0] if isinstance(devices, list) else 0
    if index >= torch.cuda.device_count():
        raise PipelineError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(0..{torch.cuda.device_count() - 1}): choose one of them")


class Run:
    """One run directory and the stages that fill it."""

    def __init__(self, config: RunConfig, echo: Callable[[str], None] = print, use_nni: bool = True):
        self.config = config
        self.dir = Path(config.run_dir).resolve()
        self.echo = echo
        #: False: the search and federated stages run in this process, not as NNI trials (no web UI)
        self.use_nni = use_nni
        self._data: DataBundle | None = None
        self._space: ResNetBlockPoolSpace | None = None
        self._federated_data: FederatedData | None = None
        self._roles: DataRoles | None = None
        #: whether run() continues an earlier run (an interrupted stage's experiment is resumed)
        self._resuming = False

    # ---- shared pieces ----------------------------------------------------------------------

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            d = self.config.data
            self._data = load_dataset(d.dataset, data_dir=d.data_dir, download=d.download)
        return self._data

    @property
    def space(self) -> ResNetBlockPoolSpace:
        """The block-pool space, for reading (sizes, building networks)."""
        if self._space is None:
            self._space = self.new_space()
        return self._space

    def new_space(self) -> ResNetBlockPoolSpace:
        """A fresh space for an experiment: a one-shot search turns its space into a supernet in place."""
        return block_pool_space(self.config.space, self.data, self.config.seed)

    @property
    def roles(self) -> DataRoles:
        """The training set's split into the server's search train/val and the clients' share."""
        if self._roles is None:
            d = self.config.data
            self._roles = split_roles(len(self.data.train), d.server_fraction, d.val_fraction, seed=self.config.seed)
        return self._roles

    def federated_data(self) -> FederatedData:
        """The clients' partitions and the server's splits, built once per run."""
        if self._federated_data is None:
            self._federated_data = FederatedData(self.config.federated_settings(), bundle=self.data)
        return self._federated_data

    def done(self) -> list[str]:
        """The stages that finished, from ``stages.json``. A damaged file is an error, never "none
        finished": that would start the run over on top of its trained results."""
        path = self.dir / "stages.json"
        if not path.exists():
            return []
        fix = (f"it lists the stages of this run that finished; delete it to rerun every stage, or write it again "
               f"as {{\"done\": [...]}} with the finished ones, in the order {', '.join(STAGES)}")
        done = _read_json(path, fix, keys=("done",))["done"]
        if not isinstance(done, list) or not all(isinstance(s, str) and s in STAGES for s in done):
            raise PipelineError(f"{path} is corrupt ('done' must list stage names, got {json.dumps(done)[:100]}): {fix}")
        return done

    def _mark(self, stage: str) -> None:
        done = [s for s in self.done() if s != stage] + [stage]
        write_json(self.dir / "stages.json", {"done": done})

    def experiments_dir(self) -> Path:
        return self.dir / "nni-experiments"

    # ---- the stages -------------------------------------------------------------------------

    def run(self, resume: bool = False, stages: tuple[str, ...] = STAGES) -> None:
        self._resuming = resume
        check_device(self.config.device)
        self._make_dir()
        if not resume and self.done():
            raise FileExistsError(f"run directory {self.dir} holds a run already: pass --resume to continue it, "
                                  "or choose another run_dir")
        write_text(self.dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        try:
            self.federated_data()  # fail early: a client would be empty, ...
        except DataError as err:
            if err.key is None:
                raise
            # a run config's error starts with the key's dotted path, as every other one does
            raise ConfigError(f"federated.{err.key}: {err}") from None
        for stage in stages:
            if resume and stage in self.done():
                self.echo(f"[{stage}] done already: skipped")
                continue
            t0 = time.time()
            self.echo(f"[{stage}] ...")
            getattr(self, f"stage_{stage}")()
            self._mark(stage)
            self.echo(f"[{stage}] finished in {time.time() - t0:.0f} s")

    def _make_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file in the way (FileExistsError, NotADirectoryError), no permission, ...
            blocker = next((p for p in (self.dir, *self.dir.parents) if p.exists() and not p.is_dir()), None)
            why = f"{blocker} is a file, not a folder" if blocker is not None else (err.strerror or reason(err))
            raise PipelineError(f"run directory {self.dir} cannot be made: {why}; choose another run_dir "
                                "(--run-dir) that is a folder or a new path") from err

    def stage_search(self) -> dict[str, Any]:
        strategy = self.config.new_strategy()
        if not self.use_nni:
            if strategy.mode != "shared":
                raise PipelineError("search.strategy: the trials mode runs every sampled network as an NNI trial, so it "
                                    "needs NNI; without NNI (--no-nni) search in the shared mode (strategy "
                                    "size_aware_pg), or leave --no-nni out")
            best, history, costs = self._shared_search_in_process()
        elif strategy.mode == "shared":
            best, history, costs = self._shared_search()
        else:
            best, history, costs = self._trials_search(strategy)
        space = self.space
        write_json(self.dir / "search" / "history.json", history)
        arch = {"sample": best, "params": space.count_params(best), "baseline_params": space.baseline_params(),
                "macs": costs.get("macs"), "early_exit_macs": costs.get("early_exit_macs"),
                "baseline": space.spec.sources[0], "num_architectures": space.num_architectures(),
                "experiment_id": history["experiment_id"]}
        write_json(self.dir / "search" / "architecture.json", arch)
        goal = ""
        if history["target"] is not None and history["target"]["T"] is not None:
            goal = f"; target T = {history['target']['T']:,.0f} {history['target']['cost']}"
        self.echo(f"[search] chose {best}: {arch['params']:,} parameters "
                  f"({arch['params'] / arch['baseline_params']:.2f} x the {arch['baseline']} baseline{goal})")
        return arch

    @staticmethod
    def _one_trial(exp: Any) -> None:
        exp.config.max_trial_number = 1
        exp.config.trial_concurrency = 1
        exp.config.training_service.use_active_gpu = False

    def _trials_search(self, strategy: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Trials mode: one NNI trial per sampled network; the strategy runs here."""
        from nni_fedexit.search.trial import search_evaluator

        c = self.config
        space = self.new_space()
        # NNI ships the trial's settings as keyword arguments; the web UI shows each trial's
        # reward as the strategy computes it
        reward = strategy.reward_for(strategy.baseline_params or space.baseline_params())
        evaluator = search_evaluator(**c.trial_settings(),  # a MACs reward is the strategy's alone
                                     reward=reward if strategy.reward_cost == "params" else None)

        def configure(exp: Any) -> None:
            exp.config.max_trial_number = c.search.max_trials
            exp.config.trial_concurrency = c.search.concurrency
            exp.config.training_service.use_active_gpu = False

        exp, resumed = self._stage_experiment("search", space, evaluator, strategy, configure, resumable=True)
        self.echo(f"[search] experiment {exp.id}{' (resumed)' if resumed else ''}; "
                  + web_ui_message(c.nni.port, c.nni.host))
        try:
            self._start(exp, resumed)
            best = exp.export_top_models(formatter="dict")[0]
        finally:
            exp.stop()
        best = {str(k): v for k, v in best.items()}
        costs = strategy.costs.costs(best) if strategy.costs is not None else {}
        return best, {"experiment_id": exp.id, **strategy.summary()}, costs

    def _shared_search(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Shared mode: the whole search is one NNI trial (search/shared_trial.py): a point per epoch
        in the web UI, a TensorBoard log, a checkpoint per epoch that an interrupted trial resumes from."""
        c = self.config
        s = c.shared_search_settings()
        checkpoint = SearchCheckpoint(s.checkpoint_dir)
        resumes = checkpoint.resume_point(s)  # refused (other settings, damaged): say so here, not in the trial's log
        space = self.new_space()
        shown = {"search": "shared weights (ENAS): one trial, a point per epoch", "epochs": s.epochs,
                 "architectures": space.num_architectures(), "strategy": s.strategy}
        # the trial's network is the baseline's (NNI builds one per trial); the search builds its own supernet
        trial = FixedArchitecture(space.baseline_sample(), shown=shown)
        exp, resumed = self._stage_experiment("search", space, SharedSearchEvaluator(**dataclasses.asdict(s)), trial,
                                              self._one_trial, resumable=True)
        after = f", from the checkpoint of epoch {checkpoint.state()['epoch']}" if resumes is not None else ""
        self.echo(f"[search] {s.epochs} epochs of shared weights{after}, checkpoints and TensorBoard log in "
                  f"{s.checkpoint_dir}; experiment {exp.id}{' (resumed)' if resumed else ''}; "
                  + web_ui_message(c.nni.port, c.nni.host))
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_epochs, args=(checkpoint, s.epochs, stop), daemon=True)
        watcher.start()
        try:
            self._start(exp, resumed)
        finally:
            stop.set()
            watcher.join()
            exp.stop()
        path = Path(s.checkpoint_dir) / "result.json"
        if not path.exists():
            raise PipelineError(f"the shared search trial wrote no {path}: see its log under "
                                f"{self.experiments_dir() / exp.id}; continue with: nni-fedexit resume {self.dir}")
        result = _read_json(path, f"the search trial writes it at its end: delete it and resume {self.dir}",
                            keys=("sample", "summary"))
        costs = {k: result.get(k) for k in ("params", "macs", "early_exit_macs")}
        return dict(result["sample"]), {"experiment_id": exp.id, **result["summary"]}, costs

    def _shared_search_in_process(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Shared mode without NNI: the same search as the NNI trial's (:func:`shared_search`), run
        here, with the same checkpoints (an interrupted one resumes from its last epoch)."""
        s = self.config.shared_search_settings()
        resumes = SearchCheckpoint(s.checkpoint_dir).resume_point(s)
        after = " from its last checkpoint" if resumes is not None else ""
        self.echo(f"[search] {s.epochs} epochs of shared weights in this process{after} (no NNI experiment); "
                  f"checkpoints and TensorBoard log in {s.checkpoint_dir}")
        result = shared_search(s)
        costs = {k: result.get(k) for k in ("params", "macs", "early_exit_macs")}
        return dict(result["sample"]), {"experiment_id": None, **result["summary"]}, costs

    def _watch_epochs(self, checkpoint: SearchCheckpoint, epochs: int, stop: threading.Event) -> None:
        """Progress bar of the search trial, read from its checkpoints (the last epoch has none)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="search epochs", unit="epoch")
        while not stop.wait(2.0):
            try:
                state = checkpoint.state()
            except RuntimeError:  # a file being replaced: the next look reads it
                continue
            if state is not None and state["epoch"] > bar.n:
                bar.update(state["epoch"] - bar.n)
        bar.close()

    def _stage_experiment(self, stage: str, space: Any, evaluator: Any, strategy: Any,
                          configure: Callable[[Any], None], resumable: bool) -> tuple[Any, bool]:
        """The stage's NNI experiment: the one an interrupted run of the stage left (to resume), or
        a new one. Its id goes to ``<stage>/experiment.json`` before it starts, so
        ``nni-fedexit view`` and ``resume`` find it whatever happens next."""
        from nni.nas.experiment import NasExperiment

        from nni_fedexit.nni_tools.reopen import (
            STAGE_RECORDS, ExperimentRef, check_own_run, experiment_manifest, plain_json_checkpoint_config,
        )

        record = self.dir / STAGE_RECORDS[stage]
        before = _read_json(record, f"it holds the id of the {stage} stage's NNI experiment; delete it to run the "
                                    "stage in a new experiment") if record.exists() else {}
        old = before.get("experiment_id")
        resumed = bool(resumable and self._resuming and old and ExperimentRef(old, self.experiments_dir()).config() is not None
                       and old in experiment_manifest())
        attempt = int(before.get("attempts", 1)) + 1 if resumed else 1
        if resumed:
            check_own_run(self.dir)
            accept_import_data()
            plain_json_checkpoint_config()  # NNI's resume reads config.json again: not with nni.load
        exp = NasExperiment(space, evaluator, strategy, id=old if resumed else None)
        exp.config.experiment_working_directory = str(self.experiments_dir())
        configure(exp)  # as when it was created: NNI resumes an experiment with its own config
        write_json(record, {"experiment_id": exp.id, "stage": stage, "attempts": attempt})
        return exp, resumed

    def _start(self, exp: Any, resumed: bool) -> None:
        """Run (or resume) a stage's experiment until it ends, its web UI on ``nni.host``."""
        with nni_manager_env(self.config.nni.host):
            outcome = exp.resume(port=self.config.nni.port) if resumed else exp.run(port=self.config.nni.port)
        if outcome is None:  # NNI catches Ctrl-C, stops the experiment and returns None: pass it on
            raise KeyboardInterrupt

    def architecture(self) -> dict[str, Any]:
        path = self.dir / "search" / "architecture.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the search stage first")
        return _read_json(path, 'it holds the searched architecture; to search again, delete it and take "search" '
                                f"out of {self.dir / 'stages.json'}, then resume", keys=("sample",))

    def stage_federate(self) -> None:
        from nni.nas.experiment import NasExperiment

        from nni_fedexit.federated import FederatedEvaluator

        arch = self.architecture()
        s = self.config.federated_settings()
        # a checkpoint this trial cannot go on from (other settings, damaged): say so here, not in the trial's log
        Checkpoint(s.checkpoint_dir).resume_point(s)
        if s.server_steps != 0 and self.config.exits.margin == "held_out":
            self.held_out_split()  # images left to certify the early exits on: checked before training
        if not self.use_nni:
            self._federate_in_process(arch, s)
            return
        evaluator = FederatedEvaluator(**s.model_dump())  # NNI ships the settings to the trial as JSON kwargs
        # resumed: the experiment of the interrupted stage goes on under its id, and NNI runs its
        # interrupted trial again, which resumes the rounds from the federated checkpoint
        exp, resumed = self._stage_experiment("federate", self.new_space(), evaluator,
                                              FixedArchitecture(arch["sample"]), self._one_trial, resumable=True)
        port = self.config.nni.port
        where = (f"on the SuperNodes of SuperLink connection {s.backend.get('superlink')!r}" if s.name("backend") == "flower"
                 else f"x {s.num_clients} simulated clients")
        self.echo(f"[federate] {s.rounds} rounds {where}, checkpoints in {s.checkpoint_dir}; experiment "
                  f"{exp.id}{' (resumed)' if resumed else ''}; " + web_ui_message(port, self.config.nni.host))
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_rounds, args=(Path(s.checkpoint_dir), s.rounds, stop), daemon=True)
        watcher.start()
        try:
            self._start(exp, resumed)
        finally:
            stop.set()
            watcher.join()
            exp.stop()
        state = Checkpoint(s.checkpoint_dir).state()
        if state is None:
            raise PipelineError(f"the federated trial wrote no readable checkpoint in {s.checkpoint_dir}: see its log "
                                f"under {self.experiments_dir() / exp.id}")
        if state["round"] < s.rounds:
            raise PipelineError(f"the federated trial stopped after round {state['round']} of {s.rounds}: see its log "
                                f"under {self.experiments_dir() / exp.id}; continue with: nni-fedexit resume {self.dir}")
        self._record_federated(arch, s, state, exp.id)

    def _federate_in_process(self, arch: Mapping[str, Any], s: Any) -> None:
        """The federated stage without NNI: the network the trial would build (the same seed before
        it is built), trained by :func:`~nni_fedexit.federated.federate` here, resuming from the
        stage's checkpoint as the trial does."""
        from nni.nas.space import SimplifiedModelSpace

        from nni_fedexit.federated import federate
        from nni_fedexit.federated.rounds import stable_seed

        where = (f"on the SuperNodes of SuperLink connection {s.backend.get('superlink')!r}" if s.name("backend") == "flower"
                 else f"x {s.num_clients} simulated clients")
        self.echo(f"[federate] {s.rounds} rounds {where} in this process (no NNI experiment); checkpoints in "
                  f"{s.checkpoint_dir}")
        # the network as NNI's trial builds it: the frozen model space instantiated under the same seed
        frozen = SimplifiedModelSpace.from_model(self.new_space()).freeze(dict(arch["sample"]))
        torch.manual_seed(stable_seed(s.seed))  # as FederatedEvaluator seeds the trial before NNI builds its network
        federate(frozen.executable_model(), s, report=False)
        state = Checkpoint(s.checkpoint_dir).state()
        if state is None or state["round"] < s.rounds:
            raise PipelineError(f"the federated rounds stopped before round {s.rounds} (checkpoints in {s.checkpoint_dir}); "
                                f"continue with: nni-fedexit run CONFIG --resume --no-nni --run-dir {self.dir}")
        self._record_federated(arch, s, state, None)

    def _record_federated(self, arch: Mapping[str, Any], s: Any, state: Mapping[str, Any], experiment_id: str | None) -> None:
        """metrics.json, partition.json, model.safetensors and model.json from the stage's checkpoint."""
        write_json(self.dir / "federated" / "metrics.json", {
            "experiment_id": experiment_id, "best_round": state["best_round"], "rounds": state["history"],
            "options": {**training_options(s), **server_training(s, len(self.roles.search_train))},
        })
        data = self.federated_data()
        write_json(self.dir / "federated" / "partition.json", {
            "scheme": s.partition, "alpha": s.alpha, "label_skew": data.label_skew, "clients": data.summary,
            # flower backend: the SuperNodes that took part (partition-id, or their own data-dir)
            **({"backend": "flower", "nodes": state.get("nodes", {})} if s.name("backend") == "flower" else {}),
        })
        from safetensors.torch import save_file

        best = Checkpoint(s.checkpoint_dir).best_weights()  # checked against state.json: FederatedError if damaged
        write_atomic(self.dir / "model.safetensors", lambda p: save_file(best, str(p)))
        write_json(self.dir / "model.json", {"architecture": arch["sample"], "head": s.head,
                                             "loss_weights": s.loss_weights, "best_round": state["best_round"]})

    def _watch_rounds(self, folder: Path, rounds: int, stop: threading.Event) -> None:
        """Progress bar of the federated trial, read from its checkpoints."""
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc="federated rounds", unit="round")
        seen = 0
        ckpt = Checkpoint(folder)
        while not stop.wait(2.0):
            state = ckpt.state()
            if state is not None and state["round"] > seen:
                last = state["history"][-1]
                bar.update(state["round"] - seen)
                bar.set_postfix(val_acc=f"{last['exit_accuracy'][-1]:.3f}", loss=f"{last['total_loss']:.3f}")
                seen = state["round"]
        bar.close()

    def model(self) -> MultiExitNetwork:
        """The trained exit-point model, rebuilt from model.json and model.safetensors."""
        meta_path = self.dir / "model.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: run the federate stage first")
        # both files are written from the federated checkpoint at the end of the federate stage
        refederate = (f'the federate stage writes it at its end: take "federate" out of {self.dir / "stages.json"} '
                      f"and resume to write it again (the rounds are kept in {self.dir / 'federated'})")
        meta = _read_json(meta_path, refederate, keys=("architecture", "head", "loss_weights"))
        from nni.mutable.exception import SampleValidationError

        try:
            model = MultiExitNetwork.from_architecture(self.space, meta["architecture"], head=meta["head"],
                                                       loss_weights=meta["loss_weights"])
        except SampleValidationError as err:  # an edited model.json, or a config.yaml whose space changed since
            raise PipelineError(f"the architecture in {meta_path} is not one of the space of {self.dir / 'config.yaml'} "
                                f"({reason(err)}): {refederate}") from err
        weights_path = self.dir / "model.safetensors"
        weights = _load_weights(weights_path, refederate)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:  # torch: missing / unexpected keys, other shapes, a line each under a heading
            lines = [line.strip() for line in reason(err).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise PipelineError(f"{weights_path} does not fit the network of {meta_path} "
                                f"({detail[:200] + ('...' if len(detail) > 200 else '')}): {refederate}") from err
        thresholds = self.dir / "evaluation.json"
        if thresholds.exists():
            ev = _read_json(thresholds, 'it holds the calibrated exit thresholds; delete it and take "evaluate" out '
                                        f"of {self.dir / 'stages.json'}, then resume", keys=("thresholds", "criterion"))
            model.thresholds, model.criterion = ev["thresholds"], ev["criterion"]
            prediction = ev.get("prediction", "exit")
            if prediction not in PREDICTIONS:
                raise PipelineError(f"{thresholds} has prediction {prediction!r}, not one of {list(PREDICTIONS)}: delete "
                                    f"it and take \"evaluate\" out of {self.dir / 'stages.json'}, then resume")
            model.prediction = prediction
        return model.eval()

    def held_out_split(self) -> tuple[ImageData, str]:
        """The images the early-exit guarantee is certified on, and their description: the server's
        search-train images whose labels the federated model never trained on (all of them, or
        those after the ones ``server_steps`` trained on: ``FederatedSettings.server_images``)."""
        s = self.config.federated_settings()
        search_train = self.roles.search_train
        used = s.server_images(len(search_train))
        if used >= len(search_train):
            raise PipelineError(f"federated.server_samples: the server trained on {used:,} of its {len(search_train):,} "
                                "search-train images, so none is left to certify the early exits on; lower "
                                "federated.server_samples, or set exits.margin: none")
        where = (f"the server's search-train images {used:,} to {len(search_train):,} (the first {used:,} trained the "
                 "model in server_steps)" if used else "the server's search-train images")
        return self.data.train.subset(search_train[used:]), where + ", whose labels the federated model never trained on"

    def stage_evaluate(self) -> dict[str, Any]:
        c = self.config
        model = self.model()
        val = self.data.train.subset(self.roles.search_val)
        test = self.federated_data().test  # the federated stage's test set (data.test_samples)
        costs = exit_costs(model, test.images[:1])
        held_out, held_out_split = self.held_out_split() if c.exits.margin == "held_out" else (None, None)
        cal = calibrate(model, val, max_accuracy_drop=c.exits.max_accuracy_drop, macs_budget=c.exits.macs_budget,
                        criterion=c.exits.criterion, costs=costs, prediction=c.exits.prediction, rule=c.exits.rule,
                        held_out=held_out, confidence_level=c.exits.confidence_level)
        logits, labels = exit_outputs(model, test)
        test_acc = exit_accuracies(logits, labels)
        best = 1 + max(range(len(test_acc)), key=lambda i: (test_acc[i], -i))
        ensemble = ensemble_accuracy(logits, labels)
        if c.exits.prediction == "ensemble":
            logits = ensemble_logits(logits)
        on_test = early_exit_metrics(logits, labels, cal.thresholds, costs, c.exits.criterion)
        curve = threshold_curve(logits, labels, costs, c.exits.criterion)
        result = {
            "thresholds": cal.thresholds, "criterion": c.exits.criterion, "prediction": c.exits.prediction,
            "target": cal.target, "rule": cal.rule, "margin": c.exits.margin, "ensemble_accuracy": ensemble,
            "guarantee": cal.guarantee, "drop_bound": cal.drop_bound, "confidence_level": cal.confidence_level,
            "held_out": cal.held_out, "held_out_images": cal.held_out_images, "held_out_split": held_out_split,
            "exits": [{"exit": x.exit, "params": x.params, "macs": x.macs, "early_exit_macs": x.early_exit_macs,
                       "test_accuracy": a} for x, a in zip(costs, test_acc)],
            "validation": {"accuracy": cal.accuracy, "last_exit_accuracy": cal.last_exit_accuracy,
                           "expected_macs": cal.expected_macs, "exit_share": cal.exit_share},
            "test": {**on_test, "last_exit_accuracy": test_acc[-1], "macs_saved": 1 - on_test["expected_macs"] / costs[-1].macs,
                     # the exit to beat: the most accurate one alone (the shallowest among equals)
                     "best_exit": best, "best_exit_accuracy": test_acc[best - 1],
                     "macs_saved_vs_best_exit": 1 - on_test["expected_macs"] / costs[best - 1].macs},
            "test_curve": curve, "test_images": len(test), "val_images": len(val),
        }
        write_json(self.dir / "evaluation.json", result)
        versus = (f" than the last exit" if best == len(test_acc) else
                  f" than the last exit; exit {best} alone beats the last exit ({test_acc[best - 1]:.4f} vs "
                  f"{test_acc[-1]:.4f}): {result['test']['macs_saved_vs_best_exit']:.1%} less compute than exit {best}")
        self.echo(f"[evaluate] test accuracy per exit {' '.join(f'{a:.4f}' for a in test_acc)}, ensemble of exits "
                  f"{ensemble:.4f}; early exits ({c.exits.prediction}): "
                  f"{on_test['accuracy']:.4f} at {result['test']['macs_saved']:.1%} less compute{versus}")
        return result

    def stage_export(self) -> list[dict[str, Any]]:
        model = self.model()
        records = export_branches(model, self.dir / "export", self.data.test.images[:2])
        write_json(self.dir / "export" / "exports.json", records)
        self.echo(f"[export] {len(records)} files in {self.dir / 'export'}")
        if model.thresholds is not None:
            self.export_early_exit(model)
        return records

    def export_early_exit(self, model: MultiExitNetwork) -> None:
        """The early-exit runtime's segments, and its batch-1 latency against the last exit alone."""
        folder = self.dir / "export" / "early_exit"
        formats = ("onnx", "torchscript") if onnx_available() else ("torchscript",)
        manifest = export_early_exit(model, folder, self.data.test.images[:2], formats=formats)
        n = self.config.exits.latency_images
        test = self.federated_data().test.images.numpy()
        timings = [measure_latency(EarlyExitRuntime(folder, fmt), test, LatencySettings(images=n))
                   for fmt in formats] if n else []
        write_json(folder / "latency.json", {"thresholds": manifest["thresholds"], "timings": timings,
                                             "threads": 1, "images": min(n, len(test))})
        self.echo(f"[export] early-exit runtime in {folder}" + "".join(
            f"; {t['format']} batch 1: {t['early_exit_s'] * 1e3:.2f} ms per image against {t['last_exit_s'] * 1e3:.2f} ms "
            f"for the last exit alone ({t['latency_saved']:.1%} less)" for t in timings))

    def stage_report(self) -> Path:
        from nni_fedexit.job.report import write_report

        path = write_report(self.dir)
        self.echo(f"[report] {path}")
        return path
