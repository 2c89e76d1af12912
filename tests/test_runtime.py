"""S4 on the device: early-exit inference on exported segments (ONNX Runtime, TorchScript).

Most tests run a *planted* network whose every output is known by hand: the stem doubles the
image, stage 1 halves it, stages 2 and 3 double it, and exit i's linear layer is the identity with
its classes rolled by i - 1. So for an image x (3 channels of 1 x 1 pixels) exit i's logits are
``roll(c_i * x, i - 1)`` with c = (1, 2, 4): deeper exits are surer, and the predicted class tells
the exit. Exporting it to TorchScript takes a fraction of a second; one test exports to ONNX.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from nni_fedexit.exits import MultiExitNetwork, early_exit_predict
from nni_fedexit.exits.runtime import (
    MANIFEST, EarlyExitRuntime, ExportFolderError, LatencySettings, export_early_exit, measure_latency,
)

#: the images' pixels (one per channel): A, B, C, D
IMAGES = [[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.25, 0.0]]
SCALE = [1.0, 2.0, 4.0]  # exit i's logits are SCALE[i - 1] * x, classes rolled by i - 1


class Scale(nn.Module):
    """Multiplies by a constant."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


def planted(num_exits: int = 3, thresholds=(0.7, 0.7), criterion: str = "max_prob",
            prediction: str = "exit") -> MultiExitNetwork:
    """The planted network (see the module's docstring) with its early-exit settings."""
    stages = [Scale(0.5)] + [Scale(2.0) for _ in range(num_exits - 1)]
    model = MultiExitNetwork(Scale(2.0), stages, [3] * num_exits, num_classes=3)
    with torch.no_grad():
        for i, head in enumerate(model.exits):
            head[2].weight.copy_(torch.roll(torch.eye(3), i, dims=0))
            head[2].bias.zero_()
    model.thresholds, model.criterion, model.prediction = list(thresholds), criterion, prediction
    return model.eval()


def images(rows=IMAGES, dtype=np.float32) -> np.ndarray:
    return np.asarray(rows, dtype=dtype).reshape(len(rows), 3, 1, 1)


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def exit_probs(x: list[float], exit_: int) -> list[float]:
    """Exit ``exit_``'s (1-based) probabilities for image x, by hand: softmax of the scaled image,
    classes rolled by exit_ - 1."""
    p = softmax([SCALE[exit_ - 1] * v for v in x])
    k = exit_ - 1
    return [p[(c - k) % 3] for c in range(3)]


