"""S3 for ``nnictl``: SizeAwarePGTuner, the size-aware policy-gradient search as a classic NNI Tuner.

The same LSTM controller and REINFORCE learner as :class:`~nni_fedexit.search.strategy.SizeAwarePolicyGradient`
(:class:`~nni_fedexit.search.controller.PolicyGradient`) and the same reward
(:func:`~nni_fedexit.search.reward.size_aware_reward`), behind NNI's ``Tuner`` API, so that any
``nnictl create`` experiment can use it, whatever its search space holds: ``choice`` (nested
too), ``randint`` and every numerical type (:func:`parse_search_space`)::

    tuner:
      name: SizeAwarePG            # after `nni-fedexit register`
      classArgs: {beta: 14, baseline_params: 700000, optimize_mode: maximize, seed: 0}

How it meets NNI's tuner protocol:

- ``generate_parameters`` is called several times before any result comes back: every sample is
  kept as *pending* under its parameter id until its result (or its failure) arrives.
- Trials report ``{"default": accuracy, "params": p_h}`` or a plain accuracy (p_h is then P, so the
  reward is the accuracy). Results arrive in any order; each one is scored
  ``R = acc * (p_h / P) ** (-1 / beta)`` and buffered, and the controller takes one REINFORCE step
  per ``samples_per_update`` rewards.
- A failed trial (``trial_end(success=False)``) drops its pending sample: no reward, not even 0
  (a final result it reported before failing is a measurement, and counts).
- ``import_data`` feeds earlier results (``[{"parameter": ..., "value": ...}, ...]``) to the
  controller the same way.
- Resume: the tuner saves its whole state (controller, optimiser, generator, reward buffer, which
  results it has counted) after every change to ``<experiment dir>/checkpoint/`` (NNI's
  ``NNI_CHECKPOINT_DIRECTORY``), and ``nnictl resume`` loads it back. NNI then replays every
  finished trial through ``import_data``; results the saved state has already counted (known by
  their trial job id) are skipped, so nothing is counted twice and the search continues where it
  stopped rather than restarting. (NNI restarts parameter ids after a resume; the tuner keys what
  it has counted by trial job id, never by parameter id.)
- Every scored trial's reward is kept (:attr:`SizeAwarePGTuner.rewards`, by parameter id), logged
  to the dispatcher log, and written with its architecture, accuracy and p_h to
  ``size_aware_pg_tuner.json`` next to the state.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from nni_fedexit.nni_compat import import_nni

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.common.hpo_utils import format_search_space  # noqa: E402
from nni.mutable import Numerical  # noqa: E402
from nni.tuner import Tuner  # noqa: E402

from nni_fedexit.checks import positive_int  # noqa: E402
from nni_fedexit.files import write_atomic, write_json  # noqa: E402
from nni_fedexit.search.controller_settings import ControllerSettings, RewardBatch  # noqa: E402
from nni_fedexit.search.decisions import DEFAULT_BINS, Bins, Choice, Decision, check_bins  # noqa: E402
from nni_fedexit.space.architecture import architecture_label  # noqa: E402
from nni_fedexit.search.reward import DEFAULT_BETA, SizeTarget, check_beta, parse_metric, size_aware_reward  # noqa: E402

if TYPE_CHECKING:  # torch and the controller load when the search space arrives, after the dispatcher connected
    from nni_fedexit.search.controller import PolicyGradient

__all__ = ["SizeAwarePGTuner", "TunerSettings", "parse_search_space", "to_parameters", "from_parameters", "NNICTL_META", "SUPPORTED_TYPES"]

_logger = logging.getLogger(__name__)

#: what ``nnictl algo register --meta`` needs; strategies/size_aware_pg_tuner.meta.yml holds the same
NNICTL_META: dict[str, str] = {
    "algoType": "tuner",
    "builtinName": "SizeAwarePG",
    "className": "nni_fedexit.search.tuner.SizeAwarePGTuner",
}

#: every type of NNI's classic search space (``choice`` options may hold nested parameters)
SUPPORTED_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform",
                   "normal", "qnormal", "lognormal", "qlognormal")
STATE_FILE = "size_aware_pg_tuner.pt"
RECORDS_FILE = "size_aware_pg_tuner.json"
_OPTIMIZE_MODES = ("maximize", "minimize")


# ---- search space ---------------------------------------------------------------------------------

def _label(key: tuple) -> str:
    """A parameter's controller label: its name, or its path in nested choices (``model/0/depth``)."""
    return "/".join(str(k) for k in key)


