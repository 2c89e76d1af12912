"""S3, ``trials`` mode: every sampled architecture is an NNI trial.

A multi-trial strategy: each architecture the controller samples is submitted to NNI's execution
engine as a trial (local training service: the web UI lists it with its metrics). The trial
reports its accuracy (``nni.report_final_result(acc)`` or ``{"default": acc, "params": p_h}``);
the strategy computes the reward and updates the controller every ``samples_per_update``
finished trials, in whatever order they finish. A trial that failed without a final metric is
logged and skipped, not rewarded 0 (one that reported before failing, or that NNI's
``FailureHandler(metric=...)`` scored, counts with that metric). Samples that break the space's
constraints are never submitted (``reward_for_invalid``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from nni_fedexit.nni_compat import import_nni
from nni_fedexit.search.decisions import DEFAULT_BINS, check_bins
from nni_fedexit.search.labelled import LabelledModelSpace
from nni_fedexit.search.reward import parse_metric
from nni_fedexit.search.strategy import SizeAwarePolicyGradient, sample_key

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.mutable import SampleValidationError  # noqa: E402
from nni.nas.execution.event import FinalMetricEvent, ModelEventType, TrainingEndEvent  # noqa: E402
from nni.nas.space import ModelStatus  # noqa: E402

__all__ = ["TrialsSizeAwarePolicyGradient"]

_logger = logging.getLogger("nni_fedexit.search.strategy")


class TrialsSizeAwarePolicyGradient(SizeAwarePolicyGradient):
    """``mode="trials"``: each sampled architecture is an NNI trial (see the module docstring).

    Parameters (besides :class:`~nni_fedexit.search.strategy.SizeAwarePolicyGradient`'s)
    ----------
    dedup
        ``trials`` mode: an architecture is trained once. When the controller samples one that
        was already trained, it learns from the recorded reward and samples again; after 20
        such draws in a row, an untrained architecture is drawn uniformly instead, and when
        none is left the search stops.
    numerical_bins
        ``trials`` mode: equal-probability bins of a continuous label (``nni.uniform``,
        ``loguniform``, ``normal``, ...); a quantised label with at most this many values is a
        choice of them. See :mod:`nni_fedexit.search.decisions`.
    """

    MODE = "trials"

    def __init__(self, *, dedup: bool = True, numerical_bins: int = DEFAULT_BINS, **kwargs: Any):
        check_bins(numerical_bins)
        super().__init__(**kwargs)
        self.dedup = dedup
        self.numerical_bins = numerical_bins

    def _initialize(self, model_space: Any, engine: Any) -> Any:
        self._setup_search(model_space, model_space)
        # strong references: NNI's engine only keeps weak ones, and drops events of collected models
        self._running: list[tuple[Any, dict[str, Any]]] = []
        self._final_metrics: list[tuple[Any, Any]] = []
        self._finished: list[tuple[Any, float]] = []
        #: trained models whose TrainingEnd came before their FinalMetric (NNI delivers the two
        #: through different channels, so on a busy machine the order flips): scored when it comes
        self._awaiting_metric: list[tuple[Any, dict[str, Any]]] = []
        engine.register_model_event_callback(ModelEventType.FinalMetric, self._on_final_metric)
        engine.register_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)
        return model_space

    def _cleanup(self) -> None:
        self.engine.unregister_model_event_callback(ModelEventType.FinalMetric, self._on_final_metric)
        self.engine.unregister_model_event_callback(ModelEventType.TrainingEnd, self._on_training_end)

    max_dedup_draws = 20
    max_uniform_draws = 1000
    #: seconds to wait, once NNI reports every trial done, for the last trials' end events
    end_event_wait = 10.0

    def _run(self) -> None:
        assert self.learner is not None
        while self.wait_for_resource():
            with self._lock:
                sample = self._next_sample()
                if sample is None:
                    _logger.info("No valid architecture left that was not trained yet: the search stops.")
                    break
                try:
                    model = LabelledModelSpace.of(self.model_space.freeze(sample))
                except SampleValidationError as err:  # a constraint check_contains did not see
                    self.invalid_draws += 1
                    _logger.debug("Invalid sample %s: %s", sample, err)
                    if self.reward_for_invalid is not None:
                        self.feed(sample, self.reward_for_invalid)
                    continue
                self._running.append((model, sample))
            _logger.info("[trial %d] submitting %s", len(self.records) + len(self._running), sample)
            self.engine.submit_models(model)  # the sequential engine runs it (and its callbacks) here
        self.engine.wait_models()
        # NNI's engine reports every model done before its listener thread has delivered the last
        # TrainingEnd events: wait for them (bounded), or the last trials' rewards would be lost
        deadline = time.monotonic() + self.end_event_wait
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running and not self._awaiting_metric:
                    break
            time.sleep(0.05)
        with self._lock:
            for _, sample in self._awaiting_metric:
                _logger.warning("Trial of %s ended without a final metric: skipped, no reward", sample)
            self._awaiting_metric.clear()

    def _next_sample(self) -> dict[str, Any] | None:
        """The controller's next valid architecture; with ``dedup``, one not trained or running yet."""
        assert self.learner is not None
        if not self.dedup:
            return self.draw()
        known = {sample_key(r["sample"]): r["reward"] for r in self.records}
        running = {sample_key(s) for _, s in self._running}
        for _ in range(self.max_dedup_draws):
            sample = self.draw()
            if sample is None:
                return None
            key = sample_key(sample)
            if key in known:
                self.feed(sample, known[key])  # learn from what was measured, spend no trial
            elif key not in running:
                return sample
        for _ in range(self.max_uniform_draws):  # the controller has converged: explore
            sample = self.draw(self.learner.sample_uniform, learn=False)
            if sample is None:
                return None
            key = sample_key(sample)
            if key not in known and key not in running:
                return sample
        return None

    @staticmethod
    def _pop(pairs: list[tuple[Any, Any]], model: Any) -> Any:
        for i, (m, value) in enumerate(pairs):
            if m is model:
                del pairs[i]
                return value
        return None

    def _on_final_metric(self, event: FinalMetricEvent) -> None:
        with self._lock:
            sample = self._pop(self._awaiting_metric, event.model)
            if sample is not None:  # its TrainingEnd came first
                self._score(event.model, sample, event.metric)
            else:
                self._final_metrics.append((event.model, event.metric))

    def _on_training_end(self, event: TrainingEndEvent) -> None:
        with self._lock:
            sample = self._pop(self._running, event.model)
            raw = self._pop(self._final_metrics, event.model)
            if sample is None:
                _logger.debug("%s was not submitted by this strategy; ignored", event.model)
                return
            if raw is None or (event.status == ModelStatus.Failed and event.model.metric is not None):
                raw = event.model.metric  # a failed trial: the metric NNI's FailureHandler set, if any
            if raw is None and event.status == ModelStatus.Trained:  # its final metric may still be on its way
                self._awaiting_metric.append((event.model, sample))
                return
            if raw is None:  # a failed trial with a final metric (reported before it failed, or NNI's
                # FailureHandler's metric) counts: it is a measurement, or what the user chose failures score
                _logger.warning("Trial of %s ended %s without a final metric: skipped, no reward", sample,
                                getattr(event.status, "value", event.status))
                return
            self._score(event.model, sample, raw)

    def _score(self, model: Any, sample: dict[str, Any], raw: Any) -> None:
        """Reward a finished trial's reported metric (under the lock) and keep it for list_models."""
        accuracy, params = parse_metric(raw)
        if accuracy is None:
            _logger.warning("Trial of %s reported %r, not a number or {'default': number}: skipped", sample, raw)
            return
        reward = self.observe(sample, accuracy, params)
        self._finished.append((model, reward))

    def list_models(self, sort: bool = True, limit: int | None = None) -> Iterator[Any]:
        """Models trained in this run, best *reward* first (NNI's default sorts by the raw metric)."""
        if not sort:
            yield from super().list_models(sort=False, limit=limit)
            return
        ranked = sorted(self._finished, key=lambda pair: pair[1], reverse=True)
        yield from (model for model, _ in ranked[:limit])
