"""S3: what a sample costs, for the reward's size term and the report's trade-off plots.

p_h comes from :class:`~nni_fedexit.search.profiler.ParamsProfiler` (any NNI space). MACs and the
expected MACs of early-exit inference come from the space's own counts when it has them
(:class:`~nni_fedexit.ResNetBlockPoolSpace`: ``count_macs``, ``stage_path_macs``): no network is
built. A space without them has no MACs; a MACs target on it is an error that says so.
"""

from __future__ import annotations

from typing import Any, Mapping

from nni_fedexit.exits.costs import expected_exit_macs
from nni_fedexit.search.profiler import ParamsProfiler
from nni_fedexit.search.reward import SizeTarget

__all__ = ["CostModel"]


class CostModel:
    """Every cost of a sample the space can tell: ``params``, ``macs``, ``early_exit_macs``."""

    def __init__(self, profiled: Any, target: SizeTarget | None = None):
        self.profiler = ParamsProfiler(profiled)
        self.target = target or SizeTarget()
        self._cache: dict[tuple, dict[str, float | None]] = {}

    @property
    def space(self) -> Any:
        return self.profiler.space

    def has_macs(self) -> bool:
        return callable(getattr(self.space, "count_macs", None))

    def cost(self, name: str, sample: Mapping[str, Any]) -> float | None:
        """One cost of ``sample``; None where the space cannot count it (params of a non-module space)."""
        if name == "params":
            return self.profiler.profile(sample)
        if not self.has_macs():
            raise ValueError(f"target.cost {name!r}: {type(self.space).__name__} does not count MACs (it has no "
                             "count_macs); use target.cost: params, or a ResNetBlockPoolSpace")
        if name == "macs":
            return int(self.space.count_macs(sample))
        t = self.target
        shares = t.exit_shares or [1.0] * len(self.space.stage_path_macs(sample))
        return float(expected_exit_macs(self.space, sample, shares, t.head, t.head_width))

    def costs(self, sample: Mapping[str, Any]) -> dict[str, float | None]:
        """``{"params", "macs", "early_exit_macs"}`` of ``sample`` (the MACs only where the space counts
        them), counted once per architecture: the shared search asks for every validation batch."""
        key = tuple(sorted((str(k), repr(v)) for k, v in sample.items()))
        if key not in self._cache:
            out: dict[str, float | None] = {"params": self.cost("params", sample)}
            if self.has_macs():
                out["macs"] = self.cost("macs", sample)
                out["early_exit_macs"] = self.cost("early_exit_macs", sample)
            self._cache[key] = out
        return dict(self._cache[key])

    def baseline_sample(self, firsts: Mapping[str, Any]) -> dict[str, Any]:
        """The space's baseline (``baseline_sample()``), else ``firsts`` (every label's first value)."""
        own = getattr(self.space, "baseline_sample", None)
        return dict(own()) if callable(own) else dict(firsts)
