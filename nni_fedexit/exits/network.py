"""S4: the exit-point model: a multi-exit network, its branch models and their loss.

The central server turns the searched network into an exit-point model: the input layer (stem),
the L stages, and a branch classifier (an *exit*) after every stage; the last exit is the output
layer. Branch model i is the stem, stages 1..i and exit i; its parameters and buffers carry
exactly the full model's names, so its state dict is a subset of the full one's and the server
can aggregate branches by name (S5).

What an exit costs is costs.py; early-exit inference, its metrics and the calibration of its
thresholds are calibration.py (the threshold rules: thresholds.py); exporting the branches is
export.py, and the segments a device runs (and their latency) runtime.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EXIT_HEADS", "PREDICTIONS", "BranchModel", "MultiExitNetwork", "make_exit", "multi_exit_loss"]


#: exit head designs: "linear" = global average pool + linear (the ResNet head);
#: "conv" = 3x3 conv + BN + ReLU, then pool + linear (as in Shallow-Deep Networks)
EXIT_HEADS = ("linear", "conv")
#: how an exit predicts: "exit" (its own softmax) or "ensemble" (the mean of the probabilities of
#: every exit up to it: free at inference, since early exit has computed them already)
PREDICTIONS = ("exit", "ensemble")


def make_exit(in_width: int, num_classes: int, head: str, head_width: int | None) -> nn.Sequential:
    if head == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_width, num_classes))
    if head == "conv":
        width = head_width or in_width
        return nn.Sequential(
            nn.Conv2d(in_width, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )
    raise ValueError(f"exit head must be one of {EXIT_HEADS}, got {head!r}")


class MultiExitNetwork(nn.Module):
    """Stem, L stages, and an exit after every stage (claim 1, S4).

    Build it from a frozen architecture of the block-pool space with :meth:`from_architecture`,
    or from any stem and ordered stage modules with their output widths. ``forward`` returns the
    logits of every exit, first to last.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        stage_widths: Sequence[int],
        num_classes: int,
        head: str = "linear",
        head_width: int | None = None,
        loss_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if len(stages) < 1 or len(stages) != len(stage_widths):
            raise ValueError(f"need one output width per stage: {len(stages)} stages, {len(stage_widths)} widths")
        if head not in EXIT_HEADS:
            raise ValueError(f"exit head must be one of {EXIT_HEADS}, got {head!r}")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(make_exit(w, num_classes, head, head_width) for w in stage_widths)
        weights = [1.0] * len(stages) if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != len(stages) or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"loss_weights: need {len(stages)} finite non-negative weights, got {loss_weights}")
        self.loss_weights = tuple(weights)
        self.num_classes = num_classes
        self.head = head
        #: early-exit thresholds (one per exit; the last exit takes every remaining sample)
        self.thresholds: list[float] | None = None
        self.criterion = "max_prob"
        #: "exit" or "ensemble" (see PREDICTIONS): how early-exit inference predicts at each exit
        self.prediction = "exit"
        #: the architecture and space spec of the network it was made from (None for other stems/stages)
        self.arch: dict[str, Any] | None = None
        self.spec: Any = None

    @classmethod
    def from_architecture(
        cls, space: Any, sample: Mapping[str, Any], *, head: str = "linear", head_width: int | None = None,
        loss_weights: Sequence[float] | None = None,
    ) -> "MultiExitNetwork":
        """The exit-point model of one architecture of a :class:`~nni_fedexit.ResNetBlockPoolSpace`."""
        return cls.from_network(space.build(sample), head=head, head_width=head_width, loss_weights=loss_weights)

    @classmethod
    def from_network(
        cls, net: nn.Module, *, head: str = "linear", head_width: int | None = None,
        loss_weights: Sequence[float] | None = None,
    ) -> "MultiExitNetwork":
        """The exit-point model of a network frozen from the block-pool space (NNI's trial model).

        Takes over the network's own stem and stage modules (and weights); its head is replaced
        by the exits.
        """
        for attr in ("stem", "stages", "interface_widths", "spec"):
            if not hasattr(net, attr):
                raise TypeError(f"{type(net).__name__} is not a network of the block-pool space (no {attr!r})")
        model = cls(
            net.stem, list(net.stages.children()), net.interface_widths[1:], net.spec.num_classes,
            head=head, head_width=head_width, loss_weights=loss_weights,
        )
        model.arch = dict(net.arch) if getattr(net, "arch", None) else None
        model.spec = net.spec
        return model

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        outputs = []
        for stage, exit_ in zip(self.stages, self.exits):
            x = stage(x)
            outputs.append(exit_(x))
        return tuple(outputs)

    def branch(self, depth: int, all_exits: bool = False) -> "BranchModel":
        """Branch model ``depth`` (1-based): stem + stages 1..depth + exit ``depth``.

        With ``all_exits`` it also holds exits 1..depth-1 (deep supervision along its path).
        It shares its modules with this network: training it trains them.
        """
        if not 1 <= depth <= self.num_exits:
            raise ValueError(f"branch depth must be in 1..{self.num_exits}, got {depth}")
        held = list(range(1, depth + 1)) if all_exits else [depth]
        return BranchModel(self, depth, held)

    def segment(self, first: int, last: int) -> "BranchModel":
        """Stages ``first..last`` (1-based) and their exits, trained on top of a frozen prefix.

        The stem (when ``first > 1``) and stages ``1..first-1`` run in front of it without
        gradients, so backward keeps no activation of theirs; they are not parameters of the
        segment. ``segment(1, d)`` is ``branch(d, all_exits=True)``.
        """
        if not 1 <= first <= last <= self.num_exits:
            raise ValueError(f"a segment needs 1 <= first <= last <= {self.num_exits}, got {first}..{last}")
        return BranchModel(self, last, list(range(first, last + 1)), first=first)

    def exit_weights(self, exits: Iterable[int]) -> list[float]:
        """lambda_i of the given (1-based) exits."""
        return [self.loss_weights[i - 1] for i in exits]