def entropy_confidence(p: list[float]) -> float:
    return 1 - -sum(q * math.log(q) for q in p) / math.log(3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The planted network exported once to TorchScript (max_prob, thresholds 0.7, 0.7)."""
    out = tmp_path_factory.mktemp("early_exit") / "export"
    export_early_exit(planted(), out, torch.from_numpy(images()), formats=["torchscript"])
    return out


@pytest.fixture
def edited(folder, tmp_path):
    """A copy of the export whose manifest a test edits: ``edited(change)`` applies change(manifest)."""
    def edit(change):
        copy_ = tmp_path / "copy"
        if copy_.exists():
            shutil.rmtree(copy_)
        shutil.copytree(folder, copy_)
        manifest = json.loads((copy_ / MANIFEST).read_text())
        change(manifest)
        (copy_ / MANIFEST).write_text(json.dumps(manifest))
        return copy_
    return edit


# ---- which exit each image takes, and what it predicts ------------------------------------------


@pytest.mark.parametrize("criterion, thresholds, taken, preds", [
    # max_prob at exits 1, 2: A .787, .965; B .576, .787; C .452, .576; D .391, .452
    ("max_prob", [0.7, 0.7], [1, 2, 3, 3], [0, 1, 2, 0]),
    ("max_prob", [0.5, 0.5], [1, 1, 2, 3], [0, 0, 1, 0]),
    # entropy confidence at exits 1, 2: A .394, .839; B .112, .394; C .030, .112; D .003, .011
    ("entropy", [0.3, 0.3], [1, 2, 3, 3], [0, 1, 2, 0]),
    ("entropy", [0.5, 0.5], [2, 3, 3, 3], [1, 2, 2, 0]),
])
def test_each_image_leaves_at_the_first_exit_whose_criterion_reaches_its_threshold(tmp_path, criterion, thresholds,
                                                                                  taken, preds):
    """Both confidence criteria, hand-computed from the softmax: the first exit confident enough
    takes the image and predicts its class there (the class shows the exit: classes roll by exit)."""
    conf = {"max_prob": max, "entropy": entropy_confidence}[criterion]
    hand = [[conf(exit_probs(x, i)) for i in (1, 2)] for x in IMAGES]
    want = [next((i + 1 for i in range(2) if hand[s][i] >= thresholds[i]), 3) for s in range(4)]
    assert want == taken  # the table's numbers are the hand computation's
    export_early_exit(planted(thresholds=thresholds, criterion=criterion), tmp_path, torch.from_numpy(images()),
                      formats=["torchscript"])
    runtime = EarlyExitRuntime(tmp_path, "torchscript")
    assert runtime.criterion == criterion and runtime.prediction == "exit" and runtime.num_exits == 3
    got_preds, got_taken = runtime.predict(images())
    assert got_taken.tolist() == taken and got_preds.tolist() == preds
    assert got_taken.dtype == np.int64 and got_preds.dtype == np.int64
    for k in range(4):  # one image at a time: the same
        p, t = runtime.predict(images()[k : k + 1])
        assert (p.tolist(), t.tolist()) == ([preds[k]], [taken[k]])


@pytest.mark.parametrize("criterion, image, exit_", [("max_prob", 0, 1), ("max_prob", 1, 2), ("entropy", 0, 2),
                                                     ("entropy", 1, 1)])
def test_the_confidence_is_the_hand_computed_value_to_a_millionth(folder, edited, criterion, image, exit_):
    """A threshold 1e-6 below the hand-computed confidence lets the image out at that exit, 1e-6
    above keeps it in (max probability; 1 - entropy / log 3). The other exit's threshold is 2.0:
    nothing leaves there."""
    conf = {"max_prob": max, "entropy": entropy_confidence}[criterion]
    value = conf(exit_probs(IMAGES[image], exit_))
    path = edited(lambda m: m.update(criterion=criterion)) if criterion != "max_prob" else folder
    for delta, leaves in ((-1e-6, True), (1e-6, False)):
        thresholds = [2.0, 2.0]
        thresholds[exit_ - 1] = value + delta
        _, taken = EarlyExitRuntime(path, "torchscript", thresholds=thresholds).predict(images())
        assert bool(taken[image] == exit_) is leaves, (value, delta, taken)


def test_an_ensemble_prediction_averages_the_probabilities_of_the_exits_so_far(edited):
    """With ``prediction: ensemble`` exit 2's confidence is that of the mean of exits 1 and 2's
    probabilities (B: max of (p1 + p2) / 2 = 0.4995 by hand), and exit 3 predicts with the mean
    of all three; a 0.7 threshold that lets B out at exit 2 alone keeps it in here."""
    b2 = max((u + v) / 2 for u, v in zip(exit_probs(IMAGES[1], 1), exit_probs(IMAGES[1], 2)))
    a2 = max((u + v) / 2 for u, v in zip(exit_probs(IMAGES[0], 1), exit_probs(IMAGES[0], 2)))
    assert 0.49 < b2 < 0.5 < a2
    path = edited(lambda m: m.update(prediction="ensemble"))
    runtime = EarlyExitRuntime(path, "torchscript")
    assert runtime.prediction == "ensemble"
    preds, taken = runtime.predict(images())
    assert taken.tolist() == [1, 3, 3, 3] and preds.tolist() == [0, 2, 2, 0]
    # E = (1, 0, 0.9): exit 3 alone says class 2 (0.59); the mean of the three exits says class 1 (0.357 to 0.353)
    e = [1.0, 0.0, 0.9]
    mean3 = [sum(exit_probs(e, i)[c] for i in (1, 2, 3)) / 3 for c in range(3)]
    assert max(range(3), key=mean3.__getitem__) == 1 and max(range(3), key=exit_probs(e, 3).__getitem__) == 2
    assert [v.tolist() for v in runtime.predict(images([e]))] == [[1], [3]]
    for delta, leaves in ((-1e-6, [True, True]), (1e-6, [True, False])):
        _, moved = EarlyExitRuntime(path, "torchscript", thresholds=[2.0, b2 + delta]).predict(images())
        assert [bool(moved[0] == 2), bool(moved[1] == 2)] == leaves, (delta, moved)
    model = planted(prediction="ensemble")
    want_preds, want_taken = early_exit_predict(model, torch.from_numpy(images()))
    assert (want_preds.tolist(), want_taken.tolist()) == (preds.tolist(), taken.tolist())  # PyTorch's view agrees


def test_very_confident_logits_do_not_overflow(folder):
    """Logits of 50 and 200: exp would overflow float32 without subtracting the largest logit;
    the probabilities are (1, 0, 0) and the image leaves at exit 1 with class 0."""
    preds, taken = EarlyExitRuntime(folder, "torchscript").predict(images([[50.0, 0.0, 0.0], [200.0, 0.0, 0.0]]))
    assert taken.tolist() == [1, 1] and preds.tolist() == [0, 0]


def test_a_confidence_equal_to_its_threshold_in_float32_leaves(folder):
    """Uniform logits give a max probability of float32(1/3) = 0.3333333433; a threshold of
    0.3333333443 is the same float32, so the image leaves (as PyTorch compares); 0.33333338 is
    the next float32 up, so it stays."""
    third = float(np.float32(1 / 3))
    x = images([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    _, taken = EarlyExitRuntime(folder, "torchscript", thresholds=[third + 1e-9, 2.0]).predict(x)
    assert taken.tolist() == [1, 1]
    _, taken = EarlyExitRuntime(folder, "torchscript", thresholds=[third + 4e-8, 2.0]).predict(x)
    assert taken.tolist() == [3, 1]


def test_an_image_runs_only_the_segments_up_to_its_exit(folder):
    """Images that leave at exit 1 never reach segment 2: the runtime pays only for what it ran,
    and stops once every image has left."""
    runtime = EarlyExitRuntime(folder, "torchscript")
    calls = []
    runtime.segments = [lambda h, run=run, i=i: calls.append((i, h.shape)) or run(h)
                        for i, run in enumerate(runtime.segments, start=1)]
    preds, taken = runtime.predict(images())
    assert taken.tolist() == [1, 2, 3, 3] and preds.tolist() == [0, 1, 2, 0]
    assert calls == [(1, (4, 3, 1, 1)), (2, (3, 3, 1, 1)), (3, (2, 3, 1, 1))]
    calls.clear()
    assert runtime.predict(images(IMAGES[:1] * 3))[1].tolist() == [1, 1, 1]
    assert calls == [(1, (3, 3, 1, 1))]


def test_segments_hand_on_the_hidden_state_of_the_images_still_inside(folder):
    """Segment 2 gets the stage-1 hidden state (x itself) of the images still inside, segment 3
    the stage-2 state (2 x): checked by the last exit's class and values, image by image."""
    runtime = EarlyExitRuntime(folder, "torchscript")
    x = images([[2.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]])
    preds, taken = runtime.predict(x)
    assert taken.tolist() == [1, 3, 3] and preds.tolist() == [0, 1, 0]  # class + 2, rolled
    hidden = []
    runtime.segments = [lambda h, run=run: hidden.append(h.copy()) or run(h) for run in runtime.segments]
    runtime.predict(x)
    assert np.array_equal(hidden[1], x[1:]) and np.array_equal(hidden[2], 2 * x[1:])
    assert all(h.flags["C_CONTIGUOUS"] and h.dtype == np.float32 for h in hidden)


def test_the_last_exit_network_gives_the_last_exits_logits(folder):
    """Branch 3 without early exits: 4 x with the classes rolled by 2, for any batch size, from
    images of any float dtype."""
    runtime = EarlyExitRuntime(folder, "torchscript")
    for batch in (1, 4):
        x = images(IMAGES[:batch], dtype=np.float64)
        want = [[4 * row[(c - 2) % 3] for c in range(3)] for row in IMAGES[:batch]]
        got = runtime.last_exit(x)
        assert got.dtype == np.float32 and got.tolist() == want
    assert runtime.predict(images(dtype=np.float64))[1].tolist() == [1, 2, 3, 3]


def test_torchscript_export_and_loading_are_quiet_about_its_deprecation(tmp_path):
    """torch 2.14 deprecates TorchScript (a FutureWarning from torch.jit); devices still run it, so
    exporting and loading the segments warn nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        export_early_exit(planted(), tmp_path, torch.from_numpy(images()), formats=["torchscript"])
        EarlyExitRuntime(tmp_path, "torchscript")


def test_a_single_exit_network_runs_its_only_segment(tmp_path):
    model = planted(num_exits=1, thresholds=[])
    manifest = export_early_exit(model, tmp_path, torch.from_numpy(images()), formats=["torchscript"])
    assert manifest["thresholds"] == [0.0] and manifest["files"]["torchscript"]["segments"] == ["segment1.pt"]
    runtime = EarlyExitRuntime(tmp_path, "torchscript")
    preds, taken = runtime.predict(images())
    assert taken.tolist() == [1, 1, 1, 1] and preds.tolist() == [0, 0, 0, 1]
    assert runtime.last_exit(images()).tolist() == [[v for v in row] for row in IMAGES]


# ---- export -------------------------------------------------------------------------------------


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_names_files_hashes_thresholds_and_settings(tmp_path):
    """Extra thresholds are cut to one per exit but the last, which is 0 (everything left leaves)."""
    model = planted(thresholds=[0.7, 0.6, 0.3], criterion="entropy")
    out = tmp_path / "a" / "b"  # made with its parents
    manifest = export_early_exit(model, out, torch.from_numpy(images()), formats=["torchscript"])
    names = ["segment1.pt", "segment2.pt", "segment3.pt", "last_exit.pt"]
    assert manifest == {
        "num_exits": 3, "num_classes": 3, "input_shape": [3, 1, 1], "thresholds": [0.7, 0.6, 0.0],
        "criterion": "entropy", "prediction": "exit",
        "files": {"torchscript": {"segments": names[:3], "last_exit": "last_exit.pt"}},
        "sha256": {n: _sha(out / n) for n in names},
    }
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [MANIFEST])


def test_export_refuses_a_model_without_thresholds_unknown_formats_and_one_image(tmp_path):
    x = torch.from_numpy(images())
    model = planted()
    model.thresholds = None
    with pytest.raises(ValueError, match=r"^the model has no early-exit thresholds: calibrate it first "
                                         r"\(nni_fedexit\.exits\.calibrate\)$"):
        export_early_exit(model, tmp_path, x)
    for formats in (["tflite"], ["torchscript", "tflite"], []):
        with pytest.raises(ValueError, match=r"^formats must be some of \['onnx', 'torchscript'\], got "
                                             + re.escape(str(formats)) + "$"):
            export_early_exit(planted(), tmp_path, x, formats=formats)
    with pytest.raises(ValueError, match=r"^example needs at least 2 images, so the exported batch size stays free$"):
        export_early_exit(planted(), tmp_path, x[:1], formats=["torchscript"])
    assert not any(tmp_path.iterdir())  # refused before writing anything
    export_early_exit(planted(), tmp_path, x[:2], formats=["torchscript"])  # 2 images are enough


@pytest.mark.slow
def test_export_to_onnx_gives_the_same_answers_as_torchscript(tmp_path):
    """Both formats by default, into one folder; ONNX Runtime runs the segments with a free batch
    size (1 image, 4 images) and gives the hand-computed exits and classes."""
    model = planted(num_exits=2, thresholds=[0.7])
    manifest = export_early_exit(model, tmp_path, torch.from_numpy(images()))
    assert manifest["files"] == {"onnx": {"segments": ["segment1.onnx", "segment2.onnx"], "last_exit": "last_exit.onnx"},
                                 "torchscript": {"segments": ["segment1.pt", "segment2.pt"], "last_exit": "last_exit.pt"}}
    assert sorted(manifest["sha256"]) == sorted([*manifest["files"]["onnx"]["segments"], "last_exit.onnx",
                                                  *manifest["files"]["torchscript"]["segments"], "last_exit.pt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*manifest["sha256"], MANIFEST])  # weights inside
    import onnxruntime

    # what a device program feeds and reads by name: "input" with a free batch size, "hidden" and "logits"
    for name, outputs in (("segment1.onnx", ["hidden", "logits"]), ("segment2.onnx", ["logits"]),
                          ("last_exit.onnx", ["logits"])):
        session = onnxruntime.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert [(i.name, i.shape) for i in session.get_inputs()] == [("input", ["batch", 3, 1, 1])], name
        assert [o.name for o in session.get_outputs()] == outputs, name
    threads = torch.get_num_threads()
    before = len(os.listdir("/proc/self/task"))
    runtime = EarlyExitRuntime(tmp_path, "onnx")
    assert len(os.listdir("/proc/self/task")) == before  # 1 thread per call by default: no ONNX Runtime thread pool
    assert torch.get_num_threads() == threads  # ONNX Runtime has its own threads
    two = EarlyExitRuntime(tmp_path, "onnx", threads=2)
    assert len(os.listdir("/proc/self/task")) > before  # asked for 2: worker threads
    assert two.predict(images())[1].tolist() == [1, 2, 2, 2]
    # max_prob at exit 1: A .787 leaves; B, C, D go on to exit 2 (the last), classes rolled by 1
    for batch in (1, 4):
        preds, taken = zip(*(runtime.predict(images()[k : k + batch]) for k in range(0, 4, batch)))
        assert np.concatenate(taken).tolist() == [1, 2, 2, 2] and np.concatenate(preds).tolist() == [0, 1, 1, 2]
    got = runtime.last_exit(images()[:1])
    assert got.shape == (1, 3) and got[0].tolist() == pytest.approx([0.0, 4.0, 0.0], abs=1e-6)


@pytest.mark.slow
def test_a_segment_that_cannot_be_exported_or_differs_is_one_error_naming_it(tmp_path):
    class DataDependent(nn.Module):  # Python control flow on a value: torch.export refuses it
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Noisy(nn.Module):  # a random output: no exported copy reproduces it
        def forward(self, x):
            return x + torch.randn_like(x)

    def network(stage):
        model = MultiExitNetwork(nn.Conv2d(1, 4, 3, padding=1), [nn.Conv2d(4, 4, 3, padding=1), stage],
                                 [4, 4], num_classes=10)
        model.thresholds = [0.5, 0.0]
        return model

    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(torch.jit.TracerWarning):  # what the bad stages are about
        with pytest.raises(RuntimeError, match=r"^could not export segment 2 to onnx .*/datadep/segment2\.onnx: "
                                               r"TorchExportError"):
            export_early_exit(network(DataDependent()), tmp_path / "datadep", x, formats=["onnx"])
        with pytest.raises(ExportFolderError, match=r"^the torchscript early-exit runtime in .*/noisy disagrees with "
                                                    r"PyTorch on the example images \(last exit differs by \d\.\d\de[+-]\d\d\): "
                                                    r"the export is not faithful; report it with the model$"):
            export_early_exit(network(Noisy()), tmp_path / "noisy", x, formats=["torchscript"])


def test_an_export_whose_last_exit_differs_beyond_atol_is_refused(tmp_path):
    """The exits agree (same classes, same exits) but a tolerance below zero fails the last-exit
    check: the comparison is ``error <= atol``, with 0 error allowed at atol 0."""
    x = torch.from_numpy(images())
    export_early_exit(planted(), tmp_path / "ok", x, formats=["torchscript"], atol=0.0)
    with pytest.raises(ExportFolderError, match=r"last exit differs by 0\.00e\+00"):
        export_early_exit(planted(), tmp_path / "bad", x, formats=["torchscript"], atol=-1e-9)


def test_a_segment_costs_what_the_calibration_and_the_search_count_for_its_exit(digits):
    """Leaving after segment i costs stem + stages 1..i + exits 1..i: the MACs calibration
    minimises (exit_costs) and the search's exit-aware cost (exit_path_macs) reads."""
    from helpers import TINY_SAMPLE, tiny_space
    from nni_fedexit.exits import exit_costs, exit_path_macs
    from nni_fedexit.exits.runtime import Segment
    from nni_fedexit.macs import forward_macs

    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(widths=(8, 16, 32)), TINY_SAMPLE).eval()
    x = digits.test.images[:1]
    costs = exit_costs(model, x)
    h, paid = x, 0
    for i in range(1, model.num_exits + 1):
        segment = Segment(model, i).eval()
        assert segment.last == (i == model.num_exits)
        macs, out = forward_macs(segment, h)
        paid += macs
        h = out if segment.last else out[0]
        assert paid == costs[i - 1].early_exit_macs
    assert exit_path_macs(tiny_space(widths=(8, 16, 32)), TINY_SAMPLE, head=model.head) == [
        c.early_exit_macs for c in costs]


