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
``trials``). This module holds what both modes share (the controller, the reward, the records,
the state); each mode is a module of its own: :mod:`nni_fedexit.search.shared_strategy` (and the
Lightning module it trains with, :mod:`nni_fedexit.search.enas_module`) and
:mod:`nni_fedexit.search.trials_strategy`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import threading
from typing import Any, Callable, Mapping

from nni_fedexit.nni_compat import import_nni
from nni_fedexit.checks import positive_int
from nni_fedexit.search.controller import ControllerSettings, PolicyGradient, RewardBatch
from nni_fedexit.presets import PresetError, load_preset
from nni_fedexit.search.cost import CostModel
from nni_fedexit.search.decisions import DEFAULT_BINS, LABEL_KINDS, Decision, decisions_of_space
from nni_fedexit.search.profiler import ParamsProfiler
from nni_fedexit.search.reward import DEFAULT_BETA, Reward, SizeAwareReward, SizeTarget, check_beta

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.mutable import SampleValidationError  # noqa: E402
from nni.nas.strategy.base import Strategy  # noqa: E402

__all__ = ["MODES", "MODE_KINDS", "SizeAwarePolicyGradient", "accepted_arguments", "argument_mode", "check_arguments",
           "mode_class", "sample_key", "strategy_parameters", "violation"]

_logger = logging.getLogger(__name__)

MODES = ("shared", "trials")
#: each mode's class, imported when a strategy of that mode is built
MODE_CLASSES = {
    "shared": "nni_fedexit.search.shared_strategy:SharedSizeAwarePolicyGradient",
    "trials": "nni_fedexit.search.trials_strategy:TrialsSizeAwarePolicyGradient",
}


def mode_class(mode: str) -> type:
    """The strategy class of ``mode`` (``shared`` or ``trials``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    module, _, name = MODE_CLASSES[mode].partition(":")
    return getattr(importlib.import_module(module), name)


def strategy_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments a strategy class takes (its own and those of the classes it extends),
    by name, with their annotations and defaults."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not issubclass(klass, SizeAwarePolicyGradient):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"):
                found.setdefault(p.name, p)
    return found


def accepted_arguments(cls: type) -> set[str]:
    """The keyword arguments a strategy class takes: its own and those of the classes it extends."""
    return set(strategy_parameters(cls))


def argument_mode(name: str) -> str | None:
    """The mode whose strategy takes the argument ``name`` and the other does not (None: both or neither)."""
    modes = [mode for mode in MODES if name in accepted_arguments(mode_class(mode))]
    return modes[0] if len(modes) == 1 else None


def check_arguments(cls: type, kwargs: Mapping[str, Any]) -> None:
    """An argument ``cls`` does not take is an error naming the mode that takes it (the two modes
    have different options: ``warmup_epochs`` means nothing to a multi-trial search)."""
    known = accepted_arguments(cls)
    unknown = sorted(set(kwargs) - known)
    if not unknown:
        return
    hints = []
    for name in unknown:
        mode = argument_mode(name)
        hints.append(f"{name!r} (an argument of mode={mode!r})" if mode else repr(name))
    raise ValueError(f"SizeAwarePolicyGradient(mode={cls.MODE!r}) does not take {', '.join(hints)}; "
                     f"its arguments: {sorted(known)}")


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


def sample_key(sample: Mapping[str, Any]) -> str:
    """The same architecture, the same key (the candidates of an InputChoice in any order)."""
    return repr(sorted((str(k), repr(sorted(v, key=repr)) if isinstance(v, list) else repr(v)) for k, v in sample.items()))


class SizeAwarePolicyGradient(Strategy):
    """Policy-gradient NAS whose reward weighs accuracy against parameter count (claims 3 and 4).

    ``SizeAwarePolicyGradient(mode=...)`` builds the mode's class: :class:`~nni_fedexit.search.shared_strategy.SharedSizeAwarePolicyGradient`
    (``shared``, the default) or :class:`~nni_fedexit.search.trials_strategy.TrialsSizeAwarePolicyGradient`
    (``trials``); an argument of the other mode is an error that says which mode takes it.

    Parameters (both modes; each mode's class lists its own)
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
    reward_for_invalid
        A sample that breaks one of the space's constraints (``ExpressionConstraint`` and NNI's
        other constraints) is never submitted or trained: the controller draws again. With a
        number, the controller also learns that reward for the invalid sample (as NNI's
        ``PolicyBasedRL``); None (default) skips it. After ``invalid_patience`` invalid draws in a
        row the search stops, with a warning naming the constraint.
    seed
        Seeds the controller's weights and every sample it draws.
    """

    MODE = ""
    #: bins of a continuous label (the trials mode's setting; the shared mode's supernet takes none)
    numerical_bins = DEFAULT_BINS

    def __new__(cls, *args: Any, mode: str | None = None, **kwargs: Any):
        if cls is SizeAwarePolicyGradient:
            cls = mode_class(mode or "shared")
        check_arguments(cls, kwargs)
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
        reward_for_invalid: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        check_beta(beta)
        positive_int("samples_per_update", samples_per_update)
        if reward_for_invalid is not None and (isinstance(reward_for_invalid, bool) or not isinstance(
                reward_for_invalid, (int, float)) or not math.isfinite(reward_for_invalid)):
            raise ValueError(f"reward_for_invalid must be a finite number or None, got {reward_for_invalid!r}")
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
        self.reward_for_invalid = None if reward_for_invalid is None else float(reward_for_invalid)
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
        data, where = load_preset("strategies", name_or_path)
        data.update(overrides)
        try:
            known = accepted_arguments(mode_class(data.get("mode") or "shared"))
        except ValueError as err:
            raise PresetError(f"{where}: {err}") from None
        unknown = sorted(set(data) - known)
        if unknown:
            raise PresetError(f"{where}: unknown key(s) {unknown} for mode {data.get('mode') or 'shared'!r}; "
                              f"known keys: {sorted(known)}")
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
