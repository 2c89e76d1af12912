"""Opening a run's NNI experiments again: `nni-fedexit view` and `resume`, readable trials, the web UI.

A tiny run searches in trials mode (every sampled network is an NNI trial), then is reopened the
way a user would: through the command line, NNI's REST API and a real headless browser.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nni_fedexit.job.cli import main
from helpers import BIN, EXAMPLES, free_port, nni_api
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


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
    config = _config(tmp, rounds=8)  # enough rounds that Ctrl-C after round 1 lands before the last
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


# NNI's command listener of the resumed experiment must not die (it did on AddCustomizedTrialJob)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_resume_goes_on_with_the_interrupted_federated_experiment(searched, caplog):
    """Ctrl-C in the middle of the federated stage; `nni-fedexit resume RUN` continues the same
    NNI experiment (same id, a second trial) from the last federated round."""
    caplog.set_level(logging.INFO, logger="nni_fedexit.nni_tools.compat")
    run_dir, config = searched
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(BIN / "nni-fedexit"), "federate", str(config), "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    state = run_dir / "federated" / "state.json"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_after = json.loads(state.read_text())["round"]
    assert proc.returncode == 130 and 1 <= stopped_after < 8, out.decode(errors="replace")[-3000:]
    first = json.loads((run_dir / "federated" / "experiment.json").read_text())

    result = CliRunner().invoke(main, ["resume", str(run_dir), "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    # the manager sent the earlier and the unfinished trials; the listener skipped both and went on
    skipped = [r.getMessage() for r in caplog.records if r.name == "nni_fedexit.nni_tools.compat"]
    assert any("ImportData command skipped" in m for m in skipped), skipped
    assert any("AddCustomizedTrialJob command skipped" in m for m in skipped), skipped
    record = json.loads((run_dir / "federated" / "experiment.json").read_text())
    assert record["experiment_id"] == first["experiment_id"] and record["attempts"] == 2
    metrics = json.loads((run_dir / "federated" / "metrics.json").read_text())
    assert metrics["experiment_id"] == first["experiment_id"]
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, 9))
    assert json.loads((run_dir / "stages.json").read_text())["done"] == ["search", "federate", "evaluate", "export", "report"]


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="Debian chromium and chromium-driver are not installed (`make test` installs them as root)")
def test_web_ui_trial_page_shows_the_architectures(viewed, tmp_path):
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (the test extra installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    del selenium
    run_dir, port, _ = viewed
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(f"http://127.0.0.1:{port}/detail")
        wait = WebDriverWait(driver, 60)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".ms-DetailsRow") or False)
        assert len(rows) == 3
        rows[0].find_element(By.CSS_SELECTOR, "[data-automation-key='_expand'] i").click()  # the trial's details
        text = wait.until(lambda d: "architecture" in d.find_element(By.TAG_NAME, "body").text
                          and d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(tmp_path / "trial.png"))
    finally:
        driver.quit()
    history = json.loads((run_dir / "search" / "history.json").read_text())
    labels = [" ".join(f"{k}={v}" for k, v in s["sample"].items()) for s in history["samples"]]
    assert any(label in text for label in labels), text[-2000:]
    assert "SUCCEEDED" in text and "(FINAL)" in text
