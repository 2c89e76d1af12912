"""SizeAwarePolicyGradient as NNI runs it: sequential engine, real NAS experiments, resume."""

import io
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import nni
from nni.mutable import ExpressionConstraint, ensure_frozen
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.evaluator.pytorch import DataLoader  # traced: NNI can ship it to trials
from nni.nas.execution import SequentialExecutionEngine
from nni.nas.nn.pytorch import LayerChoice, ModelSpace
from nni.nas.space import BaseModelSpace, SimplifiedModelSpace, current_model, model_context

from nni_fedexit.search.shared_strategy import SharedSizeAwarePolicyGradient
from nni_fedexit.search.strategy import SizeAwarePolicyGradient
from nni_fedexit.search.trials_strategy import TrialsSizeAwarePolicyGradient
from helpers import run_shared_experiment, run_trials_experiment, tiny_space


@nni.trace
class NumberSpace(BaseModelSpace):
    """A space without weights (as in NNI's own strategy tests): two choices, value = their sum."""

    def __init__(self, mutables):
        self.mutables = nni.mutable.MutableList(mutables)
        if current_model() is not None:
            self.numbers = ensure_frozen(self.mutables)

    def leaf_mutables(self, is_leaf):
        yield from self.mutables.leaf_mutables(is_leaf)

    def check_contains(self, sample):
        for m in self.mutables:
            exc = m.check_contains(sample)
            if exc is not None:
                return exc
        return None

    def freeze(self, sample):
        with model_context(sample):
            return NumberSpace(self.mutables)


def report_normalised(model, shift):
    """Best is a=3, b=7, shift=1 (value 11), worst a=1, b=4, shift=0 (value 5)."""
    nni.report_final_result((sum(model.numbers) + shift - 5) / 6)


def fail_on_a2(model, shift):
    if model.numbers[0] == 2:
        raise RuntimeError("trial crashed")
    report_normalised(model, shift)


def number_space(fn=report_normalised):
    space = NumberSpace([nni.choice("a", [1, 2, 3]), nni.choice("b", [4, 5, 6, 7])])
    return SimplifiedModelSpace.from_model(space, FunctionalEvaluator(fn, shift=nni.choice("c", [0, 1])))


def test_mode_picks_the_class_and_bad_options_are_refused():
    assert isinstance(SizeAwarePolicyGradient(), SharedSizeAwarePolicyGradient)
    trials = SizeAwarePolicyGradient(mode="trials", seed=1)
    assert isinstance(trials, TrialsSizeAwarePolicyGradient) and isinstance(trials, SizeAwarePolicyGradient)
    assert repr(trials) == "TrialsSizeAwarePolicyGradient(mode='trials', beta=14, samples_per_update=4, seed=1)"
    with pytest.raises(ValueError, match="mode"):
        SizeAwarePolicyGradient(mode="evolution")
    with pytest.raises(ValueError, match="beta"):
        SizeAwarePolicyGradient(beta=0.5)


def test_each_mode_refuses_the_other_modes_arguments_by_name():
    with pytest.raises(ValueError, match=r"mode='trials'\) does not take 'warmup_epochs' \(an argument of mode='shared'\)"):
        SizeAwarePolicyGradient(mode="trials", warmup_epochs=2)
    with pytest.raises(ValueError, match=r"mode='shared'\) does not take 'dedup' \(an argument of mode='trials'\)"):
        SizeAwarePolicyGradient(dedup=False)
    with pytest.raises(ValueError, match=r"does not take 'numerical_bins' \(an argument of mode='trials'\), 'typo'"):
        SharedSizeAwarePolicyGradient(numerical_bins=4, typo=1)
    shared = SizeAwarePolicyGradient(warmup_epochs=1, bn_eval="running", seed=2)
    assert (shared.warmup_epochs, shared.bn_eval, shared.controller_settings.seed) == (1, "running", 2)
    trials = TrialsSizeAwarePolicyGradient(dedup=False, numerical_bins=4)
    assert (trials.dedup, trials.numerical_bins, trials.mode) == (False, 4, "trials")
    with pytest.raises(ValueError, match="TrialsSizeAwarePolicyGradient runs mode 'trials', not 'shared'"):
        TrialsSizeAwarePolicyGradient(mode="shared")


