"""S3: the LSTM controller and its REINFORCE learner (one copy, used by the strategy and the tuner).

ENAS-style (Pham et al. 2018): one LSTM step per choice label, in the order of
``model_space.simplify()``; the first input is a learned start vector, every later input is the
embedding of the previous decision; each label has its own softmax head over its candidates.
Logits are divided by a temperature and squashed by ``tanh_constant * tanh(.)``, which keeps every
choice's probability away from 0 so the search keeps exploring.

REINFORCE with an exponential-moving-average baseline and an entropy bonus:
``loss = -(R - b) * log pi(a) - entropy_weight * H(pi)``. Rewards may arrive late and in any
order (NNI trials): the log-probability is computed when the reward arrives. :class:`RewardBatch`
collects rewarded samples and takes one step per ``samples_per_update`` of them (the strategy and
the tuner both learn through it).

Pure PyTorch: nothing here imports NNI's experiment machinery.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_fedexit.checks import positive_int

__all__ = ["ControllerSettings", "LSTMController", "PolicyGradient", "RewardBatch"]

_logger = logging.getLogger(__name__)


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


class LSTMController(nn.Module):
    """The policy: an LSTM cell unrolled once per choice label."""

    def __init__(self, num_choices: Sequence[int], settings: ControllerSettings):
        super().__init__()
        if not num_choices or any(n < 1 for n in num_choices):
            raise ValueError(f"every label needs at least one choice, got {list(num_choices)}")
        h = settings.hidden_size
        self.settings = settings
        self.start = nn.Parameter(torch.empty(1, h).uniform_(-0.1, 0.1))
        self.lstm = nn.LSTMCell(h, h)
        self.embeddings = nn.ModuleList(nn.Embedding(n, h) for n in num_choices)
        self.heads = nn.ModuleList(nn.Linear(h, n) for n in num_choices)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def _logits(self, hidden: torch.Tensor, step: int) -> torch.Tensor:
        logits = self.heads[step](hidden)
        if self.settings.temperature is not None:
            logits = logits / self.settings.temperature
        if self.settings.tanh_constant is not None:
            logits = self.settings.tanh_constant * torch.tanh(logits)
        return logits

    def forward(
        self,
        actions: Sequence[int] | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[list[int], torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Roll out the policy: sample (or take the argmax, or replay ``actions``).

        Returns the actions, the summed log-probability and entropy (differentiable), and the
        per-label probabilities.
        """
        x = self.start
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        chosen: list[int] = []
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        probs_out: list[torch.Tensor] = []
        for step in range(len(self.heads)):
            state = self.lstm(x, state)
            logits = self._logits(state[0], step)[0]
            log_p = F.log_softmax(logits, dim=-1)
            probs = log_p.exp()
            if actions is not None:
                a = int(actions[step])
            elif greedy:
                a = int(torch.argmax(probs))
            else:
                a = int(torch.multinomial(probs.detach(), 1, generator=generator))
            chosen.append(a)
            log_prob = log_prob + log_p[a]
            entropy = entropy - (probs * log_p).sum()
            probs_out.append(probs.detach())
            x = self.embeddings[step](torch.tensor([a]))
        return chosen, log_prob, entropy, probs_out


class PolicyGradient:
    """REINFORCE over an LSTMController for a categorical space ``{label: [values...]}``.

    ``sample()`` draws an architecture (a ``{label: value}`` dict), ``update(samples, rewards)``
    takes one gradient step on a batch of finished samples. Everything random goes through one
    seeded generator, and ``state_dict()`` holds the controller, the optimiser, the baseline and
    the generator, so a stopped search resumes exactly. The state holds only tensors and Python
    values: it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, choices: Mapping[str, Sequence[Any]], settings: ControllerSettings | None = None):
        self.settings = settings or ControllerSettings()
        self.labels = [str(label) for label in choices]  # plain str: NNI labels do not unpickle safely
        self.values = {str(label): list(vals) for label, vals in choices.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)
            self.controller = LSTMController([len(self.values[l]) for l in self.labels], self.settings)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.settings.lr)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.baseline: float | None = None
        self.steps = 0  # controller updates done
        self.history: list[dict[str, Any]] = []  # one entry per update: rewards, baseline, entropy

    # ---- sampling ---------------------------------------------------------------------------

    def _to_sample(self, actions: Sequence[int]) -> dict[str, Any]:
        return {label: self.values[label][a] for label, a in zip(self.labels, actions)}

    def _to_actions(self, sample: Mapping[str, Any]) -> list[int]:
        try:
            return [self.values[label].index(sample[label]) for label in self.labels]
        except (KeyError, ValueError) as err:
            raise ValueError(f"sample {dict(sample)} is not in the controller's space {self.values}") from err

    @torch.no_grad()
    def sample(self, greedy: bool = False) -> dict[str, Any]:
        actions, _, _, _ = self.controller(greedy=greedy, generator=self.generator)
        return self._to_sample(actions)

    def sample_uniform(self) -> dict[str, Any]:
        """A uniformly random architecture, drawn with the learner's own (checkpointed) generator."""
        return {
            label: self.values[label][int(torch.randint(len(self.values[label]), (1,), generator=self.generator))]
            for label in self.labels
        }

    @torch.no_grad()
    def probabilities(self) -> dict[str, dict[str, float]]:
        """Each label's choice probabilities along the greedy path (what the web UI and report show)."""
        actions, _, _, probs = self.controller(greedy=True)
        return {
            label: {str(v): float(p) for v, p in zip(self.values[label], probs[i])}
            for i, label in enumerate(self.labels)
        }

    # ---- learning ---------------------------------------------------------------------------

    def update(self, samples: Sequence[Mapping[str, Any]], rewards: Sequence[float]) -> dict[str, float]:
        """One REINFORCE step on finished samples; the baseline moves after the advantages are taken."""
        if len(samples) != len(rewards) or not samples:
            raise ValueError("update needs as many rewards as samples, and at least one")
        rewards = [float(r) for r in rewards]
        if any(not math.isfinite(r) for r in rewards):
            raise ValueError(f"rewards must be finite, got {rewards}")
        if self.baseline is None:
            self.baseline = sum(rewards) / len(rewards)
        baseline = self.baseline
        self.controller.train()
        loss = torch.zeros(())
        entropies = []
        for sample, reward in zip(samples, rewards):
            _, log_prob, entropy, _ = self.controller(actions=self._to_actions(sample))
            loss = loss - (reward - baseline) * log_prob - self.settings.entropy_weight * entropy
            entropies.append(entropy.item())
        loss = loss / len(samples)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.controller.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        decay = self.settings.baseline_decay
        for r in rewards:
            self.baseline = decay * self.baseline + (1.0 - decay) * r
        self.steps += 1
        stats = {
            "step": self.steps,
            "mean_reward": sum(rewards) / len(rewards),
            "max_reward": max(rewards),
            "baseline": baseline,
            "entropy": sum(entropies) / len(entropies),
            "loss": loss.item(),
        }
        self.history.append(stats)
        return stats

    # ---- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "labels": list(self.labels),
            "values": {label: [repr(v) for v in vals] for label, vals in self.values.items()},
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
            "steps": self.steps,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = {label: [repr(v) for v in vals] for label, vals in self.values.items()}
        if state["labels"] != self.labels or state["values"] != mine:
            raise ValueError(
                "controller state is for another search space: "
                f"saved labels {state['labels']}, this space {self.labels}"
            )
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        self.steps = int(state["steps"])
        self.history = [dict(h) for h in state["history"]]


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

    def add(self, learner: PolicyGradient, sample: Mapping[str, Any], reward: float) -> dict[str, float] | None:
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
