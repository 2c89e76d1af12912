"""The ``flower`` backend of :func:`~nni_fedexit.federated.federate`: submit, follow, report.

The cloud side runs here, in the NNI trial (or a Python session): the run config is written into
a Flower app folder, submitted with ``flwr run`` to the SuperLink connection
``backend.superlink`` (a ``[superlink.NAME]`` entry of ``$FLWR_HOME/config.toml``), and followed
through the checkpoint the ServerApp writes after every round (``state.json`` in
``checkpoint_dir``): each new round is reported to NNI, until ``flwr ls`` says the run finished.
So the ServerApp must be able to write ``checkpoint_dir`` and read the initial weights next to
it: run the SuperLink on this machine (or share that folder); the SuperNodes run anywhere.

Only the ``flwr`` command line is used here (no flwr import): its options are Flower's public
interface, and its JSON output (``--format json``) is parsed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from pydantic import Field, field_validator

from nni_fedexit.components import ComponentParams
from nni_fedexit.exits import ExitCost
from nni_fedexit.federated.checkpoint import Checkpoint, cpu_tensors
from nni_fedexit.federated.client_data import FederatedData
from nni_fedexit.federated.errors import FederatedError
from nni_fedexit.federated.rounds import RunOutcome
from nni_fedexit.federated.settings import FederatedSettings
from nni_fedexit.files import write_atomic
from nni_fedexit.federated.backends.flower.common import run_config, write_app

__all__ = ["FlowerCLI", "run_on_flower"]

_logger = logging.getLogger(__name__)

#: seconds between two looks at the checkpoint and the run's status
POLL = 3.0
#: seconds without an answer from the SuperLink before the run is given up on
LOST_CONTACT = 180.0


class _Stopped(Exception):
    """This process was asked to stop (SIGTERM, e.g. ``nnictl stop``): the Flower run is stopped too."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(f"stopped by signal {signum}: the Flower run is stopped too; rerun with resume to go on "
                   "from its last checkpoint")


