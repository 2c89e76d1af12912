"""S4: what leaving at each exit costs: parameters and MACs of the path to it, and the expected
MACs of early-exit inference, counted on a built network or from a block-pool space's own counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from nni_fedexit.exits.network import MultiExitNetwork, make_exit
from nni_fedexit.macs import forward_macs

__all__ = ['ExitCost', 'exit_costs', 'exit_path_macs', 'expected_exit_macs']



@dataclass
class ExitCost:
    """Cost of leaving at one exit (MACs for one input image)."""

    exit: int
    #: parameters of branch model i (stem + stages 1..i + exit i)
    params: int
    #: MACs of branch model i alone
    macs: int
    #: MACs of early-exit inference that stops here: stem + stages 1..i + exits 1..i
    early_exit_macs: int


@torch.no_grad()
def exit_costs(model: MultiExitNetwork, example: torch.Tensor) -> list[ExitCost]:
    """Parameters and MACs of the path to every exit, for one image shaped like ``example``."""
    was_training = model.training
    model.eval()
    try:
        x = example[:1]
        stem_macs, x = forward_macs(model.stem, x)
        path_macs, exits_so_far, costs = stem_macs, 0, []
        for i, (stage, exit_) in enumerate(zip(model.stages, model.exits), start=1):
            stage_macs, x = forward_macs(stage, x)
            exit_macs, _ = forward_macs(exit_, x)
            path_macs += stage_macs
            exits_so_far += exit_macs
            params = sum(p.numel() for p in model.branch(i).parameters())
            costs.append(ExitCost(i, params, path_macs + exit_macs, path_macs + exits_so_far))
    finally:
        model.train(was_training)
    return costs


def exit_path_macs(space: Any, sample: Mapping[str, Any], head: str = "conv", head_width: int | None = None) -> list[int]:
    """MACs of early-exit inference that stops at each exit (:attr:`ExitCost.early_exit_macs`), for
    the multi-exit network of ``sample``, from the costs a block-pool space counts: nothing is built
    but the exit heads (once per shape)."""
    stage_macs = space.stage_path_macs(sample)  # counts the space's MACs on first use
    path = space.stem_macs
    out, exits_so_far = [], 0
    for macs, shape in zip(stage_macs, space.stage_shapes):
        path += macs
        exits_so_far += _exit_head_macs(shape, space.spec.num_classes, head, head_width)
        out.append(path + exits_so_far)
    return out


_EXIT_HEAD_MACS: dict[tuple, int] = {}


def _exit_head_macs(shape: tuple[int, int, int], num_classes: int, head: str, head_width: int | None) -> int:
    key = (shape, num_classes, head, head_width)
    if key not in _EXIT_HEAD_MACS:
        exit_ = make_exit(shape[0], num_classes, head, head_width).eval()
        _EXIT_HEAD_MACS[key], _ = forward_macs(exit_, torch.zeros(1, *shape))
    return _EXIT_HEAD_MACS[key]


def expected_exit_macs(
    space: Any, sample: Mapping[str, Any], exit_shares: Sequence[float], head: str = "conv", head_width: int | None = None,
) -> float:
    """The mean MACs per image of early-exit inference when ``exit_shares[i]`` of the inputs leave at
    exit i+1: ``sum_i share_i * early_exit_macs_i``. The shares are what calibration measures
    (``evaluation.json``: ``validation.exit_share``); before training they are an assumption the
    user states."""
    costs = exit_path_macs(space, sample, head, head_width)
    shares = [float(q) for q in exit_shares]
    if len(shares) != len(costs) or any(q < 0 or not math.isfinite(q) for q in shares) or sum(shares) <= 0:
        raise ValueError(f"exit_shares: need {len(costs)} non-negative shares (one per exit), got {list(exit_shares)}")
    total = sum(shares)
    return sum(q / total * c for q, c in zip(shares, costs))