def test_trials_mode_searches_a_continuous_label_and_the_shared_mode_refuses_it_by_name():
    space = NumberSpace([nni.choice("a", [1, 2]), nni.uniform("lr", 0.1, 1.0)])
    model_space = SimplifiedModelSpace.from_model(space, FunctionalEvaluator(report_normalised, shift=0))
    engine = SequentialExecutionEngine(max_model_count=6)
    SizeAwarePolicyGradient(mode="trials", seed=0)(model_space, engine)
    lrs = [m.sample["lr"] for m in engine.list_models()]
    assert len(lrs) == 6 and all(0.1 <= lr <= 1.0 for lr in lrs) and len(set(lrs)) == 6
    with pytest.raises(ValueError, match=r"label 'lr'.*Numerical.*mode='trials'"):
        SizeAwarePolicyGradient().mutate_model(space)


def test_uses_the_whole_budget_and_lists_best_reward_first():
    model_space, engine = number_space(), SequentialExecutionEngine(max_model_count=30)
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=3, seed=0, dedup=False)
    strategy(model_space, engine)
    assert len(list(engine.list_models())) == 30
    assert all(model_space.contains(m.sample) for m in engine.list_models())
    assert len(strategy.records) == 30 and strategy.learner.steps == 10
    ranked = list(strategy.list_models())
    assert ranked[0].metric == max(r["reward"] for r in strategy.records)  # no size here: reward = accuracy
    assert [m.metric for m in ranked] == sorted((m.metric for m in ranked), reverse=True)
    with pytest.raises(RuntimeError, match="already been initialized"):
        strategy(model_space, engine)


def test_dedup_trains_every_distinct_sample_once_then_stops():
    model_space, engine = number_space(), SequentialExecutionEngine(max_model_count=30)
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=3, seed=0)
    strategy(model_space, engine)
    samples = [tuple(sorted(m.sample.items())) for m in engine.list_models()]
    assert len(samples) == len(set(samples)) == len(list(model_space.grid())) == 24
    assert next(strategy.list_models()).metric == 1.0
    assert strategy.learner.steps > 24 // 3  # repeated draws still taught the controller


def test_controller_learns_towards_the_best_sample():
    model_space, engine = number_space(), SequentialExecutionEngine(max_model_count=160)
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=4, seed=0, controller={"lr": 0.05}, dedup=False)
    strategy(model_space, engine)
    first, last = strategy.records[:8], strategy.records[-40:]
    assert np.mean([r["reward"] for r in last]) > np.mean([r["reward"] for r in first]) + 0.1
    assert strategy.learner.sample(greedy=True) == {"a": 3, "b": 7, "c": 1}


def test_failed_trials_are_skipped_not_rewarded_zero(caplog):
    model_space = number_space(fail_on_a2)
    engine = SequentialExecutionEngine(max_model_count=20, continue_on_failure=True)
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=2, seed=0, dedup=False)
    strategy(model_space, engine)
    failed = [m for m in engine.list_models() if m.sample["a"] == 2]
    assert failed, "the seed should sample a=2 at least once"
    assert len(strategy.records) == 20 - len(failed)
    assert all(r["sample"]["a"] != 2 for r in strategy.records)
    assert "without a final metric: skipped" in caplog.text


def test_a_final_metric_that_arrives_after_the_training_end_still_counts(caplog):
    """NNI delivers a trial's FinalMetric and TrainingEnd on different channels: on a busy machine the
    end comes first. The trained trial waits for its metric and is rewarded when it comes; only a
    failed trial without a metric is skipped at once."""
    from types import SimpleNamespace

    from nni.nas.space import ModelStatus

    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=1, seed=0)
    strategy._initialize(number_space(), SequentialExecutionEngine(max_model_count=1))
    late, failed = SimpleNamespace(metric=None), SimpleNamespace(metric=None)  # NNI's models, as events carry them
    strategy._running += [(late, {"a": 1, "b": 4, "c": 0}), (failed, {"a": 2, "b": 5, "c": 1})]
    strategy._on_training_end(SimpleNamespace(model=late, status=ModelStatus.Trained))
    assert strategy.records == [] and strategy._awaiting_metric == [(late, {"a": 1, "b": 4, "c": 0})]
    strategy._on_final_metric(SimpleNamespace(model=late, metric=0.5))
    assert [(r["sample"], r["accuracy"]) for r in strategy.records] == [({"a": 1, "b": 4, "c": 0}, 0.5)]
    assert strategy._awaiting_metric == [] and strategy.learner.steps == 1
    with caplog.at_level(logging.WARNING, logger="nni_fedexit.search.strategy"):
        strategy._on_training_end(SimpleNamespace(model=failed, status=ModelStatus.Failed))
    assert len(strategy.records) == 1 and "ended failed without a final metric: skipped" in caplog.text