# ---- loading: the manifest and the files --------------------------------------------------------


def test_the_runtime_takes_new_thresholds_without_new_files(folder):
    """Calibrated again since the export: one finite threshold per exit but the last (extra ones
    are ignored); anything else is refused naming what it needs."""
    runtime = EarlyExitRuntime(folder, "torchscript", thresholds=[0.5, 0.5, 0.9])
    assert runtime.thresholds.tolist() == [0.5, 0.5, 0.0] and runtime.thresholds.dtype == np.float32
    assert runtime.predict(images())[1].tolist() == [1, 1, 2, 3]
    assert EarlyExitRuntime(folder, "torchscript").thresholds.tolist() == pytest.approx([0.7, 0.7, 0.0])
    for bad in ([0.5], [0.5, float("nan")], [float("inf"), 0.5]):
        with pytest.raises(ValueError, match=r"^thresholds: need 2 finite values \(one per exit but the last\), got "
                                             + re.escape(str(bad)) + "$"):
            EarlyExitRuntime(folder, "torchscript", thresholds=bad)
    with pytest.raises(ValueError, match=r"^fmt must be one of \['onnx', 'torchscript'\], got 'tflite'$"):
        EarlyExitRuntime(folder, "tflite")


def test_torchscript_runs_with_the_asked_threads_and_onnx_is_the_default_format(folder):
    threads = torch.get_num_threads()
    try:
        assert EarlyExitRuntime(folder, "torchscript", threads=2).format == "torchscript"
        assert torch.get_num_threads() == 2
        EarlyExitRuntime(folder, "torchscript")
        assert torch.get_num_threads() == 1  # one thread by default: the small device
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ExportFolderError, match=r"^.*early_exit\.json is not an early-exit manifest for onnx \(KeyError: 'onnx'\)"):
        EarlyExitRuntime(folder)  # onnx by default: this folder has no onnx files


