"""S5 checkpoints: ``state.json`` plus the weights files it names, in one folder, crash-safe.

``last.safetensors`` holds the global model after the last round, ``best.safetensors`` the best
round's, ``server.safetensors`` (when there is any) the aggregator's server-side state and the
clients' objective state. Weights are safetensors: nothing in a checkpoint is unpickled.

A save is a small redo journal, so a kill at any instant leaves a checkpoint that resumes to
exactly the model of an uninterrupted run:

1. each new weights file is written (flushed to disk) as ``<name>.next``;
2. ``state.json`` is replaced (the commit point); it names every weights file with its SHA-256;
3. each ``<name>.next`` is renamed over ``<name>``.

Opening a checkpoint finishes step 3 when the journal says so (a ``.next`` whose hash
``state.json`` names) and drops ``.next`` files of a save that never committed. Every file is
then checked against ``state.json``: a damaged, truncated or replaced file is refused with a
:class:`~nni_fedexit.federated.errors.FederatedError` that names it and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from nni_fedexit.federated.errors import FederatedError
from nni_fedexit.files import fsync_dir, read_json, sha256_file, write_atomic, write_json

if TYPE_CHECKING:
    from nni_fedexit.federated.settings import FederatedSettings

__all__ = ["Checkpoint", "Resumed", "cpu_tensors", "WEIGHT_FILES", "check_state"]

#: the weights files a checkpoint may hold besides state.json, by role
WEIGHT_FILES = {"last": "last.safetensors", "best": "best.safetensors", "server": "server.safetensors"}
NEXT = ".next"

State = Mapping[str, torch.Tensor]

_START_OVER = ("move the folder away (or delete it) to start over, or restore it from a copy; "
               "with resume=False the run starts over in place")


def cpu_tensors(state: State) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: what safetensors and Flower's arrays take."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_state(state: Any, where: str | Path) -> dict[str, Any]:
    """``state.json``'s content, checked: the fields resume relies on, with their types and ranges."""
    def bad(why: str) -> FederatedError:
        return FederatedError(f"checkpoint file {where} is damaged: {why}; {_START_OVER}")

    if not isinstance(state, dict):
        raise bad(f"it holds a JSON {type(state).__name__}, not an object")
    for key in ("round", "best_round", "history", "fingerprint"):
        if key not in state:
            raise bad(f"it has no {key!r}")
    t, best = state["round"], state["best_round"]
    if not _is_int(t) or t < 0:
        raise bad(f"'round' must be a whole number >= 0, got {t!r}")
    if not _is_int(best) or not (0 <= best <= t) or (t > 0 and best == 0):
        raise bad(f"'best_round' must be a whole number in 1..{t}, got {best!r}")
    history = state["history"]
    if not isinstance(history, list) or len(history) != t:
        raise bad(f"'history' must list one record per round (round {t}), got "
                  f"{len(history) if isinstance(history, list) else type(history).__name__}")
    for i, record in enumerate(history, 1):
        if not isinstance(record, dict) or record.get("round") != i:
            raise bad(f"history entry {i} is not the record of round {i}")
        acc, loss = record.get("exit_accuracy"), record.get("total_loss")
        if (not isinstance(acc, list) or not acc or not all(isinstance(a, (int, float)) for a in acc)
                or not isinstance(loss, (int, float)) or isinstance(loss, bool)):
            raise bad(f"history entry {i} lacks its validation accuracies and total loss")
    if not isinstance(state["fingerprint"], str):
        raise bad("'fingerprint' is not a string")
    files = state.get("files", {})
    if not isinstance(files, dict) or not all(
            role in WEIGHT_FILES and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            for role, entry in files.items()):
        raise bad("'files' must map last/best/server to {'sha256': ...}")
    if "files" in state and "last" not in files:
        raise bad("'files' names no last.safetensors")
    return state


