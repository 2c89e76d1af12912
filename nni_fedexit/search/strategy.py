"""S3: SizeAwarePolicyGradient, an NNI 3.0 strategy (LSTM controller, REINFORCE, size-aware reward).

Two modes, one controller (:mod:`nni_fedexit.search.controller`) and one reward (:mod:`nni_fedexit.search.reward`):

``shared`` (default, the patent's ENAS method)
    A one-shot strategy on NNI's ``RandomOneShot`` machinery: the space becomes a supernet of
    path-sampling layers with one set of shared weights. Each epoch the shared weights train on
    the training batches along controller-sampled paths, then the controller samples a path per
    validation batch, is rewarded with ``R(accuracy on that batch, p_h)`` and takes a REINFORCE
    step every ``samples_per_update`` batches. At the end K architectures are sampled from the
    controller (plus its greedy choice), each is scored on the validation data with the shared
    weights, and the one with the highest reward is exported. Needs a Lightning evaluator such
    as ``nni.nas.evaluator.pytorch.Classification`` whose batches are ``(x, y)``.

``trials``
    A multi-trial strategy: every sampled architecture is submitted to NNI's execution engine
    as a trial (local training service: the web UI lists it with its metrics). The trial reports
    its accuracy (``nni.report_final_result(acc)`` or ``{"default": acc, "params": p_h}``); the
    strategy computes the reward and updates the controller every ``samples_per_update``
    finished trials, in whatever order they finish. A trial that failed without a final metric
    is logged and skipped, not rewarded 0 (one that reported before failing, or that NNI's
    ``FailureHandler(metric=...)`` scored, counts with that metric). Samples that break the
    space's constraints are never submitted (``reward_for_invalid``).

``SizeAwarePolicyGradient(mode=...)`` returns the mode's class, both subclasses of it, so NNI's
experiment picks the right engine by itself (sequential for ``shared``, training service for
``trials``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from nni_fedexit.nni_compat import import_nni
from nni_fedexit.checks import positive_int
from nni_fedexit.search.controller import ControllerSettings, PolicyGradient, RewardBatch
from nni_fedexit.presets import PresetError, load_preset
from nni_fedexit.search.cost import CostModel
from nni_fedexit.search.decisions import DEFAULT_BINS, LABEL_KINDS, Choice, Decision, check_bins, decisions_of_space
from nni_fedexit.search.profiler import ParamsProfiler
from nni_fedexit.search.reward import DEFAULT_BETA, Reward, SizeAwareReward, SizeTarget, check_beta, parse_metric
import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.mutable import SampleValidationError  # noqa: E402
from nni.nas.execution.event import FinalMetricEvent, ModelEventType, TrainingEndEvent
from nni.nas.oneshot.pytorch.base_lightning import BaseOneShotLightningModule
from nni.nas.oneshot.pytorch.strategy import RandomOneShot
from nni.nas.space import ModelStatus, SimplifiedModelSpace
from nni.nas.strategy.base import Strategy

from nni_fedexit.space import architecture_label

__all__ = ["SizeAwarePolicyGradient", "SharedSizeAwarePolicyGradient", "TrialsSizeAwarePolicyGradient", "FixedArchitecture"]

_logger = logging.getLogger(__name__)

MODES = ("shared", "trials")
#: how the shared weights' paths are drawn during warm-up (see ``warmup_sampling``)
WARMUP_SAMPLING = ("fair", "uniform")
#: how a path of the shared weights is evaluated: BatchNorm on the batch's statistics, or on the running ones
BN_EVAL = ("batch", "running")
#: whose paths the shared weights train along after the warm-up (see ``path_sampling``)
PATH_SAMPLING = ("controller", "warmup")


class LabelledModelSpace(SimplifiedModelSpace):
    """A trial's model as NNI sends it to the trial, with its choices also in plain words.

    NNI shows a NAS trial's parameters as the serialised model (symbols, arguments, evaluator).
    This adds ``architecture`` (``stage1=resnet34 stage2=...``) and every choice under its label at
    the top level, where the web UI looks for the search space's keys (an InputChoice's inputs
    joined by commas): the trial table and the hyper-parameter chart then show which architecture
    each trial evaluated.
    """

    _OWN_KEYS = ("status", "model_symbol", "model_args", "model_kwargs", "evaluator", "sample", "metrics", "mutables")

    #: shown instead of the architecture (a trial whose network is not what it evaluates: the shared search's)
    shown: dict[str, Any] | None = None

    @classmethod
    def of(cls, model: SimplifiedModelSpace, shown: Mapping[str, Any] | None = None) -> SimplifiedModelSpace:
        """``model`` (frozen) as a LabelledModelSpace; other model formats are returned as they are.
        ``shown``: the parameters the web UI lists instead of the architecture's labels."""
        if type(model) is not SimplifiedModelSpace:
            return model
        labelled = cls(model.model, model.mutables, model.evaluator)
        labelled.status, labelled.sample, labelled.metrics = model.status, model.sample, model.metrics
        labelled.shown = None if shown is None else dict(shown)
        return labelled

    def _dump(self) -> dict:
        rv = super()._dump()
        if self.shown is not None:
            rv.update({k: v for k, v in self.shown.items() if k not in self._OWN_KEYS})
        elif self.sample is not None:
            rv["architecture"] = architecture_label(self.sample)
            rv.update({k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in self.sample.items()
                       if k not in self._OWN_KEYS and k != "architecture" and isinstance(v, (str, int, float, bool, list))})
        return rv

    @classmethod
    def _load(cls, **attrs: Any) -> SimplifiedModelSpace:
        return super()._load(**{k: v for k, v in attrs.items() if k in cls._OWN_KEYS})


