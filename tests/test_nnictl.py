"""Real `nnictl` experiments with SizeAwarePG: registration, concentration, `nnictl resume`, `nnictl stop`.

Isolated from the user's NNI set-up: NNI_CONFIG_DIR (where tuner registration writes
registered_algorithms.yml) and HOME (where nnictl keeps its experiment list, ~/nni-experiments)
point into tmp_path, and so does the experiment's working directory, so `nnictl stop --all`
stops only this test's experiment.
"""

import json
import subprocess
import sys
import time

import pytest
import yaml

from helpers import BIN, PLANTED, PLANTED_SPACE, ROOT, free_port, nni_api, venv_env, wait_experiment_done, wait_until

NNICTL = BIN / "nnictl"
META = ROOT / "strategies" / "size_aware_pg_tuner.meta.yml"

TRIAL_SCRIPT = f"""\
import nni

PLANTED = {PLANTED!r}
params = nni.get_next_parameter()
score = 0.4 + sum(0.3 for k, v in PLANTED.items() if params[k] == v)
nni.report_final_result({{"default": score, "params": 1000}})
"""

pytestmark = [pytest.mark.skipif(not NNICTL.exists(), reason=f"nnictl not found next to {sys.executable}"), pytest.mark.slow]


def _nnictl(env, *args, timeout=60):
    return subprocess.run([str(NNICTL), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _isolated_env(tmp_path):
    env = venv_env(NNI_CONFIG_DIR=str(tmp_path / "nni-config"), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return env


def _write_experiment(tmp_path, trials):
    """A tiny choice space (2 parameters x 3 values) and a trial whose score has a planted best value per parameter."""
    (tmp_path / "trial.py").write_text(TRIAL_SCRIPT)
    config = {
        "searchSpace": PLANTED_SPACE,
        "trialCommand": f"{sys.executable} trial.py",
        "trialCodeDirectory": str(tmp_path),
        "trialConcurrency": 2,
        "maxTrialNumber": trials,
        "maxExperimentDuration": "5m",
        "tuner": {"name": "SizeAwarePG", "classArgs": {"baseline_params": 1000, "seed": 0}},
        "trainingService": {"platform": "local"},
        "experimentWorkingDirectory": str(tmp_path / "experiments"),
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


#: what nnictl or NNI's manager says when the port was taken between free_port() and its own bind
PORT_CLASH = ("is not idle", "EADDRINUSE", "address already in use")


def _start_on_a_free_port(env, *args):
    """``nnictl ARGS --port P`` on a port that was free a moment ago: another process of this
    machine may take it before NNI binds it, so a clash is retried on another port (up to 5 ports).
    Returns (port, nnictl's result)."""
    for _ in range(5):
        port = free_port()
        result = _nnictl(env, *args, "--port", str(port), timeout=180)
        if result.returncode == 0 or not any(m in result.stdout + result.stderr for m in PORT_CLASH):
            return port, result
    return port, result


def _create_and_wait(env, config, timeout_s=600):
    """`nnictl create` the experiment, wait until it ends (``timeout_s``: only a bound for a hung
    experiment), read it, `nnictl stop --all`: (check-status, trial jobs, experiment, seconds, the stop's result)."""
    t0 = time.time()
    try:
        port, created = _start_on_a_free_port(env, "create", "--config", str(config))
        assert created.returncode == 0, created.stdout + created.stderr
        status = wait_experiment_done(port, t0 + timeout_s)
        jobs = nni_api(port, "trial-jobs")
        experiment = nni_api(port, "experiment")
    finally:
        stopped = _nnictl(env, "stop", "--all")
    return status, jobs, experiment, time.time() - t0, stopped


def test_nnictl_experiment_with_size_aware_pg_concentrates_on_the_planted_best(tmp_path):
    trials = 40
    env = _isolated_env(tmp_path)
    reg = subprocess.run([str(BIN / "nni-fedexit"), "register"], env=env, capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    listed = _nnictl(env, "algo", "list")
    assert "| SizeAwarePG     | tuner      | user      | SizeAwarePGTuner" in listed.stdout, listed.stdout

    config = _write_experiment(tmp_path, trials)
    status, jobs, experiment, elapsed, stopped = _create_and_wait(env, config)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    assert status["status"] == "DONE", status
    assert len(jobs) == trials and all(j["status"] == "SUCCEEDED" for j in jobs), [j["status"] for j in jobs]
    # What the tuner generated, by parameter id. NNI 3.0's local training service hands parameters
    # to trials in the order they ask for them, so two trials started together may run each
    # other's parameters while the REST API lists them the other way round; a final metric's
    # parameterId is what its trial really ran (the tuner pairs results by it too).
    generated = {}
    for j in jobs:
        hp = json.loads(j["hyperParameters"][0])
        generated[hp["parameter_id"]] = hp["parameters"]
    swapped = 0
    for j in jobs:
        metric = j["finalMetricData"][0]
        ran = generated[int(metric["parameterId"])]
        reported = json.loads(json.loads(metric["data"]))["default"]
        assert reported == pytest.approx(0.4 + 0.3 * sum(ran[k] == v for k, v in PLANTED.items()))
        swapped += int(metric["parameterId"]) != json.loads(j["hyperParameters"][0])["parameter_id"]
    chosen = [generated[i] for i in sorted(generated)]
    hits = sum(p == PLANTED for p in chosen[-10:])
    print(f"\n{trials} trials in {elapsed:.0f} s; planted best in {hits} of the last 10 "
          f"(first 10: {sum(p == PLANTED for p in chosen[:10])}); trials that ran another trial's parameters: {swapped}")
    # Not "10 of the last 10": the tuner is seeded, but the order in which NNI returns the two
    # running trials' results is not. Replaying this protocol with the tuner in-process (40 trials,
    # 2 running, the next result drawn at random from the running ones, 100 orders): 10 of 10 in
    # 68 orders, 9 in 24, 8 in 8, never fewer.
    assert hits >= 8, chosen[-10:]

    # the tuner's own record: a reward for every trial
    exp_dir = tmp_path / "experiments" / experiment["id"]
    summary = json.loads((exp_dir / "checkpoint" / "size_aware_pg_tuner.json").read_text())
    assert len(summary["trials"]) == trials
    assert {r["trial_job_id"] for r in summary["trials"]} == {j["trialJobId"] for j in jobs}
    assert summary["controller_steps"] == trials // 4
    log = (exp_dir / "log" / "dispatcher.log").read_text()
    assert "reward" in log and "Traceback" not in log


def test_nnictl_resume_continues_the_controller_instead_of_restarting(tmp_path):
    """Stop after 8 trials, `nnictl resume`, allow 4 more: the tuner goes on from its saved state."""
    env = _isolated_env(tmp_path)
    reg = _nnictl(env, "algo", "register", "--meta_path", str(META), timeout=120)  # the README's other way
    assert reg.returncode == 0, reg.stdout + reg.stderr
    config = _write_experiment(tmp_path, 8)
    t0 = time.time()
    try:
        port, created = _start_on_a_free_port(env, "create", "--config", str(config))
        assert created.returncode == 0, created.stdout + created.stderr
        assert wait_experiment_done(port, t0 + 600)["status"] == "DONE"
        exp_id = nni_api(port, "experiment")["id"]
        stopped = _nnictl(env, "stop", exp_id)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        # a new port: the stopped manager's may not be released yet
        port, resumed = _start_on_a_free_port(env, "resume", exp_id)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        updated = _nnictl(env, "update", "trialnum", exp_id, "--value", "12")
        assert updated.returncode == 0, updated.stdout + updated.stderr

        def succeeded():
            return len([j for j in nni_api(port, "trial-jobs") if j["status"] == "SUCCEEDED"])

        wait_until(lambda: succeeded() >= 12, 600, lambda: f"the resumed experiment ran {succeeded() - 8} of 4 more trials")
    finally:
        _nnictl(env, "stop", "--all")
    print(f"\ncreate, 8 trials, stop, resume, 4 more trials: {time.time() - t0:.0f} s")

    exp_dir = tmp_path / "experiments" / exp_id
    log = (exp_dir / "log" / "dispatcher.log").read_text()
    assert "Resumed: controller step 2, 8 results counted" in log
    assert "import_data: 0 result(s) fed to the controller, 8 already counted" in log
    summary = json.loads((exp_dir / "checkpoint" / "size_aware_pg_tuner.json").read_text())
    assert len(summary["trials"]) == 12 and summary["controller_steps"] == 3  # 12 results, 4 per update
    assert len({r["trial_job_id"] for r in summary["trials"]}) == 12


# ---- NNI's own nnictl integration case for tuners ------------------------------------------------

ASSETS = ROOT / "tests" / "assets"


def _upstream_experiment(tmp_path, search_space, duration="5m"):
    """NNI v3.0's `tuner-random` case of test/training_service/config/pr_tests.yml (commit
    36ba04c94e51eaa2a88b9e6e0a4077f3a9f93004): its naive_trial.py and search_space.json (copied to
    tests/assets), maxTrialNum 2, trialConcurrency 2, maxExecDuration 5m, with SizeAwarePG as the
    tuner (no assessor: the case's Medianstop never stops a 2-epoch trial)."""
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "naive_trial.py").write_text((ASSETS / "nni_v3_naive_trial.py").read_text())
    config = {
        "searchSpace": search_space,
        "trialCommand": f"{sys.executable} naive_trial.py",
        "trialCodeDirectory": str(tmp_path / "trial"),
        "trialConcurrency": 2,
        "maxTrialNumber": 2,
        "maxExperimentDuration": duration,
        "tuner": {"name": "SizeAwarePG", "classArgs": {"seed": 0}},
        "trainingService": {"platform": "local"},
        "experimentWorkingDirectory": str(tmp_path / "experiments"),
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """An NNI config directory where SizeAwarePG is registered (once for the tests below)."""
    folder = tmp_path_factory.mktemp("nni-config")
    reg = subprocess.run([str(BIN / "nni-fedexit"), "register"], env=venv_env(NNI_CONFIG_DIR=str(folder)),
                         capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    return folder


def _run_upstream(tmp_path, registered, search_space, timeout_s=600):
    env = venv_env(NNI_CONFIG_DIR=str(registered), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    config = _upstream_experiment(tmp_path, search_space)
    status, jobs, experiment, elapsed, _ = _create_and_wait(env, config, timeout_s)
    return status, jobs, tmp_path / "experiments" / experiment["id"], elapsed


def test_nni_tuner_integration_case_succeeds_on_its_mixed_search_space(tmp_path, registered):
    space = json.loads((ASSETS / "nni_v3_naive_search_space.json").read_text())
    assert {v["_type"] for v in space.values()} == {"randint", "choice", "uniform"}
    status, jobs, _, _ = _run_upstream(tmp_path, registered, space)
    assert status["status"] == "DONE", status
    assert len(jobs) == 2 and all(j["status"] == "SUCCEEDED" for j in jobs), [j["status"] for j in jobs]
    for j in jobs:
        p = json.loads(j["hyperParameters"][0])["parameters"]
        assert p["k"] in range(0, 4) and p["d"] in (-1, 1) and 0 <= p["n"] <= 0.2, p


def test_a_tuner_error_at_start_fails_the_experiment_at_once_with_the_message_in_nnis_log(tmp_path, registered):
    bad = {"lr": {"_type": "uniform", "_value": [0.2, 0.0]}}
    # waited for less than maxExperimentDuration (5 minutes): a tuner error that did not fail the
    # experiment would leave it RUNNING until then (and DONE after), never ERROR
    status, jobs, exp_dir, _ = _run_upstream(tmp_path, registered, bad, timeout_s=240)
    assert status["status"] == "ERROR", status
    assert jobs == []
    message = "search space parameter 'lr' (uniform): low must be <= high"
    assert message in (exp_dir / "log" / "nnimanager.log").read_text()
    assert message in (exp_dir / "log" / "dispatcher.log").read_text()