def _numerical(label: str, kind: str, values: list[Any]) -> Numerical:
    """NNI's classic numerical type as the nni.mutable Numerical that means the same (NNI's shortcuts)."""
    q = float(values[2]) if kind.startswith("q") else None
    log = "log" in kind
    label = label.replace("/", ".")  # NNI labels cannot hold a slash
    if "normal" in kind:
        return Numerical(mu=float(values[0]), sigma=float(values[1]), log_distributed=log, quantize=q, label=label)
    return Numerical(float(values[0]), float(values[1]), log_distributed=log, quantize=q, label=label)


def _check_choices(name: str, spec: Any) -> None:
    """One parameter's checks, nested ones too (NNI's rules; each message names the parameter and the fix)."""
    if not isinstance(spec, Mapping) or "_type" not in spec or "_value" not in spec:
        raise ValueError(f"search space parameter {name!r}: expected {{'_type': ..., '_value': [...]}}, got {spec!r}")
    kind, values = spec["_type"], spec["_value"]
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"search space parameter {name!r} has type {kind!r}, which NNI does not define: "
                         f"use one of {', '.join(SUPPORTED_TYPES)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"search space parameter {name!r} ({kind}): _value must be a non-empty list, got {values!r}")
    if kind == "randint":
        if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values) or values[0] >= values[1]:
            raise ValueError(
                f"search space parameter {name!r} (randint): _value must be [lower, upper] integers with "
                f"lower < upper (upper excluded), got {values!r}"
            )
    if kind not in ("choice", "randint"):
        _check_numerical(name, kind, values)
    if kind != "choice":
        return
    for v in values:
        if isinstance(v, Mapping):
            if "_name" not in v:
                raise ValueError(f"search space parameter {name!r} is a nested choice whose option {v!r} has no "
                                 "'_name': give every option a '_name'")
            for sub, sub_spec in v.items():
                if sub != "_name":
                    _check_choices(f"{name}/{v['_name']}/{sub}", sub_spec)
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"search space parameter {name!r} (choice): values must be strings or numbers, got {v!r}")
    keys = [json.dumps(v["_name"] if isinstance(v, Mapping) else v, sort_keys=True) for v in values]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"search space parameter {name!r} (choice): duplicate values {dupes}; list each value once")


def _check_numerical(name: str, kind: str, values: list[Any]) -> None:
    """NNI's rules for a numerical type, except that a range of one value is allowed (NNI's own
    tuner tests expect ``uniform [99.9, 99.9]`` to work; its validate_search_space refuses it)."""
    need = 3 if kind.startswith("q") else 2
    if len(values) != need or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  for v in values):
        form = "[mu, sigma" if "normal" in kind else "[low, high"
        raise ValueError(f"search space parameter {name!r} ({kind}): _value must be {form}{', q' if need == 3 else ''}] "
                         f"numbers, got {values!r}")
    if need == 3 and values[2] <= 0:
        raise ValueError(f"search space parameter {name!r} ({kind}): q must be > 0, got {values[2]!r}")
    if "normal" in kind:
        if values[1] <= 0:
            raise ValueError(f"search space parameter {name!r} ({kind}): sigma must be > 0, got {values[1]!r}")
        return
    if values[0] > values[1]:
        raise ValueError(f"search space parameter {name!r} ({kind}): low must be <= high, got {values!r}")
    if "log" in kind and values[0] <= 0:
        raise ValueError(f"search space parameter {name!r} ({kind}): low must be > 0 on a log scale, got {values!r}")


