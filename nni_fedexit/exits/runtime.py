"""Early-exit inference as a device runs it: exported segments, ONNX Runtime or TorchScript, no PyTorch model.

A branch model computes every stage up to its exit, so early exit with the exported branches
would compute the shared stages again at every exit. The runtime is exported as *segments*
instead: segment 1 is the stem, stage 1 and exit 1; segment i is stage i and exit i; each hands
its hidden state to the next. An image leaves after segment i when exit i's confidence reaches
its threshold, so it pays for exactly the stages and exits it ran (what :class:`ExitCost`'s
``early_exit_macs`` counts). The full network without early exits (branch L) is exported the same
way, with the same dynamic batch size, so the two can be timed in the same process
(:func:`measure_latency`).

The folder holds ``early_exit.json`` (thresholds, criterion, prediction, the files and their
SHA-256) beside the model files. :class:`EarlyExitRuntime` checks every file against it before
loading and refuses a damaged one by name; load only folders you exported yourself (a TorchScript
file is a program).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from nni_fedexit.exits.calibration import early_exit_predict
from nni_fedexit.exits.export import export_errors
from nni_fedexit.exits.network import PREDICTIONS, MultiExitNetwork
from nni_fedexit.exits.thresholds import CRITERIA
from nni_fedexit.files import read_json, sha256_file, write_json

__all__ = ["FORMATS", "MANIFEST", "ExportFolderError", "Segment", "export_early_exit", "EarlyExitRuntime", "LatencySettings",
           "measure_latency"]

#: what the segments are exported to
FORMATS = ("onnx", "torchscript")
#: the runtime's description, beside its files
MANIFEST = "early_exit.json"
_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportFolderError(RuntimeError):
    """An early-exit export folder that cannot be used; the message names the file and a fix."""


class Segment(nn.Module):
    """Stage ``i`` (1-based) and its exit, after the stem for ``i == 1``: hidden state in, (hidden
    state, exit logits) out; the last segment returns its logits only."""

    def __init__(self, model: MultiExitNetwork, i: int):
        super().__init__()
        self.stem = model.stem if i == 1 else nn.Identity()
        self.stage = model.stages[i - 1]
        self.exit = model.exits[i - 1]
        self.last = i == model.num_exits

    def forward(self, h: torch.Tensor) -> Any:
        h = self.stage(self.stem(h))
        z = self.exit(h)
        return z if self.last else (h, z)


class _LastExit(nn.Module):
    """The network without early exits: branch L, returning its logits only."""

    def __init__(self, model: MultiExitNetwork):
        super().__init__()
        self.branch = model.branch(model.num_exits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)[0]


def _export(module: nn.Module, example: torch.Tensor, path: Path, fmt: str, outputs: list[str]) -> None:
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; devices still run it
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            torch.jit.trace(module, example).save(str(path))
        return
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=outputs, dynamo=True,
                      external_data=False, verbose=False, dynamic_shapes=({0: batch},))


@torch.no_grad()
def export_early_exit(model: MultiExitNetwork, out_dir: str | Path, example: torch.Tensor,
                      formats: Sequence[str] = FORMATS, atol: float = 1e-4) -> dict[str, Any]:
    """Export ``model``'s segments and its last-exit network to ``out_dir`` in each format, with
    the model's calibrated thresholds, and check the runtime against PyTorch on ``example`` (at
    least 2 images: the batch size stays free). Returns the manifest written to ``early_exit.json``."""
    if model.thresholds is None:
        raise ValueError("the model has no early-exit thresholds: calibrate it first (nni_fedexit.exits.calibrate)")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {list(FORMATS)}, got {list(formats)}")
    if example.shape[0] < 2:
        raise ValueError("example needs at least 2 images, so the exported batch size stays free")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(p.device.type != "cpu" for p in model.parameters()):  # the device runs it on its CPU
        model = copy.deepcopy(model).cpu()
    model.eval()
    example = example.cpu()
    files: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        h, names = example, []
        for i in range(1, model.num_exits + 1):
            name = f"segment{i}{_SUFFIX[fmt]}"
            segment = Segment(model, i).eval()
            with export_errors(fmt, f"segment {i}", out / name):
                _export(segment, h, out / name, fmt, ["logits"] if segment.last else ["hidden", "logits"])
            if not segment.last:
                h = segment(h)[0]
            names.append(name)
        full = f"last_exit{_SUFFIX[fmt]}"
        with export_errors(fmt, "the last-exit network", out / full):
            _export(_LastExit(model).eval(), example, out / full, fmt, ["logits"])
        files[fmt] = {"segments": names, "last_exit": full}
    manifest = {
        "num_exits": model.num_exits, "num_classes": model.num_classes, "input_shape": list(example.shape[1:]),
        "thresholds": [float(t) for t in model.thresholds][: model.num_exits - 1] + [0.0],
        "criterion": model.criterion, "prediction": model.prediction, "files": files,
        "sha256": {n: sha256_file(out / n) for f in files.values() for n in [*f["segments"], f["last_exit"]]},
    }
    write_json(out / MANIFEST, manifest)
    want_preds, want_taken = early_exit_predict(model, example)
    want_full = model(example)[-1]
    for fmt in formats:
        runtime = EarlyExitRuntime(out, fmt)
        preds, taken = runtime.predict(example.numpy())
        err = float(np.abs(runtime.last_exit(example.numpy()) - want_full.numpy()).max())
        if not (np.array_equal(preds, want_preds.numpy()) and np.array_equal(taken, want_taken.numpy())) or not err <= atol:
            raise ExportFolderError(f"the {fmt} early-exit runtime in {out} disagrees with PyTorch on the example images "
                                    f"(last exit differs by {err:.2e}): the export is not faithful; report it with the model")
    return manifest


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _confidence(probs: np.ndarray, criterion: str) -> np.ndarray:
    """:func:`~nni_fedexit.exits.confidence` on probabilities, in NumPy (what a device without PyTorch computes)."""
    if criterion == "max_prob":
        return probs.max(axis=-1)
    ent = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=-1)
    return 1.0 - ent / math.log(probs.shape[-1])


def _loader(fmt: str, threads: int) -> Callable[[Path], Callable[[np.ndarray], list[np.ndarray]]]:
    if fmt == "onnx":
        import onnxruntime

        def load(path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = threads
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x})

        return load

    def load_script(path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                out = module(torch.from_numpy(x))
            return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

        return run

    return load_script


def _manifest(folder: Path, fmt: str) -> dict[str, Any]:
    path = folder / MANIFEST
    fix = f"export the model again (nni_fedexit.exits.export_early_exit, or the run's export stage) into {folder}"
    m = read_json(path, ExportFolderError, fix)
    try:
        n = int(m["num_exits"])
        thresholds = [float(t) for t in m["thresholds"]]
        names = [*m["files"][fmt]["segments"], m["files"][fmt]["last_exit"]]
        hashes = {str(k): str(v) for k, v in m["sha256"].items()}
        ok = (n >= 1 and len(thresholds) == n and len(names) == n + 1 and m["criterion"] in CRITERIA
              and m["prediction"] in PREDICTIONS and all(math.isfinite(t) for t in thresholds))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ExportFolderError(f"{path} is not an early-exit manifest for {fmt} ({type(err).__name__}: {err}): {fix}") from None
    if not ok:
        raise ExportFolderError(f"{path} has inconsistent exits, thresholds, files, criterion or prediction: {fix}")
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name not in hashes:
            raise ExportFolderError(f"{path} names the file {name!r}, which is not a plain file name with a SHA-256: {fix}")
        if not (folder / name).is_file() or sha256_file(folder / name) != hashes[name]:
            raise ExportFolderError(f"{folder / name} is missing or damaged (its SHA-256 is not the one in {path}): {fix}")
    try:
        shape = tuple(int(d) for d in m["input_shape"])
    except (KeyError, TypeError, ValueError):
        raise ExportFolderError(f"{path} has no input_shape (channels, height, width): {fix}") from None
    return {"num_exits": n, "thresholds": thresholds, "criterion": m["criterion"], "prediction": m["prediction"],
            "names": names, "input_shape": shape}


class EarlyExitRuntime:
    """Early-exit inference on the files :func:`export_early_exit` wrote, in ``fmt`` ("onnx" or
    "torchscript"), with ``threads`` CPU threads per call (1: the small device; the same for the
    last-exit network, so the two compare fairly; for TorchScript that is torch's thread count, which
    is the whole process's), and the manifest's thresholds or ``thresholds``."""

    def __init__(self, folder: str | Path, fmt: str = "onnx", threads: int = 1, thresholds: Sequence[float] | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
        self.folder, self.format = Path(folder), fmt
        m = _manifest(self.folder, fmt)
        self.num_exits, self.criterion, self.prediction = m["num_exits"], m["criterion"], m["prediction"]
        if thresholds is not None:  # calibrated again since the export: the files do not change
            t = [float(v) for v in thresholds][: self.num_exits - 1]
            if len(t) != self.num_exits - 1 or not all(math.isfinite(v) for v in t):
                raise ValueError(f"thresholds: need {self.num_exits - 1} finite values (one per exit but the last), "
                                 f"got {list(thresholds)}")
            m["thresholds"] = t + [0.0]
        self.thresholds = np.asarray(m["thresholds"], dtype=np.float32)  # compared as float32, as PyTorch does
        self.input_shape: tuple[int, ...] = m["input_shape"]
        if fmt == "torchscript":
            torch.set_num_threads(threads)
        load = _loader(fmt, threads)
        self.segments = [load(self.folder / name) for name in m["names"][:-1]]
        self.last_exit_run = load(self.folder / m["names"][-1])

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, 1-based exit taken) per image, running each segment only on the
        images still inside; equal to :func:`~nni_fedexit.exits.early_exit_predict`'s."""
        h = self._images(images)
        n = h.shape[0]
        preds, taken = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        alive = np.arange(n)
        prob_sum: np.ndarray | None = None
        for i, run in enumerate(self.segments, start=1):
            out = run(h)
            probs = _softmax(out[-1])
            if self.prediction == "ensemble":
                prob_sum = probs if prob_sum is None else prob_sum + probs
                probs = prob_sum / i
                probs = probs / probs.sum(axis=-1, keepdims=True)
            if i == self.num_exits:
                leave = np.ones(len(alive), dtype=bool)
            else:
                leave = _confidence(probs, self.criterion) >= self.thresholds[i - 1]
            preds[alive[leave]] = probs[leave].argmax(axis=-1)
            taken[alive[leave]] = i
            if leave.all():
                break
            stay = ~leave
            alive, h = alive[stay], np.ascontiguousarray(out[0][stay])
            if prob_sum is not None:
                prob_sum = prob_sum[stay]
        return preds, taken

    def last_exit(self, images: np.ndarray) -> np.ndarray:
        """Logits of the network without early exits (branch L), run the same way."""
        return self.last_exit_run(self._images(images))[0]

    def _images(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self.input_shape))}) as exported in "
                             f"{self.folder / MANIFEST}, got {tuple(x.shape)}: pass a batch of images of that shape")
        return x


