"""Multiply-accumulates of a forward pass, counted by ``torch.utils.flop_counter``.

One counter for the space (what a stage candidate costs, without building a network) and the
exits (what each exit of a built network costs), so the search's compute cost and the
evaluation's exit costs are the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_macs"]


@torch.no_grad()
def forward_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(multiply-accumulates, output) of one forward of ``module`` on ``x`` (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        y = module(x)
    return counter.get_total_flops() // 2, y
