"""Opening a run's NNI experiments again: `nni-fedexit view` and `resume`, readable trials, the web UI.

A tiny run searches in trials mode (every sampled network is an NNI trial), then is reopened the
way a user would: through the command line, NNI's REST API and a real headless browser.
"""

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nni_fedexit.job.cli import main
from helpers import (ALL_INTERFACES, BIN, EXAMPLES, free_port, headless_chrome, needs_browser, nni_api, other_address,
                     reachable, sigint_default, trial_processes, wait_until)

pytestmark = pytest.mark.slow  # NNI experiments, Flower or Ray processes, a browser: make test-fast leaves them out

ROUNDS = 8  # of the federated stage: enough that round 1's checkpoint comes well before the last


def _config(tmp: Path, rounds: int = 2) -> Path:
    config = yaml.safe_load((EXAMPLES / "tiny_digits.yaml").read_text())
    config["search"] = {"strategy": {"preset": "size_aware_pg_trials", "samples_per_update": 1}, "max_trials": 3,
                        "concurrency": 1, "trial": {"train_samples": 300, "val_samples": 200, "epochs": 1}}
    config["federated"]["rounds"] = rounds
    config["nni"]["port"] = free_port()
    path = tmp / "tiny_trials.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stop(port: int) -> None:
    """Stop the experiment served on ``port`` (what `nnictl stop ID` does, through NNI's API)."""
    from nni.experiment import Experiment

    Experiment.connect(port).stop()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A run whose search stage ran in trials mode (3 trials) and finished."""
    tmp = tmp_path_factory.mktemp("view")
    run_dir = tmp / "run"
    config = _config(tmp, rounds=ROUNDS)  # the federated stage of `resumed`
    result = CliRunner().invoke(main, ["search", str(config), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir, config


@pytest.fixture(scope="module")
def viewed(searched):
    """The finished search experiment served again by `nni-fedexit view --detach`."""
    run_dir, _ = searched
    port = free_port()
    result = CliRunner().invoke(main, ["view", str(run_dir), "--stage", "search", "--port", str(port), "--detach"])
    assert result.exit_code == 0, result.output
    exp_id = json.loads((run_dir / "search" / "experiment.json").read_text())["experiment_id"]
    assert f"experiment {exp_id} (search stage) is served again" in result.output
    yield run_dir, port, exp_id
    _stop(port)


def test_view_serves_the_finished_search_with_readable_trials(viewed):
    from nni_fedexit.nni_tools.webui import listening_hosts

    run_dir, port, exp_id = viewed
    assert nni_api(port, "check-status")["status"] == "VIEWED"
    assert listening_hosts(port) == {"127.0.0.1"}  # nni-fedexit view keeps the web UI on this machine
    history = json.loads((run_dir / "search" / "history.json").read_text())
    by_arch = {" ".join(f"{k}={v}" for k, v in s["sample"].items()): s for s in history["samples"]}
    jobs = nni_api(port, "trial-jobs")
    assert len(jobs) == 3 and all(j["status"] == "SUCCEEDED" for j in jobs)
    for job in jobs:
        final = json.loads(json.loads(job["finalMetricData"][0]["data"]))
        params = json.loads(job["hyperParameters"][0])["parameters"]
        # the architecture in plain words, in the metrics and in the trial's parameters
        assert params["architecture"] == final["architecture"]
        assert all(f"{label}={params[label]}" in final["architecture"] for label in ("stage1", "stage2", "stage3"))
        record = by_arch[final["architecture"]]  # what the strategy scored for it
        assert final["params"] == record["params"] and final["reward"] == pytest.approx(record["reward"])
        assert final["default"] == pytest.approx(record["accuracy"])


def test_view_and_resume_explain_what_cannot_be_opened(tmp_path, searched):
    run_dir, _ = searched
    runner = CliRunner()
    result = runner.invoke(main, ["view", str(run_dir), "--stage", "federate"])
    assert result.exit_code == 2 and "federate stage has not started an experiment" in result.output
    result = runner.invoke(main, ["view", "nosuchexp"])
    assert result.exit_code == 2 and "neither a run directory nor an experiment id" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["resume", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "not a run directory" in result.output


class _Records(logging.Handler):
    """The messages of one logger, for a module-scoped fixture (caplog is per test)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def resumed(searched):
    """The federated stage interrupted in the middle of a round, then `nni-fedexit resume EXPERIMENT_ID`.

    No race with the rounds: as soon as round 1's checkpoint exists, the trial's processes are
    frozen (SIGSTOP), so no later round can finish; the round last saved is read; then Ctrl-C
    (SIGINT) stops `nni-fedexit federate`, which stops the experiment (NNI's manager kills the
    frozen trial). Returns (run dir, experiment id, the round saved at the stop, the resume's
    output, what nni_fedexit.nni_compat logged during the resume)."""
    run_dir, config = searched
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(BIN / "nni-fedexit"), "federate", str(config), "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=sigint_default)
    state = run_dir / "federated" / "state.json"

    def saved_round():
        try:
            return json.loads(state.read_text())["round"]
        except (OSError, ValueError, KeyError):  # not written yet
            return 0

    frozen: list[int] = []
    try:
        wait_until(lambda: saved_round() >= 1 or proc.poll() is not None, 600, "no federated round saved", poll=0.1)
        exp_id = json.loads((run_dir / "federated" / "experiment.json").read_text())["experiment_id"]
        frozen = trial_processes(exp_id)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        stopped_after = saved_round()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in frozen:  # NNI's manager killed them; if not, here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    out = out.decode(errors="replace")
    assert frozen, f"no trial process of experiment {exp_id} found:\n{out[-3000:]}"
    assert proc.returncode == 130 and 1 <= stopped_after < ROUNDS, out[-3000:]
    assert saved_round() == stopped_after  # nothing saved after the freeze
    first = json.loads((run_dir / "federated" / "experiment.json").read_text())
    assert first["experiment_id"] == exp_id and first["attempts"] == 1

    logger = logging.getLogger("nni_fedexit.nni_compat")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        result = CliRunner().invoke(main, ["resume", exp_id, "--port", str(free_port())])
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert result.exit_code == 0, result.output
    return run_dir, exp_id, stopped_after, result.output, records.messages


