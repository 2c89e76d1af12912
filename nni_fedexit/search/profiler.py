"""S3: p_h, the parameter count of a sampled network, for any NNI model space.

Apart from the rewards (:mod:`nni_fedexit.search.reward`, plain arithmetic) because counting
needs NNI's model spaces and torch.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch.nn as nn

from nni_fedexit.nni_compat import import_nni

import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.profiler import Profiler  # noqa: E402
from nni.nas.space import RawFormatModelSpace, SimplifiedModelSpace  # noqa: E402

__all__ = ["ParamsProfiler"]

_logger = logging.getLogger(__name__)


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
