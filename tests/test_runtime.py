"""S4 on the device: early-exit inference on exported segments (ONNX Runtime, TorchScript)."""

import copy
import json

import numpy as np
import pytest
import torch

from nni_fedexit.exits import early_exit_predict
from nni_fedexit.exits.runtime import (
    MANIFEST, EarlyExitRuntime, ExportFolderError, LatencySettings, export_early_exit, measure_latency,
)

#: thresholds that send images out of every exit of the trained digits network (both prediction modes)
THRESHOLDS = {"exit": [0.6, 0.8], "ensemble": [0.7, 0.8]}


@pytest.fixture(scope="module")
def exported(trained, digits, tmp_path_factory):
    """The trained network exported once, with thresholds that use every exit; the ensemble
    folder holds the same files, its manifest another prediction mode and thresholds."""
    import shutil

    folders = {}
    model = copy.deepcopy(trained).eval()
    model.thresholds, model.criterion, model.prediction = list(THRESHOLDS["exit"]), "max_prob", "exit"
    folder = tmp_path_factory.mktemp("early_exit")
    export_early_exit(model, folder, digits.test.images[:4])
    folders["exit"] = (model, folder)
    ensemble = copy.deepcopy(model)
    ensemble.thresholds, ensemble.prediction = list(THRESHOLDS["ensemble"]), "ensemble"
    other = tmp_path_factory.mktemp("early_exit_ensemble") / "export"
    shutil.copytree(folder, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest.update(prediction="ensemble", thresholds=ensemble.thresholds + [0.0])
    (other / MANIFEST).write_text(json.dumps(manifest))
    folders["ensemble"] = (ensemble, other)
    return folders


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("prediction", ["exit", "ensemble"])
def test_the_runtimes_predictions_equal_early_exit_predicts(exported, digits, fmt, prediction):
    model, folder = exported[prediction]
    x = digits.test.images
    want_preds, want_taken = early_exit_predict(model, x)
    assert (torch.bincount(want_taken, minlength=4)[1:] > 0).all()  # every exit takes images
    runtime = EarlyExitRuntime(folder, fmt)
    for batch in (1, 7, len(x)):  # one image at a time, small batches, all at once
        preds, taken = zip(*(runtime.predict(x[k : k + batch].numpy()) for k in range(0, len(x), batch)))
        assert np.array_equal(np.concatenate(preds), want_preds.numpy()), (fmt, batch)
        assert np.array_equal(np.concatenate(taken), want_taken.numpy()), (fmt, batch)
    with torch.no_grad():
        want_last = model(x)[-1]
    assert np.abs(runtime.last_exit(x.numpy()) - want_last.numpy()).max() <= 1e-4


def test_an_image_runs_only_the_segments_up_to_its_exit(exported, digits):
    """Images that leave at exit 1 never reach segment 2: the runtime pays only for what it ran."""
    model, folder = exported["exit"]
    runtime = EarlyExitRuntime(folder, "onnx")
    calls = []
    runtime.segments = [lambda h, run=run, i=i: calls.append((i, len(h))) or run(h)
                        for i, run in enumerate(runtime.segments, start=1)]
    _, taken = runtime.predict(digits.test.images.numpy())
    inside = [len(taken)] + [int((taken > i).sum()) for i in (1, 2)]
    assert calls == [(1, inside[0]), (2, inside[1]), (3, inside[2])]


def test_a_damaged_or_edited_export_is_refused_by_name(exported, tmp_path):
    import shutil

    _, folder = exported["exit"]
    copy_ = tmp_path / "copy"
    shutil.copytree(folder, copy_)
    EarlyExitRuntime(copy_, "onnx")  # intact: loads
    segment = copy_ / "segment2.onnx"
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(ExportFolderError, match=r"segment2\.onnx is missing or damaged .*export the model again"):
        EarlyExitRuntime(copy_, "onnx")
    manifest = json.loads((copy_ / MANIFEST).read_text())
    manifest["files"]["onnx"]["segments"][0] = "../../etc/passwd"
    (copy_ / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportFolderError, match=r"names the file '\.\./\.\./etc/passwd', which is not a plain file name"):
        EarlyExitRuntime(copy_, "onnx")
    (copy_ / MANIFEST).write_text("{not json")
    with pytest.raises(ExportFolderError, match=rf"{MANIFEST} is unreadable or corrupt"):
        EarlyExitRuntime(copy_, "onnx")


def test_images_of_another_shape_are_one_error_naming_the_shape(exported, digits):
    _, folder = exported["exit"]
    runtime = EarlyExitRuntime(folder, "onnx")
    with pytest.raises(ValueError, match=r"images must be \(N, 1, 8, 8\) as exported in .*early_exit\.json, got \(8, 8\)"):
        runtime.predict(digits.test.images[0, 0].numpy())
    with pytest.raises(ValueError, match=r"got \(2, 3, 8, 8\)"):
        runtime.last_exit(np.zeros((2, 3, 8, 8), dtype=np.float32))


def test_export_needs_calibrated_thresholds(trained, digits, tmp_path):
    model = copy.deepcopy(trained)
    model.thresholds = None
    with pytest.raises(ValueError, match="calibrate it first"):
        export_early_exit(model, tmp_path, digits.test.images[:4])


def test_latency_is_measured_on_the_same_batches_for_both(exported, digits):
    _, folder = exported["exit"]
    runtime = EarlyExitRuntime(folder, "onnx")
    out = measure_latency(runtime, digits.test.images.numpy(), LatencySettings(batch_size=4, images=40, repeats=2, warmup=2))
    assert out["format"] == "onnx" and out["batch_size"] == 4 and out["batches"] == 10
    assert out["early_exit_s"] > 0 and out["last_exit_s"] > 0
    assert out["latency_saved"] == pytest.approx(1 - out["early_exit_s"] / out["last_exit_s"])


def test_a_segment_costs_what_the_calibration_and_the_search_count_for_its_exit(trained, digits):
    """Leaving after segment i costs stem + stages 1..i + exits 1..i: the MACs calibration
    minimises (exit_costs) and the search's exit-aware cost (exit_path_macs) reads."""
    from helpers import TINY_SAMPLE, tiny_space
    from nni_fedexit.exits import exit_costs, exit_path_macs
    from nni_fedexit.exits.runtime import Segment
    from nni_fedexit.macs import forward_macs

    model = trained.eval()
    h, paid = digits.test.images[:1], 0
    for i in range(1, model.num_exits + 1):
        segment = Segment(model, i).eval()
        macs, out = forward_macs(segment, h)
        paid += macs
        h = out if segment.last else out[0]
        assert paid == exit_costs(model, digits.test.images[:1])[i - 1].early_exit_macs
    assert exit_path_macs(tiny_space(widths=(8, 16, 32)), TINY_SAMPLE, head=model.head) == [
        c.early_exit_macs for c in exit_costs(model, digits.test.images[:1])]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # what the bad stages are about
def test_a_segment_that_cannot_be_exported_or_differs_is_one_error_naming_it(tmp_path):
    from nni_fedexit.exits import MultiExitNetwork

    class DataDependent(torch.nn.Module):  # Python control flow on a value: torch.export refuses it
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Noisy(torch.nn.Module):  # a random output: no exported copy reproduces it
        def forward(self, x):
            return x + torch.randn_like(x)

    def network(stage):
        model = MultiExitNetwork(torch.nn.Conv2d(1, 4, 3, padding=1), [torch.nn.Conv2d(4, 4, 3, padding=1), stage],
                                 [4, 4], num_classes=10)
        model.thresholds = [0.5, 0.0]
        return model

    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match=r"^could not export segment 2 to onnx .*/datadep/segment2\.onnx: TorchExportError"):
        export_early_exit(network(DataDependent()), tmp_path / "datadep", x, formats=["onnx"])
    with pytest.raises(ExportFolderError, match=r"^the torchscript early-exit runtime in .*/noisy disagrees with PyTorch"):
        export_early_exit(network(Noisy()), tmp_path / "noisy", x, formats=["torchscript"])
