"""The shared search as one NNI trial: what the web UI, the REST API and TensorBoard show, the same
choice as NNI's sequential engine in-process, and a resume from the last epoch to the same result.

A tiny shared search (digits, 3 epochs: 1 of warm-up, 2 with the controller) runs through
`nni-fedexit search`, once straight through and once stopped after its first epoch and resumed.
"""

import contextlib
import dataclasses
import json
import shutil
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from nni_fedexit.job.cli import main
from nni_fedexit.space import architecture_label
from helpers import (BIN, EXAMPLES, free_port, headless_chrome, needs_browser, nni_api, sigint_default, trial_processes,
                     wait_until)

pytestmark = pytest.mark.slow  # NNI experiments, Flower or Ray processes, a browser: make test-fast leaves them out

EPOCHS = 3


def _config(tmp: Path) -> Path:
    config = yaml.safe_load((EXAMPLES / "tiny_digits.yaml").read_text())
    config["search"]["epochs"] = EPOCHS
    config["nni"]["port"] = free_port()
    path = tmp / "tiny_shared.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _history(run_dir: Path) -> dict:
    history = json.loads((run_dir / "search" / "history.json").read_text())
    history.pop("experiment_id")
    return history


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A run whose shared search ran straight through, as one NNI trial."""
    tmp = tmp_path_factory.mktemp("shared")
    config = _config(tmp)
    result = CliRunner().invoke(main, ["search", str(config), "--run-dir", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    return tmp / "run", config


@pytest.fixture(scope="module")
def viewed(searched):
    run_dir, _ = searched
    port = free_port()
    result = CliRunner().invoke(main, ["view", str(run_dir), "--stage", "search", "--port", str(port), "--detach"])
    assert result.exit_code == 0, result.output
    yield run_dir, port
    from nni.experiment import Experiment

    Experiment.connect(port).stop()


def test_the_web_ui_shows_one_trial_with_a_point_per_epoch_and_the_chosen_architecture(viewed):
    run_dir, port = viewed
    arch = json.loads((run_dir / "search" / "architecture.json").read_text())
    history = json.loads((run_dir / "search" / "history.json").read_text())
    result = json.loads((run_dir / "search" / "checkpoint" / "result.json").read_text())
    assert nni_api(port, "check-status")["status"] == "VIEWED"
    (job,) = nni_api(port, "trial-jobs")
    assert job["status"] == "SUCCEEDED"
    params = json.loads(job["hyperParameters"][0])["parameters"]
    assert params["search"].startswith("shared weights") and params["epochs"] == EPOCHS
    final = json.loads(json.loads(job["finalMetricData"][0]["data"]))
    assert final["architecture"] == architecture_label(arch["sample"]) and final["params"] == arch["params"]
    finalists = history["final_candidates"]
    best = max(finalists, key=lambda c: c["reward"])
    assert final["default"] == pytest.approx(best["reward"]) and final["accuracy"] == pytest.approx(best["accuracy"])
    assert sorted(f["architecture"] for f in final["finalists"]) == sorted(
        architecture_label(c["sample"]) for c in finalists)
    points = sorted((p for p in nni_api(port, "metric-data") if p["type"] == "PERIODICAL"), key=lambda p: p["sequence"])
    shown = [json.loads(json.loads(p["data"])) for p in points]
    assert [p["epoch"] for p in shown] == list(range(1, EPOCHS + 1))
    assert [p["phase"] for p in shown] == ["warm-up", "controller", "controller"]
    for point, epoch in zip(shown, result["epochs"]):
        assert point == pytest.approx(epoch)
        assert point["default"] > 0 and 0 <= point["val_acc"] <= 1 and point["entropy"] > 0
    # every key in every point (the web UI offers the first point's keys); the controller learns after the warm-up
    assert all(set(p) == set(shown[0]) for p in shown) and 0 <= shown[0]["sampled_val_acc"] <= 1
    assert shown[0]["controller_steps"] == 0 and shown[0]["mean_reward"] > 0
    steps = [h["step"] for h in history["controller_steps"]]
    assert shown[-1]["controller_steps"] == steps[-1] and shown[1]["controller_steps"] < steps[-1]


@needs_browser
def test_the_browser_shows_the_chosen_architecture_in_the_trial_table(viewed, tmp_path):
    """What a user does in the web UI: Trials detail, "Add/Remove columns", tick the final
    metric "architecture", Save; the trial's row then names the chosen network."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run_dir, port = viewed
    label = architecture_label(json.loads((run_dir / "search" / "architecture.json").read_text())["sample"])
    with headless_chrome(tmp_path / "profile") as driver:
        driver.get(f"http://127.0.0.1:{port}/detail")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".ms-DetailsRow") or False)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".ms-DetailsRow")) == 1  # the whole search: one trial
        button = wait.until(lambda d: d.find_element(By.XPATH, "//button[.//span[text()='Add/Remove columns']]"))
        button.click()
        box = wait.until(lambda d: d.find_element(By.XPATH, "//label[.//span[text()='architecture (metric)']]"))
        box.click()
        driver.find_element(By.XPATH, "//button[.//span[text()='Save']]").click()
        cell = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-automation-key='metric/architecture']"))
        text = wait.until(lambda d: label in cell.text and d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(tmp_path / "shared-search.png"))
    assert "SUCCEEDED" in text and "(FINAL)" in text


