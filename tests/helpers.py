"""What the tests share, in one place (fixtures are in conftest.py):

- paths: the repository, its examples, this venv's scripts; whether Fashion-MNIST is installed;
- the tiny digits-sized space and its sample, the tests' planted choice space;
- a free port, NNI's REST API, NNI experiments (NAS trials, shared mode), waiting for one to end;
- torch thread counts and state-dict comparisons;
- the Flower harness: FLWR_HOME config files, a SuperLink with SuperNodes as real processes,
  `flwr` calls, TLS certificates and SuperNode keys.

Test modules import it as ``from helpers import ...`` (conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping
from unittest import mock

import pytest

from nni_fedexit.data import FASHION_MNIST_SYSTEM_DIR

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: this venv's scripts (nnictl, nni-fedexit, flower-superlink, flwr, ...)
BIN = Path(sys.executable).parent
#: Debian's dataset-fashion-mnist is installed (`make data`)
HAVE_FMNIST = (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file()


# ---- what the suite needs beyond the venv (`make test` installs all of it; in CI a skip fails) --


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


#: Fashion-MNIST's IDX files in Debian's folder
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_SYSTEM_DIR}: `make data` (Debian's dataset-fashion-mnist)")
#: Flower: the flower and flower-simulation backends
needs_flwr = pytest.mark.skipif(
    not importable("flwr"), reason="flwr cannot be imported: `make install` (pip install -e '.[flower]')")
#: the web UI in a real browser: selenium, Debian's chromium and chromium-driver
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not importable("selenium") or CHROMIUM is None or CHROMEDRIVER is None,
    reason="selenium, chromium or chromedriver missing: `make install browser` (pip extra 'test'; "
           "Debian's chromium and chromium-driver, as root)")


#: OpenSSH's ssh-keygen: SuperNode authentication keys
needs_ssh_keygen = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="ssh-keygen missing: `make browser` (Debian's openssh-client, as root)")


@contextlib.contextmanager
def headless_chrome(profile: Path) -> Iterator:
    """Debian's chromium driven by selenium, headless, with its own profile (so no column choice or
    expanded row of an earlier test carries over through localStorage)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


# ---- spaces and samples ------------------------------------------------------------------------

#: an architecture of :func:`tiny_space` (3 stages)
TINY_SAMPLE = {"stage1": "resnet18", "stage2": "resnet50", "stage3": "resnet18"}

#: a classic NNI search space of two parameters with a planted best value each (tuner and nnictl tests)
PLANTED_SPACE = {
    "a": {"_type": "choice", "_value": ["x", "y", "z"]},
    "c": {"_type": "randint", "_value": [0, 3]},
}
PLANTED = {"a": "z", "c": 2}


def tiny_space(widths=(8, 16, 16), sources=("resnet18", "resnet50"), **kwargs):
    """The block-pool space of resnet18 and resnet50 blocks (or ``sources``) for 8x8 images (digits):
    one stage per width (3 stages, 8 networks by default)."""
    from nni_fedexit import ResNetBlockPoolSpace

    return ResNetBlockPoolSpace(sources=list(sources), **{"image_size": 8, **kwargs}, widths=list(widths))


# ---- ports, NNI's REST API, NNI experiments ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nni_api(port: int, path: str):
    """GET ``/api/v1/nni/<path>`` of the NNI manager on ``port``, as JSON."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{path}", timeout=10) as r:
        return json.load(r)


def wait_until(condition, timeout: float, explain, poll: float = 0.5):
    """``condition()``'s first true value, checked every ``poll`` s; fails after ``timeout`` s (a bound
    for a hung process, not a guess of how long it takes) with ``explain()`` (or ``explain``)."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"not after {timeout} s: {explain() if callable(explain) else explain}")
        time.sleep(poll)


def wait_experiment_done(port: int, deadline: float, poll: float = 1.0) -> dict:
    """The experiment's ``check-status`` once it is DONE, ERROR or STOPPED; fails at ``deadline`` (time.time())."""
    last = {}

    def done():
        last["status"] = nni_api(port, "check-status")
        return last["status"] if last["status"]["status"] in ("DONE", "ERROR", "STOPPED") else None

    return wait_until(done, max(0.0, deadline - time.time()), lambda: f"experiment not done; last status "
                      f"{last.get('status')}, {len(nni_api(port, 'trial-jobs'))} trial jobs so far", poll)