class BranchModel(nn.Module):
    """A part of a MultiExitNetwork whose parameter and buffer names are the full model's names.

    Stages ``first..depth`` (``stages.<i-1>``) and the exits it holds (``exits.<i-1>``); the stem
    too when ``first`` is 1, so its ``state_dict()`` keys are a subset of the full model's. With
    ``first > 1`` the stem and the earlier stages are a frozen prefix: run without gradients, in
    the segment's train/eval mode, and not registered (not in ``parameters()`` or the state
    dict). ``forward`` returns the logits of the exits it holds, in order.
    """

    def __init__(self, full: MultiExitNetwork, depth: int, exits: Sequence[int], first: int = 1):
        super().__init__()
        if first == 1:
            self.stem = full.stem
        self.stages = nn.ModuleDict(OrderedDict((str(i), full.stages[i]) for i in range(first - 1, depth)))
        self.exits = nn.ModuleDict(OrderedDict((str(i - 1), full.exits[i - 1]) for i in exits))
        #: the frozen prefix (a tuple, so nn.Module does not register its modules)
        self.prefix: tuple[nn.Module, ...] = (full.stem, *list(full.stages)[: first - 1]) if first > 1 else ()
        self.depth = depth
        self.first = first
        self.loss_weights = tuple(full.exit_weights(exits))
        #: the network it is part of (set past nn.Module, which would register it as a child)
        self.full_model: MultiExitNetwork
        object.__setattr__(self, "full_model", full)

    def train(self, mode: bool = True) -> "BranchModel":
        super().train(mode)
        for module in self.prefix:
            module.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.prefix:
            with torch.no_grad():
                for module in self.prefix:
                    x = module(x)
        else:
            x = self.stem(x)
        outputs = []
        for key, stage in self.stages.items():
            x = stage(x)
            if key in self.exits:
                outputs.append(self.exits[key](x))
        return tuple(outputs)


def multi_exit_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i lambda_i * CE(softmax(z_i), y)`` over the exits given (claims 6 and 7)."""
    if len(logits) != len(weights) or not logits:
        raise ValueError(f"need one weight per exit output: {len(logits)} outputs, {len(weights)} weights")
    total = logits[0].new_zeros(())
    for z, w in zip(logits, weights):
        total = total + w * F.cross_entropy(z, target)
    return total
