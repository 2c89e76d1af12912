"""S3: the LSTM controller and its REINFORCE learner (one copy, used by the strategy and the tuner).

ENAS-style (Pham et al. 2018): one LSTM step per decision step, in the order of
``model_space.simplify()`` (a categorical label is one step; how other NNI label kinds become
steps is :mod:`nni_fedexit.search.decisions`); the first input is a learned start vector, every
later input is the embedding of the previous decision; each step has its own softmax head.
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
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_fedexit.search.controller_settings import ControllerSettings, RewardBatch
from nni_fedexit.search.decisions import Choice, Decision

__all__ = ["ControllerSettings", "LSTMController", "PolicyGradient", "RewardBatch"]

_logger = logging.getLogger(__name__)


class LSTMController(nn.Module):
    """The policy: an LSTM cell unrolled once per decision step (one or more per label)."""

    def __init__(self, num_choices: Sequence[int], settings: ControllerSettings,
                 groups: Sequence[int | None] | None = None):
        super().__init__()
        if not num_choices or any(n < 1 for n in num_choices):
            raise ValueError(f"every label needs at least one choice, got {list(num_choices)}")
        h = settings.hidden_size
        self.settings = settings
        #: steps with the same group id are drawn without replacement (None: independent)
        self.groups = list(groups) if groups is not None else [None] * len(num_choices)
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
        actions: Sequence[int | None] | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        skip: Callable[[int, list[int | None]], bool] | None = None,
    ) -> tuple[list[int | None], torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Roll out the policy: sample (or take the argmax, or replay ``actions``).

        ``skip(step, chosen so far)`` leaves a step out (no LSTM step; its action is None): a
        nested label whose parent took another option. Returns the actions, the summed
        log-probability and entropy (differentiable), and the per-step probabilities.
        """
        x = self.start
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        chosen: list[int | None] = []
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        probs_out: list[torch.Tensor | None] = []
        for step in range(len(self.heads)):
            if skip is not None and skip(step, chosen):
                chosen.append(None)
                probs_out.append(None)
                continue
            state = self.lstm(x, state)
            logits = self._logits(state[0], step)[0]
            group = self.groups[step]
            taken = None
            if group is not None:
                earlier = [a for s, a in zip(range(step), chosen) if self.groups[s] == group and a is not None]
                if earlier:
                    taken = torch.zeros(len(logits), dtype=torch.bool)
                    taken[earlier] = True
                    logits = logits.masked_fill(taken, float("-inf"))
            log_p = F.log_softmax(logits, dim=-1)
            probs = log_p.exp()
            if actions is not None:
                a = actions[step]
                if a is None:
                    raise ValueError(f"replayed actions lack step {step}")
                a = int(a)
            elif greedy:
                a = int(torch.argmax(probs))
            else:
                a = int(torch.multinomial(probs.detach(), 1, generator=generator))
            chosen.append(a)
            log_prob = log_prob + log_p[a]
            finite = log_p if taken is None else log_p.masked_fill(taken, 0.0)
            entropy = entropy - (probs * finite).sum()
            probs_out.append(probs.detach())
            x = self.embeddings[step](torch.tensor([a]))
        return chosen, log_prob, entropy, probs_out


