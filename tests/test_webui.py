"""The NNI web server bound to 127.0.0.1 through our node preload, and the web UI message.

A real classic NNI experiment (local training service, one trial) is started inside
`nni_manager_env()`: its port is in LISTEN state on 127.0.0.1 only, the REST API answers there,
the trial succeeds (so the tuner and the trial still reach the manager), and the trial did not
inherit our NODE_OPTIONS. Without it, NNI binds every interface (documents NNI's behaviour).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nni_fedexit.nni_tools import webui
from nni_fedexit.nni_tools.webui import listening_hosts, nni_manager_env, node_options, web_ui_message
from helpers import ALL_INTERFACES, free_port, nni_api, other_address, reachable, wait_experiment_done

NODE = None
try:
    import nni_node

    NODE = Path(nni_node.__path__[0]) / "node"
except ImportError:  # pragma: no cover
    pass

TRIAL_SCRIPT = """\
import json, os, sys
import nni

params = nni.get_next_parameter()
with open(sys.argv[1], "w") as f:
    json.dump({"params": params, "NODE_OPTIONS": os.environ.get("NODE_OPTIONS")}, f)
nni.report_final_result(1.0)
"""

def _experiment(tmp_path, name):
    from nni.experiment import Experiment

    work = tmp_path / name
    work.mkdir()
    (work / "trial.py").write_text(TRIAL_SCRIPT)
    exp = Experiment("local")
    exp.config.experiment_name = f"test_webui_{name}"
    exp.config.search_space = {"x": {"_type": "choice", "_value": [1, 2]}}
    exp.config.trial_command = f'"{sys.executable}" trial.py trial_env.json'
    exp.config.trial_code_directory = str(work)
    exp.config.tuner.name = "Random"
    exp.config.tuner.class_args = {"seed": 0}
    exp.config.max_trial_number = 1
    exp.config.trial_concurrency = 1
    exp.config.training_service.use_active_gpu = False
    exp.config.experiment_working_directory = str(work / "nni-experiments")
    return exp, work


@pytest.mark.slow
def test_nni_manager_binds_localhost_only_and_the_local_trial_succeeds(tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_OPTIONS", "--no-deprecation")  # a user's own value: kept, not clobbered
    exp, work = _experiment(tmp_path, "local")
    port = free_port()
    try:
        with nni_manager_env():
            exp.start(port)
        assert os.environ["NODE_OPTIONS"] == "--no-deprecation"
        assert listening_hosts(port) == {"127.0.0.1"}
        assert nni_api(port, "check-status")["status"] in ("RUNNING", "DONE")
        other = other_address()
        if other is not None:  # the machine's own network address is refused
            assert not reachable(other, port)
        assert wait_experiment_done(port, time.time() + 600, poll=0.5)["status"] == "DONE"
        jobs = nni_api(port, "trial-jobs")
        assert [j["status"] for j in jobs] == ["SUCCEEDED"], jobs
        assert json.loads(jobs[0]["finalMetricData"][0]["data"]) in (1.0, "1.0")
        trial = json.loads(next(work.rglob("trial_env.json")).read_text())
        assert trial["params"]["x"] in (1, 2)
        # the preload removed itself from the manager's environment: the trial got the user's value
        assert trial["NODE_OPTIONS"] == "--no-deprecation"
        assert listening_hosts(port) == {"127.0.0.1"}
    finally:
        exp.stop()
    assert listening_hosts(port) == set()


@pytest.mark.slow
def test_without_it_nni_binds_all_interfaces(tmp_path):
    """NNI's own behaviour, which the warning in web_ui_message is about."""
    exp, _ = _experiment(tmp_path, "default")
    port = free_port()
    try:
        with nni_manager_env("all"):  # "all" changes nothing
            exp.start(port)
        hosts = listening_hosts(port)
        assert hosts and hosts <= ALL_INTERFACES, hosts
        other = other_address()
        if other is not None:
            assert reachable(other, port)
        # let the tuner and the trial finish: stopping while the tuner connects makes it print a traceback
        assert wait_experiment_done(port, time.time() + 600, poll=0.5)["status"] == "DONE"
        assert [j["status"] for j in nni_api(port, "trial-jobs")] == ["SUCCEEDED"]
    finally:
        exp.stop()
    assert listening_hosts(port) == set()