class FlowerCLI:
    """The ``flwr`` command of this environment, pointed at one SuperLink connection."""

    def __init__(self, superlink: str, home: str | None = None):
        exe = Path(sys.executable).parent / "flwr"
        found = str(exe) if exe.is_file() else shutil.which("flwr")
        if found is None:
            raise FederatedError("backend 'flower' needs the flwr command: pip install 'nni-fedexit[flower]'")
        self.exe = found
        self.superlink = superlink
        self.env = dict(os.environ)
        if home:
            self.env["FLWR_HOME"] = str(Path(home).expanduser())
        self.home = self.env.get("FLWR_HOME", str(Path.home() / ".flwr"))

    def __call__(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json``; its JSON answer (``success`` false when it failed)."""
        try:
            res = subprocess.run([self.exe, *args, "--format", "json"], env=self.env, capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"success": False, "error-message": f"flwr {args[0]} gave no answer in {timeout:.0f} s"}
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            out = None
        if not isinstance(out, dict):
            return {"success": False, "error-message": (res.stdout + res.stderr).strip()[-2000:]}
        return out

    def where(self) -> str:
        return f"SuperLink connection {self.superlink!r} of {self.home}/config.toml"

    def submit(self, app: Path) -> int:
        out = self("run", str(app), self.superlink)
        if not out.get("success"):
            raise FederatedError(
                f"flwr run was refused ({self.where()}): {out.get('error-message', out)}. Check that the SuperLink "
                "runs and that this connection has its address (and root-certificates for TLS, or insecure = true)"
            )
        return int(out["run-id"])

    def status(self, run_id: int) -> str | None:
        """``pending``, ``running``, ``finished:completed`` / ``:failed`` / ``:stopped``; None: no answer."""
        out = self("ls", self.superlink, "--run-id", str(run_id), timeout=60.0)
        runs = out.get("runs") if out.get("success") else None
        return str(runs[0].get("status")) if runs else None

    def stop(self, run_id: int) -> None:
        out = self("stop", str(run_id), self.superlink, timeout=60.0)
        if not out.get("success"):
            _logger.warning("flwr stop %d failed: %s", run_id, out.get("error-message", out))

    def follow_log(self, run_id: int, path: Path) -> subprocess.Popen:
        """``flwr log RUN_ID --stream`` into ``path`` (the ServerApp's log: rounds, nodes that dropped)."""
        with path.open("ab") as out:
            return subprocess.Popen([self.exe, "log", str(run_id), self.superlink, "--stream"], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class FlowerParams(ComponentParams):
    """The options of backend ``flower`` (``backend: {name: flower, superlink: local-deploy}``)."""

    superlink: str = Field("", validate_default=True, description="the SuperLink connection the run is submitted "
                           "to with flwr run: a [superlink.NAME] entry of $FLWR_HOME/config.toml")
    flwr_home: str | None = Field(None, description="FLWR_HOME of the flwr CLI (null: the environment's, else ~/.flwr)")

    @field_validator("superlink")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the flower backend needs the name of a SuperLink connection ([superlink.NAME] in "
                             "$FLWR_HOME/config.toml), e.g. backend: {name: flower, superlink: local-deploy}")
        return value


def run_on_flower(
    model: torch.nn.Module, settings: FederatedSettings, data: FederatedData | None = None,
    costs: Sequence[ExitCost] = (), on_record: Callable[[Mapping[str, Any]], None] | None = None,
) -> RunOutcome:
    """The ``flower`` backend: run ``settings.rounds`` rounds on the SuperNodes of a SuperLink.

    The ServerApp runs the rounds (with the same round engine as the simulation) and writes the
    checkpoint; this side submits the run, follows ``state.json`` and calls ``on_record(record)``
    once for every round the run adds. ``model`` is the exit-point model (a
    :class:`~nni_fedexit.exits.MultiExitNetwork` with the ``arch`` and ``spec`` of its network):
    its weights are the run's initial weights. ``data`` and ``costs`` are not needed here: the
    ServerApp loads the data and measures the exits itself.
    """
    s = settings

    def on_round(record: Mapping[str, Any]) -> None:
        _logger.info("Round %d/%d: val accuracy per exit %s, total loss %.4f", record["round"], s.rounds,
                     " ".join(f"{a:.4f}" for a in record["exit_accuracy"]), record["total_loss"])
        if on_record is not None:
            on_record(record)

    if getattr(model, "arch", None) is None or getattr(model, "spec", None) is None:
        raise FederatedError("backend 'flower' rebuilds the network on the server and the nodes from its architecture: "
                             "give federate() a network of ResNetBlockPoolSpace (space.build(sample) or NNI's trial model)")
    params = s.params("backend")
    if not isinstance(params, FlowerParams):
        raise FederatedError(f"backend 'flower' needs its options (backend: {{name: flower, superlink: ...}}), "
                             f"the settings choose backend {s.name('backend')!r}")
    cli = FlowerCLI(params.superlink, params.flwr_home)
    if s.checkpoint_dir:
        ckpt = Checkpoint(Path(s.checkpoint_dir).expanduser().absolute())
    else:
        ckpt = Checkpoint(tempfile.mkdtemp(prefix="fedexit-flower-"))
        _logger.info("Checkpoints of the Flower run go to %s", ckpt.folder)
    ckpt.folder.mkdir(parents=True, exist_ok=True)
    if not s.resume:
        ckpt.clear()
    before = ckpt.state()
    reported = int(before["round"]) if before else 0

    from safetensors.torch import save_file

    initial = write_atomic(ckpt.folder / "initial.safetensors", lambda p: save_file(cpu_tensors(model.state_dict()), str(p)))
    config = run_config(s.replace(checkpoint_dir=str(ckpt.folder)), model.arch, model.spec, **{"initial-weights": str(initial)})
    app = write_app(ckpt.folder / "flower_app", config)

    run_id = cli.submit(app)
    log_path = ckpt.folder / f"flower-run-{run_id}.log"
    _logger.info("Flower run %d submitted to %s (%d rounds; log %s)", run_id, cli.where(), s.rounds, log_path)
    status: str | None = None
    previous = None
    log_proc: subprocess.Popen | None = None
    # SIGTERM stops the run from here on; installed before the run's log file appears, so a
    # stop sent once that file exists (what a supervisor can see) always reaches the run
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        log_proc = cli.follow_log(run_id, log_path)
        last_answer = time.time()
        # a safety net only: every round is bounded by the ServerApp (round_timeout for the replies)
        budget = s.node_wait + (s.rounds - reported) * (2 * s.round_timeout + 300) + 300
        deadline = time.time() + budget
        while True:
            state = ckpt.state()
            for record in (state or {}).get("history", []):
                if record["round"] > reported:
                    reported = record["round"]
                    on_round(record)
            status = cli.status(run_id)
            if status is not None:
                last_answer = time.time()
                if status.startswith("finished"):
                    break
            elif time.time() - last_answer > LOST_CONTACT:
                raise FederatedError(f"no answer from {cli.where()} for {LOST_CONTACT:.0f} s about run {run_id}")
            if time.time() > deadline:
                raise FederatedError(f"Flower run {run_id} did not finish in {budget:.0f} s; it was stopped")
            time.sleep(POLL)
    except BaseException:
        if status is None or not status.startswith("finished"):
            cli.stop(run_id)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if log_proc is not None:
            try:
                log_proc.wait(timeout=30)  # the stream ends with the run
            except subprocess.TimeoutExpired:
                log_proc.kill()
                log_proc.wait()

    state = ckpt.state()
    for record in (state or {}).get("history", []):  # rounds the last look missed
        if record["round"] > reported:
            on_round(record)
    done = int(state["round"]) if state else 0
    if status != "finished:completed" or done < s.rounds:
        raise FederatedError(
            f"Flower run {run_id} ended {status} after round {done} of {s.rounds}; rounds 1..{done} are kept in "
            f"{ckpt.folder} (rerun with resume to go on). The ServerApp's log ({log_path}) ends with:\n{_tail(log_path)}"
        )
    clients = [{"node": int(n), **p} for n, p in state.get("nodes", {}).items()]
    return RunOutcome(state["history"], int(state["best_round"]), ckpt.best_weights(), clients)


run_on_flower.Params = FlowerParams  # type: ignore[attr-defined]