def test_stopped_search_resumes_to_the_same_state():
    kwargs = dict(mode="trials", samples_per_update=2, seed=4)
    full = SizeAwarePolicyGradient(**kwargs)
    full(number_space(), SequentialExecutionEngine(max_model_count=15))

    first = SizeAwarePolicyGradient(**kwargs)
    first(number_space(), SequentialExecutionEngine(max_model_count=7))  # ends with one sample buffered
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # NNI's checkpoint serializer is torch.save
    buf.seek(0)
    resumed = SizeAwarePolicyGradient(**kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))  # before initialize, as NNI's resume does
    resumed(number_space(), SequentialExecutionEngine(max_model_count=8))

    assert [r["sample"] for r in resumed.records] == [r["sample"] for r in full.records]
    assert resumed.learner.steps == full.learner.steps > 0
    for a, b in zip(full.learner.controller.parameters(), resumed.learner.controller.parameters()):
        assert torch.equal(a, b)


def test_state_loaded_after_initialize_goes_on_like_the_uninterrupted_search():
    """NNI's documented order too: ``initialize``, then ``load_state_dict``, then ``run``. The
    reference is a search of 15 models that was never stopped (same seed): the resumed one must
    draw its remaining 8 samples, and end with the controller, exactly as it did."""
    kwargs = dict(mode="trials", samples_per_update=2, seed=4)
    full = SizeAwarePolicyGradient(**kwargs)
    full(number_space(), SequentialExecutionEngine(max_model_count=15))

    first = SizeAwarePolicyGradient(**kwargs)
    first(number_space(), SequentialExecutionEngine(max_model_count=7))  # one sample left in the update buffer
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = SizeAwarePolicyGradient(**kwargs)
    resumed.initialize(number_space(), SequentialExecutionEngine(max_model_count=8))  # a fresh controller
    assert resumed.learner.steps == 0 and resumed.records == []
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    # restored at once, not deferred: the first run's 7 records and its controller steps
    assert [r["sample"] for r in resumed.records] == [r["sample"] for r in full.records[:7]]
    assert resumed.learner.steps == first.learner.steps > 0
    for a, b in zip(first.learner.controller.parameters(), resumed.learner.controller.parameters()):
        assert torch.equal(a, b)
    resumed.run()

    assert [r["sample"] for r in resumed.records] == [r["sample"] for r in full.records]
    assert [r["reward"] for r in resumed.records] == [r["reward"] for r in full.records]
    assert resumed.learner.steps == full.learner.steps > first.learner.steps
    for a, b in zip(full.learner.controller.parameters(), resumed.learner.controller.parameters()):
        assert torch.equal(a, b)
    # and the next draw too: the controller's random generator was restored with it
    assert resumed.learner.sample() == full.learner.sample()


def _digits_loaders(digits, size=None):
    x = digits.train.images
    if size is not None:  # NAS-Bench-201 wants 32x32x3
        x = F.interpolate(x, size=size).repeat(1, 3, 1, 1)
    train = TensorDataset(x[:1000], digits.train.labels[:1000])
    val = TensorDataset(x[1000:], digits.train.labels[1000:])
    g = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=64, shuffle=True, generator=g), DataLoader(val, batch_size=64)


def _classification(digits, max_epochs, size=None):
    from nni.nas.evaluator.pytorch import Classification

    train, val = _digits_loaders(digits, size)
    return Classification(
        train_dataloaders=train, val_dataloaders=val, max_epochs=max_epochs, num_classes=10,
        learning_rate=0.01, accelerator="cpu", enable_progress_bar=False, logger=False, enable_checkpointing=False,
    )


@pytest.mark.slow
def test_shared_mode_nas_experiment_exports_the_best_scored_sample(digits, tmp_path):
    torch.manual_seed(0)
    space = tiny_space(widths=(8, 16, 32))
    strategy = SizeAwarePolicyGradient(final_samples=6, samples_per_update=2, seed=0)
    exported = run_shared_experiment(space, _classification(digits, max_epochs=2), strategy, tmp_path)
    assert len(exported) == 1 and space.contains(exported[0])
    assert strategy.learner.steps == 2 * 7 // 2  # 7 validation batches an epoch, 2 per update
    best = max(strategy.final_candidates, key=lambda c: c["reward"])
    assert exported[0] == best["sample"]
    assert best["params"] == space.count_params(best["sample"])
    # what the user relies on: shared weights that learnt, so the scores rank networks. 10 digit
    # classes: chance is 0.1; after 2 epochs of shared training the 5 candidates scored 0.51 to 0.75
    # here (seed 0): every one at least 3 x chance, the best chosen one above 0.6
    accuracies = [c["accuracy"] for c in strategy.final_candidates]
    assert min(accuracies) > 0.3 and best["accuracy"] > 0.6, accuracies
    # and the reward is the patent's, computed here by hand: Acc * (p_h / P) ** (-1 / beta), beta = 14
    for c in strategy.final_candidates:
        assert c["reward"] == pytest.approx(c["accuracy"] * (c["params"] / strategy.baseline_params) ** (-1 / 14))