def test_tensorboard_holds_the_same_curves(searched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = searched
    result = json.loads((run_dir / "search" / "checkpoint" / "result.json").read_text())
    events = EventAccumulator(str(run_dir / "search" / "checkpoint" / "tensorboard" / "search")).Reload()
    for key in ("greedy_reward", "val_acc", "params", "entropy", "controller_steps", "mean_reward"):
        scalars = events.Scalars(f"search_epoch/{key}")
        assert [e.step for e in scalars] == list(range(1, EPOCHS + 1))
        reported = [e["default" if key == "greedy_reward" else key] for e in result["epochs"]]
        assert [e.value for e in scalars] == pytest.approx(reported, rel=1e-6), key


def test_the_trial_chooses_what_nni_sequential_engine_chooses_in_process(searched):
    """Same strategy, evaluator and seed as a one-shot NasExperiment run from Python: same
    samples, rewards, controller steps, probabilities, finalists and choice."""
    from nni.nas.experiment import NasExperiment

    from nni_fedexit.job.config import load_config
    from nni_fedexit.job.pipeline import Run, shared_search_evaluator

    run_dir, config_path = searched
    config = load_config(config_path, {"run_dir": str(run_dir.parent / "in-process")})
    run = Run(config)
    roles, s = run.roles, config.search
    evaluator = shared_search_evaluator(
        run.data.train.subset(roles.search_train[: s.train_samples]), run.data.train.subset(roles.search_val),
        run.data.num_classes, epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate, seed=config.seed,
        progress=False)
    strategy = config.new_strategy()
    exp = NasExperiment(run.new_space(), evaluator, strategy)
    exp.config.experiment_working_directory = str(run_dir.parent / "in-process")
    exp.run()
    best = exp.export_top_models(formatter="dict")[0]
    exp.stop()
    assert json.loads((run_dir / "search" / "architecture.json").read_text())["sample"] == best
    assert _history(run_dir) == json.loads(json.dumps(strategy.summary()))


@pytest.fixture(scope="module")
def resumed(searched, tmp_path_factory):
    """The same search stopped once its first epoch is saved (its trial frozen, then Ctrl-C), then
    `nni-fedexit search --resume`."""
    _, config = searched
    run_dir = tmp_path_factory.mktemp("resumed") / "run"
    state = run_dir / "search" / "checkpoint" / "state.json"
    proc = subprocess.Popen([str(BIN / "nni-fedexit"), "search", str(config), "--run-dir", str(run_dir)],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=sigint_default)
    frozen: list[int] = []
    try:
        wait_until(lambda: state.exists() or proc.poll() is not None, 600, "no search epoch saved", poll=0.05)
        exp_id = json.loads((run_dir / "search" / "experiment.json").read_text())["experiment_id"]
        frozen = trial_processes(exp_id)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        stopped_after = json.loads(state.read_text())["epoch"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    out = out.decode(errors="replace")
    assert frozen and proc.returncode == 130 and stopped_after == 1, out[-3000:]
    assert not (run_dir / "search" / "history.json").exists()
    result = CliRunner().invoke(main, ["search", str(config), "--run-dir", str(run_dir), "--resume",
                                       "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    return run_dir, exp_id, result.output


def test_a_stopped_search_resumes_from_its_last_epoch_to_the_same_result(searched, resumed):
    straight, _ = searched
    run_dir, exp_id, output = resumed
    assert f"experiment {exp_id} (resumed)" in output and "from the checkpoint of epoch 1" in output
    assert _history(run_dir) == _history(straight)  # samples, rewards, controller steps, finalists, choice
    mine, theirs = (json.loads((d / "search" / "architecture.json").read_text()) for d in (run_dir, straight))
    assert {k: v for k, v in mine.items() if k != "experiment_id"} == {
        k: v for k, v in theirs.items() if k != "experiment_id"}
    # the controller's and the supernet's state after the last saved epoch: equal tensors
    a, b = (torch.load(d / "search" / "checkpoint" / f"epoch-{EPOCHS - 1}.ckpt", weights_only=True)
            for d in (run_dir, straight))
    for key in ("controller", "optimizer"):
        assert repr(a["size_aware_pg"]["controller"][key]) == repr(b["size_aware_pg"]["controller"][key])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    # the resumed attempt trained only epochs 2 and 3: the trial's log says where it started
    (log_file,) = (run_dir / "nni-experiments" / exp_id).glob("environments/*/trials/*/trial.log")
    log = log_file.read_text(errors="replace")
    assert log.count("[search] resuming from") == 1 and "epoch-1.ckpt" in log
    assert sum("[search] epoch 1/3:" in line for line in log.splitlines()) == 1


def test_a_checkpoint_of_other_settings_is_refused_by_key(resumed, tmp_path):
    from nni_fedexit.job.config import load_config
    from nni_fedexit.search.shared_trial import SearchCheckpoint, SearchCheckpointError

    run_dir, _, _ = resumed

    config = load_config(run_dir / "config.yaml")
    copy = tmp_path / "checkpoint"
    shutil.copytree(run_dir / "search" / "checkpoint", copy)
    settings = config.shared_search_settings()

    (copy / "state.json").write_text(json.dumps({**json.loads((copy / "state.json").read_text()), "epoch": 1,
                                                 "file": f"epoch-{EPOCHS - 1}.ckpt"}))
    assert SearchCheckpoint(copy).resume_point(settings) == copy / f"epoch-{EPOCHS - 1}.ckpt"
    with pytest.raises(SearchCheckpointError, match=r"^search\.batch_size: .* batch_size = 64, this run has 32"):
        SearchCheckpoint(copy).resume_point(dataclasses.replace(settings, batch_size=32))
    with (copy / f"epoch-{EPOCHS - 1}.ckpt").open("r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(SearchCheckpointError, match="epoch-2.ckpt is damaged or was replaced"):
        SearchCheckpoint(copy).resume_point(settings)
