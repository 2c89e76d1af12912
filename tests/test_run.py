"""The main job from the command line: `nni-fedexit run` end to end, its artifacts (bad configs: test_config.py)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nni_fedexit.job.cli import main
import yaml

from helpers import BIN, EXAMPLES, free_port, plugin_uses, venv_env

pytestmark = pytest.mark.slow  # NNI experiments, Flower or Ray processes, a browser: make test-fast leaves them out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = CliRunner().invoke(
        main, ["run", str(EXAMPLES / "tiny_digits.yaml"), "--run-dir", str(run_dir), "--port", str(free_port())]
    )
    assert result.exit_code == 0, result.output
    return run_dir, result.output


def test_run_writes_every_artifact(tiny_run):
    run_dir, output = tiny_run
    for name in ("config.yaml", "search/history.json", "search/architecture.json", "federated/metrics.json",
                 "federated/partition.json", "federated/state.json", "federated/best.safetensors", "model.safetensors",
                 "model.json", "evaluation.json", "export/exports.json", "export/early_exit/early_exit.json",
                 "export/early_exit/latency.json", "report.md", "plots/reward.png",
                 "plots/accuracy_vs_params.png", "plots/rounds.png", "plots/early_exit.png", "plots/partition.png"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "stages.json").read_text())["done"] == ["search", "federate", "evaluate", "export", "report"]
    assert "NNI web UI: http://127.0.0.1:" in output and str(run_dir / "report.md") in output
    # one NNI experiment per stage, in the run directory, where nnictl finds them
    for name in ("search/architecture.json", "federated/metrics.json"):
        exp_id = json.loads((run_dir / name).read_text())["experiment_id"]
        assert (run_dir / "nni-experiments" / exp_id / "checkpoint").is_dir()


def test_report_agrees_with_the_json_files(tiny_run):
    run_dir, _ = tiny_run
    report = (run_dir / "report.md").read_text()
    arch = json.loads((run_dir / "search/architecture.json").read_text())
    for label, block in arch["sample"].items():
        assert f"| {label} | {block} |" in report
    assert f"Parameters p_h = {arch['params']:,}" in report
    metrics = json.loads((run_dir / "federated/metrics.json").read_text())
    for r in metrics["rounds"]:
        assert f"| {r['round']} | " + " | ".join(f"{a:.4f}" for a in r["exit_accuracy"]) in report
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    for e in evaluation["exits"]:
        assert f"| {e['exit']} | {e['params']:,} |" in report and f"{e['test_accuracy']:.4f} |" in report
    assert metrics["best_round"] == json.loads((run_dir / "model.json").read_text())["best_round"]
    for record in json.loads((run_dir / "export/exports.json").read_text()):
        assert Path(record["path"]).is_file() and record["max_abs_error"] <= 1e-5
    # per-exit thresholds certified on the held-out split, the guarantee in words, the measured latency
    assert evaluation["rule"] == "per_exit" and evaluation["margin"] == "held_out"
    assert evaluation["drop_bound"] <= evaluation["target"]["max_accuracy_drop"]
    assert f"Guarantee: {evaluation['guarantee']}" in report
    # the training options the run used, in words; the server trained, so the report says so, and
    # the guarantee was certified on the search-train images its steps did not train on
    options = metrics["options"]
    assert (options["client_training"], options["objective"], options["server_steps"]) == ("depthwise", "logit_adjusted", None)
    # the default: one pass over the server's labelled images a round
    assert options["server_step_count"] == max(1, options["server_images"] // 32) and options["server_images"] > 0
    assert "Training options:" in report and "each client trains every stage" in report
    steps = options["server_step_count"]
    assert f"the server trained the model for {steps} steps on its own {options['server_images']:,} labelled images" in report
    assert "not trained on the clients' data alone" in report
    assert evaluation["held_out_images"] + options["server_images"] == 230  # digits: 230 search-train images
    assert f"images {options['server_images']:,} to 230" in evaluation["held_out_split"] in report
    # the exit to beat: the most accurate alone; the report compares early exits with it when it is not the last
    accuracies = [e["test_accuracy"] for e in evaluation["exits"]]
    best = evaluation["test"]["best_exit"]
    assert accuracies[best - 1] == max(accuracies) and best == 1 + accuracies.index(max(accuracies))
    assert ("A shallower exit beats the last one on the test images: exit " in report) == (best < len(accuracies))
    latency = json.loads((run_dir / "export/early_exit/latency.json").read_text())
    assert {t["format"] for t in latency["timings"]} == {"onnx", "torchscript"}
    assert latency["thresholds"] == evaluation["thresholds"]
    for t in latency["timings"]:
        assert f"| {t['format']}, batch 1, 1 CPU thread | {t['early_exit_s'] * 1e3:.3f} ms | " in report


def _accuracies(model, data, batch_size=64):
    """Each exit's accuracy on ``data``: a plain PyTorch loop (eval mode, argmax), not the project's exit_outputs."""
    model.eval()
    correct = None
    with torch.no_grad():
        for start in range(0, len(data.labels), batch_size):
            outs = model(data.images[start:start + batch_size])
            hits = [int((z.argmax(1) == data.labels[start:start + batch_size]).sum()) for z in outs]
            correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
    return [c / len(data.labels) for c in correct]


def test_the_model_is_the_best_rounds_and_the_one_evaluated(tiny_run):
    """model.safetensors: the federated checkpoint's best round, value for value; on the federated
    validation split it scores what metrics.json says of that round, and on the test split what
    evaluation.json says of each exit."""
    from nni_fedexit.job.cli import _existing_run

    run_dir, _ = tiny_run
    weights = load_file(str(run_dir / "model.safetensors"))
    best = load_file(str(run_dir / "federated/best.safetensors"))
    assert set(weights) == set(best) and all(torch.equal(weights[k], best[k]) for k in best)
    last = load_file(str(run_dir / "federated/last.safetensors"))
    metrics = json.loads((run_dir / "federated/metrics.json").read_text())
    rounds = metrics["rounds"]
    # the best round as docs/federated.md defines it: the lowest validation total loss rounded to 4
    # decimals, then the higher last-exit accuracy, then the earlier round
    ranked = sorted(rounds, key=lambda r: (round(r["total_loss"], 4), -r["exit_accuracy"][-1], r["round"]))
    assert metrics["best_round"] == ranked[0]["round"]
    if metrics["best_round"] < len(rounds):  # then it is not simply the last round's weights
        assert any(not torch.equal(weights[k], last[k]) for k in last)

    run = _existing_run(str(run_dir))
    model = run.model()  # rebuilt from model.json and model.safetensors, as `evaluate` does
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    data = run.federated_data()
    val = _accuracies(model, data.val)
    assert val == pytest.approx(rounds[metrics["best_round"] - 1]["exit_accuracy"], abs=1e-9)
    test = _accuracies(model, data.test)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert test == pytest.approx([e["test_accuracy"] for e in evaluation["exits"]], abs=1e-9)


def test_finished_run_is_not_overwritten_and_resume_skips_done_stages(tiny_run):
    run_dir, _ = tiny_run
    again = CliRunner().invoke(main, ["run", str(EXAMPLES / "tiny_digits.yaml"), "--run-dir", str(run_dir)])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = CliRunner().invoke(main, ["run", str(EXAMPLES / "tiny_digits.yaml"), "--run-dir", str(run_dir), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("done already: skipped") == 5


def test_stages_continue_an_interrupted_run(tiny_run, tmp_path):
    """A run stopped after the search resumes with the federated stage, reusing the search."""
    run_dir, _ = tiny_run
    partial = tmp_path / "partial"
    (partial / "search").mkdir(parents=True)
    for name in ("search/history.json", "search/architecture.json", "config.yaml"):
        shutil.copy(run_dir / name, partial / name)
    (partial / "stages.json").write_text(json.dumps({"done": ["search"]}))
    result = CliRunner().invoke(main, ["run", str(EXAMPLES / "tiny_digits.yaml"), "--run-dir", str(partial),
                                       "--resume", "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    assert "[search] done already: skipped" in result.output and (partial / "report.md").is_file()
    assert json.loads((partial / "search/architecture.json").read_text()) == json.loads((run_dir / "search/architecture.json").read_text())


def test_a_plugin_chosen_in_the_yaml_runs_inside_the_nni_trial(tiny_run, tmp_path, plugin_site):
    """A third-party distribution's aggregator and objective (entry points; installed by pip into a
    folder on PYTHONPATH), named in the run config: the federated stage's NNI trial, a process NNI's
    manager starts, finds and runs them; nothing imported them before."""
    run_dir, _ = tiny_run
    partial = tmp_path / "plugin_run"
    (partial / "search").mkdir(parents=True)
    for name in ("search/history.json", "search/architecture.json"):
        shutil.copy(run_dir / name, partial / name)
    (partial / "stages.json").write_text(json.dumps({"done": ["search"]}))
    config = yaml.safe_load((EXAMPLES / "tiny_digits.yaml").read_text())
    config["federated"].update(aggregator={"name": "logged_fedavg", "tag": "from the yaml"}, objective="logged_multi_exit")
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "uses.jsonl"
    env = venv_env(PYTHONPATH=os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")]),
                   FEDEXIT_PLUGIN_LOG=str(log))
    out = subprocess.run([str(BIN / "nni-fedexit"), "federate", str(tmp_path / "plugin.yaml"), "--run-dir", str(partial),
                          "--resume", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    uses = plugin_uses(log)
    trial = {u["nni_trial"] for u in uses}
    assert len(trial) == 1 and None not in trial, uses  # every use inside the one NNI trial of the stage
    assert [u["kind"] for u in uses].count("aggregator") == config["federated"]["rounds"]
    assert {u["tag"] for u in uses if u["kind"] == "aggregator"} == {"from the yaml"}  # its own parameter, set there
    assert any(u["kind"] == "objective" for u in uses)
    assert json.loads((partial / "federated" / "metrics.json").read_text())["rounds"]


def test_no_nni_runs_the_same_stages_in_process(tiny_run, tmp_path):
    """--no-nni: the search and the federated rounds run in this process (no NNI experiment, no
    web UI) and give the run NNI's trials gave: the same samples and controller steps, the same
    rounds (clients, branches, seeds; losses equal up to float rounding: the federated trial ran in
    a process of its own, here it follows the search in this one); the report says it ran without NNI."""
    first, _ = tiny_run
    plain = tmp_path / "plain"
    result = CliRunner().invoke(main, ["run", str(EXAMPLES / "tiny_digits.yaml"), "--run-dir", str(plain), "--no-nni"])
    assert result.exit_code == 0, result.output
    assert "in this process (no NNI experiment)" in result.output and "nnictl" not in result.output
    assert not (plain / "nni-experiments").exists() and not (plain / "search" / "experiment.json").exists()
    history = [json.loads((d / "search" / "history.json").read_text()) for d in (first, plain)]
    assert history[1]["experiment_id"] is None
    assert history[0]["samples"] == history[1]["samples"]
    assert history[0]["controller_steps"] == history[1]["controller_steps"]
    rounds = [json.loads((d / "federated" / "metrics.json").read_text()) for d in (first, plain)]
    assert rounds[1]["experiment_id"] is None and len(rounds[0]["rounds"]) == len(rounds[1]["rounds"])
    for nni_round, plain_round in zip(rounds[0]["rounds"], rounds[1]["rounds"]):
        assert nni_round["clients"] == plain_round["clients"] and nni_round["accepted"] == plain_round["accepted"]
        assert plain_round["total_loss"] == pytest.approx(nni_round["total_loss"], rel=1e-4)
    assert rounds[0]["best_round"] == rounds[1]["best_round"]
    assert "without NNI" in (plain / "report.md").read_text()


def test_no_nni_refuses_the_trials_mode_by_name(tmp_path):
    config = yaml.safe_load((EXAMPLES / "tiny_digits.yaml").read_text())
    config["search"]["strategy"] = {"preset": "size_aware_pg_trials"}
    (tmp_path / "trials.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["search", str(tmp_path / "trials.yaml"), "--run-dir", str(tmp_path / "r"), "--no-nni"])
    assert result.exit_code == 2 and "the trials mode runs every sampled network as an NNI trial" in result.output


def test_help_of_every_command():
    for command in ("run", "search", "federate", "evaluate", "export", "report", "space"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_a_second_run_with_the_same_seed_gives_the_same_results(tiny_run, tmp_path):
    """Same config, same seed: the same search and the same federated rounds (initial weights are seeded)."""
    first, _ = tiny_run
    again = tmp_path / "again"
    for stage in ("search", "federate"):
        result = CliRunner().invoke(main, [stage, str(EXAMPLES / "tiny_digits.yaml"), "--run-dir", str(again),
                                           "--port", str(free_port())])
        assert result.exit_code == 0, result.output
    history = [json.loads((d / "search" / "history.json").read_text())["samples"] for d in (first, again)]
    assert history[0] == history[1]
    rounds = [json.loads((d / "federated" / "metrics.json").read_text())["rounds"] for d in (first, again)]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rounds[0]) == strip(rounds[1])