def _round_lines(log: str) -> list[int]:
    """The rounds a federated trial's log says it finished ("Round t/8: val accuracy ...")."""
    return [int(m) for m in re.findall(rf"Round (\d+)/{ROUNDS}: val accuracy", log)]


# NNI's command listener of the resumed experiment must not die (it did on AddCustomizedTrialJob)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_resume_goes_on_with_the_interrupted_federated_experiment(resumed):
    """`nni-fedexit resume EXPERIMENT_ID` continues the same NNI experiment (same id; NNI runs its
    interrupted trial again) from the round saved last, without doing any round again."""
    run_dir, exp_id, stopped_after, output, compat_log = resumed
    # the manager sent the earlier and the unfinished trials; the listener skipped both and went on
    assert any("ImportData command skipped" in m for m in compat_log), compat_log
    assert any("AddCustomizedTrialJob command skipped" in m for m in compat_log), compat_log
    assert f"experiment {exp_id} (resumed)" in output
    record = json.loads((run_dir / "federated" / "experiment.json").read_text())
    assert record["experiment_id"] == exp_id and record["attempts"] == 2
    metrics = json.loads((run_dir / "federated" / "metrics.json").read_text())
    assert metrics["experiment_id"] == exp_id
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    assert json.loads((run_dir / "stages.json").read_text())["done"] == ["search", "federate", "evaluate", "export", "report"]
    # the trial's own log: NNI runs the interrupted trial again under its id (its log goes on in
    # the same file, one "Connect to trial command channel" line per attempt). The first attempt
    # stopped in the round after the one it saved; the second started from that checkpoint and
    # ran only the rounds after it
    (log_file,) = (run_dir / "nni-experiments" / exp_id).glob("environments/*/trials/*/trial.log")
    attempts = re.split(r"^.*Connect to trial command channel.*$", log_file.read_text(errors="replace"),
                        flags=re.MULTILINE)[1:]
    assert len(attempts) == 2, attempts
    # (a round's log line comes just before its checkpoint: the freeze may fall between them)
    assert _round_lines(attempts[0]) in (list(range(1, stopped_after + 1)), list(range(1, stopped_after + 2))), \
        attempts[0][-3000:]
    assert "Resuming from" not in attempts[0] and f"after round {stopped_after}\n" in attempts[1], attempts[1][-3000:]
    assert _round_lines(attempts[1]) == list(range(stopped_after + 1, ROUNDS + 1)), attempts[1][-3000:]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_view_by_experiment_id_on_all_interfaces_shows_both_trials_rounds(resumed):
    """`nni-fedexit view EXPERIMENT_ID --host all`: NNI's own binding (every interface, with the
    warning), and the web UI's points of the federated experiment: the interrupted trial's
    rounds, then the resumed trial's, each round once, with metrics.json's accuracies."""
    from nni_fedexit.nni_tools.webui import listening_hosts

    run_dir, exp_id, stopped_after, _, _ = resumed
    port = free_port()
    result = CliRunner().invoke(main, ["view", exp_id, "--port", str(port), "--host", "all", "--detach"])
    assert result.exit_code == 0, result.output
    try:
        assert f"experiment {exp_id} (federate stage) is served again" in result.output
        assert "WARNING" in result.output and "all network interfaces" in result.output
        hosts = listening_hosts(port)
        assert hosts and hosts <= ALL_INTERFACES, hosts
        other = other_address()
        if other is not None:  # the machine's own network address answers too
            assert reachable(other, port)
        assert nni_api(port, "check-status")["status"] == "VIEWED"
        jobs = nni_api(port, "trial-jobs")
        points = nni_api(port, "metric-data")
    finally:
        _stop(port)
    assert any(j["status"] == "SUCCEEDED" for j in jobs), jobs
    # every point the web UI draws, in the order the trial reported them: the interrupted attempt's
    # rounds (NNI may not have stored its last one), then rounds stopped_after+1 .. 8; none twice
    shown = [json.loads(json.loads(p["data"]))["default"]
             for p in sorted(points, key=lambda p: (int(p["timestamp"]), p["sequence"])) if p["type"] == "PERIODICAL"]
    rounds = json.loads((run_dir / "federated" / "metrics.json").read_text())["rounds"]
    last_exit = [r["exit_accuracy"][-1] for r in rounds]
    before = len(shown) - (ROUNDS - stopped_after)
    assert 0 <= before <= stopped_after, shown
    assert shown == pytest.approx(last_exit[:before] + last_exit[stopped_after:]), (shown, last_exit)


@needs_browser
def test_web_ui_trial_page_shows_the_architectures(viewed, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run_dir, port, _ = viewed
    with headless_chrome(tmp_path / "profile") as driver:
        driver.get(f"http://127.0.0.1:{port}/detail")
        wait = WebDriverWait(driver, 60)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".ms-DetailsRow") or False)
        assert len(rows) == 3
        history = json.loads((run_dir / "search" / "history.json").read_text())
        labels = {" ".join(f"{k}={v}" for k, v in s["sample"].items()) for s in history["samples"]}
        assert len(labels) == 3  # three distinct networks, one trial each
        for i in range(3):  # open every trial's details (the arrow on the left of its row)
            expanders = driver.find_elements(By.CSS_SELECTOR, "[data-automation-key='_expand'] i")
            expanders[i].click()
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        text = wait.until(lambda d: all(label in body(d) for label in labels) and body(d))
        driver.save_screenshot(str(tmp_path / "trial.png"))
    assert all(label in text for label in labels), text[-2000:]
    assert text.count("SUCCEEDED") >= 3 and "(FINAL)" in text