def _set(key, value):
    return lambda m: m.update({key: value})


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("num_exits"), r"is not an early-exit manifest for torchscript \(KeyError: 'num_exits'\): "),
    (lambda m: m.pop("thresholds"), r"is not an early-exit manifest for torchscript \(KeyError: 'thresholds'\): "),
    (lambda m: m.pop("sha256"), r"is not an early-exit manifest for torchscript \(KeyError: 'sha256'\): "),
    (lambda m: m.pop("criterion"), r"is not an early-exit manifest for torchscript \(KeyError: 'criterion'\): "),
    (lambda m: m.pop("prediction"), r"is not an early-exit manifest for torchscript \(KeyError: 'prediction'\): "),
    (lambda m: m["files"]["torchscript"].pop("last_exit"), r"\(KeyError: 'last_exit'\): "),
    (lambda m: m["files"]["torchscript"].pop("segments"), r"\(KeyError: 'segments'\): "),
    (_set("num_exits", "three"), r"\(ValueError: invalid literal for int\(\) with base 10: 'three'\): "),
    (_set("thresholds", None), r"\(TypeError: 'NoneType' object is not iterable\): "),
    (_set("thresholds", ["x", 0.0, 0.0]), r"\(ValueError: could not convert string to float: 'x'\): "),
    (_set("sha256", []), r"\(AttributeError: 'list' object has no attribute 'items'\): "),
    (_set("files", {"torchscript": "segment1.pt"}), r"\(TypeError: string indices must be integers"),
    (_set("num_exits", 2), r"has inconsistent exits, thresholds, files, criterion or prediction: "),
    (_set("num_exits", 0), r"has inconsistent exits, thresholds, files, criterion or prediction: "),
    (_set("thresholds", [0.7, 0.0]), r"has inconsistent exits, thresholds, files, criterion or prediction: "),
    (_set("thresholds", [0.7, float("nan"), 0.0]), r"has inconsistent exits, thresholds"),
    (_set("thresholds", [0.7, 0.7, float("inf")]), r"has inconsistent exits, thresholds"),
    (_set("criterion", "margin"), r"has inconsistent exits, thresholds, files, criterion or prediction: "),
    (_set("prediction", "vote"), r"has inconsistent exits, thresholds, files, criterion or prediction: "),
    (lambda m: m["files"]["torchscript"]["segments"].pop(), r"has inconsistent exits"),
    (lambda m: m["files"]["torchscript"].update(segments=["segment1.pt", "sub/segment2.pt", "segment3.pt"]),
     r"names the file 'sub/segment2\.pt', which is not a plain file name with a SHA-256: "),
    (lambda m: m["files"]["torchscript"].update(last_exit=7), r"names the file 7, which is not a plain file name"),
    (lambda m: m["sha256"].pop("segment3.pt"), r"names the file 'segment3\.pt', which is not a plain file name with a SHA-256"),
    (lambda m: m["sha256"].update({"segment2.pt": "0" * 64}), r"segment2\.pt is missing or damaged \(its SHA-256 is not the one in "),
    (lambda m: m["files"]["torchscript"].update(last_exit="gone.pt") or m["sha256"].update({"gone.pt": "0" * 64}),
     r"gone\.pt is missing or damaged"),
    (lambda m: m.pop("input_shape"), r"has no input_shape \(channels, height, width\): "),
    (_set("input_shape", ["three", 1, 1]), r"has no input_shape \(channels, height, width\): "),
    (_set("input_shape", None), r"has no input_shape"),
])
def test_a_damaged_or_edited_manifest_is_refused_naming_the_fix(edited, change, message):
    path = edited(change)
    with pytest.raises(ExportFolderError, match=message + r".*export the model again \(nni_fedexit\.exits\.export_early_exit, "
                                                          r"or the run's export stage\) into "):
        EarlyExitRuntime(path, "torchscript")


