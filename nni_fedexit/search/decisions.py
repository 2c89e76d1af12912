"""S3: how each kind of NNI label becomes steps of the LSTM controller.

The controller takes one softmax step per *decision step*; a :class:`Decision` says how many steps
a label takes, how many options each step has, and how the steps' actions turn into the label's
value (and back, when a reward arrives with the value only):

- :class:`Choice`: ``Categorical`` (``nni.choice``, ``LayerChoice``, ``randint``): one step over
  the values.
- :class:`Subset`: ``CategoricalMultiple`` (``InputChoice``). With ``n_chosen = k``, k steps over
  the candidates, each masked to the candidates not taken yet (how ENAS picks a cell's inputs);
  the value is the list in draw order. With ``n_chosen = None``, one include/skip step per
  candidate (ENAS's skip connections).
- :class:`Bins`: ``Numerical`` (``nni.uniform``, ``loguniform``, ``normal``, ``lognormal`` and
  their quantised forms). A quantised label with at most ``bins`` grid points is one step over the
  points. Otherwise it is one step over ``bins`` equal-probability bins of the label's own
  distribution (its quantiles); the value is drawn from the distribution restricted to the bin
  (the inverse CDF of a uniform draw inside the bin's quantile range) and then rounded and clipped
  as NNI defines it (``Numerical.qclip``: ``round(x / q) * q``, clipped to the range). A uniform
  policy therefore samples exactly the declared distribution, and the controller learns which
  bins pay. A value maps back to the bin its CDF falls in.

Constraints (``ExpressionConstraint`` and every other ``MutableAnnotation``) take no step: the
strategy checks a sample against them and resamples (see ``reward_for_invalid``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # imported where used: the nnictl tuner parses a search space before torch and nni.mutable load
    import torch
    from nni.mutable import Numerical

__all__ = ["Decision", "Choice", "Subset", "Bins", "DEFAULT_BINS", "check_bins", "decisions_of_space", "LABEL_KINDS"]

#: bins of a continuous label unless the strategy's or tuner's ``numerical_bins`` says otherwise
DEFAULT_BINS = 8
#: the label kinds a decision exists for, by NNI class name (the docs' table lists them per mode)
LABEL_KINDS = ("Categorical", "CategoricalMultiple", "Numerical")


def check_bins(bins: Any, key: str = "numerical_bins") -> int:
    """``bins`` if it is an integer >= 2 (a setting's value), else an error naming ``key``."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"{key} must be an integer >= 2, got {bins!r}")
    return bins


class Decision:
    """One label's part of the controller's rollout (see the module docstring)."""

    label: str
    #: options of each step
    sizes: list[int]
    #: the steps are drawn without replacement (a step cannot repeat an earlier step's option)
    exclusive: bool = False
    #: ``(label, index)``: the label is decided only when that Choice label took that index (a
    #: classic search space's nested choice); None: always decided
    parent: tuple[str, int] | None = None
    #: where the value goes in a classic search space's parameters (NNI's ``ParameterSpec.key``:
    #: names, and option indices of nested choices); None: under the label itself
    key: tuple | None = None
    #: a nested choice of a classic search space: its value goes out as ``{"_name": value}``
    nested: bool = False

    def value(self, actions: Sequence[int], generator: torch.Generator | None) -> Any:
        """The label's value for these actions (``generator`` None: the deterministic middle of a bin)."""
        raise NotImplementedError

    def actions(self, value: Any) -> list[int]:
        """The actions that give ``value``; ValueError if the value is not one this label can take."""
        raise NotImplementedError

    def first(self) -> Any:
        """The value of every step's first option (the baseline sample's)."""
        return self.value([0] * len(self.sizes) if not self.exclusive else list(range(len(self.sizes))), None)

    def uniform_actions(self, generator: torch.Generator) -> list[int]:
        import torch

        if self.exclusive:
            return [int(i) for i in torch.randperm(self.sizes[0], generator=generator)[: len(self.sizes)]]
        return [int(torch.randint(n, (1,), generator=generator)) for n in self.sizes]

    def identity(self) -> list[str]:
        """What a saved controller state must match to load into this label."""
        raise NotImplementedError

    def option_names(self) -> list[tuple[str, list[str]]]:
        """``(name, option names)`` of every step, for the probabilities a person reads."""
        raise NotImplementedError


def _index(values: Sequence[Any], value: Any) -> int:
    for i, v in enumerate(values):
        if type(v) is type(value) and v == value:
            return i
    for i, v in enumerate(values):  # 2 == 2.0 after a JSON round trip, but True is not 1
        if v == value and isinstance(v, bool) == isinstance(value, bool):
            return i
    raise ValueError(f"{value!r} is not one of {list(values)}")


class Choice(Decision):
    def __init__(self, label: str, values: Sequence[Any]):
        if not values:
            raise ValueError(f"label {label!r} has no values to choose from")
        self.label, self.values = str(label), list(values)
        self.sizes = [len(self.values)]

    def value(self, actions: Sequence[int], generator: torch.Generator | None) -> Any:
        return self.values[actions[0]]

    def actions(self, value: Any) -> list[int]:
        return [_index(self.values, value)]

    def identity(self) -> list[str]:
        return [repr(v) for v in self.values]

    def option_names(self) -> list[tuple[str, list[str]]]:
        return [(self.label, [str(v) for v in self.values])]


class Subset(Decision):
    def __init__(self, label: str, values: Sequence[Any], n_chosen: int | None):
        self.label, self.values, self.n_chosen = str(label), list(values), n_chosen
        if n_chosen is None:
            self.sizes, self.exclusive = [2] * len(self.values), False
        else:
            if not 0 <= n_chosen <= len(self.values):
                raise ValueError(f"label {label!r}: n_chosen {n_chosen} for {len(self.values)} candidates")
            self.sizes, self.exclusive = [len(self.values)] * n_chosen, True

    def value(self, actions: Sequence[int], generator: torch.Generator | None) -> list[Any]:
        if self.n_chosen is None:  # action 1: include this candidate
            return [v for v, a in zip(self.values, actions) if a == 1]
        return [self.values[a] for a in actions]

    def actions(self, value: Any) -> list[int]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list of candidates")
        chosen = [_index(self.values, v) for v in value]
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"{list(value)} repeats a candidate")
        if self.n_chosen is None:
            return [int(i in chosen) for i in range(len(self.values))]
        if len(chosen) != self.n_chosen:
            raise ValueError(f"{list(value)} does not have n_chosen={self.n_chosen} candidates")
        return chosen

    def first(self) -> list[Any]:
        return list(self.values[: self.n_chosen if self.n_chosen is not None else 1])

    def identity(self) -> list[str]:
        return [f"n_chosen={self.n_chosen}"] + [repr(v) for v in self.values]

    def option_names(self) -> list[tuple[str, list[str]]]:
        if self.n_chosen is None:
            return [(f"{self.label}/{v}", ["skip", "include"]) for v in self.values]
        return [(f"{self.label}#{j + 1}", [str(v) for v in self.values]) for j in range(self.n_chosen)]


