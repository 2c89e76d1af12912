"""NNI 3.0's own strategy tests, with SizeAwarePolicyGradient(mode="trials") in place of NNI's strategies.

Adapted from microsoft/nni at tag v3.0 (commit 36ba04c94e51eaa2a88b9e6e0a4077f3a9f93004):

- ``test/ut/nas/strategy/test_sanity.py``: its ``MyModelSpace``, ``foo`` and the three spaces of
  ``named_model_space`` (base, constraint, numerical) are copied as they are. Its
  ``test_reinforcement_learning`` (NNI's ``PolicyBasedRL``, which refuses the numerical space)
  becomes :func:`test_policy_gradient_sanity`, run on all three spaces with ``reward_for_invalid``
  None and -1, with the same assertions, plus: every submitted sample lies in the space and keeps
  its constraints. NNI's tianshou ``naive_policy`` is not used (tianshou is not installed here).
- ``test/ut/nas/strategy/test_middleware.py``: every test that wraps a strategy in ``Chain(...)``
  runs with ours where NNI's has ``MockStrategy()`` or ``Random(dedup=False)`` (ours with
  ``dedup=False``, since the middleware under test does the deduplication). Assertions on the mock's
  private event logs (``_check_*_events``) are dropped; the others are kept. Not adapted:
  ``test_filter_patience`` and ``test_deduplication_patience``, which feed the middleware a
  hand-made generator of models instead of a strategy.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

import nni
from nni.mutable import ExpressionConstraint, Mutable, MutableList, ensure_frozen
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.execution import SequentialExecutionEngine
from nni.nas.space import BaseModelSpace, ModelStatus, SimplifiedModelSpace, current_model, model_context
from nni.nas.strategy.base import StrategyStatus
from nni.nas.strategy.middleware import Chain, Deduplication, FailureHandler, Filter, MultipleEvaluation

from nni_fedexit import SizeAwarePolicyGradient


# ---- copied from test_sanity.py ------------------------------------------------------------------

@nni.trace
class MyModelSpace(BaseModelSpace):
    def __init__(self, mutables: list[Mutable]):
        self.mutables = MutableList(mutables)

        if current_model() is not None:
            self.numbers = ensure_frozen(self.mutables)

    def call(self, x):
        return sum(n for n in self.numbers if n is not None) + x

    def leaf_mutables(self, is_leaf):
        yield from self.mutables.leaf_mutables(is_leaf)

    def check_contains(self, sample):
        for mutable in self.mutables:
            exc = mutable.check_contains(sample)
            if exc is not None:
                return exc
        return None

    def freeze(self, sample):
        with model_context(sample):
            return MyModelSpace(self.mutables)


def foo(model, a, optimal, minimal):
    nni.report_intermediate_result(a)
    nni.report_final_result((model.call(a) - minimal) / (optimal - minimal))


@pytest.fixture(params=["base", "constraint", "numerical"])
def named_model_space(request):
    if request.param == "base":
        model = MyModelSpace([nni.choice("a", [1, 2, 3]), nni.choice("b", [4, 5, 6, 7])])
        evaluator = FunctionalEvaluator(foo, a=nni.choice("c", [0, 1]), optimal=11., minimal=5.)
    if request.param == "constraint":
        a, b = nni.choice("a", [1, 2, 3]), nni.choice("b", [4, 5, 6, 7])
        model = MyModelSpace([a, b, ExpressionConstraint((a + b) % 2 == 1, label="odd")])
        evaluator = FunctionalEvaluator(foo, a=nni.choice("c", [0, 1]), optimal=10., minimal=5.)
    if request.param == "numerical":
        model = MyModelSpace([nni.quniform("a", 1, 3, 0.75), nni.quniform("b", 4, 7, 1)])
        evaluator = FunctionalEvaluator(foo, a=1, optimal=11., minimal=6.)
    return request.param, SimplifiedModelSpace.from_model(model, evaluator)


@pytest.fixture
def engine():
    return SequentialExecutionEngine(max_model_count=30)


def ours(**kwargs):
    """Our strategy where NNI's tests put theirs (small batches: the budget is 30 trials)."""
    return SizeAwarePolicyGradient(**{"mode": "trials", "samples_per_update": 4, "seed": 0, **kwargs})


# ---- test_sanity.py: test_reinforcement_learning ---------------------------------------------------