def test_the_manifest_path_and_fix_are_named(edited):
    path = edited(_set("criterion", "margin"))
    with pytest.raises(ExportFolderError) as err:
        EarlyExitRuntime(path, "torchscript")
    assert str(err.value) == (f"{path / MANIFEST} has inconsistent exits, thresholds, files, criterion or prediction: "
                              f"export the model again (nni_fedexit.exits.export_early_exit, or the run's export stage) "
                              f"into {path}")
    ok = edited(_set("input_shape", [3.0, 1, 1]))  # numbers that are whole are fine
    assert EarlyExitRuntime(ok, "torchscript").input_shape == (3, 1, 1)


def test_a_damaged_file_is_refused_by_name(folder, tmp_path):
    copy_ = tmp_path / "copy"
    shutil.copytree(folder, copy_)
    EarlyExitRuntime(copy_, "torchscript")  # intact: loads
    segment = copy_ / "segment2.pt"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(ExportFolderError, match=r"segment2\.pt is missing or damaged .*export the model again"):
        EarlyExitRuntime(copy_, "torchscript")
    (copy_ / MANIFEST).write_text("{not json")
    with pytest.raises(ExportFolderError, match=rf"{MANIFEST} is unreadable or corrupt \(.*\): export the model again "
                                                r"\(nni_fedexit\.exits\.export_early_exit, or the run's export stage\) into "):
        EarlyExitRuntime(copy_, "torchscript")


