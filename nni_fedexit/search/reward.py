"""S3: the size-aware reward, and how p_h is measured.

Claim 4's reward weighs validation accuracy against model size. The published text lost the
formula; this project uses MnasNet's soft constraint (Tan et al. 2019):

    R(h) = Acc(h) * (p_h / P) ** (-1 / beta)

with P the baseline network's parameter count and beta a positive integer. beta = 14 makes the
exponent -0.071, MnasNet's -0.07: halving the size is worth about 5 % more reward, so accuracy
still dominates. The same form is NNI's ``ProfilerPenalty`` with ``aggregate='mul'`` and
``scale = -1/beta``.

A reward is any callable ``reward(accuracy, cost) -> float``, the cost being p_h unless the
reward's ``cost`` attribute names another (``macs``, ``early_exit_macs``). :class:`SizeAwareReward`
is claim 4's form; :class:`TargetReward` is MnasNet's *target* form, for a size goal a user can
state (a parameter count, a share of P, MACs, or the expected MACs of calibrated early exits):

    R(h) = Acc(h) * (cost_h / T) ** w,   w = below if cost_h <= T else above

with ``below`` = -1/beta (claim 4's exponent: under the target, smaller still gains a little) and
``above`` = -1 (MnasNet's hard-constraint value: 10 % over the target costs 9 % of the reward).
:class:`HardBudgetReward` and :class:`LinearPenaltyReward` are documented alternatives.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nni_fedexit.checks import positive_int

__all__ = [
    "Reward",
    "size_aware_reward",
    "hard_budget_reward",
    "linear_penalty_reward",
    "SizeAwareReward",
    "TargetReward",
    "SizeTarget",
    "COSTS",
    "target_reward",
    "HardBudgetReward",
    "LinearPenaltyReward",
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


def target_reward(accuracy: float, cost: float, target: float, below: float, above: float) -> float:
    """``accuracy * (cost / target) ** w``, ``w = below`` at or under the target and ``above`` over it."""
    if cost <= 0 or target <= 0:
        raise ValueError(f"cost and target must be positive, got cost={cost}, target={target}")
    return float(accuracy) * (cost / target) ** (below if cost <= target else above)


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


#: what a reward's size term counts: p_h, MACs for one image, or the mean MACs of early-exit inference
COSTS = ("params", "macs", "early_exit_macs")


@dataclass(frozen=True)
class TargetReward:
    """MnasNet's target form (module docstring) with the target T bound; ``cost`` names what it weighs."""

    target: float
    cost: str = "params"
    below: float = -1.0 / DEFAULT_BETA
    above: float = -1.0

    def __call__(self, accuracy: float, cost: float) -> float:
        return target_reward(accuracy, cost, self.target, self.below, self.above)


@dataclass(frozen=True)
class SizeTarget:
    """A size goal as the user states it (the strategy's ``target`` argument, ``classArgs.target``).

    ``cost``: ``params``, ``macs`` or ``early_exit_macs``. T is ``value`` (in the cost's unit) or
    ``share`` times the baseline network's cost (P for params); neither: ``share`` 1.0.
    ``exit_shares``: for ``early_exit_macs``, the share of inputs leaving at each exit (what
    calibration measured on an earlier run: ``evaluation.json``, ``validation.exit_share``);
    None: equal shares. ``head`` and ``head_width``: the exits' heads, as the federated section's.
    """

    cost: str = "params"
    value: float | None = None
    share: float | None = None
    below: float = -1.0 / DEFAULT_BETA
    above: float = -1.0
    exit_shares: tuple[float, ...] | None = None
    head: str = "conv"
    head_width: int | None = None

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"target.cost must be one of {COSTS}, got {self.cost!r}")
        if self.value is not None and self.share is not None:
            raise ValueError("target: give value (T in the cost's unit) or share (T as a share of the baseline's "
                             "cost), not both")
        for key in ("value", "share"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ValueError(f"target.{key} must be a positive number, got {v!r}")
        for key in ("below", "above"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 0:
                raise ValueError(f"target.{key} must be a number <= 0 (the exponent of cost / T), got {v!r}")
        if self.exit_shares is not None:
            shares = self.exit_shares
            if (not isinstance(shares, (list, tuple)) or not shares
                    or any(isinstance(q, bool) or not isinstance(q, (int, float)) or not q >= 0 for q in shares)
                    or sum(shares) <= 0):
                raise ValueError(f"target.exit_shares must list non-negative shares, one per exit, got {shares!r}")
            object.__setattr__(self, "exit_shares", tuple(float(q) for q in shares))

    @classmethod
    def of(cls, target: "SizeTarget | Mapping[str, Any]", key: str = "target") -> "SizeTarget":
        """A SizeTarget from itself or a mapping of its fields; an unknown field names itself under ``key``."""
        if isinstance(target, SizeTarget):
            return target
        if not isinstance(target, Mapping):
            raise ValueError(f"{key} must be a mapping of {sorted(cls.__dataclass_fields__)}, got {target!r}")
        unknown = sorted(set(target) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        try:
            return cls(**dict(target))
        except ValueError as err:
            raise ValueError(str(err).replace("target", key, 1)) from None

    def reward(self, baseline_cost: float) -> TargetReward:
        """The reward with T resolved against the baseline network's cost."""
        target = self.value if self.value is not None else (1.0 if self.share is None else self.share) * baseline_cost
        return TargetReward(float(target), self.cost, float(self.below), float(self.above))


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