@dataclass
class LatencySettings:
    """How :func:`measure_latency` times: ``images`` single images (or batches of ``batch_size``),
    ``repeats`` passes of each runtime over them, after ``warmup`` calls of each."""

    batch_size: int = 1
    images: int = 1000
    repeats: int = 4
    warmup: int = 50


def _pass(run: Callable[[np.ndarray], Any], batches: list[np.ndarray]) -> float:
    start = time.perf_counter_ns()
    for b in batches:
        run(b)
    return (time.perf_counter_ns() - start) / len(batches) / 1e9


def measure_latency(runtime: EarlyExitRuntime, images: np.ndarray, settings: LatencySettings | None = None) -> dict[str, Any]:
    """Mean wall-clock seconds per batch of early-exit inference and of the last-exit network, in
    this process, on the same batches: passes over all batches, one runtime at a time (as a device
    runs one model, its weights stay in cache), in the order early, last, last, early, ... so
    that drift hits both alike; the median over passes. ``latency_saved`` is 1 - early / last exit."""
    s = settings or LatencySettings()
    if s.batch_size < 1 or s.images < 1 or s.repeats < 1 or s.warmup < 0:
        raise ValueError(f"latency settings must be positive: {s}")
    x = np.ascontiguousarray(images[: s.images], dtype=np.float32)
    batches = [x[k : k + s.batch_size] for k in range(0, len(x) - s.batch_size + 1, s.batch_size)]
    if not batches:
        raise ValueError(f"need at least batch_size={s.batch_size} images, got {len(x)}")
    runs = {"early": runtime.predict, "last": runtime.last_exit}
    for run in runs.values():
        for b in (batches * (s.warmup // len(batches) + 1))[: s.warmup]:
            run(b)
    times: dict[str, list[float]] = {"early": [], "last": []}
    for r in range(s.repeats):
        for key in (("early", "last") if r % 2 == 0 else ("last", "early")):
            times[key].append(_pass(runs[key], batches))
    e, f = float(np.median(times["early"])), float(np.median(times["last"]))
    return {"format": runtime.format, "batch_size": s.batch_size, "batches": len(batches), "repeats": s.repeats,
            "early_exit_s": e, "last_exit_s": f, "latency_saved": 1.0 - e / f}