def test_images_of_another_shape_are_one_error_naming_the_shape(folder):
    runtime = EarlyExitRuntime(folder, "torchscript")
    with pytest.raises(ValueError, match=r"^images must be \(N, 3, 1, 1\) as exported in .*early_exit\.json, got \(3, 1, 1\): "
                                         r"pass a batch of images of that shape$"):
        runtime.predict(images()[0])
    with pytest.raises(ValueError, match=r"got \(2, 3, 2, 1\)"):
        runtime.last_exit(np.zeros((2, 3, 2, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got \(2, 1, 1, 3\)"):
        runtime.predict(np.zeros((2, 1, 1, 3), dtype=np.float32))


# ---- latency ------------------------------------------------------------------------------------


def test_latency_is_measured_on_the_same_batches_for_both_in_alternating_order(folder):
    """Warm-up calls of each runtime first (cycling over the batches), then passes in the order
    early, last, last, early, early, last; every call gets whole batches of the first ``images``."""
    runtime = EarlyExitRuntime(folder, "torchscript")
    calls = []
    predict, last_exit = runtime.predict, runtime.last_exit
    runtime.predict = lambda b: calls.append(("early", b[:, 0, 0, 0].tolist())) or predict(b)
    runtime.last_exit = lambda b: calls.append(("last", b[:, 0, 0, 0].tolist())) or last_exit(b)
    x = images([[float(k), 0.0, 0.0] for k in range(9)])
    out = measure_latency(runtime, x, LatencySettings(batch_size=2, images=7, repeats=3, warmup=5))
    batches = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # 7 images: 3 whole batches of 2
    warm = [batches[k % 3] for k in range(5)]
    want = ([("early", b) for b in warm] + [("last", b) for b in warm]
            + [(key, b) for key in ("early", "last", "last", "early", "early", "last") for b in batches])
    assert calls == want
    assert {k: out[k] for k in ("format", "batch_size", "batches", "repeats")} == {
        "format": "torchscript", "batch_size": 2, "batches": 3, "repeats": 3}


def test_latency_is_the_median_seconds_per_batch(folder):
    """Two passes of each: the sum of what is reported, times the calls, is within the call's wall
    time and most of it; latency_saved is 1 - early / last."""
    runtime = EarlyExitRuntime(folder, "torchscript")
    x = images(IMAGES * 10)
    start = time.perf_counter()
    out = measure_latency(runtime, x, LatencySettings(batch_size=1, images=40, repeats=2, warmup=0))
    wall = time.perf_counter() - start
    assert out["batches"] == 40 and out["early_exit_s"] > 0 and out["last_exit_s"] > 0
    spent = 2 * 40 * (out["early_exit_s"] + out["last_exit_s"])
    assert 0.5 * wall < spent <= wall
    assert out["latency_saved"] == pytest.approx(1 - out["early_exit_s"] / out["last_exit_s"], rel=1e-12)
    default = LatencySettings()
    assert (default.batch_size, default.images, default.repeats, default.warmup) == (1, 1000, 4, 50)


@pytest.mark.parametrize("settings", [LatencySettings(batch_size=0), LatencySettings(images=0), LatencySettings(repeats=0),
                                      LatencySettings(warmup=-1)])
def test_latency_settings_must_be_positive(folder, settings):
    runtime = EarlyExitRuntime(folder, "torchscript")
    with pytest.raises(ValueError, match=r"^latency settings must be positive: LatencySettings\("):
        measure_latency(runtime, images(), settings)


def test_latency_needs_one_whole_batch(folder):
    runtime = EarlyExitRuntime(folder, "torchscript")
    with pytest.raises(ValueError, match=r"^need at least batch_size=5 images, got 4$"):
        measure_latency(runtime, images(), LatencySettings(batch_size=5, images=10, repeats=1, warmup=0))
    with pytest.raises(ValueError, match=r"^need at least batch_size=3 images, got 2$"):
        measure_latency(runtime, images(), LatencySettings(batch_size=3, images=2, repeats=1, warmup=0))
    out = measure_latency(runtime, images(), LatencySettings(batch_size=4, images=4, repeats=1, warmup=0))
    assert out["batches"] == 1
    assert measure_latency(runtime, images(), LatencySettings(batch_size=1, images=4, repeats=1, warmup=0))["batches"] == 4
    assert measure_latency(runtime, images(), LatencySettings(batch_size=1, images=1, repeats=1, warmup=0))["batches"] == 1