@pytest.mark.slow
def test_shared_mode_runs_unchanged_on_an_nni_hub_space(digits, tmp_path):
    from nni.nas.hub.pytorch import NasBench201

    torch.manual_seed(0)
    space = NasBench201(stem_out_channels=4, num_modules_per_stack=1)
    strategy = SizeAwarePolicyGradient(final_samples=3, samples_per_update=2, seed=0)
    (sample,) = run_shared_experiment(space, _classification(digits, max_epochs=1, size=32), strategy, tmp_path)
    assert set(sample) == {f"cell/{j}_{i}" for i in range(1, 4) for j in range(i)}
    assert space.contains(sample) and strategy.learner.steps == 3
    assert strategy.baseline_params > 0  # P: the sample of every label's first choice


@pytest.mark.slow
def test_trials_mode_real_experiment_lists_trials_with_metrics(tmp_path):
    from nni_fedexit.search.trial import search_evaluator

    space = tiny_space(widths=(8, 16, 32))
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=2, seed=0)
    evaluator = search_evaluator(dataset="digits", train_samples=None, epochs=1)
    jobs, _, exported = run_trials_experiment(space, evaluator, strategy, tmp_path, trials=4)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 4
    reported = [json.loads(json.loads(j["finalMetricData"][0]["data"])) for j in jobs]
    assert all(0.0 <= r["default"] <= 1.0 and r["params"] > 0 for r in reported)
    assert len(strategy.records) == 4 and strategy.learner.steps >= 2  # dedup may add steps from known rewards
    assert sorted(r["accuracy"] for r in strategy.records) == sorted(r["default"] for r in reported)
    for record in strategy.records:  # p_h the trial reported equals the space's own count
        assert record["params"] == space.count_params(record["sample"])
    assert space.contains(exported[0])
    assert exported[0] == max(strategy.records, key=lambda r: r["reward"])["sample"]


def test_presets_build_strategies_and_bad_keys_are_named(tmp_path):
    from nni_fedexit.presets import PresetError

    shared = SizeAwarePolicyGradient.from_preset("size_aware_pg")
    assert isinstance(shared, SharedSizeAwarePolicyGradient) and shared.final_samples == 16
    trials = SizeAwarePolicyGradient.from_preset("size_aware_pg_trials", seed=3)
    assert isinstance(trials, TrialsSizeAwarePolicyGradient) and trials.controller_settings.seed == 3
    bad = tmp_path / "s.yaml"
    bad.write_text("mode: trials\nbeta: 14\nbatch: 3\n")
    with pytest.raises(PresetError, match=r"unknown key\(s\) \['batch'\]"):
        SizeAwarePolicyGradient.from_preset(bad)
    bad.write_text("controller: {lr: 0.1, layers: 2}\n")
    with pytest.raises(PresetError, match=r"\['layers'\] under 'controller'"):
        SizeAwarePolicyGradient.from_preset(bad)
    bad.write_text("beta: 0\n")
    with pytest.raises(PresetError, match="beta must be a positive integer"):
        SizeAwarePolicyGradient.from_preset(bad)


class EvenNet(ModelSpace):
    """Two LayerChoices and a constraint on them: (a + b) even (NNI needs the default (0, 0) valid)."""

    def __init__(self):
        super().__init__()
        self.a = LayerChoice([torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(1, 8, 5, padding=2),
                              torch.nn.Conv2d(1, 8, 1)], label="a")
        self.b = LayerChoice([torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)], label="b")
        self.add_mutable(ExpressionConstraint((nni.choice("a", [0, 1, 2]) + nni.choice("b", [0, 1])) % 2 == 0,
                                              label="even"))
        self.head = torch.nn.Linear(8, 10)

    def freeze(self, sample):
        with model_context(sample):
            return EvenNet()

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_shared_mode_trains_scores_and_exports_only_samples_that_keep_the_constraint(digits, tmp_path):
    torch.manual_seed(0)
    space = EvenNet()
    strategy = SizeAwarePolicyGradient(final_samples=4, samples_per_update=2, seed=0, warmup_epochs=1)
    (sample,) = run_shared_experiment(space, _classification(digits, max_epochs=2), strategy, tmp_path)
    even = lambda s: (s["a"] + s["b"]) % 2 == 0  # noqa: E731
    assert even(sample) and strategy.invalid_draws > 0
    assert strategy.records and all(even(r["sample"]) for r in strategy.records)
    assert all(even(c["sample"]) for c in strategy.final_candidates)
