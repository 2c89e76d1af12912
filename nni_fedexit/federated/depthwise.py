"""S5 client training mode ``depthwise``: every client's data reaches every stage, within its branch's memory.

In the patent's mode (``client_training: branch``) a client given branch model d trains stages
1..d only, so under label skew the deep stages are trained by the few clients that drew a deep
branch, and forget the classes those clients lack. A branch's depth stands for what the device
can hold in memory while it trains, and most of that is the activations autograd saves for
backward. Depth-wise training (after FeDepth, Zhang et al. 2023) keeps that bound and trains the
whole model: first the client's branch (stem, stages 1..d, exits 1..d), then the deeper stages in
consecutive *segments*, each trained on the client's data with the stages before it frozen and
run without gradients (no activation of theirs is kept). A segment holds as many stages as fit
in the bytes the branch saved, so no segment's backward holds more than the branch's; a stage
that alone saves more is trained in micro-batches (its gradient accumulated over parts of the
batch), which BatchNorm sees as smaller batches.

Bytes saved for backward are counted, not estimated: :func:`saved_bytes` records every tensor
autograd packs (``torch.autograd.graph.saved_tensors_hooks``), once per storage, leaving out the
parameters (they are in memory anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from nni_fedexit.exits import BranchModel, MultiExitNetwork, multi_exit_loss

__all__ = ["CLIENT_TRAINING", "SEGMENT_DATA", "Segment", "depthwise_segments", "saved_bytes", "segment_schedule",
           "training_step_bytes"]

#: the values of ``federated.client_training``
CLIENT_TRAINING = ("branch", "depthwise")
#: the values of ``federated.segment_data``: each segment on all of a client's data, or on a share
SEGMENT_DATA = ("all", "split")


def saved_bytes(fn: Callable[..., Any], *args: Any, exclude: Sequence[torch.Tensor] = ()) -> tuple[int, Any]:
    """``(bytes autograd saved for backward while fn(*args) ran, its output)``.

    Each storage counts once (a tensor saved by two operations is one tensor in memory); the
    storages of ``exclude`` (the parameters) are left out.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


@dataclass(frozen=True)
class Segment:
    """Stages ``first..last`` (1-based) and their exits, trained together.

    ``saved``: the bytes a training step saves for backward; ``micro_batches``: how many parts each
    batch is cut into (gradients accumulated over them) to keep ``saved`` within the budget.
    """

    first: int
    last: int
    saved: int
    micro_batches: int = 1


#: ``cost(first, last, batch)``: bytes one training step of stages first..last on ``batch`` images saves
Cost = Callable[[int, int, int], int]


def segment_schedule(cost: Cost, num_stages: int, depth: int, batch_size: int) -> list[Segment]:
    """The segments a client with branch ``depth`` trains in one local pass, in order.

    The first is the branch itself (``cost(1, d, b)``: stem, stages and exits 1..d). Then the
    deeper stages, packed greedily into consecutive segments that save at most what the branch
    saves on a batch of ``batch_size``. A stage that alone saves more is trained on its own in
    micro-batches (the fewest parts of a batch whose largest fits; the gradient of the batch is
    accumulated over them, as SGD needs); one that does not fit even one image at a time is left
    out (clients with deeper branches train it).
    """
    if not 1 <= depth <= num_stages:
        raise ValueError(f"branch depth must be in 1..{num_stages}, got {depth}")
    budget = cost(1, depth, batch_size)
    out = [Segment(1, depth, budget)]
    first = depth + 1
    while first <= num_stages:
        last = first
        if cost(first, first, batch_size) <= budget:
            while last < num_stages and cost(first, last + 1, batch_size) <= budget:
                last += 1
            out.append(Segment(first, last, cost(first, last, batch_size)))
        else:
            for parts in range(2, batch_size + 1):
                saved = cost(first, first, -(-batch_size // parts))
                if saved <= budget:
                    out.append(Segment(first, first, saved, parts))
                    break
        first = last + 1
    return out


def training_step_bytes(model: MultiExitNetwork, example: torch.Tensor) -> Cost:
    """``cost(first, last, batch)``: the bytes one training step of ``model.segment(first, last)``
    on the first ``batch`` images of ``example`` saves for backward (forward and the multi-exit
    loss), measured once each. The model's weights, BatchNorm statistics and train/eval mode are
    left as they were."""
    params = list(model.parameters())
    measured: dict[tuple[int, int, int], int] = {}

    def step(segment: BranchModel, batch: int) -> torch.Tensor:
        labels = torch.zeros(batch, dtype=torch.long, device=example.device)
        return multi_exit_loss(segment(example[:batch]), labels, segment.loss_weights)

    def cost(first: int, last: int, batch: int) -> int:
        if (first, last, batch) not in measured:
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            was_training = model.training
            segment = model.segment(first, last).train()
            try:
                measured[first, last, batch], _ = saved_bytes(step, segment, batch, exclude=params)
            finally:
                model.train(was_training)
                model.load_state_dict(buffers, strict=False)
        return measured[first, last, batch]

    return cost


def depthwise_segments(model: MultiExitNetwork, depth: int, example: torch.Tensor) -> list[Segment]:
    """The segment schedule of a client with branch ``depth`` of ``model``, for batches shaped like
    ``example`` (a full batch of the client's training)."""
    return segment_schedule(training_step_bytes(model, example), model.num_exits, depth, example.shape[0])