@dataclass
class Resumed:
    """What a checkpoint holds to go on from: its ``state.json``, the last and best weights, the server state.

    ``best`` is None when the best round's file is unusable (``best_problem`` says why); the
    last round's weights are all a resume needs.
    """

    state: dict[str, Any]
    last: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    server: dict[str, torch.Tensor]
    best_problem: str | None = None

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
        #: the weights files the last committed state.json names (known after a save or a load)
        self._files: dict[str, dict[str, str]] | None = None

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def state(self) -> dict[str, Any] | None:
        """``state.json``, or None while it is not there (or not readable): for watchers of a run."""
        try:
            return check_state(json.loads(self.state_path.read_text()), self.state_path)
        except (OSError, ValueError, FederatedError):
            return None

    def clear(self) -> None:
        """Remove the checkpoint's files (a run that starts over)."""
        for name in ("state.json", *WEIGHT_FILES.values()):
            (self.folder / name).unlink(missing_ok=True)
            (self.folder / (name + NEXT)).unlink(missing_ok=True)
        self._files = {}

    def resume_point(self, settings: "FederatedSettings") -> Resumed | None:
        """What to go on from, or None to start at round 1 (no checkpoint, or ``resume`` off); a
        checkpoint written with other settings, or for more rounds than ``settings.rounds``, is an error."""
        if not settings.resume or not self.exists():
            return None
        resumed = self.load()
        if resumed.state.get("fingerprint") != settings.fingerprint():
            raise FederatedError(
                f"checkpoint in {self.folder} was written with other settings (data, partition, model or training); "
                "use another checkpoint directory, or resume=False (resume=false in a Flower run config) to start over"
            )
        if resumed.round > settings.rounds:
            raise FederatedError(
                f"checkpoint {self.state_path} holds {resumed.round} rounds, more than rounds={settings.rounds}: "
                f"set rounds to at least {resumed.round} to go on from it, or use another checkpoint directory"
            )
        return resumed

    # ---- writing --------------------------------------------------------------------------------

    def save(self, state: Mapping[str, Any], last: State, best: State | None, server: State | None = None) -> None:
        """Write the new weights files as ``.next``, commit ``state.json``, then move them in place.

        ``best`` None keeps the best file of the previous save; ``server`` None or empty means no
        server state.
        """
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        previous = self._files if self._files is not None else self._committed_files()
        files: dict[str, dict[str, str]] = {}
        new = {"last": last, "best": best, "server": server or None}
        for role, tensors in new.items():
            if tensors is None:
                if role == "best" and "best" in previous:
                    files["best"] = previous["best"]
                elif role == "best" and self._path("best").is_file():  # written before state.json named its files
                    files["best"] = {"sha256": sha256_file(self._path("best"))}
                continue
            data = save(cpu_tensors(tensors))
            write_atomic(self._path(role, NEXT), lambda p, data=data: p.write_bytes(data))
            files[role] = {"sha256": hashlib.sha256(data).hexdigest()}
        write_json(self.state_path, {**dict(state), "files": files})  # the commit point
        self._apply(files, written=[role for role, tensors in new.items() if tensors is not None])

    def _path(self, role: str, suffix: str = "") -> Path:
        return self.folder / (WEIGHT_FILES[role] + suffix)

    def _committed_files(self) -> dict[str, dict[str, str]]:
        state = self.state()
        return dict(state.get("files", {})) if state else {}

    def _apply(self, files: Mapping[str, Mapping[str, str]], written: Sequence[str] = ()) -> None:
        """Journal step 3 (and the clean-up of a save that never committed): afterwards every file
        ``files`` names is in place, and no ``.next`` file is left. ``written``: the roles whose
        ``.next`` file this process has just written with the hash ``files`` names (not read again)."""
        moved = False
        for role in WEIGHT_FILES:
            pending = self._path(role, NEXT)
            if not pending.is_file():
                continue
            if role in files and (role in written or sha256_file(pending) == files[role]["sha256"]):
                os.replace(pending, self._path(role))
                moved = True
            else:
                pending.unlink()
        if moved:
            fsync_dir(self.folder)
        if "server" not in files:  # a server file of an earlier save that this one does not name
            self._path("server").unlink(missing_ok=True)
        self._files = {role: dict(entry) for role, entry in files.items()}

    # ---- reading --------------------------------------------------------------------------------

    def load(self) -> Resumed:
        """The checkpoint, checked file by file (see the module doc); damage raises FederatedError."""
        state, files = self._open()
        last = self._read("last", files)
        best, best_problem = None, None
        if (self._path("best").is_file() or (files and "best" in files)) and state["round"] > 0:
            try:
                best = self._read("best", files)
            except FederatedError as err:
                best_problem = str(err)
        server = self._read("server", files) if (files and "server" in files) or (
            files is None and self._path("server").is_file()) else {}
        return Resumed(state, last, best, server, best_problem)

    def best_weights(self) -> dict[str, torch.Tensor]:
        """The best round's weights, checked against ``state.json`` (what a finished run hands on)."""
        return self._read("best", self._open()[1])

    def _open(self) -> tuple[dict[str, Any], dict[str, dict[str, str]] | None]:
        """``state.json``, checked, and the files it names (None: written before it named them),
        with an interrupted save finished or dropped."""
        state = check_state(read_json(self.state_path, FederatedError, _START_OVER), self.state_path)
        files = state.get("files")
        if files is not None:
            self._apply(files)
        return state, files

    def _read(self, role: str, files: Mapping[str, Mapping[str, str]] | None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        path = self._path(role)
        if files is not None and role not in files:
            raise FederatedError(f"checkpoint file {self.state_path} names no {path.name}; {_START_OVER}")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise FederatedError(f"checkpoint file {path} is missing or unreadable ({err.strerror}); {_START_OVER}") from None
        if files is not None and hashlib.sha256(data).hexdigest() != files[role]["sha256"]:
            raise FederatedError(f"checkpoint file {path} does not match {self.state_path.name} (damaged, truncated or "
                                 f"replaced); {_START_OVER}")
        try:
            return load(data)
        except Exception as err:  # safetensors raises its own SafetensorError (and others) on bad bytes
            raise FederatedError(f"checkpoint file {path} is not a readable safetensors file ({err}); {_START_OVER}") from None
