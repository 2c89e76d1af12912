"""S3, ``shared`` mode (the default, the patent's ENAS method): one supernet, shared weights.

A one-shot strategy on NNI's ``RandomOneShot`` machinery: the space becomes a supernet of
path-sampling layers with one set of shared weights. Each epoch the shared weights train on the
training batches along controller-sampled paths (or fair warm-up paths), then the controller
samples a path per validation batch, is rewarded with ``R(accuracy on that batch, p_h)`` and takes
a REINFORCE step every ``samples_per_update`` batches. At the end K architectures are sampled from
the controller (plus its greedy choice), each is scored on the validation data with the shared
weights, and the one with the highest reward is exported. Needs a Lightning evaluator such as
``nni.nas.evaluator.pytorch.Classification`` whose batches are ``(x, y)``. The training loop is
:class:`~nni_fedexit.search.enas_module.SizeAwareEnasModule`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from nni_fedexit.checks import positive_int
from nni_fedexit.nni_compat import import_nni
from nni_fedexit.search.decisions import Choice, Decision, decisions_of_space
from nni_fedexit.search.strategy import MODE_KINDS, SizeAwarePolicyGradient, sample_key, violation

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.oneshot.pytorch.strategy import RandomOneShot  # noqa: E402

from nni_fedexit.search.enas_module import SizeAwareEnasModule, TaggedConcatLoader  # noqa: E402

__all__ = ["BN_EVAL", "PATH_SAMPLING", "WARMUP_SAMPLING", "FairPathSampler", "SharedSizeAwarePolicyGradient"]

_logger = logging.getLogger("nni_fedexit.search.strategy")

#: how the shared weights' paths are drawn during warm-up (see ``warmup_sampling``)
WARMUP_SAMPLING = ("fair", "uniform")
#: how a path of the shared weights is evaluated: BatchNorm on the batch's statistics, or on the running ones
BN_EVAL = ("batch", "running")
#: whose paths the shared weights train along after the warm-up (see ``path_sampling``)
PATH_SAMPLING = ("controller", "warmup")


class SharedSizeAwarePolicyGradient(SizeAwarePolicyGradient, RandomOneShot):
    """``mode="shared"``: ENAS on NNI's one-shot machinery (see the module docstring).

    Parameters (besides :class:`~nni_fedexit.search.strategy.SizeAwarePolicyGradient`'s)
    ----------
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
    """

    MODE = "shared"

    def __init__(self, *, final_samples: int = 16, final_eval_batches: int | None = None, warmup_epochs: int = 0,
                 warmup_sampling: str = "fair", path_sampling: str = "controller", bn_eval: str = "batch",
                 **kwargs: Any):
        positive_int("final_samples", final_samples)
        if warmup_sampling not in WARMUP_SAMPLING:
            raise ValueError(f"warmup_sampling must be one of {WARMUP_SAMPLING}, got {warmup_sampling!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        if path_sampling not in PATH_SAMPLING:
            raise ValueError(f"path_sampling must be one of {PATH_SAMPLING}, got {path_sampling!r}")
        if bn_eval not in BN_EVAL:
            raise ValueError(f"bn_eval must be one of {BN_EVAL}, got {bn_eval!r}")
        super().__init__(**kwargs)
        self.final_samples = final_samples
        self.final_eval_batches = final_eval_batches
        self.warmup_epochs = warmup_epochs
        self.warmup_sampling = warmup_sampling
        self.path_sampling = path_sampling
        self.bn_eval = bn_eval
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
                found.setdefault(sample_key(s), s)
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
            candidates[sample_key(greedy)] = greedy
        for _ in range(self.final_samples):
            s = self.draw(learn=False)
            if s is not None:
                candidates.setdefault(sample_key(s), s)
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

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "warmup_epochs": self.warmup_epochs, "warmup_sampling": self.warmup_sampling}

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