LISTEN_FORMS = r"""
const net = require('net');
const http = require('http');
const path = require('path');
const sock = path.join(process.argv[2], 's.sock');
const forms = {
  'port': s => s.listen(0),
  'port,cb': s => s.listen(0, () => {}),
  'options': s => s.listen({port: 0}),
  'port,0.0.0.0': s => s.listen(0, '0.0.0.0'),
  'port,::': s => s.listen(0, '::'),
  'options,::': s => s.listen({port: 0, host: '::'}),
  'port,backlog,cb': s => s.listen(0, 5, () => {}),
  'none': s => s.listen(),
  'string port': s => s.listen('0'),
  'port,127.0.0.2': s => s.listen(0, '127.0.0.2'),
  'options,127.0.0.2': s => s.listen({port: 0, host: '127.0.0.2'}),
  'unix socket': s => s.listen(sock),
  'options,path': s => s.listen({path: sock + '2'}),
};
(async () => {
  const out = {};
  for (const [name, f] of Object.entries(forms)) {
    const s = http.createServer();
    await new Promise((resolve, reject) => { s.on('listening', resolve); s.on('error', reject); f(s); });
    const a = s.address();
    out[name] = typeof a === 'string' ? 'unix' : a.address;
    await new Promise(r => s.close(r));
  }
  out.NODE_OPTIONS = process.env.NODE_OPTIONS === undefined ? null : process.env.NODE_OPTIONS;
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(NODE is None or not NODE.exists(), reason="nni_node's node binary not found")
@pytest.mark.parametrize("host", ["127.0.0.1", "all"])
def test_preload_rewrites_wildcard_listens_only(tmp_path, monkeypatch, host):
    script = tmp_path / "forms.js"
    script.write_text(LISTEN_FORMS)
    monkeypatch.setenv("NODE_OPTIONS", "--max-old-space-size=256")
    with nni_manager_env(host):
        env = dict(os.environ)
    out = subprocess.run([str(NODE), str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    wildcard = ["port", "port,cb", "options", "port,0.0.0.0", "port,::", "options,::", "port,backlog,cb",
                "none", "string port"]
    if host == "all":
        assert {got[k] for k in wildcard} <= ALL_INTERFACES, got
    else:
        assert {k: got[k] for k in wildcard} == {k: "127.0.0.1" for k in wildcard}
    assert got["port,127.0.0.2"] == got["options,127.0.0.2"] == "127.0.0.2"
    assert got["unix socket"] == got["options,path"] == "unix"
    assert got["NODE_OPTIONS"] == "--max-old-space-size=256"  # ours removed, the user's kept


def test_nni_manager_env_appends_and_restores(monkeypatch):
    monkeypatch.delenv("NODE_OPTIONS", raising=False)
    monkeypatch.delenv(webui.HOST_ENV, raising=False)
    with nni_manager_env():
        assert os.environ["NODE_OPTIONS"] == node_options() == f"--require={webui.PRELOAD}"
        assert os.environ[webui.HOST_ENV] == "127.0.0.1"
    assert "NODE_OPTIONS" not in os.environ and webui.HOST_ENV not in os.environ

    monkeypatch.setenv("NODE_OPTIONS", "--no-warnings")
    with pytest.raises(RuntimeError):
        with nni_manager_env("localhost"):
            assert os.environ["NODE_OPTIONS"] == f"--no-warnings --require={webui.PRELOAD}"
            assert os.environ[webui.HOST_ENV] == "localhost"
            raise RuntimeError("restored on errors too")
    assert os.environ["NODE_OPTIONS"] == "--no-warnings" and webui.HOST_ENV not in os.environ

    for everything in ("all", "0.0.0.0", "::", "*"):
        with nni_manager_env(everything):
            assert os.environ["NODE_OPTIONS"] == "--no-warnings"
    # NNI's launcher, tuner and trials reach the manager at "localhost": other bindings are refused
    for bad in ("127.0.0.1 --inspect", "10.1.2.3", "::1", "127.0.0.2"):
        with pytest.raises(ValueError):
            with nni_manager_env(bad):
                pass
    assert os.environ["NODE_OPTIONS"] == "--no-warnings"
    assert webui.PRELOAD.is_file() and webui.PRELOAD.is_absolute()


@pytest.mark.parametrize("host", [None, "all", "0.0.0.0", "::"])
def test_message_warns_when_all_interfaces_are_bound(host):
    msg = web_ui_message(8123, host)
    assert "http://127.0.0.1:8123" in msg
    assert "WARNING" in msg and "all network interfaces" in msg
    assert "ssh -N -L 8123:127.0.0.1:8123 user@server" in msg and "firewall" in msg


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8123"), ("::1", "http://[::1]:8123"),
                                       ("localhost", "http://localhost:8123")])
def test_message_for_a_local_binding_has_no_warning(host, url):
    msg = web_ui_message(8123, host, url_prefix="/nni/")
    assert f"{url}/nni" in msg
    assert "WARNING" not in msg and "all network interfaces" not in msg
    assert f"ssh -N -L 8123:{host}:8123 user@server" in msg


def test_message_for_a_specific_address():
    msg = web_ui_message(8123, "10.1.2.3")
    assert "http://10.1.2.3:8123" in msg and "WARNING" not in msg and "10.1.2.3 only" in msg