@pytest.mark.parametrize("reward_for_invalid", [None, -1.0])
def test_policy_gradient_sanity(named_model_space, engine, reward_for_invalid, caplog):
    name, model_space = named_model_space
    strategy = ours(reward_for_invalid=reward_for_invalid)
    strategy(model_space, engine)

    models = list(engine.list_models())
    assert models and all(model_space.check_contains(m.sample) is None for m in models)  # nothing invalid ran
    if name == "constraint":
        assert all((m.sample["a"] + m.sample["b"]) % 2 == 1 for m in models)
        assert strategy.invalid_draws > 0
        assert strategy.learner.steps > 0
    if name == "numerical":
        assert {m.sample["a"] for m in models} <= {1, 1.5, 2.25, 3} and {m.sample["b"] for m in models} <= {4, 5, 6, 7}
    # upstream: the best model is optimal (dedup trains every distinct sample of these small spaces)
    assert next(strategy.list_models()).metric == 1.0

    # upstream's resume: a state loaded before initialize is kept, and used once initialized
    prev_models = list(engine.list_models())
    state_dict = strategy.state_dict()
    strategy2 = ours(reward_for_invalid=reward_for_invalid, dedup=False)
    with caplog.at_level(logging.INFO):
        strategy2.load_state_dict(state_dict)
    assert "not restored" in caplog.text  # upstream's words; ours keeps the state for initialize
    engine.max_model_count += 10
    strategy2.initialize(model_space, engine)
    strategy2.load_state_dict(state_dict)
    assert strategy2.learner.steps == strategy.learner.steps
    strategy2.run()
    new_models = [m for m in engine.list_models() if m not in prev_models]
    assert len(new_models) == engine.max_model_count - len(prev_models) >= 10  # the whole budget is used
    assert all(model_space.check_contains(m.sample) is None for m in new_models)


# ---- test_middleware.py ----------------------------------------------------------------------------

@pytest.mark.parametrize("metric_for_invalid", [-1., None])
@pytest.mark.parametrize("retain_history", [False, True])
def test_filter(named_model_space, engine, metric_for_invalid, retain_history):
    name, model_space = named_model_space

    def filter_fn(model):
        return model.sample["a"] <= 2

    strategy = Chain(ours(dedup=False), Filter(filter_fn, metric_for_invalid=metric_for_invalid,
                                               retain_history=retain_history))
    strategy(model_space, engine)
    assert strategy._status == StrategyStatus.SUCCEEDED
    assert all(not v for v in engine._callbacks.values())

    if metric_for_invalid is not None:
        any_invalid = False
        for model in strategy.list_models(sort=False):
            if model.sample["a"] > 2:
                assert model.metric == -1
                assert model.status == ModelStatus.Invalid
                any_invalid = True
        if retain_history:
            assert any_invalid
    else:
        assert all(model.sample["a"] <= 2 for model in engine.list_models())


def test_deduplication(named_model_space, engine):
    name, model_space = named_model_space
    strategy = Chain(ours(dedup=False), Deduplication("invalid", retain_history=True))
    strategy(model_space, engine)
    assert all(not v for v in engine._callbacks.values())

    models = list(strategy.list_models(sort=False))
    assert any(model.status == ModelStatus.Invalid for model in models)
    assert not all(model.status == ModelStatus.Invalid for model in models)
    # upstream also asserts that every sample came at least twice: true of its uniform MockStrategy,
    # not of a controller that converges; ours: every invalid (duplicate) model repeats a trained one
    trained = [m.sample for m in models if m.status != ModelStatus.Invalid]
    assert all(m.sample in trained for m in models if m.status == ModelStatus.Invalid)


@pytest.mark.slow
def test_deduplication_replay(named_model_space, engine):
    name, model_space = named_model_space
    strategy = Chain(ours(dedup=False), Deduplication("replay", retain_history=True))
    strategy(model_space, engine)
    assert len(engine.list_models()) < len(list(strategy.list_models()))

    for model in engine.list_models():
        for m in strategy.list_models():
            if model.sample == m.sample:
                assert model.metrics.intermediates == m.metrics.intermediates
                assert model.metrics.final == m.metrics.final
                assert model.status == m.status
                assert m.status != ModelStatus.Invalid


def _failing_half_the_time(model_space, rng):
    fn = model_space.evaluator.function

    def wrapper(*args, **kwargs):
        fn(*args, **kwargs)
        if rng.random() < 0.5:
            raise RuntimeError("failed")
    model_space.evaluator.function = wrapper