def parse_search_space(search_space: Mapping[str, Any], numerical_bins: int = DEFAULT_BINS) -> dict[str, Decision]:
    """NNI's classic search-space JSON as the controller's decisions, one per parameter.

    Every NNI type is supported. ``choice`` keeps its values (strings, numbers, booleans); a nested
    ``choice`` (options ``{"_name": ..., sub-parameters}``) is a choice of the option names whose
    sub-parameters are decided only when their option is taken; ``randint [lower, upper]`` is a
    choice of ``lower .. upper - 1`` (NNI's meaning); the numerical types are
    :class:`~nni_fedexit.search.decisions.Bins` of the distribution NNI defines for them
    (``q`` types: ``round(x / q) * q``, clipped to the range). The parameters come in the order of
    NNI's ``format_search_space``; an error names the parameter and the fix.
    """
    if not isinstance(search_space, Mapping) or not search_space:
        raise ValueError(f"the search space must be a non-empty mapping of parameters, got {search_space!r}")
    for name, spec in search_space.items():
        _check_choices(str(name), spec)
    decisions: dict[str, Decision] = {}
    for key, spec in format_search_space(search_space).items():
        label = _label(key)
        if spec.type == "choice" and all(isinstance(v, Mapping) for v in spec.values):
            decision: Decision = Choice(label, [v["_name"] for v in spec.values])
            decision.nested = True
        elif spec.type == "choice":
            decision = Choice(label, spec.values)
        elif spec.type == "randint":
            decision = Choice(label, list(range(spec.values[0], spec.values[1])))
        elif "normal" not in spec.type and spec.values[0] == spec.values[1]:  # a range of one value
            low = spec.values[0]
            decision = Choice(label, [float(low) if spec.type in ("uniform", "loguniform") else low])
        else:
            decision = Bins(label, _numerical(label, spec.type, spec.values), numerical_bins)
        if spec.is_nested():
            decision.parent = (_label(key[:-2]), int(key[-2]))
        decision.key = key
        decisions[label] = decision
    return decisions


def to_parameters(sample: Mapping[str, Any], decisions: Mapping[str, Decision]) -> dict[str, Any]:
    """The controller's flat sample as the parameters a trial gets (nested choices as
    ``{"_name": option, sub-parameter: value, ...}``, as NNI's own tuners send them)."""
    params: dict[str, Any] = {}
    for label, d in decisions.items():
        if label not in sample:
            continue  # inside a nested option that was not taken
        path = d.key or (label,)
        where = params
        for part in path[:-1]:
            if isinstance(part, str):  # a parameter name; the ints are option indices
                where = where[part]
        value = sample[label]
        where[path[-1]] = {"_name": value} if d.nested else value
    return params


def from_parameters(parameters: Any, decisions: Mapping[str, Decision]) -> dict[str, Any] | None:
    """The controller's flat sample for parameters a trial reports back; None if they are not in the space."""
    if not isinstance(parameters, Mapping):
        return None
    sample: dict[str, Any] = {}
    for label, d in decisions.items():
        parent = decisions[d.parent[0]] if d.parent is not None else None
        if isinstance(parent, Choice) and sample.get(parent.label) != parent.values[d.parent[1]]:
            continue  # its option was not taken
        path = d.key or (label,)
        where: Any = parameters
        for part in path[:-1]:
            if isinstance(part, str):
                where = where.get(part) if isinstance(where, Mapping) else None
        if not isinstance(where, Mapping) or path[-1] not in where:
            return None
        value = where[path[-1]]
        if d.nested:
            value = value.get("_name") if isinstance(value, Mapping) else None
        try:
            actions = d.actions(value)
        except ValueError:
            return None
        sample[label] = value if isinstance(d, Bins) else d.value(actions, None)
    return sample


# ---- reported values ------------------------------------------------------------------------------

def _fingerprint(parameters: Any, value: Any) -> str:
    return json.dumps([parameters, value], sort_keys=True, default=str)


# ---- settings -------------------------------------------------------------------------------------

#: The tuner's controller defaults (other fields: ControllerSettings'). Chosen on simulated nnictl
#: runs (40 trials, concurrency 2, results back in random order, scores with a planted best value
#: per parameter; 20 seeds x 8 orders): with 4 rewards per update, lr 0.03 and tanh_constant 2.5,
#: at least 6 of the last 10 trials were the planted best in 158/160 runs on 2 parameters x 3
#: values and 134/160 on 3 x 3, against 111/160 and 73/160 with the trials strategy preset's
#: 2 per update, lr 0.05 and tanh_constant 1.5.
CONTROLLER_DEFAULTS: dict[str, Any] = {"lr": 0.03, "tanh_constant": 2.5}

