"""What NNI's web UI shows of a trial: its architecture in plain words (both search modes, and the
federated stage's one trial).

:class:`LabelledModelSpace` is a trial's model with its choices at the top level of its
parameters; :class:`FixedArchitecture` submits one given architecture as one trial.
"""

from __future__ import annotations

from typing import Any, Mapping

from nni_fedexit.nni_compat import import_nni
from nni_fedexit.space.architecture import architecture_label

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.space import SimplifiedModelSpace  # noqa: E402
from nni.nas.strategy.base import Strategy  # noqa: E402

__all__ = ["FixedArchitecture", "LabelledModelSpace"]


class LabelledModelSpace(SimplifiedModelSpace):
    """A trial's model as NNI sends it to the trial, with its choices also in plain words.

    NNI shows a NAS trial's parameters as the serialised model (symbols, arguments, evaluator).
    This adds ``architecture`` (``stage1=resnet34 stage2=...``) and every choice under its label at
    the top level, where the web UI looks for the search space's keys (an InputChoice's inputs
    joined by commas): the trial table and the hyper-parameter chart then show which architecture
    each trial evaluated.
    """

    _OWN_KEYS = ("status", "model_symbol", "model_args", "model_kwargs", "evaluator", "sample", "metrics", "mutables")

    #: shown instead of the architecture (a trial whose network is not what it evaluates: the shared search's)
    shown: dict[str, Any] | None = None

    @classmethod
    def of(cls, model: SimplifiedModelSpace, shown: Mapping[str, Any] | None = None) -> SimplifiedModelSpace:
        """``model`` (frozen) as a LabelledModelSpace; other model formats are returned as they are.
        ``shown``: the parameters the web UI lists instead of the architecture's labels."""
        if type(model) is not SimplifiedModelSpace:
            return model
        labelled = cls(model.model, model.mutables, model.evaluator)
        labelled.status, labelled.sample, labelled.metrics = model.status, model.sample, model.metrics
        labelled.shown = None if shown is None else dict(shown)
        return labelled

    def _dump(self) -> dict:
        rv = super()._dump()
        if self.shown is not None:
            rv.update({k: v for k, v in self.shown.items() if k not in self._OWN_KEYS})
        elif self.sample is not None:
            rv["architecture"] = architecture_label(self.sample)
            rv.update({k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in self.sample.items()
                       if k not in self._OWN_KEYS and k != "architecture" and isinstance(v, (str, int, float, bool, list))})
        return rv

    @classmethod
    def _load(cls, **attrs: Any) -> SimplifiedModelSpace:
        return super()._load(**{k: v for k, v in attrs.items() if k in cls._OWN_KEYS})


class FixedArchitecture(Strategy):
    """Submits one given architecture as one trial: the final federated stage of a run, so the
    web UI shows that trial and its per-round curve."""

    def __init__(self, sample: Mapping[str, Any], shown: Mapping[str, Any] | None = None):
        super().__init__()
        self.sample = dict(sample)
        #: the trial's parameters in the web UI, when not the architecture (see LabelledModelSpace)
        self.shown = None if shown is None else dict(shown)

    def extra_repr(self) -> str:
        return repr(self.sample)

    def _run(self) -> None:
        if self.wait_for_resource():
            self.engine.submit_models(LabelledModelSpace.of(self.model_space.freeze(self.sample), self.shown))
        self.engine.wait_models()

    def state_dict(self) -> dict:
        return {"sample": dict(self.sample)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.sample = dict(state_dict.get("sample", self.sample))