def test_failure_handler(named_model_space):
    name, model_space = named_model_space
    engine = SequentialExecutionEngine(max_model_count=30, continue_on_failure=True)
    _failing_half_the_time(model_space, random.Random(0))

    strategy = Chain(ours(dedup=False), FailureHandler(metric=-1.))
    strategy(model_space, engine)
    assert len(list(engine.list_models())) == len(list(strategy.list_models(sort=False)))

    failed = [m for m in strategy.list_models(sort=False) if m.status == ModelStatus.Failed]
    assert failed and all(m.metric == -1 for m in failed)
    # ours: the handler's metric reaches the controller: every trial, failed or not, was rewarded
    assert len(strategy[0].records) == len(list(engine.list_models()))
    assert sorted(r["reward"] for r in strategy[0].records)[0] == -1


def test_failure_handler_rerun(named_model_space):
    name, model_space = named_model_space
    engine = SequentialExecutionEngine(max_model_count=30, continue_on_failure=True)
    _failing_half_the_time(model_space, random.Random(1))

    strategy = Chain(ours(dedup=False), FailureHandler(retry_patience=100, retain_history=True))
    strategy(model_space, engine)
    assert len(list(engine.list_models())) > len(list(strategy.list_models(sort=False)))
    failure_status_count = sum(m.status != ModelStatus.Trained for m in strategy.list_models(sort=False))
    assert failure_status_count <= 1


@pytest.mark.parametrize("failure_types", [(ModelStatus.Invalid, ), (ModelStatus.Failed, )])
def test_failure_handler_filter(named_model_space, failure_types):
    name, model_space = named_model_space
    engine = SequentialExecutionEngine(max_model_count=30, continue_on_failure=True)
    rng = random.Random(2)
    appeared = []

    def filter_fn(model):
        if model not in appeared:
            appeared.append(model)
            return model.sample["a"] <= 2
        if rng.random() < 0.5:
            return model.sample["a"] <= 2
        return True

    strategy = Chain(ours(dedup=False), FailureHandler(retry_patience=1, failure_types=failure_types),
                     Filter(filter_fn))
    strategy(model_space, engine)

    status_counter = Counter(m.status for m in strategy.list_models(sort=False) if m.sample["a"] > 2)
    if failure_types[0] == ModelStatus.Failed:
        assert set(status_counter) == {ModelStatus.Invalid}
    else:
        assert set(status_counter) == {ModelStatus.Invalid, ModelStatus.Trained}


def test_multiple_evaluation(named_model_space, engine):
    name, model_space = named_model_space
    strategy = Chain(ours(dedup=False), MultipleEvaluation(3))
    strategy(model_space, engine)
    assert len(list(strategy.list_models(sort=False))) * 3 == len(list(engine.list_models()))


def test_multiple_evaluation_messy(named_model_space):
    name, model_space = named_model_space
    engine = SequentialExecutionEngine(max_model_count=30, continue_on_failure=True)
    rng = random.Random(3)
    fn = model_space.evaluator.function

    def wrapper(*args, **kwargs):
        if rng.random() < 0.5:
            nni.report_intermediate_result(0.)
        fn(*args, **kwargs)
        if rng.random() < 0.3:
            nni.report_final_result(1.)
        if rng.random() < 0.3:
            raise RuntimeError("failed")
    model_space.evaluator.function = wrapper

    strategy = Chain(ours(dedup=False), MultipleEvaluation(3))
    strategy(model_space, engine)
    assert len(list(strategy.list_models(sort=False))) * 3 == len(list(engine.list_models()))
    for model in strategy.list_models(sort=False):
        assert 1 <= len(model.metrics.intermediates) <= 2
        assert model.status in [ModelStatus.Trained, ModelStatus.Failed]


@pytest.mark.slow
@pytest.mark.parametrize("middleware", ["filter", "dedup", "failure", "multiple"])
def test_state_dict_sanity(middleware, named_model_space, engine):
    def middleware_fn():
        if middleware == "filter":
            return Filter(lambda model: model.sample["a"] >= 2)
        elif middleware == "dedup":
            return Deduplication("replay")
        elif middleware == "failure":
            return FailureHandler(metric=0.)
        elif middleware == "multiple":
            return MultipleEvaluation(4)

    strategy = Chain(ours(dedup=False), middleware_fn())
    _, model_space = named_model_space
    strategy(model_space, engine)

    state_dict = strategy.state_dict()
    strategy2 = Chain(ours(dedup=False), middleware_fn())
    strategy2.load_state_dict(state_dict)

    engine.max_model_count += 10
    strategy2(model_space, engine)
    # ours: the controller continued from the saved state rather than starting over
    assert strategy2[0].learner.steps >= strategy[0].learner.steps > 0
    assert strategy2[0].records[: len(strategy[0].records)] == strategy[0].records