#: what a socket listening on every interface reports as its address
ALL_INTERFACES = {"0.0.0.0", "::"}


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine (None if it has none)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def reachable(address: str, port: int) -> bool:
    """Whether a TCP connection to ``address:port`` is accepted."""
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex((address, port)) == 0


def trial_processes(experiment_id: str) -> list[int]:
    """The pids of this user's processes that run a trial of NNI experiment ``experiment_id`` (the
    trial command and what it started: NNI's manager puts NNI_EXP_ID and NNI_TRIAL_JOB_ID in their environment)."""
    want = f"NNI_EXP_ID={experiment_id}".encode()
    return [pid for pid, env in proc_files("environ")
            if want in env.split(b"\0") and any(e.startswith(b"NNI_TRIAL_JOB_ID=") for e in env.split(b"\0"))]


def trial_threads(concurrent: int) -> str:
    """OMP_NUM_THREADS for ``concurrent`` trial processes: their share of this machine's CPUs (at least 1),
    at most what the environment already says. Two trials of 2 torch threads each on 2 cores are
    oversubscribed: with one thread each, test_strategy's 4-trial experiment took 19-23 s instead of
    23-37 s on the 2-core machine (what the trials report is only compared with itself)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cpus // max(1, concurrent))
    return str(min(share, int(os.environ.get("OMP_NUM_THREADS") or share)))


def run_trials_experiment(space, evaluator, strategy, work_dir, trials: int, concurrency: int = 2):
    """Run a NasExperiment on the local training service; returns (trial jobs, metric data, top model).

    The trial processes (started by NNI's manager, which inherits this environment) share the CPUs:
    see :func:`trial_threads`."""
    from nni.nas.experiment import NasExperiment

    exp = NasExperiment(space, evaluator, strategy)
    exp.config.max_trial_number = trials
    exp.config.trial_concurrency = concurrency
    exp.config.training_service.use_active_gpu = False
    exp.config.experiment_working_directory = str(work_dir)
    port = free_port()
    try:
        with mock.patch.dict(os.environ, OMP_NUM_THREADS=trial_threads(min(trials, concurrency))):
            exp.run(port=port)
        jobs = nni_api(port, "trial-jobs")
        metrics = nni_api(port, "metric-data")
        exported = exp.export_top_models(formatter="dict")
    finally:
        exp.stop()
    return jobs, metrics, exported


def run_shared_experiment(space, evaluator, strategy, work_dir):
    """Run a NasExperiment in this process (a shared-mode strategy); returns its top models as dicts."""
    from nni.nas.experiment import NasExperiment

    exp = NasExperiment(space, evaluator, strategy)
    exp.config.experiment_working_directory = str(work_dir)
    try:
        exp.run()
        return exp.export_top_models(formatter="dict")
    finally:
        exp.stop()


def venv_env(**overrides: str) -> dict[str, str]:
    """This process's environment with ``overrides`` and this venv's scripts first on PATH."""
    env = dict(os.environ, **overrides)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---- federated settings ------------------------------------------------------------------------


def digits_settings(**overrides: object):
    """FederatedSettings of a small digits run (2 rounds, 4 clients, linear heads); ``overrides``
    change any field. A test module with other needs binds its own with functools.partial."""
    from nni_fedexit.federated import FederatedSettings

    base = dict(dataset="digits", rounds=2, num_clients=4, min_clients=2, batch_size=32, lr=0.05, seed=0, head="linear")
    return FederatedSettings(**{**base, **overrides})


# ---- torch -------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads (float32 reductions depend on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def max_abs_difference(a: Mapping, b: Mapping) -> float:
    """The largest absolute difference between two state dicts, over the keys of ``b``."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


# ---- Flower ------------------------------------------------------------------------------------

#: the Flower app the deployment tests submit, as a user would
FLOWER_APP = EXAMPLES / "flower_deployment"


def write_flwr_config(home: Path, connection: str, address: str, security: str = "insecure = true",
                      default: bool = False) -> Path:
    """FLWR_HOME's config.toml with one SuperLink connection (``security``: a TOML line)."""
    head = f'[superlink]\ndefault = "{connection}"\n\n' if default else ""
    path = home / "config.toml"
    path.write_text(f'{head}[superlink.{connection}]\naddress = "{address}"\n{security}\n')
    return path


def wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until something listens on 127.0.0.1:``port``; fails with ``log``'s tail when ``proc`` exits first."""
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


class RayCluster(Processes):
    """A Ray cluster on 127.0.0.1 started as a user would (``ray start --head``, ``ray start
    --address``), each node in the foreground (``--block``) of its own session, with its own
    free ports and temp dir: stopping them by process group stops only this cluster."""

    def __init__(self, tmp_path: Path):
        # token authentication: only processes holding the token may join or drive the cluster
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        env = venv_env(RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", **self.auth)
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set, it forbids a second node
        super().__init__(env, tmp_path)
        # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        #: port ranges taken by this cluster's nodes
        self.used: list[tuple[int, int]] = []
        self.port = self._port()
        self.address = f"127.0.0.1:{self.port}"

    def _port(self) -> int:
        """A free port outside every range this cluster already uses (Ray refuses overlaps)."""
        while True:
            port = free_port()
            if not any(lo <= port <= hi for lo, hi in self.used):
                self.used.append((port, port))
                return port

    def _ports(self) -> list[str]:
        workers = self._port()
        self.used.append((workers, workers + 40))
        ports = [self._port() for _ in range(6)]
        return [f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
                f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
                f"--node-manager-port={ports[4]}", f"--object-manager-port={ports[5]}",
                f"--min-worker-port={workers}", f"--max-worker-port={workers + 40}"]

    def node(self, name: str, num_cpus: int, head: bool = False) -> subprocess.Popen:
        args = [str(BIN / "ray"), "start", "--block", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
                "--disable-usage-stats", *self._ports()]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
                     f"--ray-client-server-port={self._port()}"]
        else:
            args += [f"--address={self.address}"]
        proc, _ = self.start(name, args)
        return proc

    def wait_nodes(self, count: int, timeout: float) -> None:
        """Until ``ray status`` lists ``count`` alive nodes (a node's raylet has registered)."""
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            res = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"], env=self.env,
                                 capture_output=True, text=True, timeout=60)
            out = res.stdout + res.stderr
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
            if active.count("node_") >= count:
                return
            time.sleep(1.0)
        raise AssertionError(f"the Ray cluster at {self.address} has not {count} nodes after {timeout} s:\n{out[-2000:]}"
                             f"\n{self.diag()}")

    def diag(self) -> str:
        return "\n".join(f"--- {name}.log\n" + (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                         for name, _ in self.procs)

    def stop_all(self) -> None:
        super().stop_all()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Processes of this machine still running for this cluster (its temp dir or address in their command line)."""
        return processes_with(lambda cmd: str(self.temp_dir) in cmd or self.address in cmd)


def proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, contents of /proc/PID/``name``) of every process this user may read."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / name).read_bytes()
            except OSError:  # gone, or not ours
                continue


def processes_with(match) -> list[str]:
    """``"pid: command line"`` of this machine's processes whose command line ``match`` accepts."""
    out = []
    for pid, raw in proc_files("cmdline"):
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
        if match(cmd):
            out.append(f"{pid}: {cmd[:200]}")
    return out


class Deployment(Processes):
    """A SuperLink and its SuperNodes on 127.0.0.1, with a temporary FLWR_HOME (``local-deploy``).

    ``tls``: a folder holding ``ca.crt``, ``server.pem`` and ``server.key`` (see :func:`make_tls`):
    the SuperLink then serves TLS and authenticates SuperNodes, and ``flwr`` trusts that CA.
    """

    def __init__(self, tmp_path: Path, tls: Path | None = None):
        home = tmp_path / "flwr_home"
        home.mkdir()
        logs = tmp_path / "logs"
        logs.mkdir()
        self.tls = tls
        self.link_port = free_port()
        security = f'root-certificates = "{tls / "ca.crt"}"' if tls else "insecure = true"
        write_flwr_config(home, "local-deploy", f"127.0.0.1:{self.link_port}", security, default=True)
        env = venv_env(  # flwr-serverapp, flwr-clientapp, ... of this venv first on PATH
            FLWR_HOME=str(home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        super().__init__(env, logs)

    def superlink(self) -> subprocess.Popen:
        if self.tls:
            security = ["--ssl-ca-certfile", str(self.tls / "ca.crt"), "--ssl-certfile", str(self.tls / "server.pem"),
                        "--ssl-keyfile", str(self.tls / "server.key"), "--enable-supernode-auth"]
        else:
            security = ["--insecure"]
        link, link_log = self.start("superlink", [
            str(BIN / "flower-superlink"), *security, "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.link_port),
        ])
        wait_port(self.link_port, link, 60, link_log)
        return link

    def supernode(self, name: str, node_config: str, key: Path | None = None) -> tuple[subprocess.Popen, Path]:
        if self.tls:
            security = ["--root-certificates", str(self.tls / "ca.crt"), "--auth-supernode-private-key", str(key)]
        else:
            security = ["--insecure"]
        return self.start(name, [
            str(BIN / "flower-supernode"), *security, "--superlink", f"127.0.0.1:{self.link_port}",
            "--port", str(free_port()), "--node-config", node_config,
        ])

    def run(self, run_config: str, app: Path = FLOWER_APP) -> tuple[subprocess.Popen, Path]:
        return self.start("flwr_run", [
            str(BIN / "flwr"), "run", str(app), "local-deploy", "--stream", "--run-config", run_config,
        ])

    def online_nodes(self) -> int:
        res = flwr_cli(self.env, "supernode", "list", "local-deploy", "--format", "json", timeout=30)
        try:
            return sum(n.get("status") == "online" for n in json.loads(res.stdout).get("nodes", []))
        except (json.JSONDecodeError, AttributeError):
            return 0

    def wait_online(self, count: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.online_nodes() >= count:
                return
            time.sleep(1)
        raise AssertionError(f"fewer than {count} SuperNodes online after {timeout} s\n{self.diag()}")

    @staticmethod
    def state(ckpt: Path) -> dict | None:
        try:
            return json.loads((ckpt / "state.json").read_text())
        except (OSError, json.JSONDecodeError):  # not there yet, or being written
            return None

    def wait_rounds(self, ckpt: Path, run: subprocess.Popen, rounds: int, timeout: float) -> dict | None:
        """The checkpoint's state once ``rounds`` rounds are in it and the run has ended (or at the deadline)."""
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.state(ckpt) or state
            if state is not None and state["round"] >= rounds:
                break
            if run.poll() is not None and run.returncode != 0:
                break
            time.sleep(2)
        # the run finishes right after the last round's checkpoint
        while time.time() < deadline and run.poll() is None:
            time.sleep(1)
        return self.state(ckpt) or state

    def diag(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.glob("*.log")))

    def kill(self, proc: subprocess.Popen) -> None:
        self._signal(proc, signal.SIGKILL)
        proc.wait(timeout=10)


HOSTILE_CLIENT = '''"""Our ClientApp, with misbehaviour a node's --node-config asks for:

- ``hostile=1``: claims 1e18 training examples every round (``hostile-from=R``: from round R on);
- ``hold-at-round=R hold-file=PATH``: when round R's message arrives, writes PATH and never
  replies (until the node is killed): a test kills it after that event, never before.
"""
import time
from pathlib import Path

from flwr.clientapp import ClientApp

from nni_fedexit.federated.backends.flower import client_app as ours

app = ClientApp()


@app.query()
def query(msg, context):
    return ours.query(msg, context)


@app.train()
def train(msg, context):
    node = context.node_config
    server_round = int(msg.content.config_records["config"]["server-round"])
    if "hold-at-round" in node and server_round == int(node["hold-at-round"]):
        Path(str(node["hold-file"])).write_text(str(server_round))
        while True:
            time.sleep(1)
    reply = ours.train(msg, context)
    if node.get("hostile") or ("hostile-from" in node and server_round >= int(node["hostile-from"])):
        reply.content.metric_records["metrics"]["num-examples"] = 1e18
    return reply
'''


def hostile_flower_app(folder: Path, **settings) -> Path:
    """The example Flower app with the ClientApp of :data:`HOSTILE_CLIENT` (misbehaving as the node's
    config says), and ``settings`` in its settings table (:func:`flower_app_text`)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = flower_app_text(**settings)
    text = text.replace('clientapp = "nni_fedexit.federated.backends.flower.client_app:app"', 'clientapp = "hostile_client:app"')
    assert "hostile_client:app" in text
    (folder / "pyproject.toml").write_text(text)
    (folder / "hostile_client.py").write_text(HOSTILE_CLIENT)
    return folder


def sigint_default() -> None:
    """``preexec_fn`` of a child a test stops with SIGINT: Python's Ctrl-C handling in it even
    where the tests run with SIGINT ignored (a background job of a non-interactive shell inherits
    SIG_IGN, and Python keeps it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):  # a run config holds no lists or tables of settings: a JSON string
        value = json.dumps(value)
    return json.dumps(value) if isinstance(value, str) else repr(value)


def flower_app_text(**settings) -> str:
    """The example Flower app's pyproject.toml with ``settings`` (FederatedSettings keys) set in its
    ``[tool.flwr.app.config.settings]`` table (the file's last), replacing the example's own."""
    import re

    text = (FLOWER_APP / "pyproject.toml").read_text()
    for key, value in settings.items():
        line = f"{key} = {_toml(value)}"
        text, found = re.subn(rf"^{re.escape(key)} = .*$", lambda _: line, text, flags=re.M)
        if not found:
            text = text.rstrip("\n") + "\n" + line + "\n"
    return text


def flower_app_config(**settings) -> dict:
    """The run config of the example Flower app with ``settings`` (:func:`flower_app_text`), as
    Flower hands it to the apps: nested tables as dotted keys (``settings.rounds``)."""
    def flat(table: Mapping, prefix: str = "") -> dict:
        out: dict = {}
        for key, value in table.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {prefix + key: value})
        return out

    return flat(tomllib.loads(flower_app_text(**settings))["tool"]["flwr"]["app"]["config"])


def flwr_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The ``flwr`` command line of this venv."""
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def flwr_runs(env: dict[str, str]) -> list[dict]:
    """``flwr ls local-deploy``: the runs the SuperLink knows ([] when it does not answer)."""
    res = flwr_cli(env, "ls", "local-deploy", "--format", "json", timeout=30)
    try:
        return json.loads(res.stdout).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return []


def make_tls(folder: Path) -> Path:
    """A CA and a server certificate (SANs localhost, 127.0.0.1) it signed: ca.crt, server.pem, server.key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir()
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public_key, signing_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nni-fedexit test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key.public_key(), ca_key,
                  False, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


def ssh_key(path: Path) -> Path:
    """A SuperNode key pair (``path`` and ``path.pub``) made by ssh-keygen."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)], check=True,
                   capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return path


# ---- a third-party plugin distribution -------------------------------------------------------

#: the plugin's module: an aggregator and an objective (FedAvg's and the multi-exit loss's maths)
#: that write one JSON line per use to $FEDEXIT_PLUGIN_LOG, saying in which process they ran
PLUGIN_MODULE = '''"""A third-party nni-fedexit plugin, as a user would write one."""
import json
import os
import sys

from pydantic import Field

from nni_fedexit.components import ComponentParams
from nni_fedexit.federated.aggregators import FedAvg
from nni_fedexit.federated.objectives import MultiExitObjective


def log_use(kind, **extra):
    path = os.environ.get("FEDEXIT_PLUGIN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "pid": os.getpid(), "argv0": os.path.basename(sys.argv[0]),
                                "nni_trial": os.environ.get("NNI_TRIAL_JOB_ID"), **extra}) + "\\n")


#: a search-space preset (``nni_fedexit.search_spaces``): two ResNets' blocks at tiny widths
PLUGIN_POOL = {"sources": ["resnet18", "resnet50"], "in_chans": 1, "image_size": 8, "num_classes": 10,
               "widths": [8, 16, 16]}


class LoggedFedAvg(FedAvg):
    """FedAvg that says where it ran, with a parameter of its own."""

    class Params(ComponentParams):
        tag: str = Field("plugin", description="written into each log line")

    def begin(self, global_state):
        log_use("aggregator", tag=self.params.tag)
        return super().begin(global_state)


class LoggedMultiExit(MultiExitObjective):
    """The multi-exit loss, saying where it ran."""

    def begin(self, ctx):
        log_use("objective", client=ctx.client)
        super().begin(ctx)
'''

PLUGIN_PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "fedexit-plugin-demo"
version = "0.1"

[project.entry-points."nni_fedexit.aggregators"]
logged_fedavg = "fedexit_plugin_demo:LoggedFedAvg"

[project.entry-points."nni_fedexit.objectives"]
logged_multi_exit = "fedexit_plugin_demo:LoggedMultiExit"

[project.entry-points."nni_fedexit.search_spaces"]
plugin_pool = "fedexit_plugin_demo:PLUGIN_POOL"

[tool.setuptools]
py-modules = ["fedexit_plugin_demo"]
'''


def install_plugin_distribution(folder: Path) -> Path:
    """Build the plugin from its source (a pyproject with entry points) and install it with pip into
    ``folder/site`` (``pip install --target``): that folder on PYTHONPATH is a site where
    ``importlib.metadata`` finds it, in this process and in every process started with it."""
    source = folder / "src"
    source.mkdir(parents=True)
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (source / "fedexit_plugin_demo.py").write_text(PLUGIN_MODULE)
    site = folder / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(site.glob("fedexit_plugin_demo-0.1.dist-info/entry_points.txt")), sorted(p.name for p in site.iterdir())
    return site


def plugin_uses(log: Path) -> list[dict]:
    """The plugin's log lines (one per use)."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
