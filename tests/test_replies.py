"""The checks of a Flower training reply (nni_fedexit/federated/backends/flower/replies.py).

A reply is untrusted: every refusal is checked for its reason (the exact message the round
engine logs and records with the node id) and, where that is the rule, for happening before
any array is decoded. Replies are built with Flower's own ArrayRecord / MetricRecord /
RecordDict, as a node's ClientApp builds them; the branch is planted by hand (a 2x3 float32
weight, a float32 bias of 3, a BatchNorm-like int64 counter of shape ()).
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="flwr cannot be imported: `make install` (pip install -e '.[flower]')")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from nni_fedexit.federated.backends.flower.replies import read_reply  # noqa: E402
from nni_fedexit.federated.errors import UpdateRejected  # noqa: E402

#: the branch a reply must fit: key -> (shape, dtype), as the ServerApp builds it from its model
SPEC = {"layer.weight": ((2, 3), "float32"), "layer.bias": ((3,), "float32"), "bn.num_batches_tracked": ((), "int64")}
WEIGHT = np.array([[0.25, -0.5, 1.0], [2.0, -4.0, 8.5]], dtype=np.float32)
BIAS = np.array([0.5, -1.25, 2.0], dtype=np.float32)
COUNT = np.array(7, dtype=np.int64)
#: bytes numpy's own npy header adds to a small array (version 1.0: a 128-byte aligned header)
NPY_HEADER = 128


def npy(value: np.ndarray) -> bytes:
    """``value`` as the bytes of an .npy file (what Flower's Array carries for a numpy array)."""
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def raw(data: bytes, shape: tuple[int, ...] = (2, 3), dtype: str = "float32", stype: str = "numpy.ndarray") -> Array:
    """An Array declaring ``dtype`` / ``shape`` / ``stype`` and carrying ``data``, whatever it holds."""
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def honest_arrays() -> dict[str, Array]:
    return {"layer.weight": Array(WEIGHT), "layer.bias": Array(BIAS), "bn.num_batches_tracked": Array(COUNT)}


def reply(arrays: dict[str, Array] | None = None, metrics: dict | None = None, **replace: Array) -> RecordDict:
    """A reply as a ClientApp sends it: the honest branch (entries replaced by ``replace``, whose
    names spell a key's dots as ``__``) and ``{"num-examples": 12, "train-loss": 0.375}`` unless
    other metrics are given."""
    arrays = dict(honest_arrays() if arrays is None else arrays)
    arrays.update({k.replace("__", "."): v for k, v in replace.items()})
    return RecordDict({"arrays": ArrayRecord(arrays),
                       "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.375} if metrics is None else metrics)})


def refusal(content: RecordDict) -> str:
    """The reason ``read_reply`` gives for refusing ``content`` (it must refuse it)."""
    with pytest.raises(UpdateRejected) as caught:
        read_reply(content, SPEC)
    return str(caught.value)


# ---- what is accepted ------------------------------------------------------------------------------


def test_an_honest_reply_is_decoded_exactly_with_its_weight_and_loss():
    """Every array comes back as a tensor of the branch's dtype with the planted values; the
    weight and loss are the reply's metrics as floats."""
    update, weight, loss = read_reply(reply(), SPEC)
    assert sorted(update) == sorted(SPEC)
    assert update["layer.weight"].dtype == torch.float32 and update["layer.weight"].shape == (2, 3)
    assert update["layer.weight"].tolist() == [[0.25, -0.5, 1.0], [2.0, -4.0, 8.5]]
    assert update["layer.bias"].dtype == torch.float32 and update["layer.bias"].tolist() == [0.5, -1.25, 2.0]
    assert update["bn.num_batches_tracked"].dtype == torch.int64 and update["bn.num_batches_tracked"].shape == ()
    assert update["bn.num_batches_tracked"].item() == 7
    assert (weight, loss) == (12.0, 0.375) and type(weight) is float and type(loss) is float


def test_a_reply_without_a_train_loss_has_loss_zero():
    """``train-loss`` is optional (0.0); ``num-examples`` may be a float."""
    _, weight, loss = read_reply(reply(metrics={"num-examples": 2.5}), SPEC)
    assert (weight, loss) == (2.5, 0.0)


def test_the_byte_bound_lets_through_exactly_the_shape_plus_4096_header_bytes():
    """The bound is the shape's bytes plus 4096: a 2x3 float32 needs 2*3*4 = 24 bytes, so
    24 + 4096 = 4120 bytes pass (numpy ignores bytes after the array) and decode to the planted
    values; a () int64 needs 1*8 = 8, so 8 + 4096 = 4104 pass."""
    weight = npy(WEIGHT) + bytes(24 + 4096 - (NPY_HEADER + 24))
    count = npy(COUNT) + bytes(8 + 4096 - (NPY_HEADER + 8))
    assert len(weight) == 4120 and len(count) == 4104
    update, _, _ = read_reply(reply(layer__weight=raw(weight), bn__num_batches_tracked=raw(count, (), "int64")), SPEC)
    assert update["layer.weight"].tolist() == WEIGHT.tolist() and update["bn.num_batches_tracked"].item() == 7


# ---- refused before decoding: the records, keys, serialisation and declarations ---------------------


@pytest.mark.parametrize("content", [
    RecordDict({"metrics": MetricRecord({"num-examples": 12})}),
    RecordDict({"arrays": ArrayRecord(honest_arrays())}),
    RecordDict({"weights": ArrayRecord(honest_arrays()), "metrics": MetricRecord({"num-examples": 12})}),
    RecordDict({"arrays": ArrayRecord(honest_arrays()), "metrics": ConfigRecord({"num-examples": 12})}),
    RecordDict({}),
], ids=["no arrays", "no metrics", "arrays under another name", "metrics as a ConfigRecord", "empty"])
def test_a_reply_without_its_arrays_or_metrics_record_is_refused_saying_so(content):
    """Both records must be there, under their names and of their types."""
    assert refusal(content) == "the reply has no 'arrays' ArrayRecord or no 'metrics' MetricRecord"


@pytest.mark.parametrize("metrics, reason", [
    ({"train-loss": 0.1}, "its metrics have no 'num-examples'"),
    ({}, "its metrics have no 'num-examples'"),
    ({"num-examples": [12, 12]}, "its metric 'num-examples' is a list, not a number"),
    ({"num-examples": 12, "train-loss": [0.1, 0.2]}, "its metric 'train-loss' is a list, not a number"),
], ids=["no num-examples", "no metrics at all", "num-examples a list", "train-loss a list"])
def test_missing_or_non_numeric_metrics_are_refused_naming_the_metric(metrics, reason):
    """A weight must be given and be a number; a loss, when given, must be a number (a
    MetricRecord holds only numbers and lists of numbers)."""
    assert refusal(reply(metrics=metrics)) == reason


def test_more_arrays_than_the_branch_holds_are_refused_by_their_count():
    """One array more than the branch's 3 is refused by the count, before any key is looked at
    (the extra keys here are not entries of the branch either)."""
    arrays = honest_arrays() | {"junk.0": Array(np.zeros(1, np.float32))}
    assert refusal(reply(arrays)) == "it holds 4 arrays, its branch only 3"
    arrays |= {f"junk.{i}": Array(np.zeros(1, np.float32)) for i in range(1, 1000)}
    assert refusal(reply(arrays)) == "it holds 1003 arrays, its branch only 3"


def test_a_key_outside_the_branch_is_refused_by_name():
    """As many arrays as the branch, one of them under a key the branch does not hold."""
    arrays = honest_arrays()
    arrays["not.in.the.model"] = arrays.pop("layer.bias")
    assert refusal(reply(arrays)) == "it holds 'not.in.the.model', which is not an entry of its branch"


def test_a_pickle_is_refused_by_its_serialisation_and_never_unpickled():
    """Any serialisation other than numpy's is refused by name, whatever the bytes are (a real
    pickle of the planted weight here; Flower could not decode it as numpy anyway)."""
    data = pickle.dumps(WEIGHT)
    assert refusal(reply(layer__weight=raw(data, stype="pickle"))) == \
        "'layer.weight' is serialised as 'pickle', not 'numpy.ndarray'"
    assert refusal(reply(layer__weight=raw(b"\x80\x04 not even a pickle", stype="torch.Tensor"))) == \
        "'layer.weight' is serialised as 'torch.Tensor', not 'numpy.ndarray'"


@pytest.mark.parametrize("declared, reason", [
    (("float64", (2, 3)), "'layer.weight' is declared float64 (2, 3), the global model has float32 (2, 3)"),
    (("float32", (3, 2)), "'layer.weight' is declared float32 (3, 2), the global model has float32 (2, 3)"),
    (("float32", (6,)), "'layer.weight' is declared float32 (6,), the global model has float32 (2, 3)"),
    (("int32", (2, 3)), "'layer.weight' is declared int32 (2, 3), the global model has float32 (2, 3)"),
], ids=["dtype", "shape", "flattened", "same size, other dtype"])
def test_a_declared_dtype_or_shape_other_than_the_branchs_is_refused_before_decoding(declared, reason):
    """The declaration is checked against the global model, even when the bytes are an honest
    array (they are never decoded): a wrong dtype with the right shape, a wrong shape with the
    right dtype."""
    dtype, shape = declared
    assert refusal(reply(layer__weight=raw(npy(WEIGHT), shape, dtype))) == reason


# ---- the byte bound: refused before decoding, by that check ----------------------------------------


def test_one_byte_over_the_bound_is_refused_with_its_byte_count():
    """24 + 4096 + 1 = 4121 bytes for a 2x3 float32, and 8 + 4096 + 1 = 4105 for a () int64,
    are refused, with the byte count and what the shape needs; the bytes are an honest npy
    array followed by zeros, which numpy would decode to the planted values."""
    weight = npy(WEIGHT) + bytes(4121 - (NPY_HEADER + 24))
    assert np.array_equal(np.load(io.BytesIO(weight), allow_pickle=False), WEIGHT)  # it would decode fine
    assert refusal(reply(layer__weight=raw(weight))) == "'layer.weight' carries 4121 bytes, more than its shape needs (24)"
    count = npy(COUNT) + bytes(4105 - (NPY_HEADER + 8))
    assert refusal(reply(bn__num_batches_tracked=raw(count, (), "int64"))) == \
        "'bn.num_batches_tracked' carries 4105 bytes, more than its shape needs (8)"


def test_an_oversized_array_that_would_decode_fine_is_refused_by_the_bound_not_after_decoding():
    """The bytes are a real npy array of 2000x3 float32 (24,128 bytes) under a (2, 3) declaration:
    numpy would decode it, and the check after decoding would refuse its shape; the byte bound
    refuses it first, with its own reason."""
    big = npy(np.ones((2000, 3), np.float32))
    assert len(big) == NPY_HEADER + 2000 * 3 * 4 == 24128
    assert np.load(io.BytesIO(big), allow_pickle=False).shape == (2000, 3)  # it would decode fine
    assert refusal(reply(layer__weight=raw(big))) == "'layer.weight' carries 24128 bytes, more than its shape needs (24)"


def test_an_oversized_payload_that_would_not_even_decode_is_refused_by_the_bound():
    """One MB of zeros is not an npy file: decoding it raises numpy's ValueError (not a refusal),
    so a refusal with the byte reason shows that it was never decoded. The same zeros within the
    bound are decoded, and numpy's error is what comes out."""
    zeros = bytes(1_000_000)
    assert refusal(reply(layer__weight=raw(zeros))) == \
        "'layer.weight' carries 1000000 bytes, more than its shape needs (24)"
    with pytest.raises(ValueError) as within_bound:
        read_reply(reply(layer__weight=raw(bytes(4120))), SPEC)
    assert not isinstance(within_bound.value, UpdateRejected)  # numpy decoded it and gave up


def test_every_array_is_bounded_before_any_is_decoded():
    """The first array is garbage within its bound (decoding it would raise numpy's error), the
    last one is over the bound: the reply is refused by the bound, so nothing was decoded."""
    arrays = {"layer.weight": raw(b"\x93NUMPY garbage"), "layer.bias": Array(BIAS),
              "bn.num_batches_tracked": raw(bytes(5000), (), "int64")}
    assert refusal(reply(arrays)) == "'bn.num_batches_tracked' carries 5000 bytes, more than its shape needs (8)"


# ---- checked again after decoding -------------------------------------------------------------------


@pytest.mark.parametrize("carried, reason", [
    (np.arange(6, dtype=np.int32).reshape(2, 3), "'layer.weight' decodes to int32 (2, 3), not the float32 (2, 3) it declared"),
    (WEIGHT.reshape(3, 2), "'layer.weight' decodes to float32 (3, 2), not the float32 (2, 3) it declared"),
    (WEIGHT.astype(np.float16), "'layer.weight' decodes to float16 (2, 3), not the float32 (2, 3) it declared"),
], ids=["other dtype, same shape", "other shape, same dtype", "smaller dtype"])
def test_bytes_that_decode_to_another_dtype_or_shape_than_declared_are_refused(carried, reason):
    """The declaration is right and the bytes are within the bound, but the npy header inside
    them says another dtype or shape: refused after decoding, naming both."""
    assert refusal(reply(layer__weight=raw(npy(carried)))) == reason
