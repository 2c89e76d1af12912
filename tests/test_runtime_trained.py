"""S4 on the device, end to end: a network trained on digits, exported to ONNX and TorchScript,
predicts through the early-exit runtime exactly what ``early_exit_predict`` gives in PyTorch.
(tests/test_runtime.py pins the runtime's arithmetic on a hand-built network.)"""

import copy
import json

import numpy as np
import pytest
import torch

from nni_fedexit.exits import early_exit_predict
from nni_fedexit.exits.runtime import MANIFEST, EarlyExitRuntime, export_early_exit

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


@pytest.mark.slow
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