@dataclass
class TunerSettings:
    """The tuner's classArgs (controller options go under ``controller``, as in strategies/*.yaml)."""

    #: reward exponent: R = acc * (p_h / P) ** (-1 / beta); a positive integer
    beta: int = DEFAULT_BETA
    #: P, the baseline network's parameter count; None: the first p_h a trial reports
    baseline_params: float | None = None
    #: a size goal (SizeTarget fields; the tuner knows p_h only, so ``cost`` is ``params``): the
    #: reward becomes MnasNet's target form, T = ``value`` or ``share`` x P; None: claim 4's form
    target: dict[str, Any] | None = None
    #: "maximize" the reported metric (accuracy) or "minimize" it (an error or a loss)
    optimize_mode: str = "maximize"
    #: finished trials per controller update (the REINFORCE batch)
    samples_per_update: int = 4
    #: equal-probability bins of a continuous parameter (uniform, loguniform, normal, ...; a q-type
    #: with at most this many values is a choice of them); see nni_fedexit.search.decisions
    numerical_bins: int = DEFAULT_BINS
    seed: int = 0
    #: ControllerSettings fields (hidden_size, lr, baseline_decay, entropy_weight, tanh_constant, ...),
    #: on top of CONTROLLER_DEFAULTS
    controller: dict[str, Any] = field(default_factory=dict)
    #: where the state is saved; None: NNI's checkpoint directory of the experiment (none outside NNI)
    state_dir: str | None = None

    def __post_init__(self) -> None:
        check_beta(self.beta, "classArgs.beta")
        if self.baseline_params is not None:
            p = self.baseline_params
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
                raise ValueError(f"classArgs.baseline_params (P) must be a positive number of parameters, got {p!r}")
        if self.target is not None:
            target = SizeTarget.of(self.target, "classArgs.target")
            if target.cost != "params":
                raise ValueError(f"classArgs.target.cost: the tuner sees only the p_h trials report, so the cost "
                                 f"is 'params', not {target.cost!r}; search MACs with SizeAwarePolicyGradient")
            if target.value is None and self.baseline_params is None:
                raise ValueError("classArgs.target.share needs classArgs.baseline_params (P); or give target.value")
        if self.optimize_mode not in _OPTIMIZE_MODES:
            raise ValueError(f"classArgs.optimize_mode must be one of {_OPTIMIZE_MODES}, got {self.optimize_mode!r}")
        positive_int("classArgs.samples_per_update", self.samples_per_update)
        check_bins(self.numerical_bins, "classArgs.numerical_bins")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"classArgs.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.controller, Mapping):
            raise ValueError(f"classArgs.controller must be a mapping of ControllerSettings fields, got {self.controller!r}")
        known = {f.name for f in fields(ControllerSettings)} - {"seed"}
        unknown = sorted(set(self.controller) - known)
        if unknown:
            raise ValueError(f"classArgs.controller: unknown key(s) {unknown}; known keys: {sorted(known)}")
        self.controller = dict(self.controller)
        self.controller_settings()  # validates the values

    def controller_settings(self) -> ControllerSettings:
        try:
            return ControllerSettings(**{**CONTROLLER_DEFAULTS, **self.controller, "seed": self.seed})
        except (TypeError, ValueError) as err:
            raise ValueError(f"classArgs.controller: {err}") from err


# ---- the tuner ------------------------------------------------------------------------------------

