"""The checks of a Flower training reply, before and after it is decoded.

A reply comes from a node the server does not control, so it is untrusted: its records, keys,
serialisation, declared dtypes and shapes, and byte sizes are checked (and bounded) before any
array is decoded, and each decoded array is checked again. A reply that fails a check raises
:class:`~nni_fedexit.federated.errors.UpdateRejected` saying why; the round engine then leaves
it out, and it costs only its sender.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import RecordDict

from nni_fedexit.federated.errors import UpdateRejected

__all__ = ["NPY_HEADER_BYTES", "read_reply"]

#: bytes an npy header may add to an array's data (numpy writes 128, or a multiple of 64 for long shapes)
NPY_HEADER_BYTES = 4096


def _metric(metrics: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = metrics.get(key, default)
    if value is None:
        raise UpdateRejected(f"its metrics have no {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpdateRejected(f"its metric {key!r} is a {type(value).__name__}, not a number")
    return float(value)


def read_reply(content: RecordDict, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> tuple[dict[str, Any], float, float]:
    """A training reply's ``(update, num-examples, train-loss)``, checked before anything is decoded.

    ``spec`` maps each key the node's branch holds to its shape and dtype. A reply is refused
    (UpdateRejected) when it holds other keys, more arrays than the branch, an array declared
    with another shape, dtype or serialisation than numpy's (pickles are never decoded), or more
    bytes than that shape needs; so decoding a reply never takes more memory than the branch.
    Arrays are decoded by Flower with ``allow_pickle=False`` and checked again after decoding.
    """
    arrays, metrics = content.array_records.get("arrays"), content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        raise UpdateRejected("the reply has no 'arrays' ArrayRecord or no 'metrics' MetricRecord")
    weight, loss = _metric(metrics, "num-examples"), _metric(metrics, "train-loss", 0.0)
    if len(arrays) > len(spec):
        raise UpdateRejected(f"it holds {len(arrays)} arrays, its branch only {len(spec)}")
    for key, array in arrays.items():
        if key not in spec:
            raise UpdateRejected(f"it holds {key!r}, which is not an entry of its branch")
        shape, dtype = spec[key]
        if array.stype != "numpy.ndarray":
            raise UpdateRejected(f"{key!r} is serialised as {array.stype!r}, not 'numpy.ndarray'")
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise UpdateRejected(f"{key!r} is declared {array.dtype} {tuple(array.shape)}, the global model has {dtype} {shape}")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if len(array.data) > need + NPY_HEADER_BYTES:
            raise UpdateRejected(f"{key!r} carries {len(array.data)} bytes, more than its shape needs ({need})")
    update = {}
    for key, array in arrays.items():
        value = array.numpy()
        shape, dtype = spec[key]
        if value.shape != shape or str(value.dtype) != dtype:
            raise UpdateRejected(f"{key!r} decodes to {value.dtype} {value.shape}, not the {dtype} {shape} it declared")
        update[key] = torch.from_numpy(value)
    return update, weight, loss
