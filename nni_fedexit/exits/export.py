"""S4: every branch model exported to TorchScript and ONNX, each file loaded back and checked
against PyTorch (the segments a device runs, and their latency: runtime.py).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from nni_fedexit.exits.network import MultiExitNetwork

__all__ = ['export_branches', 'export_errors', 'onnx_available']



@torch.no_grad()
def export_branches(
    model: MultiExitNetwork, out_dir: str | Path, example: torch.Tensor, onnx: bool | None = None, atol: float = 1e-5,
) -> list[dict[str, Any]]:
    """Export every branch model to TorchScript (and ONNX, when onnx/onnxruntime are installed).

    Each file is loaded back and run on ``example``; its outputs must match PyTorch's within
    ``atol`` or a RuntimeError names the file. A branch that cannot be written, exported or run
    back raises a RuntimeError naming the branch and the file too (the exporter's error chained).
    Returns one record per file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    if onnx is None:
        onnx = onnx_available()
    records = []
    for depth in range(1, model.num_exits + 1):
        branch = model.branch(depth).eval()
        want = branch(example)[0]
        path = out / f"branch{depth}.pt"
        with export_errors("torchscript", f"branch {depth}", path), warnings.catch_warnings():
            # torch 2.14 deprecates TorchScript; it is still what we ship
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            torch.jit.trace(branch, example).save(str(path))
            got = torch.jit.load(str(path))(example)[0]
        records.append(_check_export(path, want, got, atol, "torchscript", depth))
        if onnx:
            onnx_path = out / f"branch{depth}.onnx"
            with export_errors("onnx", f"branch {depth}", onnx_path):
                torch.onnx.export(branch, (example,), str(onnx_path), input_names=["image"],
                                  output_names=[f"exit{depth}"], dynamo=True, external_data=False, verbose=False)
                import onnxruntime

                session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(session.run(None, {"image": example.cpu().numpy()})[0])
            records.append(_check_export(onnx_path, want.cpu(), got, atol, "onnx", depth))
    return records


@contextlib.contextmanager
def export_errors(fmt: str, part: str, path: Path) -> Iterator[None]:
    """One error naming the part ("branch 2", "segment 1") and the file for whatever the exporter
    or the runtime raises."""
    try:
        yield
    except Exception as err:
        first = (re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines() or [""])[0]  # no terminal colours
        raise RuntimeError(f"could not export {part} to {fmt} {path}: {type(err).__name__}: {first}") from err


def _check_export(path: Path, want: torch.Tensor, got: torch.Tensor, atol: float, fmt: str, depth: int) -> dict[str, Any]:
    err = float((want - got).abs().max())
    if not err <= atol:
        raise RuntimeError(f"exported {fmt} branch {path} differs from PyTorch by {err:.2e} (> {atol:.0e})")
    return {"branch": depth, "format": fmt, "path": str(path), "max_abs_error": err}


def onnx_available() -> bool:
    """Whether onnx, onnxruntime and onnxscript (the ``onnx`` extra) are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True
