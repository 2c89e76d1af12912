"""S3: what the LSTM controller is told (:class:`ControllerSettings`) and fed (:class:`RewardBatch`).

Plain Python, apart from the controller itself (:mod:`nni_fedexit.search.controller`, PyTorch):
the nnictl tuner builds both while NNI's dispatcher waits for it to connect, so importing them
must not cost torch's import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from nni_fedexit.checks import positive_int


__all__ = ["ControllerSettings", "Learner", "RewardBatch"]

_logger = logging.getLogger("nni_fedexit.search.controller")


@dataclass
class ControllerSettings:
    """Controller and REINFORCE options (defaults sized for the small budgets of CPU searches)."""

    hidden_size: int = 64
    #: logits are divided by this before the tanh (ENAS: 5.0); None leaves them as they are
    temperature: float | None = None
    #: logits become tanh_constant * tanh(logits) (ENAS: 1.1 to 2.5); None disables
    tanh_constant: float | None = 1.5
    entropy_weight: float = 1e-4
    baseline_decay: float = 0.9
    lr: float = 0.01
    #: gradient-norm clip for the controller update; None disables
    grad_clip: float | None = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.tanh_constant is not None and self.tanh_constant <= 0:
            raise ValueError(f"tanh_constant must be > 0, got {self.tanh_constant}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class Learner(Protocol):
    """What a :class:`RewardBatch` steps: :class:`~nni_fedexit.search.controller.PolicyGradient`."""

    def update(self, samples: Sequence[Mapping[str, Any]], rewards: Sequence[float]) -> dict[str, float]: ...


class RewardBatch:
    """Rewarded samples waiting for the controller: one :meth:`PolicyGradient.update` per ``size``.

    :meth:`add` keeps ``(sample, reward)`` in arrival order; when ``size`` of them are waiting, the
    learner takes one REINFORCE step on them all and the batch starts empty again. ``pending``
    (and :meth:`state`) is what a checkpoint keeps of a batch that is not full yet.
    """

    def __init__(self, size: int, logger: logging.Logger | None = None):
        self.size = positive_int("samples_per_update", size)
        self.pending: list[tuple[dict[str, Any], float]] = []
        self._logger = logger or _logger  # the owner's logger: its log keeps the controller steps

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, learner: Learner, sample: Mapping[str, Any], reward: float) -> dict[str, float] | None:
        """Keep one (sample, reward); a full batch is ``learner``'s next step (its stats are returned)."""
        self.pending.append((dict(sample), float(reward)))
        if len(self.pending) < self.size:
            return None
        samples, rewards = zip(*self.pending)
        stats = learner.update(list(samples), list(rewards))
        self.pending.clear()
        self._logger.info(
            "[controller step %d] mean reward %.4f, baseline %.4f, entropy %.3f",
            stats["step"], stats["mean_reward"], stats["baseline"], stats["entropy"],
        )
        return stats

    def clear(self) -> None:
        self.pending.clear()

    def state(self) -> list[list[Any]]:
        """The waiting pairs as ``[[sample, reward], ...]`` (plain values: loads with weights_only)."""
        return [[dict(s), float(r)] for s, r in self.pending]

    def load_state(self, state: Sequence[Sequence[Any]]) -> None:
        self.pending = [(dict(s), float(r)) for s, r in state]
