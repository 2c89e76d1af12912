"""S3: the size-aware reward, and how p_h is measured.

Claim 4's reward weighs validation accuracy against model size. The published text lost the
formula; this project uses MnasNet's soft constraint (Tan et al. 2019):

    R(h) = Acc(h) * (p_h / P) ** (-1 / beta)

with P the baseline network's parameter count and beta a positive integer. beta = 14 makes the
exponent -0.071, MnasNet's -0.07: halving the size is worth about 5 % more reward, so accuracy
still dominates. The same form is NNI's ``ProfilerPenalty`` with ``aggregate='mul'`` and
``scale = -1/beta``.

A reward is any callable ``reward(accuracy, params) -> float``; :class:`SizeAwareReward` is the
default, :class:`HardBudgetReward` and :class:`LinearPenaltyReward` are documented alternatives.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from nni_fedexit.nni_tools import compat  # noqa: F401
from nni_fedexit.checks import positive_int
from nni.nas.profiler import Profiler
from nni.nas.space import RawFormatModelSpace, SimplifiedModelSpace

__all__ = [
    "Reward",
    "size_aware_reward",
    "hard_budget_reward",
    "linear_penalty_reward",
    "SizeAwareReward",
    "HardBudgetReward",
    "LinearPenaltyReward",
    "ParamsProfiler",
    "DEFAULT_BETA",
    "check_beta",
    "parse_metric",
]

_logger = logging.getLogger(__name__)

#: -1/14 = -0.071, MnasNet's soft-constraint exponent
DEFAULT_BETA = 14

Reward = Callable[[float, int], float]


def check_beta(beta: Any, key: str = "beta") -> int:
    """``beta`` if it is a positive integer, else ``ValueError("<key> must be a positive integer, ...")``.

    The reward, the strategy and the tuner check beta with this one function (``key`` names the
    setting, e.g. ``classArgs.beta``).
    """
    try:
        return positive_int(key, beta)
    except ValueError:
        raise ValueError(f"{key} must be a positive integer, got {beta!r}") from None


def size_aware_reward(accuracy: float, params: float, baseline_params: float, beta: int = DEFAULT_BETA) -> float:
    """``accuracy * (params / baseline_params) ** (-1 / beta)``: the patent's reward (claim 4)."""
    check_beta(beta)
    if params <= 0 or baseline_params <= 0:
        raise ValueError(f"parameter counts must be positive, got p_h={params}, P={baseline_params}")
    return float(accuracy) * (params / baseline_params) ** (-1.0 / beta)


def hard_budget_reward(accuracy: float, params: float, max_params: float) -> float:
    """Accuracy while the network fits ``max_params``, 0 above it (MnasNet's hard constraint)."""
    return float(accuracy) if params <= max_params else 0.0


def linear_penalty_reward(accuracy: float, params: float, baseline_params: float, weight: float = 0.1) -> float:
    """``accuracy - weight * (params / baseline_params - 1)``: a size penalty that is linear in p_h."""
    return float(accuracy) - weight * (params / baseline_params - 1.0)


@dataclass(frozen=True)
class SizeAwareReward:
    """The default reward: :func:`size_aware_reward` with P and beta bound."""

    baseline_params: float
    beta: int = DEFAULT_BETA

    def __post_init__(self) -> None:
        size_aware_reward(1.0, 1.0, self.baseline_params, self.beta)  # validates beta and P

    def __call__(self, accuracy: float, params: int) -> float:
        return size_aware_reward(accuracy, params, self.baseline_params, self.beta)


@dataclass(frozen=True)
class HardBudgetReward:
    max_params: float

    def __call__(self, accuracy: float, params: int) -> float:
        return hard_budget_reward(accuracy, params, self.max_params)


@dataclass(frozen=True)
class LinearPenaltyReward:
    baseline_params: float
    weight: float = 0.1

    def __call__(self, accuracy: float, params: int) -> float:
        return linear_penalty_reward(accuracy, params, self.baseline_params, self.weight)


class ParamsProfiler(Profiler):
    """p_h of a sample, exactly, for any NNI model space (an ``nni.nas.profiler.Profiler``).

    Accepts a model space, or the executable form an NNI experiment hands to a strategy
    (raw or simplified). Uses the space's own ``count_params(sample)`` when it has one
    (ResNetBlockPoolSpace: nothing is built); otherwise freezes the sample and counts
    ``sum(p.numel())`` of the module, cached per sample. A space whose frozen samples are not
    ``nn.Module`` s has no size: ``profile`` returns None and the reward treats p_h as P.
    """

    def __init__(self, model_space: Any):
        self._given = model_space
        self._space: Any = None
        self._cache: dict[tuple, int | None] = {}

    @property
    def space(self) -> Any:
        """The plain model space behind what was given, built once on first use."""
        if self._space is None:
            given = self._given
            if isinstance(given, RawFormatModelSpace):
                self._space = given.model_space
            elif isinstance(given, SimplifiedModelSpace):
                self._space = given.model.trace_copy().get(traceable=False)
            else:
                self._space = given
        return self._space

    def profile(self, sample: Mapping[str, Any]) -> int | None:
        count = getattr(self.space, "count_params", None)
        if callable(count):
            return int(count(sample))
        key = tuple(sorted((k, repr(v)) for k, v in sample.items()))
        if key not in self._cache:
            frozen = self.space.freeze(dict(sample))
            if isinstance(frozen, nn.Module):
                self._cache[key] = sum(p.numel() for p in frozen.parameters())
            else:
                if not self._cache:
                    _logger.info("%s has no parameters to count: the reward is the accuracy alone",
                                 type(self.space).__name__)
                self._cache[key] = None
        return self._cache[key]


def parse_metric(value: Any) -> tuple[float | None, int | None]:
    """``(metric, p_h or None)`` from what a trial reported: a number, or ``{"default": number,
    "params": p_h, ...}`` (also JSON-encoded, as NNI hands metrics over in places).
    The strategy and the tuner read trial results with this one function."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, None
    params = None
    if isinstance(value, Mapping):
        p = value.get("params")
        if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p > 0:
            params = int(p)
        value = value.get("default")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, params
    return float(value), params
