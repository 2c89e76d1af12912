"""S5 on Flower: a real deployment (SuperLink + 2 SuperNodes + `flwr run`) on 127.0.0.1.

Builds nothing by hand: the app in examples/flower_deployment is submitted as a user would, the
processes talk over HTTP, and the run's checkpoint is compared with the simulation backend's for
the same seed and partitions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import flwr  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("flwr (Flower >= 1.42) cannot be imported: the Flower deployment backend is not testable here",
                allow_module_level=True)

import tomllib

import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_deployment"
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 240  # seconds for the whole run (2 rounds of the digits model take far less)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before listening on {port}:\n{log.read_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


class Processes:
    """Processes started by the test, each in its own session; stopped (with children) by pid."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=self.env, cwd=str(self.logs), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        return proc, log

    def stop_all(self) -> None:
        # newest first: the run, the SuperNodes (and their ClientApps), then the SuperLink
        for _, proc in reversed(self.procs):
            self._signal(proc, signal.SIGTERM)
        deadline = time.time() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(proc, signal.SIGKILL)  # its process group: the children it spawned
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group whose id is this process's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass


def _app_config(**overrides) -> dict:
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update(overrides)
    return config


def _flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _run_status(env: dict[str, str]) -> list[dict]:
    res = _flwr(env, "ls", "local-deploy", "--format", "json", timeout=30)
    try:
        return json.loads(res.stdout).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return []


def test_deployment_trains_two_rounds_like_the_simulation(tmp_path):
    from safetensors.torch import load_file

    home = tmp_path / "flwr_home"
    home.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    ckpt = tmp_path / "checkpoint"
    link_port = _free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-deploy"\n\n'
        f'[superlink.local-deploy]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # flwr-serverapp, flwr-clientapp, ... of this venv
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    procs = Processes(env, logs)
    try:
        link, link_log = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(link_port),
        ])
        _wait_port(link_port, link, 60, link_log)
        for i in range(2):
            procs.start(f"supernode{i}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2",
            ])
        run, run_log = procs.start("flwr_run", [
            str(BIN / "flwr"), "run", str(APP), "local-deploy", "--stream",
            "--run-config", f'checkpoint-dir="{ckpt}" client-threads=1',
        ])
        deadline = time.time() + RUN_TIMEOUT
        state = None
        while time.time() < deadline:
            if (ckpt / "state.json").is_file():
                state = json.loads((ckpt / "state.json").read_text())
                if state["round"] >= 2:
                    break
            if run.poll() is not None and run.returncode != 0:
                break
            time.sleep(2)
        # the run finishes right after the last round's checkpoint
        while time.time() < deadline and run.poll() is None:
            time.sleep(1)
        diag = "\n".join(f"--- {p.name}:\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("*.log")))
        assert state is not None and state["round"] == 2, f"the run did not complete 2 rounds in {RUN_TIMEOUT} s\n{diag}"
        assert run.returncode == 0, diag
        runs = _run_status(env)
        assert runs and all("completed" in str(r.get("status", "")) for r in runs), f"{runs}\n{diag}"
    finally:
        procs.stop_all()

    # two rounds, both clients accepted in each, the checkpoint is there and loads
    assert [h["round"] for h in state["history"]] == [1, 2]
    assert all(h["accepted"] == 2 and not h["failed"] and not h["rejected"] for h in state["history"]), state["history"]
    assert state["backend"] == "flower" and (ckpt / "last.safetensors").is_file() and (ckpt / "best.safetensors").is_file()
    deployed = load_file(str(ckpt / "last.safetensors"))

    # the simulation backend, same seed and partitions (client i = partition i): same weights
    from nni_fedexit.federated import federate
    from nni_fedexit.federated.flower.common import build_model, load_data, settings_from_config

    config = _app_config()
    settings = settings_from_config(config, num_clients=2, min_clients=2, checkpoint_dir=str(tmp_path / "sim"))
    # one torch thread, as the ClientApps ran (client-threads=1, OMP_NUM_THREADS=1): float32
    # reductions depend on the thread count, the data's normalisation statistics included
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_data(settings)
        model = build_model(config, settings, data.bundle)
        assert set(model.state_dict()) == set(deployed)
        result = federate(model, settings, data=data, report=False)
    finally:
        torch.set_num_threads(threads)
    assert [h["clients"] for h in result.history] == [
        [{"client": c["partition"], "depth": c["depth"], "seed": c["seed"]} for c in sorted(h["clients"], key=lambda c: c["partition"])]
        for h in state["history"]
    ]
    simulated = load_file(str(tmp_path / "sim" / "last.safetensors"))
    worst = max(float((deployed[k].double() - simulated[k].double()).abs().max()) for k in simulated)
    assert worst <= 1e-5, f"deployment and simulation differ by {worst}"


def test_run_config_builds_the_simulation_model_and_checks_branch_arrays():
    from nni_fedexit.federated.flower.common import (
        branch_keys, build_model, load_branch_state, load_data, settings_from_config, to_array_record, to_state_dict,
    )

    config = _app_config(**{"client-samples": 0, "loss-weights": "[1, 0.5, 2]", "batch-size": 16.0})
    settings = settings_from_config(config, num_clients=2, min_clients=2)
    assert (settings.dataset, settings.rounds, settings.head, settings.client_samples) == ("digits", 2, "linear", None)
    assert settings.loss_weights == [1, 0.5, 2] and settings.batch_size == 16 and settings.backend == "simulation"
    data = load_data(settings)
    model = build_model(config, settings, data.bundle)
    again = build_model(config, settings, data.bundle)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())  # seeded
    assert model.num_exits == 3 and model.loss_weights == (1.0, 0.5, 2.0)
    keys = branch_keys(model, 1)
    assert set(keys) < set(model.state_dict()) and all(k.startswith(("stem.", "stages.0.", "exits.0.")) for k in keys)
    state = to_state_dict(to_array_record(model.state_dict(), keys))
    assert list(state) == keys and all(torch.equal(state[k], model.state_dict()[k]) for k in keys)
    load_branch_state(again, state, 1)
    with pytest.raises(ValueError, match="do not match"):
        load_branch_state(again, state, 2)