def quantised_grid(numerical: Numerical, limit: int) -> list[float] | None:
    """Every value a quantised, bounded Numerical can take (NNI's qclip of each multiple of q),
    if there are at most ``limit``; None otherwise."""
    q, low, high = numerical.quantize, numerical.low, numerical.high
    if low == high and math.isfinite(low):  # a range of one value (NNI allows it)
        return [_plain(numerical.qclip(low))]
    if q is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    first, last = math.floor(low / q), math.ceil(high / q)
    if last - first + 1 > 4 * limit:
        return None
    grid = sorted({_plain(numerical.qclip(k * q)) for k in range(first, last + 1)})
    return grid if len(grid) <= limit else None


def _plain(x: Any) -> float | int:
    x = x.item() if hasattr(x, "item") else x
    return x if isinstance(x, int) else float(x)


class Bins(Decision):
    #: a draw inside a bin stays this far (in probability) from the bin's edges: ppf(0) of a normal is -inf
    EDGE = 1e-9

    def __init__(self, label: str, numerical: Numerical, bins: int = DEFAULT_BINS):
        self.label, self.numerical, self.bins = str(label), numerical, check_bins(bins)
        self.grid = quantised_grid(numerical, bins)
        self.sizes = [len(self.grid) if self.grid is not None else bins]

    def value(self, actions: Sequence[int], generator: torch.Generator | None) -> float | int:
        import torch

        a = actions[0]
        if self.grid is not None:
            return self.grid[a]
        r = 0.5 if generator is None else float(torch.rand((), generator=generator, dtype=torch.float64))
        u = min(max((a + r) / self.bins, self.EDGE), 1.0 - self.EDGE)
        return _plain(self.numerical.qclip(float(self.numerical.distribution.ppf(u))))

    def actions(self, value: Any) -> list[int]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        low, high = self.numerical.low, self.numerical.high
        if self.grid is None and not low - 1e-9 * max(1.0, abs(low)) <= value <= high + 1e-9 * max(1.0, abs(high)):
            raise ValueError(f"{value!r} is outside {self.numerical!r}")  # (qlognormal may give 0: pdf 0, but NNI's value)
        if self.grid is not None:
            i = min(range(len(self.grid)), key=lambda i: abs(self.grid[i] - value))
            if abs(self.grid[i] - value) > 1e-9 * max(1.0, abs(value)):
                raise ValueError(f"{value!r} is not one of the values {self.grid} of {self.numerical!r}")
            return [i]
        return [min(self.bins - 1, max(0, int(float(self.numerical.distribution.cdf(value)) * self.bins)))]

    def first(self) -> float | int:
        return _plain(self.numerical.qclip(float(self.numerical.distribution.median())))

    def identity(self) -> list[str]:
        return [repr(self.numerical), f"bins={self.sizes[0]}"]

    def option_names(self) -> list[tuple[str, list[str]]]:
        if self.grid is not None:
            return [(self.label, [str(v) for v in self.grid])]
        ppf = self.numerical.distribution.ppf
        edges = [float(ppf(i / self.bins)) for i in range(self.bins + 1)]
        return [(self.label, [f"[{lo:.4g}, {hi:.4g})" for lo, hi in zip(edges, edges[1:])])]


