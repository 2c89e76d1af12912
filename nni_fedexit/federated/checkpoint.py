"""S5 checkpoints: ``state.json`` plus the weights files it names, in one folder, written atomically.

``last.safetensors`` holds the global model after the last round, ``best.safetensors`` the best
round's, ``server.safetensors`` (when there is any) the aggregator's server-side state and the
clients' objective state. ``state.json`` (round, best round, history, fingerprint of the
settings) is written last. Weights are safetensors: nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from nni_fedexit.federated.errors import FederatedError
from nni_fedexit.files import write_atomic, write_json

if TYPE_CHECKING:
    from nni_fedexit.federated.settings import FederatedSettings

__all__ = ["Checkpoint", "Resumed", "cpu_tensors", "WEIGHT_FILES"]

#: the files a checkpoint may hold besides state.json (a fresh start removes them all)
WEIGHT_FILES = ("last.safetensors", "best.safetensors", "server.safetensors")

State = Mapping[str, torch.Tensor]


def cpu_tensors(state: State) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: what safetensors and Flower's arrays take."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


@dataclass
class Resumed:
    """What a checkpoint holds to go on from: its ``state.json``, the last and best weights, the server state."""

    state: dict[str, Any]
    last: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    server: dict[str, torch.Tensor]

    @property
    def round(self) -> int:
        return int(self.state["round"])

    @property
    def best_round(self) -> int:
        return int(self.state["best_round"])


class Checkpoint:
    """One checkpoint folder: save after every round, resume from it, watch it while a run goes on."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def state(self) -> dict[str, Any] | None:
        """``state.json``, or None while it is not there (or being replaced): for watchers of a run."""
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def clear(self) -> None:
        """Remove the checkpoint's files (a run that starts over)."""
        for name in ("state.json", *WEIGHT_FILES):
            (self.folder / name).unlink(missing_ok=True)

    def resume_point(self, settings: "FederatedSettings") -> Resumed | None:
        """What to go on from, or None to start at round 1 (no checkpoint, or ``resume`` off); a
        checkpoint written with other settings is an error."""
        if not settings.resume or not self.exists():
            return None
        resumed = self.load()
        if resumed.state.get("fingerprint") != settings.fingerprint():
            raise FederatedError(
                f"checkpoint in {self.folder} was written with other settings (data, partition, model or training); "
                "use another checkpoint directory, or resume=False (resume=false in a Flower run config) to start over"
            )
        return resumed

    def save(self, state: Mapping[str, Any], last: State, best: State | None, server: State | None = None) -> None:
        """Write the weights files, then ``state.json`` (the commit point)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / "last.safetensors", lambda p: save_file(cpu_tensors(last), str(p)))
        if best is not None:
            write_atomic(self.folder / "best.safetensors", lambda p: save_file(cpu_tensors(best), str(p)))
        if server:
            write_atomic(self.folder / "server.safetensors", lambda p: save_file(cpu_tensors(server), str(p)))
        write_json(self.folder / "state.json", dict(state))

    def load(self) -> Resumed:
        from safetensors.torch import load_file

        state = json.loads((self.folder / "state.json").read_text())
        last = load_file(str(self.folder / "last.safetensors"))
        best_path, server_path = self.folder / "best.safetensors", self.folder / "server.safetensors"
        best = load_file(str(best_path)) if best_path.is_file() else None
        server = load_file(str(server_path)) if server_path.is_file() else {}
        return Resumed(state, last, best, server)