#: the label kinds each mode can search (NNI's one-shot supernet takes no continuous values)
MODE_KINDS = {"trials": LABEL_KINDS, "shared": ("Categorical", "CategoricalMultiple")}


def violation(space: Any, sample: Mapping[str, Any]) -> str | None:
    """Why ``sample`` breaks one of ``space``'s constraints (or is outside it); None if it is valid."""
    check = getattr(space, "check_contains", None)
    if not callable(check):
        return None
    try:
        err = check(dict(sample))
    except SampleValidationError as exc:
        err = exc
    return None if err is None else str(err)


def _sample_key(sample: Mapping[str, Any]) -> str:
    """The same architecture, the same key (the candidates of an InputChoice in any order)."""
    return repr(sorted((str(k), repr(sorted(v, key=repr)) if isinstance(v, list) else repr(v)) for k, v in sample.items()))


class SizeAwarePolicyGradient(Strategy):
    """Policy-gradient NAS whose reward weighs accuracy against parameter count (claims 3 and 4).

    Parameters
    ----------
    mode
        ``"shared"`` (weight-sharing ENAS, default) or ``"trials"`` (one NNI trial per sample).
    beta
        Reward exponent: ``R = Acc * (p_h / P) ** (-1 / beta)``; a positive integer.
    baseline_params
        P. Default: the space's ``baseline_params()`` (ResNetBlockPoolSpace), else the parameter
        count of the sample that takes every label's first value.
    target
        A size goal: :class:`~nni_fedexit.search.reward.SizeTarget` or a mapping of its fields
        (``cost``: params, macs or early_exit_macs; ``value`` or ``share`` of the baseline's cost;
        ``below``, ``above`` exponents). The reward is then MnasNet's target form
        ``Acc * (cost / T) ** w`` instead of claim 4's; None keeps claim 4's.
    reward
        Replaces the reward: any ``reward(accuracy, cost) -> float`` (its ``cost`` attribute names
        the cost, default params), e.g. :class:`~nni_fedexit.search.reward.HardBudgetReward`.
        ``beta``, ``target`` and ``baseline_params`` are then unused except for P's default.
    controller
        :class:`~nni_fedexit.search.controller.ControllerSettings` (or a dict of its fields); its seed
        defaults to ``seed``.
    samples_per_update
        Finished samples (trials, or validation batches in ``shared`` mode) per controller update.
    final_samples
        ``shared`` mode: K, the architectures sampled at the end and scored with the shared weights.
    final_eval_batches
        ``shared`` mode: validation batches used to score each of the K (None: all).
    warmup_epochs
        ``shared`` mode: epochs at the start in which the shared weights train along paths drawn
        by ``warmup_sampling``, not by the controller, and the controller neither samples nor
        learns: every candidate is trained before the controller compares them (otherwise the
        blocks it happens to favour early train more and win: rich get richer).
    warmup_sampling
        ``fair`` (FairNAS' strict fairness: in every run of N training batches each candidate of
        each label is on the path exactly once) or ``uniform`` (each label drawn independently).
    path_sampling
        ``shared`` mode, after the warm-up: ``controller`` (ENAS: the shared weights train along
        the controller's paths) or ``warmup`` (they keep training along ``warmup_sampling`` paths
        and the controller only samples the validation batches: the supernet then ranks every
        network as fairly as at the start, instead of favouring what the controller chose).
    bn_eval
        ``shared`` mode: ``batch`` (default) evaluates a path with BatchNorm on each validation
        batch's own statistics (see :func:`batch_statistics`); ``running`` uses the shared running
        statistics, which every path has moved.
    dedup
        ``trials`` mode: an architecture is trained once. When the controller samples one that
        was already trained, it learns from the recorded reward and samples again; after 20
        such draws in a row, an untrained architecture is drawn uniformly instead, and when
        none is left the search stops.
    reward_for_invalid
        A sample that breaks one of the space's constraints (``ExpressionConstraint`` and NNI's
        other constraints) is never submitted or trained: the controller draws again. With a
        number, the controller also learns that reward for the invalid sample (as NNI's
        ``PolicyBasedRL``); None (default) skips it. After ``invalid_patience`` invalid draws in a
        row the search stops, with a warning naming the constraint.
    numerical_bins
        ``trials`` mode: equal-probability bins of a continuous label (``nni.uniform``,
        ``loguniform``, ``normal``, ...); a quantised label with at most this many values is a
        choice of them. See :mod:`nni_fedexit.search.decisions`.
    seed
        Seeds the controller's weights and every sample it draws.
    """

    MODE = ""

    def __new__(cls, *args: Any, mode: str | None = None, **kwargs: Any):
        if cls is SizeAwarePolicyGradient:
            mode = mode or "shared"
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            cls = SharedSizeAwarePolicyGradient if mode == "shared" else TrialsSizeAwarePolicyGradient
        return super().__new__(cls)

    def __init__(
        self,
        *,
        mode: str | None = None,
        beta: int = DEFAULT_BETA,
        baseline_params: int | None = None,
        target: SizeTarget | Mapping[str, Any] | None = None,
        reward: Reward | None = None,
        controller: ControllerSettings | Mapping[str, Any] | None = None,
        samples_per_update: int = 4,
        final_samples: int = 16,
        final_eval_batches: int | None = None,
        warmup_epochs: int = 0,
        warmup_sampling: str = "fair",
        path_sampling: str = "controller",
        bn_eval: str = "batch",
        dedup: bool = True,
        reward_for_invalid: float | None = None,
        numerical_bins: int = DEFAULT_BINS,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        check_beta(beta)
        positive_int("samples_per_update", samples_per_update)
        positive_int("final_samples", final_samples)
        if warmup_sampling not in WARMUP_SAMPLING:
            raise ValueError(f"warmup_sampling must be one of {WARMUP_SAMPLING}, got {warmup_sampling!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        if path_sampling not in PATH_SAMPLING:
            raise ValueError(f"path_sampling must be one of {PATH_SAMPLING}, got {path_sampling!r}")
        if bn_eval not in BN_EVAL:
            raise ValueError(f"bn_eval must be one of {BN_EVAL}, got {bn_eval!r}")
        if reward_for_invalid is not None and (isinstance(reward_for_invalid, bool) or not isinstance(
                reward_for_invalid, (int, float)) or not math.isfinite(reward_for_invalid)):
            raise ValueError(f"reward_for_invalid must be a finite number or None, got {reward_for_invalid!r}")
        check_bins(numerical_bins)
        if mode is not None and mode != self.MODE:
            raise ValueError(f"{type(self).__name__} runs mode {self.MODE!r}, not {mode!r}")
        self.mode = self.MODE
        self.beta = beta
        self.baseline_params = baseline_params
        self.target = None if target is None else SizeTarget.of(target)
        self.custom_reward = reward
        if controller is None:
            controller = ControllerSettings(seed=seed)
        elif not isinstance(controller, ControllerSettings):
            controller = ControllerSettings(**{"seed": seed, **dict(controller)})
        self.controller_settings = controller
        self.samples_per_update = samples_per_update
        self.final_samples = final_samples
        self.final_eval_batches = final_eval_batches
        self.warmup_epochs = warmup_epochs
        self.warmup_sampling = warmup_sampling
        self.bn_eval = bn_eval
        self.path_sampling = path_sampling
        self.dedup = dedup
        self.reward_for_invalid = None if reward_for_invalid is None else float(reward_for_invalid)
        self.numerical_bins = numerical_bins
        self.seed = seed
        self.invalid_draws = 0  # samples drawn that broke a constraint (never submitted)
        self.decisions: dict[str, Decision] = {}  # one per label of the space, once initialized
        self._space: Any = None  # what samples are checked against (its constraints)
        self.learner: PolicyGradient | None = None
        self.reward_fn: Reward | None = None
        self.profiler: ParamsProfiler | None = None
        self.costs: CostModel | None = None
        self._baseline: dict[str, Any] = {}
        #: every scored sample: {"sample", "accuracy", "params", "macs", "early_exit_macs", "reward", "step"}
        #: (the MACs where the space counts them)
        self.records: list[dict[str, Any]] = []
        self._batch = RewardBatch(samples_per_update, _logger)
        self._pending_state: dict[str, Any] | None = None
        self._lock = threading.RLock()

    @classmethod
    def from_preset(cls, name_or_path: str = "size_aware_pg", **overrides: Any) -> "SizeAwarePolicyGradient":
        """A strategy from a YAML preset in ``strategies/`` (by name) or a file, with overrides."""
        import inspect

        data, where = load_preset("strategies", name_or_path)
        data.update(overrides)
        known = set(inspect.signature(SizeAwarePolicyGradient.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PresetError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        controller = data.get("controller")
        if controller is not None:
            if not isinstance(controller, Mapping):
                raise PresetError(f"{where}: key 'controller' must be a mapping of ControllerSettings fields")
            fields = set(ControllerSettings.__dataclass_fields__)
            bad = sorted(set(controller) - fields)
            if bad:
                raise PresetError(f"{where}: unknown key(s) {bad} under 'controller'; known: {sorted(fields)}")
        target = data.get("target")
        if target is not None and not isinstance(target, Mapping):
            raise PresetError(f"{where}: key 'target' must be a mapping of SizeTarget fields "
                              f"{sorted(SizeTarget.__dataclass_fields__)}")
        try:
            return SizeAwarePolicyGradient(**data)
        except (TypeError, ValueError) as err:
            raise PresetError(f"{where}: {err}") from err

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, beta={self.beta}, samples_per_update={self.samples_per_update}, "
            f"seed={self.seed}"
        )

    # ---- shared by both modes ---------------------------------------------------------------

    def _setup_search(self, space: Any, profiled: Any) -> None:
        """Controller over ``space``'s labels; reward with P; the state loaded before initialize."""
        self.decisions = decisions_of_space(space, self.numerical_bins, allow=MODE_KINDS[self.MODE],
                                            who=f"SizeAwarePolicyGradient(mode={self.MODE!r})")
        self.learner = PolicyGradient(self.decisions, self.controller_settings)
        self._space = space
        self.costs = CostModel(profiled, self.target)
        self.profiler = self.costs.profiler
        self._baseline = self.costs.baseline_sample({label: d.first() for label, d in self.decisions.items()})
        if violation(space, self._baseline) is not None:  # the first values break a constraint
            self._baseline = dict(space.default().sample)
        if self.baseline_params is None:
            own = getattr(self.profiler.space, "baseline_params", None)
            if callable(own):
                self.baseline_params = int(own())
            else:
                self.baseline_params = self.profiler.profile(self._baseline)
                _logger.info("Baseline P = %s parameters (the sample of every label's first value)", self.baseline_params)
        self.reward_fn = self.reward_for(self.baseline_params)
        if self._pending_state is not None:
            self._load_search_state(self._pending_state)
            self._pending_state = None

    #: invalid draws in a row after which the search stops (NNI's PolicyBasedRL: 20)
    invalid_patience = 100

    def draw(self, sampler: Callable[[], dict[str, Any]] | None = None, learn: bool = True) -> dict[str, Any] | None:
        """A sample from ``sampler`` (default: the controller) that keeps every constraint of the
        space; invalid ones are counted, learnt with ``reward_for_invalid`` (if ``learn`` and it is
        set) and drawn again. None after ``invalid_patience`` invalid draws in a row."""
        assert self.learner is not None
        sampler = sampler or self.learner.sample
        why = None
        for _ in range(self.invalid_patience):
            sample = sampler()
            why = violation(self._space, sample)
            if why is None:
                return sample
            self.invalid_draws += 1
            _logger.debug("Invalid sample %s (%s): %s", sample, why,
                          "skipped" if self.reward_for_invalid is None else f"reward {self.reward_for_invalid}")
            if learn and self.reward_for_invalid is not None:
                self.feed(sample, self.reward_for_invalid)
        _logger.warning("%d samples in a row broke the space's constraints (last: %s): no more sampling. "
                        "Check that the constraints leave valid samples, or set reward_for_invalid so the "
                        "controller learns to avoid them.", self.invalid_patience, why)
        return None

    def summary(self) -> dict[str, Any]:
        """What the search did, as plain JSON (a run's ``search/history.json``, without its experiment id)."""
        assert self.learner is not None
        return {
            "mode": self.mode, "beta": self.beta,
            "target": None if self.target is None else {
                **dataclasses.asdict(self.target), "T": getattr(self.reward_fn, "target", None)},
            "warmup_epochs": self.warmup_epochs, "warmup_sampling": self.warmup_sampling,
            "baseline_params": self.baseline_params, "controller_steps": self.learner.history,
            "samples": self.records, "probabilities": self.learner.probabilities(),
            "final_candidates": getattr(self, "final_candidates", []),
        }

    def reward_for(self, baseline_params: int | None) -> Reward:
        """The reward this strategy scores with, given P (trials may compute it too, for the web UI)."""
        if self.custom_reward is not None:
            return self.custom_reward
        if self.target is not None and (baseline_params or self.target.value is not None):
            if self.target.cost == "params" or self.target.value is not None:
                return self.target.reward(float(baseline_params or 1))
            if self.costs is None:
                raise RuntimeError(f"target.cost {self.target.cost!r} as a share needs the space: "
                                   "the strategy has not been initialized with one yet")
            return self.target.reward(float(self.costs.cost(self.target.cost, self._baseline)))
        if baseline_params:
            return SizeAwareReward(baseline_params, self.beta)
        return lambda accuracy, params: float(accuracy)

    @property
    def reward_cost(self) -> str:
        """What the reward's size term counts: ``params`` unless the reward names another cost."""
        return str(getattr(self.reward_fn or self.custom_reward, "cost", None)
                   or (self.target.cost if self.target is not None else "params"))

    def score(self, accuracy: float, sample: Mapping[str, Any], params: int | None = None) -> tuple[float, dict[str, Any]]:
        """(reward, costs) of a sample with this accuracy: costs as :meth:`CostModel.costs`, p_h
        from the trial if it reported one."""
        assert self.reward_fn is not None and self.costs is not None
        costs = self.costs.costs(sample)
        if params is not None:
            costs["params"] = params
        if self.reward_cost == "params":
            cost = costs["params"] if costs["params"] is not None else self.baseline_params or 1
        else:
            cost = costs.get(self.reward_cost)
            if cost is None:  # a space that cannot count it: the error names target.cost
                cost = self.costs.cost(self.reward_cost, sample)
        return float(self.reward_fn(accuracy, cost)), costs

    def observe(self, sample: Mapping[str, Any], accuracy: float, params: int | None = None, learn: bool = True) -> float:
        """Score a finished sample, record it, and feed it to the controller (if ``learn``)."""
        assert self.learner is not None
        with self._lock:
            reward, costs = self.score(accuracy, sample, params)
            self.records.append({
                "sample": dict(sample), "accuracy": float(accuracy), **costs,
                "reward": reward, "step": self.learner.steps,
            })
            if learn:
                self.feed(sample, reward)
            return reward

    def feed(self, sample: Mapping[str, Any], reward: float) -> None:
        """Give the controller one (sample, reward); it takes a step when a batch is full."""
        assert self.learner is not None
        with self._lock:
            self._batch.add(self.learner, sample, reward)

    def _search_state(self) -> dict[str, Any]:
        if self.learner is None:
            return dict(self._pending_state or {})
        return {
            "controller": self.learner.state_dict(),
            "records": [dict(r) for r in self.records],
            "buffer": self._batch.state(),
            "baseline_params": self.baseline_params,
        }

    def _load_search_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.learner is None:
            _logger.info("Strategy state not restored yet (no space yet): it is kept, and restored when the "
                         "strategy is initialized with a space.")
            self._pending_state = dict(state)
            return
        self.learner.load_state_dict(state["controller"])
        self.records = [dict(r) for r in state["records"]]
        self._batch.load_state(state["buffer"])

    def state_dict(self) -> dict:
        return self._search_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_search_state(state_dict)


class TrialsSizeAwarePolicyGradient(SizeAwarePolicyGradient):
    """``mode="trials"``: each sampled architecture is an NNI trial (see the module docstring)."""

    MODE = "trials"

    def _initialize(self, model_space: Any, engine: Any) -> Any:
        self._setup_search(model_space, model_space)
        # strong references: NNI's engine only keeps weak ones, and drops events of collected models
        self._running: list[tuple[Any, dict[str, Any]]] = []
        self._final_metrics: list[tuple[Any, Any]] = []
        self._finished: list[tuple[Any, float]] = []
        engine.register_model_event_callback(ModelEventType.FinalMetric, self._on_final_metric)
        engine.register_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.FinalMetric, self._on_final_metric)
        self.engine.unregister_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)

    max_dedup_draws = 20
    max_uniform_draws = 1000
    #: seconds to wait, once NNI reports every trial done, for the last trials' end events
    end_event_wait = 10.0

    def _run(self) -> None:
        assert self.learner is not None
        while self.wait_for_resource():
            with self._lock:
                sample = self._next_sample()
                if sample is None:
                    _logger.info("No valid architecture left that was not trained yet: the search stops.")
                    break
                try:
                    model = LabelledModelSpace.of(self.model_space.freeze(sample))
                except SampleValidationError as err:  # a constraint check_contains did not see
                    self.invalid_draws += 1
                    _logger.debug("Invalid sample %s: %s", sample, err)
                    if self.reward_for_invalid is not None:
                        self.feed(sample, self.reward_for_invalid)
                    continue
                self._running.append((model, sample))
            _logger.info("[trial %d] submitting %s", len(self.records) + len(self._running), sample)
            self.engine.submit_models(model)  # the sequential engine runs it (and its callbacks) here
        self.engine.wait_models()
        # NNI's engine reports every model done before its listener thread has delivered the last
        # TrainingEnd events: wait for them (bounded), or the last trials' rewards would be lost
        deadline = time.monotonic() + self.end_event_wait
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    break
            time.sleep(0.05)

    def _next_sample(self) -> dict[str, Any] | None:
        """The controller's next valid architecture; with ``dedup``, one not trained or running yet."""
        assert self.learner is not None
        if not self.dedup:
            return self.draw()
        known = {_sample_key(r["sample"]): r["reward"] for r in self.records}
        running = {_sample_key(s) for _, s in self._running}
        for _ in range(self.max_dedup_draws):
            sample = self.draw()
            if sample is None:
                return None
            key = _sample_key(sample)
            if key in known:
                self.feed(sample, known[key])  # learn from what was measured, spend no trial
            elif key not in running:
                return sample
        for _ in range(self.max_uniform_draws):  # the controller has converged: explore
            sample = self.draw(self.learner.sample_uniform, learn=False)
            if sample is None:
                return None
            key = _sample_key(sample)
            if key not in known and key not in running:
                return sample
        return None

    @staticmethod
    def _pop(pairs: list[tuple[Any, Any]], model: Any) -> Any:
        for i, (m, value) in enumerate(pairs):
            if m is model:
                del pairs[i]
                return value
        return None

    def _on_final_metric(self, event: FinalMetricEvent) -> None:
        with self._lock:
            self._final_metrics.append((event.model, event.metric))

    def _on_training_end(self, event: TrainingEndEvent) -> None:
        with self._lock:
            sample = self._pop(self._running, event.model)
            raw = self._pop(self._final_metrics, event.model)
            if sample is None:
                _logger.debug("%s was not submitted by this strategy; ignored", event.model)
                return
            if raw is None or (event.status == ModelStatus.Failed and event.model.metric is not None):
                raw = event.model.metric  # a failed trial: the metric NNI's FailureHandler set, if any
            if raw is None:  # a failed trial with a final metric (reported before it failed, or NNI's
                # FailureHandler's metric) counts: it is a measurement, or what the user chose failures score
                _logger.warning("Trial of %s ended %s without a final metric: skipped, no reward", sample,
                                getattr(event.status, "value", event.status))
                return
            accuracy, params = parse_metric(raw)
            if accuracy is None:
                _logger.warning("Trial of %s reported %r, not a number or {'default': number}: skipped", sample, raw)
                return
            reward = self.observe(sample, accuracy, params)
            self._finished.append((event.model, reward))

    def list_models(self, sort: bool = True, limit: int | None = None) -> Iterator[Any]:
        """Models trained in this run, best *reward* first (NNI's default sorts by the raw metric)."""
        if not sort:
            yield from super().list_models(sort=False, limit=limit)
            return
        ranked = sorted(self._finished, key=lambda pair: pair[1], reverse=True)
        yield from (model for model, _ in ranked[:limit])


class SharedSizeAwarePolicyGradient(SizeAwarePolicyGradient, RandomOneShot):
    """``mode="shared"``: ENAS on NNI's one-shot machinery (see the module docstring)."""

    MODE = "shared"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._val_loader: Any = None
        self.final_candidates: list[dict[str, Any]] = []
        self._exported: dict[str, Any] | None = None

    def mutate_model(self, model: Any) -> Any:
        decisions_of_space(model, allow=MODE_KINDS["shared"],  # fail early, naming the label, before anything is mutated
                           who="SizeAwarePolicyGradient(mode='shared')")
        count_macs = getattr(model, "count_macs", None)
        if callable(count_macs) and callable(getattr(model, "baseline_sample", None)):
            count_macs(model.baseline_sample())  # the space counts its MACs before it becomes a supernet
        return super().mutate_model(model)

    def _initialize(self, model_space: Any, engine: Any) -> Any:
        pending = dict(self._pending_state or {})  # a state loaded before initialize: restored by _setup_search
        mutated = super()._initialize(model_space, engine)
        self._setup_search(self.supernet, self.supernet)
        assert self.learner is not None
        self.warmup_sampler = FairPathSampler(self.learner.decisions, self.learner.generator, self.warmup_sampling)
        if "warmup_queues" in pending:
            self.warmup_sampler.load_state(pending["warmup_queues"])
        return mutated

    def configure_oneshot_module(self, training_module: Any) -> "SizeAwareEnasModule":
        return SizeAwareEnasModule(training_module, self)

    def train_dataloader(self, train_dataloader_fn: Callable[[], Any], val_dataloader_fn: Callable[[], Any]) -> Any:
        self._val_loader = val_dataloader_fn()
        return TaggedConcatLoader(train_dataloader_fn(), self._val_loader)

    def val_dataloader(self, train_dataloader_fn: Callable[[], Any], val_dataloader_fn: Callable[[], Any]) -> Any:
        return None

    def path_accuracies(self, samples: list[Mapping[str, Any]], max_batches: int | None = None) -> list[float]:
        """Validation accuracy of each sample with the shared weights as they are now (e.g. after
        the search, to compare the supernet's ranking with stand-alone training)."""
        return [self.oneshot_module.evaluate_path(sample, self._val_loader, max_batches) for sample in samples]

    #: draws per final sample when looking for candidates within the target
    target_draws = 50

    def _within_target(self) -> dict[str, dict[str, Any]]:
        """With a target T: up to ``final_samples`` more candidates whose cost is at most T, drawn
        from the controller (rejection sampling: its policy restricted to what meets the goal), so
        the final choice can meet the goal even when most of the policy's mass lies above it."""
        reward, found = self.reward_fn, {}
        target = getattr(reward, "target", None)
        if target is None or self.costs is None or self.learner is None:
            return found
        for _ in range(self.target_draws * self.final_samples):
            if len(found) >= self.final_samples:
                break
            s = self.draw(learn=False)
            if s is None:
                break
            if self.costs.cost(self.reward_cost, s) <= target:
                found.setdefault(_sample_key(s), s)
        return found

    def select_final(self) -> dict[str, Any]:
        """Sample K architectures (plus the greedy one), score each with the shared weights, keep the best."""
        if self._exported is not None:
            return self._exported
        assert self.learner is not None
        module = self.oneshot_module
        candidates: dict[str, dict[str, Any]] = {}
        greedy = self.learner.sample(greedy=True)
        if violation(self._space, greedy) is None:
            candidates[_sample_key(greedy)] = greedy
        for _ in range(self.final_samples):
            s = self.draw(learn=False)
            if s is not None:
                candidates.setdefault(_sample_key(s), s)
        candidates.update(self._within_target())
        self.final_candidates = []
        for sample in candidates.values():
            accuracy = module.evaluate_path(sample, self._val_loader, self.final_eval_batches)
            reward, costs = self.score(accuracy, sample)
            self.final_candidates.append({"sample": sample, "accuracy": accuracy, **costs, "reward": reward})
            _logger.info("[final] %s: accuracy %.4f, %s params, reward %.4f", sample, accuracy, costs["params"], reward)
        best = max(self.final_candidates, key=lambda c: c["reward"])
        self._exported = dict(best["sample"])
        return self._exported

    def _search_state(self) -> dict[str, Any]:
        state = super()._search_state()
        sampler = getattr(self, "warmup_sampler", None)
        if self.learner is not None and sampler is not None:
            state["warmup_queues"] = sampler.state()  # mid-permutation at an epoch's end: resumes exactly
        return state

    def _load_search_state(self, state: Mapping[str, Any]) -> None:
        super()._load_search_state(state)
        sampler = getattr(self, "warmup_sampler", None)
        if self.learner is not None and sampler is not None and "warmup_queues" in state:
            sampler.load_state(state["warmup_queues"])

    def state_dict(self) -> dict:
        state = RandomOneShot.state_dict(self)
        state.update(self._search_state())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "ckpt_path" in state_dict and self._mutated_model_space is not None:
            RandomOneShot.load_state_dict(self, state_dict)
        self._load_search_state({k: v for k, v in state_dict.items() if k != "ckpt_path"})


class FairPathSampler:
    """Paths for the warm-up. ``fair``: each categorical label walks through a fresh random
    permutation of its candidates, so in every N consecutive paths each candidate is used exactly
    once (FairNAS' strict fairness, Chu et al. 2021, without its gradient accumulation); other
    labels (an InputChoice's subset) are drawn uniformly. ``uniform``: each label drawn
    independently. Draws come from the controller's own seeded generator."""

    def __init__(self, decisions: Mapping[str, Decision | list[Any]], generator: torch.Generator, sampling: str = "fair"):
        self.decisions = {label: d if isinstance(d, Decision) else Choice(label, d) for label, d in decisions.items()}
        self.generator = generator
        self.sampling = sampling
        self._queues: dict[str, list[Any]] = {label: [] for label in self.decisions}

    def state(self) -> dict[str, list[Any]]:
        """The candidates left in each label's current permutation (plain values: a checkpoint's)."""
        return {label: list(queue) for label, queue in self._queues.items()}

    def load_state(self, state: Mapping[str, Sequence[Any]]) -> None:
        self._queues = {label: list(state.get(label, [])) for label in self.decisions}

    def sample(self) -> dict[str, Any]:
        out = {}
        for label, d in self.decisions.items():
            if not isinstance(d, Choice):
                out[label] = d.value(d.uniform_actions(self.generator), self.generator)
                continue
            values = d.values
            if self.sampling == "uniform":
                out[label] = values[int(torch.randint(len(values), (1,), generator=self.generator))]
                continue
            queue = self._queues[label]
            if not queue:
                queue.extend(values[int(i)] for i in torch.randperm(len(values), generator=self.generator))
            out[label] = queue.pop(0)
        return out


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

    def __init__(self, training_module: Any, strategy: SharedSizeAwarePolicyGradient):
        super().__init__(training_module)
        self._strategy = [strategy]  # in a list so Lightning does not treat it as a submodule

    @property
    def strategy(self) -> SharedSizeAwarePolicyGradient:
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


class FixedArchitecture(Strategy):
    """Submits one given architecture as one trial: the final federated stage of a run, so the
    web UI shows that trial and its per-round curve."""

    def __init__(self, sample: Mapping[str, Any], shown: Mapping[str, Any] | None = None):
        super().__init__()
        self.sample = dict(sample)
        #: the trial's parameters in the web UI, when not the architecture (see LabelledModelSpace)
        self.shown = None if shown is None else dict(shown)

    def extra_repr(self) -> str:
        return repr(self.sample)

    def _run(self) -> None:
        if self.wait_for_resource():
            self.engine.submit_models(LabelledModelSpace.of(self.model_space.freeze(self.sample), self.shown))
        self.engine.wait_models()

    def state_dict(self) -> dict:
        return {"sample": dict(self.sample)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.sample = dict(state_dict.get("sample", self.sample))