class PolicyGradient:
    """REINFORCE over an LSTMController for a space ``{label: [values...] or Decision}``.

    A list of values is a categorical label; a :class:`~nni_fedexit.search.decisions.Decision`
    (Subset, Bins) is any other kind of NNI label. ``sample()`` draws an architecture (a ``{label:
    value}`` dict), ``update(samples, rewards)`` takes one gradient step on a batch of finished
    samples. Everything random goes through one seeded generator, and ``state_dict()`` holds the
    controller, the optimiser, the baseline and the generator, so a stopped search resumes
    exactly. The state holds only tensors and Python values: it loads with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, choices: Mapping[str, Sequence[Any] | Decision], settings: ControllerSettings | None = None):
        self.settings = settings or ControllerSettings()
        # plain str labels: NNI labels do not unpickle safely
        self.decisions: dict[str, Decision] = {
            str(label): d if isinstance(d, Decision) else Choice(str(label), d) for label, d in choices.items()
        }
        self.labels = list(self.decisions)
        #: the candidates of every categorical label (Choice and Subset), as lists
        self.values = {label: list(d.values) for label, d in self.decisions.items() if hasattr(d, "values")}
        self._steps: list[tuple[str, int]] = [(label, j) for label, d in self.decisions.items() for j in range(len(d.sizes))]
        if not self._steps:
            raise ValueError("the search space has no choices to search")
        sizes = [self.decisions[label].sizes[j] for label, j in self._steps]
        groups = [self.labels.index(label) if self.decisions[label].exclusive else None for label, _ in self._steps]
        #: each label's steps, as a slice of the rollout (its first step is where a nested label's parent decided)
        self._slices: dict[str, slice] = {}
        start = 0
        for label, d in self.decisions.items():
            self._slices[label] = slice(start, start + len(d.sizes))
            start += len(d.sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)
            self.controller = LSTMController(sizes, self.settings, groups)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.settings.lr)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.baseline: float | None = None
        self.steps = 0  # controller updates done
        self.history: list[dict[str, Any]] = []  # one entry per update: rewards, baseline, entropy
        self._nested = any(d.parent is not None for d in self.decisions.values())

    # ---- sampling ---------------------------------------------------------------------------

    def _skip(self, step: int, chosen: list[int | None]) -> bool:
        """A nested label is left out unless its parent took the option it belongs to."""
        parent = self.decisions[self._steps[step][0]].parent
        if parent is None:
            return False
        where = self._slices[parent[0]]
        first = where.start if where.stop > where.start else None
        return first is None or first >= len(chosen) or chosen[first] != parent[1]

    def _to_sample(self, actions: Sequence[int | None], generator: torch.Generator | None) -> dict[str, Any]:
        sample: dict[str, Any] = {}
        for label, d in self.decisions.items():
            acts = list(actions[self._slices[label]])
            if any(a is None for a in acts):
                continue  # a nested label its parent did not choose
            sample[label] = d.value(acts, generator)
        return sample

    def _to_actions(self, sample: Mapping[str, Any]) -> list[int | None]:
        actions: list[int | None] = []
        for label, d in self.decisions.items():
            if label not in sample and (d.parent is not None or not d.sizes):
                actions.extend([None] * len(d.sizes))
                continue
            try:
                actions.extend(d.actions(sample[label]))
            except (KeyError, ValueError) as err:
                raise ValueError(f"sample {dict(sample)} is not in the controller's space: label {label!r}: "
                                 f"{err}") from err
        return actions

    def _check_nesting(self, actions: Sequence[int | None]) -> None:
        for i in range(len(actions)):
            if (actions[i] is None) != self._skip(i, list(actions[:i])):
                raise ValueError(f"label {self._steps[i][0]!r} is given where its parent choice leaves it out, "
                                 "or missing where it is needed")

    @torch.no_grad()
    def sample(self, greedy: bool = False, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A path from the policy (``greedy``: its most probable one). ``generator``: draw with this
        one instead of the learner's own, which is then left as it was (a look at the policy that
        does not change what the search samples next)."""
        g = self.generator if generator is None else generator
        skip = self._skip if self._nested else None
        actions, _, _, _ = self.controller(greedy=greedy, generator=g, skip=skip)
        return self._to_sample(actions, None if greedy else g)

    def sample_uniform(self) -> dict[str, Any]:
        """A uniformly random architecture, drawn with the learner's own (checkpointed) generator."""
        actions: list[int | None] = []
        for label, d in self.decisions.items():
            if not d.sizes:
                continue
            if self._nested and self._skip(len(actions), actions):
                actions.extend([None] * len(d.sizes))
                continue
            actions.extend(d.uniform_actions(self.generator))
        return self._to_sample(actions, self.generator)

    def contains(self, sample: Mapping[str, Any]) -> bool:
        """Whether ``sample`` is one this controller can draw (every label, in range)."""
        try:
            self._check_nesting(self._to_actions(sample))
        except ValueError:
            return False
        return True

    @torch.no_grad()
    def probabilities(self) -> dict[str, dict[str, float]]:
        """Each step's option probabilities along the greedy path (what the web UI and report show)."""
        skip = self._skip if self._nested else None
        _, _, _, probs = self.controller(greedy=True, skip=skip)
        names = [pair for d in self.decisions.values() for pair in d.option_names()]
        return {name: {o: float(p) for o, p in zip(options, probs[i])}
                for i, (name, options) in enumerate(names) if probs[i] is not None}

    @torch.no_grad()
    def entropy(self, sample: Mapping[str, Any] | None = None) -> float:
        """The policy's entropy (nats, summed over the decision steps) along ``sample`` (default:
        the greedy path): near 0 once the controller has decided, largest while it explores."""
        actions = self._to_actions(sample if sample is not None else self.sample(greedy=True))
        _, _, entropy, _ = self.controller(actions=actions, skip=self._skip if self._nested else None)
        return float(entropy)

    # ---- learning ---------------------------------------------------------------------------

    def log_prob(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """log pi(sample), differentiable (the sum over the sample's decision steps)."""
        actions = self._to_actions(sample)
        if self._nested:
            self._check_nesting(actions)
        _, log_prob, _, _ = self.controller(actions=actions, skip=self._skip if self._nested else None)
        return log_prob

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
        skip = self._skip if self._nested else None
        for sample, reward in zip(samples, rewards):
            actions = self._to_actions(sample)
            if self._nested:
                self._check_nesting(actions)
            _, log_prob, entropy, _ = self.controller(actions=actions, skip=skip)
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

    def _identity(self) -> dict[str, list[str]]:
        return {label: d.identity() for label, d in self.decisions.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "labels": list(self.labels),
            "values": self._identity(),
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "baseline": self.baseline,
            "steps": self.steps,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["labels"] != self.labels or state["values"] != self._identity():
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