def decisions_of_space(space: Any, numerical_bins: int = DEFAULT_BINS, *,
                       allow: Sequence[str] = LABEL_KINDS, who: str = "SizeAwarePolicyGradient") -> dict[str, Decision]:
    """One decision per label of an NNI space's ``simplify()``, in its order; constraints take none.

    ``allow`` names the label kinds the caller can run (the shared mode's supernet cannot take a
    continuous value): any other kind is an error naming the label, its kind and what to do.
    """
    from nni_fedexit.nni_compat import import_nni

    import_nni()
    from nni.mutable import Categorical, CategoricalMultiple, MutableAnnotation, Numerical

    decisions: dict[str, Decision] = {}
    for label, mutable in space.simplify().items():
        kind = type(mutable).__name__
        if isinstance(mutable, MutableAnnotation):
            continue  # a constraint: checked on every sample, not decided
        if isinstance(mutable, CategoricalMultiple) and "CategoricalMultiple" in allow:
            decisions[label] = Subset(label, mutable.values, mutable.n_chosen)
        elif isinstance(mutable, Categorical) and "Categorical" in allow:
            decisions[label] = Choice(label, mutable.values)
        elif isinstance(mutable, Numerical) and "Numerical" in allow:
            decisions[label] = Bins(label, mutable, numerical_bins)
        else:
            known = ", ".join(allow)
            hint = (" The shared (one-shot) mode's supernet takes categorical choices only: use mode='trials' "
                    "for continuous labels, or make the label an nni.choice of a few values."
                    if isinstance(mutable, Numerical) else "")
            raise ValueError(f"{who} cannot search label {label!r}: it is {kind}, and this mode supports "
                             f"{known}.{hint}")
    if not any(d.sizes for d in decisions.values()):
        raise ValueError("the model space has no choices to search")
    return decisions
