"""S5 on Flower: a real deployment (SuperLink + 2 SuperNodes + `flwr run`) on 127.0.0.1.

Builds nothing by hand: the app in examples/flower_deployment is submitted as a user would, the
processes talk over HTTP, and the run's checkpoint is compared with the simulation backend's for
the same seed and partitions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tomllib

import torch

from helpers import (
    Deployment,
    needs_flwr,
    needs_ssh_keygen,
    plugin_uses,
    flower_app_config,
    flwr_cli,
    flwr_runs,
    free_port,
    hostile_flower_app,
    make_tls,
    max_abs_difference,
    run_trials_experiment,
    ssh_key,
    tiny_space,
    torch_threads,
    wait_until,
    write_flwr_config,
)

pytestmark = [needs_flwr, pytest.mark.slow]  # every test here runs Flower

RUN_TIMEOUT = 240  # seconds for the whole run (2 rounds of the digits model take far less)


def test_deployment_trains_two_rounds_like_the_simulation_without_its_hostile_node(tmp_path):
    """Two SuperNodes; node 1 runs a ClientApp that claims 1e18 training examples each round. Its
    updates are rejected (by node id), the round goes on with node 0 (min-clients=1), and the
    weights are the simulation's with client 1 dropped. The clients train with FedDyn and
    self-distillation, every stage (depth-wise, so node 0 receives and sends the whole model), and
    the ServerApp trains on its own images after each aggregation: node 0's FedDyn state from
    round 1 (kept in its ``context.state``) must shape its round 2 exactly as the simulation's
    kept state does. In round 3 node 0 turns hostile
    too (hostile-from=3): no update is accepted (fewer than min-clients), so the round keeps the
    previous model: the weights after round 3 are those after round 2, and round 3 is not the best.
    (Two nodes aggregated against the simulation: the evaluator test below.)"""
    from safetensors.torch import load_file

    ckpt = tmp_path / "checkpoint"
    dep = Deployment(tmp_path)
    try:
        dep.superlink()
        for i in range(2):
            dep.supernode(f"supernode{i}", f"partition-id={i} num-partitions=2" + (" hostile=1" if i else " hostile-from=3"))
        run, run_log = dep.run(f'settings.checkpoint_dir="{ckpt}" settings.client_threads=1 settings.rounds=3 '
                               'settings.min_clients=1 settings.client_training="depthwise"',
                               app=hostile_flower_app(tmp_path / "hostile_app", server_steps=3, objective={
                                   "name": "feddyn", "alpha": 0.05, "distill_weight": 0.5}))
        state = dep.wait_rounds(ckpt, run, 3, RUN_TIMEOUT)
        diag = dep.diag()
        assert state is not None and state["round"] == 3, f"the run did not complete 3 rounds in {RUN_TIMEOUT} s\n{diag}"
        assert run.returncode == 0, diag
        runs = flwr_runs(dep.env)
        assert runs and all("completed" in str(r.get("status", "")) for r in runs), f"{runs}\n{diag}"
    finally:
        dep.stop_all()

    # rounds 1 and 2: the hostile node's update rejected by name, the other one accepted
    assert [h["round"] for h in state["history"]] == [1, 2, 3]
    hostile = {n for n, p in state["nodes"].items() if p["partition-id"] == 1}
    for h in state["history"][:2]:
        assert h["accepted"] == 1 and not h["failed"], h
        assert [str(r["node"]) for r in h["rejected"]] == list(hostile) and "1e+18" in h["rejected"][0]["reason"], h
    # round 3: both updates rejected, by name: 0 accepted < min-clients=1, the model is kept
    third = state["history"][2]
    assert third["accepted"] == 0 and not third["failed"], third
    assert sorted(str(r["node"]) for r in third["rejected"]) == sorted(state["nodes"]), third
    assert all("1e+18" in r["reason"] for r in third["rejected"]), third
    assert "Round 3: only 0 update(s) accepted (min_clients=1); the global model is kept" in run_log.read_text(errors="replace")
    # the same model validates as round 2's did: equal loss and accuracy, so round 3 cannot be the
    # best (docs/federated.md: among equal losses the higher last-exit accuracy, then the earlier round)
    second = state["history"][1]
    assert (third["total_loss"], third["exit_accuracy"]) == (second["total_loss"], second["exit_accuracy"]), (second, third)
    assert state["best_round"] in (1, 2), state["best_round"]
    assert state["backend"] == "flower" and (ckpt / "last.safetensors").is_file() and (ckpt / "best.safetensors").is_file()
    deployed = load_file(str(ckpt / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in deployed.values() if v.is_floating_point())

    # the simulation backend, same seed and partitions (client i = partition i), client 1 dropped: same weights
    from nni_fedexit.federated import SimulationBackend, federate
    from nni_fedexit.federated.backends.flower.common import build_model, load_data, settings_from_config

    class WithoutClient1(SimulationBackend):
        def train_client(self, global_state, task):
            if task.client == 1:
                raise ConnectionError("left out")
            return super().train_client(global_state, task)

    config = flower_app_config(objective={"name": "feddyn", "alpha": 0.05, "distill_weight": 0.5},
                               client_training="depthwise", server_steps=3)
    settings = settings_from_config(config, num_clients=2, min_clients=1, checkpoint_dir=str(tmp_path / "sim"))
    assert settings.objective == {"name": "feddyn", "alpha": 0.05, "distill_weight": 0.5, "distill_temperature": 1.0}
    assert settings.client_training == "depthwise" and settings.server_steps == 3
    # one torch thread, as the ClientApps ran (client-threads=1, OMP_NUM_THREADS=1): float32
    # reductions depend on the thread count, the data's normalisation statistics included
    with torch_threads(1):
        data = load_data(settings)
        model = build_model(config, settings, data.bundle)
        assert set(model.state_dict()) == set(deployed)
        result = federate(model, settings, data=data, report=False, backend_factory=WithoutClient1)
    assert [h["clients"] for h in result.history] == [
        [{"client": c["client"], "depth": c["depth"], "lr": c["lr"], "seed": c["seed"]}
         for c in sorted(h["clients"], key=lambda c: c["client"])]
        for h in state["history"][:2]
    ]
    # after round 3 (kept model) the deployment holds exactly the 2-round simulation's weights
    simulated = load_file(str(tmp_path / "sim" / "last.safetensors"))
    assert set(deployed) == set(simulated)
    worst = max_abs_difference(deployed, simulated)
    assert worst == 0.0 and all(torch.equal(deployed[k], simulated[k]) for k in simulated), \
        f"deployment and simulation differ by {worst}"
    assert any("/dyn/" in k for k in load_file(str(tmp_path / "sim" / "server.safetensors")))  # state was kept


def test_federated_evaluator_on_flower_reports_rounds_to_nni_and_resumes(tmp_path, monkeypatch):
    """backend="flower": an NNI trial submits the run to the SuperLink and reports every round;
    a second run resumes from the checkpoint; node 1 trains on its own image folder (data-dir);
    the weights are the simulation backend's with those images as client 1's data."""
    # one torch thread here, as the ClientApps run (client-threads=1, OMP_NUM_THREADS=1): float32
    # reductions, the data's standardisation statistics included, depend on the thread count
    with torch_threads(1):
        _evaluator_on_flower(tmp_path, monkeypatch)


def _evaluator_on_flower(tmp_path, monkeypatch):

    from safetensors.torch import load_file

    import nni
    from nni_fedexit.data import load_dataset
    from nni_fedexit.exits import MultiExitNetwork
    from nni_fedexit.federated import FederatedEvaluator, FederatedSettings, federate
    from nni_fedexit.search.labelled import FixedArchitecture

    bundle = load_dataset("digits")
    sizes = dict(in_chans=bundle.in_chans, image_size=bundle.image_size, num_classes=bundle.num_classes)
    space = tiny_space(**sizes)
    arch = {"stage1": "resnet50", "stage2": "resnet18", "stage3": "resnet18"}
    ckpt = tmp_path / "checkpoint"
    dep = Deployment(tmp_path)
    settings = FederatedSettings(
        dataset="digits", rounds=1, num_clients=2, min_clients=2, head="linear",
        backend={"name": "flower", "superlink": "local-deploy", "flwr_home": dep.env["FLWR_HOME"]}, client_threads=1,
        checkpoint_dir=str(ckpt), node_wait=60.0, round_timeout=120.0,
    )
    reported = []
    # node 1's own images: the first 120 of partition 1, as PNG files in one folder per class
    from nni_fedexit.data import save_image_folder
    from nni_fedexit.federated import FederatedData

    from nni_fedexit.data import load_image_folder

    data = FederatedData(settings.replace(backend="simulation"), bundle=bundle)
    first120 = data.clients[1].subset(range(120))
    save_image_folder(first120, tmp_path / "node1_images", bundle.mean, bundle.std)
    # the simulation's client 1 trains on what node 1 reads (the PNG files, 8-bit); the digits
    # are 8-bit already (k/255), so the files hold the partition's images exactly
    data.clients[1] = load_image_folder(tmp_path / "node1_images", bundle.class_names, bundle.in_chans,
                                        bundle.image_size, bundle.mean, bundle.std)
    assert torch.equal(data.clients[1].images, first120.images) and torch.equal(data.clients[1].labels, first120.labels)
    try:
        dep.superlink()
        dep.supernode("supernode0", "partition-id=0 num-partitions=2")
        dep.supernode("supernode1", f'partition-id=1 num-partitions=2 data-dir="{tmp_path / "node1_images"}"')
        dep.wait_online(2, 90)
        # round 1: the federated trial of an NNI experiment (as `nni-fedexit run` does it)
        evaluator = FederatedEvaluator(**settings.model_dump())
        jobs, metrics, _ = run_trials_experiment(space, evaluator, FixedArchitecture(arch), tmp_path / "nni", trials=1)
        assert [j["status"] for j in jobs] == ["SUCCEEDED"], f"{jobs}\n{dep.diag()}"
        assert sorted(m["type"] for m in metrics) == ["FINAL", "PERIODICAL"]  # one point per round
        final = json.loads(json.loads(next(m for m in metrics if m["type"] == "FINAL")["data"]))
        assert final["best_round"] == 1 and {"test_exit1", "test_exit3", "params"} <= set(final)
        # round 2: resumed from the checkpoint (its weights are the initial arrays), in this process
        monkeypatch.setattr(nni, "report_intermediate_result", reported.append)
        monkeypatch.setattr(nni, "report_final_result", lambda metric: None)
        model = MultiExitNetwork.from_architecture(space, arch, head="linear")
        initial = load_file(str(ckpt / "initial.safetensors"))  # the NNI trial's initial weights
        model.load_state_dict(initial)
        result = FederatedEvaluator(**settings.replace(rounds=2).model_dump()).fit(model)
        # stopping the submitter (SIGTERM, as `nnictl stop` does) stops its Flower run
        stopped = _submit_and_stop(dep, settings.replace(rounds=50, checkpoint_dir=str(tmp_path / "stopped")),
                                   sizes, arch)
    finally:
        dep.stop_all()
    run_id, code, out, runs = stopped
    assert code != 0 and "stopped by signal 15: the Flower run is stopped too" in out, out[-3000:]
    status = {str(r.get("run-id")): str(r.get("status")) for r in runs}
    assert status.get(str(run_id)) == "finished:stopped", f"run {run_id}: {runs}\n{out[-3000:]}"
    assert all(s.startswith("finished") for s in status.values()), runs  # no run still going

    assert [h["round"] for h in result.history] == [1, 2] and len(reported) == 1  # only the new round
    assert reported[0]["default"] == result.history[1]["exit_accuracy"][-1]
    assert sorted(c["partition-id"] for c in result.clients) == [0, 1]
    assert [c.get("data-dir") for c in sorted(result.clients, key=lambda c: c["partition-id"])] == [None, str(tmp_path / "node1_images")]
    assert len(list(ckpt.glob("flower-run-*.log"))) == 2
    # an uninterrupted simulation of both rounds from the same initial weights: same weights
    model = MultiExitNetwork.from_architecture(space, arch, head="linear")
    model.load_state_dict(initial)
    federate(model, settings.replace(rounds=2, backend="simulation", checkpoint_dir=str(tmp_path / "sim")),
             data=data, report=False)
    deployed, simulated = load_file(str(ckpt / "last.safetensors")), load_file(str(tmp_path / "sim" / "last.safetensors"))
    worst = max_abs_difference(deployed, simulated)
    assert worst == 0.0 and all(torch.equal(deployed[k], simulated[k]) for k in simulated), \
        f"resumed deployment and simulation differ by {worst}"


#: a submitter as a user runs it: federate(backend="flower") in its own process (argv: the settings,
#: the architecture and the data set's sizes as JSON, then tests/ for helpers.tiny_space)
SUBMITTER = """
import json, sys
sys.path.insert(0, sys.argv[4])
from helpers import tiny_space
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.federated import FederatedSettings, federate
settings, arch, sizes = (json.loads(a) for a in sys.argv[1:4])
model = MultiExitNetwork.from_architecture(tiny_space(**sizes), arch, head=settings["head"])
federate(model, FederatedSettings(**settings), report=False)
"""


def _submit_and_stop(dep, settings, sizes, arch):
    """Start a submitter of ``settings`` on ``dep``'s SuperLink, SIGTERM it once its run is submitted
    (the event: ``flower-run-<id>.log`` appears in its checkpoint folder, see run_on_flower), wait
    for it to exit; (run id, exit code, its output, ``flwr ls`` then)."""
    ckpt = Path(settings.checkpoint_dir)
    proc, log = dep.start("submitter", [sys.executable, "-c", SUBMITTER, settings.to_json(),
                                        json.dumps(arch), json.dumps(sizes), str(Path(__file__).parent)])
    found = wait_until(lambda: next(ckpt.glob("flower-run-*.log"), None) or proc.poll() is not None, 180,
                       lambda: f"no run submitted\n{dep.diag()}", poll=0.2)
    assert found is not True, f"the submitter exited with {proc.returncode} before submitting\n{dep.diag()}"
    os.kill(proc.pid, signal.SIGTERM)  # the submitter alone, as `nnictl stop` signals a trial
    code = proc.wait(timeout=180)  # it stops the run (flwr stop) and exits: a bound, not a guess
    return int(found.stem.rsplit("-", 1)[1]), code, log.read_text(errors="replace"), flwr_runs(dep.env)


def test_flower_backend_names_the_missing_superlink(tmp_path):
    from nni_fedexit.federated import FederatedError, FederatedSettings

    with pytest.raises(ValueError, match=r"^backend\.superlink: the flower backend needs .*superlink: local-deploy"):
        FederatedSettings(backend="flower")
    from nni_fedexit.exits import MultiExitNetwork
    from nni_fedexit.federated.backends.flower.submit import run_on_flower

    home = tmp_path / "flwr_home"
    home.mkdir()
    write_flwr_config(home, "nowhere", f"127.0.0.1:{free_port()}")
    space = tiny_space()
    model = MultiExitNetwork.from_architecture(space, {"stage1": "resnet18", "stage2": "resnet18", "stage3": "resnet50"})
    settings = FederatedSettings(dataset="digits", num_clients=2, checkpoint_dir=str(tmp_path / "ckpt"),
                                 backend={"name": "flower", "superlink": "nowhere", "flwr_home": str(home)})
    with pytest.raises(FederatedError, match="(?s)'nowhere'.*unavailable.*Check that the SuperLink runs"):
        run_on_flower(model, settings)


def test_run_config_round_trips_the_settings(tmp_path):

    from nni_fedexit.federated import FederatedSettings
    from nni_fedexit.federated.backends.flower.common import run_config, settings_from_config, space_from_config, write_app

    space = tiny_space(depth_crops=[1])
    settings = FederatedSettings(dataset="digits", num_clients=3, loss_weights=[1, 0.5, 2], client_samples=90,
                                 profile_mix=[["phone", 0.3, 0.5], ["edge", 1.0, 0.5]], lr=0.02)
    arch = {"stage1": "resnet50-d1", "stage2": "resnet18", "stage3": "resnet18"}
    settings = settings.replace(checkpoint_dir=str(tmp_path / 'c "quoted"'), aggregator={"name": "fedadam", "lr": 0.1})
    config = run_config(settings, arch, space.spec)
    app = write_app(tmp_path / "app", config)
    written = tomllib.loads((app / "pyproject.toml").read_text())
    assert written["tool"]["flwr"]["app"]["config"] == config
    assert written["tool"]["flwr"]["app"]["components"]["serverapp"] == "nni_fedexit.federated.backends.flower.server_app:app"
    back = settings_from_config(config)
    assert back == settings  # one JSON document (all but the backend: the deployment is the backend), read back
    assert json.loads(config["settings"]) == {k: v for k, v in settings.model_dump().items() if k != "backend"}
    rebuilt = space_from_config(config, _Sizes(space.spec))
    assert rebuilt.spec == space.spec and json.loads(config["architecture"]) == arch
    assert set(config) == {"settings", "architecture", "space-sources", "space-widths", "space-depth-crops",
                           "space-stem-width", "space-stem-stride", "initial-weights"}  # nothing field by field
    # the example app lists only keys the ServerApp knows
    example = flower_app_config()
    assert {k for k in example if not k.startswith("settings.")} <= set(config)
    assert {k.split(".")[1] for k in example if k.startswith("settings.")} <= set(FederatedSettings.model_fields)
    # a run config of an earlier version (settings as hyphenated keys) is refused, naming the key
    with pytest.raises(ValueError, match=r"^run config key 'local-epochs': the settings are now under settings\.\*"):
        settings_from_config({**config, "local-epochs": 2})


class _Sizes:
    """The image and class sizes space_from_config takes from a data set."""

    def __init__(self, spec):
        self.in_chans, self.image_size, self.num_classes = spec.in_chans, spec.image_size, spec.num_classes


def test_run_config_builds_the_simulation_model_and_checks_branch_arrays():
    from nni_fedexit.federated.backends.flower.common import (
        branch_keys, build_model, load_branch_state, load_data, settings_from_config, to_array_record, to_state_dict,
    )

    config = flower_app_config(loss_weights=[1, 0.5, 2], batch_size=16)
    settings = settings_from_config(config, num_clients=2, min_clients=2)
    assert (settings.dataset, settings.rounds, settings.head, settings.client_samples) == ("digits", 2, "linear", None)
    assert settings.loss_weights == [1, 0.5, 2] and settings.batch_size == 16 and settings.name("backend") == "simulation"
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


# what a SuperNode whose key the SuperLink does not know logs before it exits (exit code 305)
REFUSED = "Failed to activate SuperNode"
FAULT_TIMEOUT = 600  # seconds: 3 rounds, one of which waits for the SuperLink to report the killed node


def test_deployment_finishes_when_a_supernode_is_killed_after_round_one(tmp_path, plugin_site):
    """Three SuperNodes; the one with partition 2 (the victim) trains round 1, then, when round 2's
    message arrives, writes a file and never replies (HOSTILE_CLIENT's hold-at-round): the test
    kills it on that event, so it cannot have replied to round 2. The round timeout (120 s) is
    above the SuperLink's ~60 s of missed heartbeats before it reports a node lost.

    The run's aggregator and objective come from a third-party plugin (entry points, installed by pip
    into a folder on the processes' PYTHONPATH), named in the run config: the ServerApp aggregates
    with it and every SuperNode's ClientApp trains with it."""
    ckpt = tmp_path / "checkpoint"
    held = tmp_path / "victim_holds_round_2"
    uses_log = tmp_path / "plugin_uses.jsonl"
    dep = Deployment(tmp_path)
    dep.env.update(PYTHONPATH=os.pathsep.join([str(plugin_site), dep.env.get("PYTHONPATH", "")]),
                   FEDEXIT_PLUGIN_LOG=str(uses_log))
    try:
        dep.superlink()
        nodes = {p: dep.supernode(f"supernode{p}", f"partition-id={p} num-partitions=3" + (
            f' hold-at-round=2 hold-file="{held}"' if p == 2 else ""))[0] for p in range(3)}
        dep.wait_online(3, 90)
        run, run_log = dep.run(f'settings.checkpoint_dir="{ckpt}" settings.client_threads=1 settings.rounds=3 '
                               'settings.min_clients=2 settings.round_timeout=120.0 settings.node_wait=60.0 '
                               'settings.objective="logged_multi_exit"',
                               app=hostile_flower_app(tmp_path / "app", aggregator={"name": "logged_fedavg",
                                                                                    "tag": "in the app"}))
        deadline = time.time() + FAULT_TIMEOUT
        wait_until(lambda: held.is_file() or run.poll() is not None, FAULT_TIMEOUT,
                   lambda: f"round 2 never reached the victim\n{dep.diag()}", poll=0.2)
        assert held.is_file(), f"the run ended before round 2 reached the victim\n{dep.diag()}"
        # round 2 is sent after round 1's checkpoint: round 1 is in it, with the victim's update
        first = dep.state(ckpt)
        assert first is not None and first["round"] == 1, f"round 1 was not checkpointed\n{dep.diag()}"
        victim = next(c for c in first["history"][0]["clients"] if c["client"] == 2)
        # the victim goes away for good (with its ClientApp)
        dep.kill(nodes[2])
        state = dep.wait_rounds(ckpt, run, 3, deadline - time.time())
        diag = dep.diag()
        assert state is not None and state["round"] == 3, f"the run did not complete 3 rounds in {FAULT_TIMEOUT} s\n{diag}"
        assert run.returncode == 0, diag
    finally:
        dep.stop_all()

    history = state["history"]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert history[0]["accepted"] == 3 and not history[0]["failed"], history[0]
    # the two surviving nodes carry rounds 2 and 3; the dropped node is recorded as failed, never accepted
    assert all(h["accepted"] == 2 for h in history[1:]), history
    assert victim["node"] in [f["node"] for f in history[1]["failed"]], history[1]
    # every failure is the dropped node's, by its own id (also when the SuperLink reports it unavailable)
    assert all(f["node"] == victim["node"] for h in history for f in h["failed"]), history
    assert all(len(h["failed"]) <= 1 for h in history), history
    # the server's log (flwr run --stream) names the node that dropped
    text = run_log.read_text(errors="replace")
    named = [line for line in text.splitlines() if "WARNING" in line and f"node {victim['node']} " in line
             and ("failed" in line or "did not reply" in line)]
    assert named, f"no warning names node {victim['node']}:\n{text[-4000:]}"
    # the plugin ran where the work runs: aggregation in the ServerApp's process (once per round),
    # local training in the SuperNodes' ClientApp processes (7 client rounds: 3 + 2 + 2)
    uses = plugin_uses(uses_log)
    aggregations = [u for u in uses if u["kind"] == "aggregator"]
    trainings = [u for u in uses if u["kind"] == "objective"]
    assert len(aggregations) == 3 and len({u["pid"] for u in aggregations}) == 1, uses
    assert {u["tag"] for u in aggregations} == {"in the app"}, uses  # its own parameter, from the run config
    assert len(trainings) >= 7 and aggregations[0]["pid"] not in {u["pid"] for u in trainings}, uses
    assert len({u["pid"] for u in trainings}) >= 2, uses


@needs_ssh_keygen
def test_deployment_over_tls_admits_only_registered_supernodes(tmp_path):
    tls = make_tls(tmp_path / "tls")
    keys = [ssh_key(tmp_path / f"node{i}") for i in range(3)]  # node2's key is never registered
    ckpt = tmp_path / "checkpoint"
    dep = Deployment(tmp_path, tls=tls)
    try:
        dep.superlink()
        for key in keys[:2]:
            res = flwr_cli(dep.env, "supernode", "register", f"{key}.pub", "local-deploy")
            assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{dep.diag()}"
        intruder, intruder_log = dep.supernode("intruder", "partition-id=2 num-partitions=3", keys[2])
        for i in range(2):
            dep.supernode(f"supernode{i}", f"partition-id={i} num-partitions=2", keys[i])
        dep.wait_online(2, 90)
        run, _ = dep.run(f'settings.checkpoint_dir="{ckpt}" settings.client_threads=1')
        state = dep.wait_rounds(ckpt, run, 2, RUN_TIMEOUT)
        diag = dep.diag()
        assert state is not None and state["round"] == 2, f"the run did not complete 2 rounds in {RUN_TIMEOUT} s\n{diag}"
        assert run.returncode == 0, diag
        assert dep.online_nodes() == 2, diag
        try:  # the event: the intruder exits once the SuperLink refuses its key (60 s: a bound, not a guess)
            intruder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        refusal = intruder_log.read_text(errors="replace")
        assert intruder.poll() is not None and REFUSED in refusal, f"the unregistered SuperNode was not refused:\n{refusal[-3000:]}"
    finally:
        dep.stop_all()
    history = state["history"]
    assert all(h["accepted"] == 2 and not h["failed"] for h in history), history
    assert all(sorted(c["client"] for c in h["clients"]) == [0, 1] for h in history), history


def test_node_config_names_the_data_or_says_how():
    from nni_fedexit.federated.backends.flower.client_app import node_partition
    from nni_fedexit.federated.backends.flower.server_app import NodeProfile

    assert node_partition({"partition-id": 1, "num-partitions": 3}) == (1, 3)
    assert node_partition({"data-dir": "/data/cam0"}) == (None, 0)
    assert node_partition({"data-dir": "/data/cam0", "partition-id": 2, "num-partitions": 3}) == (2, 3)
    with pytest.raises(ValueError, match="partition-id.*data-dir"):
        node_partition({"budget": 0.5})
    with pytest.raises(ValueError, match=r"0\.\.1"):
        node_partition({"partition-id": 2, "num-partitions": 2})
    own = NodeProfile({"data-dir": "/data/cam0", "num-partitions": 0})
    assert own.partition is None and own.describe() == "data-dir /data/cam0"
    assert NodeProfile({"partition-id": 1, "num-partitions": 2}).describe() == "partition 1/2"