class SizeAwarePGTuner(Tuner):
    """NNI Tuner: LSTM controller + REINFORCE with the size-aware reward (see the module docstring).

    Keyword arguments are :class:`TunerSettings` fields (nnictl's ``classArgs``).
    """

    def __init__(self, **class_args: Any):
        super().__init__()
        unknown = sorted(set(class_args) - {f.name for f in fields(TunerSettings)})
        if unknown:
            raise ValueError(
                f"SizeAwarePGTuner: unknown classArgs {unknown}; known: {sorted(f.name for f in fields(TunerSettings))}"
            )
        self.settings = TunerSettings(**class_args)
        self.baseline_params: float | None = self.settings.baseline_params
        #: the controller's decisions (one per parameter) and the search space they came from
        self.space: dict[str, Decision] | None = None
        self.search_space: dict[str, Any] | None = None
        self.learner: PolicyGradient | None = None
        #: parameter id -> sample, for trials sent out and not finished yet
        self.pending: dict[int, dict[str, Any]] = {}
        #: samples that were pending when the state was saved (their parameter ids are stale after a resume)
        self.orphans: list[dict[str, Any]] = []
        #: (sample, reward) waiting for the next controller update
        self._batch = RewardBatch(self.settings.samples_per_update, _logger)
        #: every scored result: parameter_id, trial_job_id, parameters, metric, params, reward, step, source
        self.records: list[dict[str, Any]] = []
        #: parameter id -> reward of the trials of this session (parameter ids restart on resume)
        self.rewards: dict[int, float] = {}
        self.failed = 0
        self._counted_trials: set[str] = set()  # trial job ids whose result the controller has seen
        self._imported: Counter[str] = Counter()  # anonymous imported records (no trial id), by fingerprint
        self._recovered: Counter[str] = Counter()  # results of resumed trials, not yet tied to a trial id
        self._saved_state: dict[str, Any] | None = None
        self._lock = threading.RLock()  # NNI calls trial_end and receive_trial_result from two threads

    @property
    def buffer(self) -> list[tuple[dict[str, Any], float]]:
        """The (sample, reward) pairs waiting for the next controller update."""
        return self._batch.pending

    # ---- where the state lives --------------------------------------------------------------

    @property
    def state_dir(self) -> Path | None:
        if self.settings.state_dir:
            return Path(self.settings.state_dir)
        path = self.get_checkpoint_path()  # NNI_CHECKPOINT_DIRECTORY, set for the dispatcher
        return Path(path) if path else None

    # ---- NNI's Tuner API --------------------------------------------------------------------

    def update_search_space(self, search_space: Mapping[str, Any]) -> None:
        """Build the controller over the space's parameters (errors name the unsupported parameter)."""
        space = parse_search_space(search_space, self.settings.numerical_bins)
        plain = json.loads(json.dumps(search_space))
        with self._lock:
            if self.search_space == plain and self.learner is not None:
                return
            if self.learner is not None:
                _logger.warning("The search space changed: the controller starts over on the new one")
            self.space, self.search_space = space, plain
            from nni_fedexit.search.controller import PolicyGradient  # torch: after the dispatcher connected

            self.learner = PolicyGradient(space, self.settings.controller_settings())
            self.pending.clear()
            self._batch.clear()
            if self._saved_state is not None:
                self._restore(self._saved_state)
                self._saved_state = None
            _logger.info("SizeAwarePGTuner over %s, %s", {k: d.sizes for k, d in space.items()}, self.settings)

    def generate_parameters(self, parameter_id: int, **kwargs: Any) -> dict[str, Any]:
        """A sample of the controller's policy; kept pending until its trial reports or fails."""
        with self._lock:
            if self.learner is None:
                raise RuntimeError("SizeAwarePGTuner: generate_parameters before update_search_space")
            sample = self.learner.sample()
            self.pending[int(parameter_id)] = sample
            self._save()
            _logger.info("[parameter %s] %s", parameter_id, _arch(sample))
            return to_parameters(sample, self.space)

    def receive_trial_result(self, parameter_id: int, parameters: Mapping[str, Any], value: Any, **kwargs: Any) -> None:
        """Score a finished trial and give its reward to the controller."""
        with self._lock:
            sample = self.pending.pop(int(parameter_id), None)
            trial = kwargs.get("trial_job_id")
            if trial is not None and str(trial) in self._counted_trials:
                _logger.info("[parameter %s] result of trial %s was already counted: skipped", parameter_id, trial)
                return
            self._count(parameters if parameters is not None else sample, value, parameter_id=int(parameter_id),
                        trial_job_id=None if trial is None else str(trial), source="trial")
            self._save()

    def trial_end(self, parameter_id: int, success: bool, **kwargs: Any) -> None:
        """A failed trial drops its pending sample: it gives no reward (not even 0)."""
        if success:
            return  # its final result arrives through receive_trial_result (possibly after this call)
        with self._lock:
            sample = self.pending.pop(int(parameter_id), None)
            if sample is not None:
                self.failed += 1
                _logger.warning("[parameter %s] trial failed: %s gets no reward", parameter_id, _arch(sample))
                self._save()

    def import_data(self, data: Sequence[Mapping[str, Any]]) -> None:
        """Feed earlier results ``[{"parameter": ..., "value": ..., "trialJobId"?: ...}]`` to the controller.

        On ``nnictl resume`` NNI replays every finished trial here (with its trial job id), and
        every earlier import (without): results the saved state has counted already are skipped.
        An entry without a trial id counts only if this import holds more copies of it than all
        earlier imports together, so a replayed import adds nothing.
        """
        with self._lock:
            if self.learner is None:
                raise RuntimeError("SizeAwarePGTuner: import_data before update_search_space")
            fed = skipped = 0
            copies: Counter[str] = Counter()
            for entry in data:
                parameters, value = entry.get("parameter"), entry.get("value")
                trial = entry.get("trialJobId")
                fp = _fingerprint(parameters, value)
                if trial is not None:
                    trial = str(trial)
                    if trial in self._counted_trials:
                        skipped += 1
                        continue
                    if self._recovered[fp] > 0:  # a resumed trial's result, counted before its id was known
                        self._recovered[fp] -= 1
                        self._counted_trials.add(trial)
                        skipped += 1
                        continue
                    fed += self._count(parameters, value, trial_job_id=trial, source="import")
                    continue
                if self._take_orphan(parameters):  # a trial running at the stop, run again after the resume
                    self._recovered[fp] += 1
                    fed += self._count(parameters, value, source="resumed trial")
                    continue
                copies[fp] += 1
                if copies[fp] > self._imported[fp]:
                    fed += self._count(parameters, value, source="import")
                else:
                    skipped += 1
            self._imported.update(copies)
            _logger.info("import_data: %d result(s) fed to the controller, %d already counted", fed, skipped)
            self._save()

    def load_checkpoint(self) -> None:
        """Read the saved state (``nnictl resume``); it is applied once the search space is known."""
        folder = self.state_dir
        path = folder / STATE_FILE if folder else None
        if path is None or not path.is_file():
            _logger.info("No SizeAwarePGTuner state in %s: the search starts fresh", folder)
            return
        import torch

        with self._lock:
            self._saved_state = torch.load(path, map_location="cpu", weights_only=True)
            _logger.info("SizeAwarePGTuner state loaded from %s", path)
            if self.space is not None:
                self._restore(self._saved_state)
                self._saved_state = None

    def save_checkpoint(self) -> None:
        self._save()

    # ---- scoring ----------------------------------------------------------------------------

    def reward(self, metric: float, params: float | None) -> float:
        """The size-aware reward of a reported metric and p_h (None: p_h = P).

        With ``classArgs.target``: ``metric * (p_h / T) ** w`` (minimize: ``-metric / (p_h / T) ** w``).
        Otherwise, maximize: ``metric * (p_h / P) ** (-1 / beta)``. minimize (an error or a loss):
        ``-(metric * (p_h / P) ** (1 / beta))``, so that a smaller network lowers the effective
        loss as it raises the effective accuracy.
        """
        if params is not None and self.baseline_params is None:
            self.baseline_params = params
            _logger.info("baseline_params (P) not given: using the first reported p_h, %s "
                         "(set classArgs.baseline_params to choose it)", params)
        if params is None or self.baseline_params is None:
            return metric if self.settings.optimize_mode == "maximize" else -metric
        if self.settings.target is not None:
            target = SizeTarget.of(self.settings.target).reward(float(self.baseline_params))
            factor = target(1.0, params)  # (p_h / T) ** w
            return metric * factor if self.settings.optimize_mode == "maximize" else -metric / factor
        if self.settings.optimize_mode == "maximize":
            return size_aware_reward(metric, params, self.baseline_params, self.settings.beta)
        return -size_aware_reward(metric, self.baseline_params, params, self.settings.beta)

    def _count(self, parameters: Any, value: Any, *, parameter_id: int | None = None,
               trial_job_id: str | None = None, source: str) -> int:
        """Score one result and buffer its reward; returns 1 if it was counted, 0 if unusable."""
        assert self.learner is not None
        sample = self._sample_of(parameters)
        metric, params = parse_metric(value)
        where = f"parameter {parameter_id}" if parameter_id is not None else f"{source} {trial_job_id or ''}".strip()
        if sample is None:
            _logger.warning("[%s] parameters %r are not in the search space %s: skipped", where, parameters,
                            self.search_space)
            return 0
        if metric is None:
            _logger.warning("[%s] reported %r, not a number or {'default': number}: skipped, no reward", where, value)
            return 0
        reward = self.reward(metric, params)
        if trial_job_id is not None:
            self._counted_trials.add(trial_job_id)
        record = {"parameter_id": parameter_id, "trial_job_id": trial_job_id, "parameters": sample,
                  "metric": metric, "params": params, "reward": reward, "step": self.learner.steps, "source": source}
        self.records.append(record)
        if parameter_id is not None:
            self.rewards[parameter_id] = reward
        _logger.info("[%s] %s: metric %.4f, p_h %s, reward %.4f", where, _arch(sample), metric,
                     "n/a" if params is None else f"{params:,.0f}", reward)
        self._batch.add(self.learner, sample, reward)
        return 1

    def _sample_of(self, parameters: Any) -> dict[str, Any] | None:
        """The controller's sample for these parameters (or for a flat sample of its own), or None if
        they are not in the space."""
        assert self.space is not None and self.learner is not None
        sample = from_parameters(parameters, self.space)
        if sample is None and isinstance(parameters, Mapping) and self.learner.contains(parameters):
            sample = dict(parameters)  # already the controller's flat form (a pending sample)
        return sample if sample is not None and self.learner.contains(sample) else None

    def _take_orphan(self, parameters: Any) -> bool:
        sample = self._sample_of(parameters)
        if sample is not None and sample in self.orphans:
            self.orphans.remove(sample)
            return True
        return False

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed search needs; tensors and plain values only (loads with weights_only)."""
        assert self.learner is not None
        return {
            "version": 1,
            "space": self.search_space,
            "controller": self.learner.state_dict(),
            "baseline_params": self.baseline_params,
            "buffer": self._batch.state(),
            "pending": [dict(s) for s in self.pending.values()] + [dict(s) for s in self.orphans],
            "records": [dict(r) for r in self.records],
            "counted_trials": sorted(self._counted_trials),
            "imported": dict(self._imported),
            "recovered": dict(self._recovered),
            "failed": self.failed,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        assert self.learner is not None
        if state.get("space") != self.search_space:
            _logger.warning("The saved SizeAwarePGTuner state is for another search space (%s): starting fresh",
                            list(state.get("space", {})))
            return
        self.learner.load_state_dict(state["controller"])
        if self.settings.baseline_params is None:
            self.baseline_params = state["baseline_params"]
        self._batch.load_state(state["buffer"])
        self.orphans = [dict(s) for s in state["pending"]]  # their parameter ids do not survive a resume
        self.records = [dict(r) for r in state["records"]]
        self._counted_trials = set(state["counted_trials"])
        self._imported = Counter(state["imported"])
        self._recovered = Counter(state["recovered"])
        self.failed = int(state["failed"])
        _logger.info("Resumed: controller step %d, %d results counted, %d in the reward buffer",
                     self.learner.steps, len(self.records), len(self.buffer))

    def _save(self) -> None:
        folder = self.state_dir
        if folder is None or self.learner is None:
            return
        import torch  # loaded already: the learner is a torch module

        write_atomic(folder / STATE_FILE, lambda tmp: torch.save(self.state_dict(), tmp))
        summary = {
            "settings": asdict(self.settings),
            "baseline_params": self.baseline_params,
            "controller_steps": self.learner.steps,
            "probabilities": self.learner.probabilities(),
            "failed_trials": self.failed,
            "trials": [{**r, "architecture": _arch(r["parameters"])} for r in self.records],
        }
        write_json(folder / RECORDS_FILE, summary)


def _arch(sample: Mapping[str, Any]) -> str:
    """``stage1=resnet34 stage2=resnet18 ...``: what a person reads in the log."""
    return architecture_label({k: v["_name"] if isinstance(v, Mapping) else v for k, v in sample.items()})
