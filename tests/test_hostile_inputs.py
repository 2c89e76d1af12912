"""Hostile inputs and crashes, tried as an attacker and an unlucky operator would (issue 14): no
code from them runs, no client weighs more than its share, a bad reply costs only its sender, a
checkpoint resumes exactly or is refused by name, the CLI prints one ``error:`` line.

1. run directories someone else wrote: NNI's config.json is read as plain JSON, never decoded;
2. client weights: a sample count above what the server knows the client holds is rejected;
3. malformed Flower replies (and 9, the memory bound): checked before decoding, only the sender pays;
4. a kill at any point of a checkpoint save resumes to the uninterrupted model;
5. damaged checkpoints are refused naming the file (a damaged best file costs only its weights);
6. CLI errors: one ``error:`` line, exit 2; damaged run files named;
7. device images: decompression bombs and damaged files are DataErrors naming the file;
8. a resumed experiment's command channel skips what NNI's NAS channel does not handle and lives on
   (the real resume is in tests/test_view.py);
9. node profiles, budgets and ServerApp paths.

Run directories are made by hand, as the pipeline lays them out: a damaged one fails before any
NNI experiment starts. The real deployment with a hostile ClientApp is in tests/test_flower.py.
"""

from __future__ import annotations

import functools

import copy
import inspect
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from nni_fedexit.data import DataError, load_dataset, load_image_folder
from nni_fedexit.federated import FederatedData, FederatedError, SimulationBackend, federate
from nni_fedexit.federated.aggregators import Aggregator, WeightedMean, register_aggregator
from nni_fedexit.federated.checkpoint import Checkpoint
from nni_fedexit.job.cli import main
from nni_fedexit import nni_compat as compat
from nni_fedexit.nni_tools.reopen import (
    ExperimentRef, ReopenError, find_experiment, plain_json_checkpoint_config, read_nas_config,
)
from helpers import EXAMPLES, TINY_SAMPLE, TINY_SAMPLE as SAMPLE, digits_settings as shared_digits_settings, needs_flwr, tiny_space


# ==== 1 and 8. run directories and NNI commands we did not write ==================================
EXP_ID = "hostile1"


class _Touch:
    """Unpickling it creates ``path``: the stand-in for someone else's code."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _payload(path: Path) -> dict:
    """An ``__nni_obj__`` entry exactly as NNI's encoder writes it for an object it cannot trace."""
    import nni

    entry = json.loads(nni.dump(_Touch(path)))
    assert set(entry) == {"__nni_obj__"}
    return entry


def _nni_config(tmp: Path) -> dict:
    """The config.json NNI itself writes for a NAS experiment on the training service (through
    NasExperiment.save_checkpoint, as the federate stage's experiment has it)."""
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import NasExperimentConfig

    config = NasExperimentConfig("ts", "simplified", "local")
    config.max_trial_number = 1
    config.trial_concurrency = 1
    config.training_service.use_active_gpu = False
    config.experiment_working_directory = str(tmp / "written")
    NasExperiment(None, None, None, config=config, id="written").save_checkpoint()
    return json.loads((tmp / "written" / "written" / "checkpoint" / "config.json").read_text())


def _run_dir(tmp: Path, config_json: str) -> Path:
    """The smallest run directory `nni-fedexit view` takes: config.yaml, the search stage's
    experiment record, and the experiment's checkpoint/config.json."""
    run = tmp / "run"
    (run / "search").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "search" / "experiment.json").write_text(json.dumps({"experiment_id": EXP_ID, "stage": "search"}))
    ckpt = run / "nni-experiments" / EXP_ID / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(config_json)
    return run


@pytest.fixture(scope="module")
def nni_written(tmp_path_factory) -> dict:
    return _nni_config(tmp_path_factory.mktemp("nni_written"))


@pytest.fixture
def hostile(tmp_path, nni_written):
    """A run directory whose config.json carries a live cloudpickle payload (it would create
    ``tmp_path/"pwned"``), next to NNI's real fields."""
    pwned = tmp_path / "pwned"
    data = dict(nni_written, experimentName=_payload(pwned))
    return _run_dir(tmp_path, json.dumps(data, indent=2)), pwned


def test_the_payload_is_live_through_nni_load(tmp_path):
    """The check the other tests rely on: NNI's own loader runs such an entry."""
    import nni

    control = tmp_path / "control"
    nni.load(json.dumps({"experimentName": _payload(control)}))
    assert control.exists()


def test_config_with_an_encoded_object_is_refused_not_decoded(hostile):
    run, pwned = hostile
    ref = find_experiment(str(run))
    with pytest.raises(ReopenError) as err:
        ref.config()
    message = str(err.value)
    assert str(ref.folder / "checkpoint" / "config.json") in message and "'experimentName.__nni_obj__'" in message
    assert not pwned.exists()


def test_nni_load_checkpoint_reads_config_json_as_plain_json(hostile):
    """NNI's view (and resume) read config.json again in NasExperiment.load_checkpoint: patched,
    that read refuses the payload too."""
    from nni.nas.experiment import NasExperiment
    from nni.nas.experiment.config import NasExperimentConfig

    run, pwned = hostile
    plain_json_checkpoint_config()
    config = NasExperimentConfig("ts", "simplified", "local", trial_concurrency=1)
    config.experiment_working_directory = str(run / "nni-experiments")
    with pytest.raises(ReopenError, match="__nni_obj__"):
        NasExperiment(None, None, None, config=config, id=EXP_ID).load_checkpoint()
    assert not pwned.exists()


def test_view_of_a_hostile_run_exits_2_with_one_error_line(hostile):
    run, pwned = hostile
    result = CliRunner().invoke(main, ["view", str(run), "--port", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0], result.output
    assert "__nni_obj__" in lines[0] and "trust" in lines[0]
    assert not pwned.exists()


@pytest.mark.parametrize("where, entry, key", [
    ("executionEngine", {"__nni_type__": "path:os.system"}, "executionEngine.__nni_type__"),  # an import
    ("trainingService", [{"platform": "local"}, {"__instance_type__": ["os", "system"]}],  # json-tricks' own
     "trainingService[1].__instance_type__"),
])
def test_every_decoder_marker_is_refused_with_its_key(tmp_path, nni_written, where, entry, key):
    run = _run_dir(tmp_path, json.dumps(dict(nni_written, **{where: entry})))
    with pytest.raises(ReopenError, match=re.escape(f"holds an encoded object at {key!r}")):
        ExperimentRef(EXP_ID, run / "nni-experiments").config()


@pytest.mark.parametrize("text", ['{"experimentType": "nas", "trainingService": {"platform": "lo', "",
                                  "\x00\x01 not json", '["nas"]', '{"searchSpace": {}}', "[" * 100_000 + "]" * 100_000],
                         ids=["truncated", "empty", "binary", "not-an-object", "not-nas", "too-deep"])
def test_damaged_config_json_is_a_reopen_error_naming_the_file(tmp_path, text):
    run = _run_dir(tmp_path, text)
    path = run / "nni-experiments" / EXP_ID / "checkpoint" / "config.json"
    with pytest.raises(ReopenError) as err:
        ExperimentRef(EXP_ID, run / "nni-experiments").config()
    assert str(path) in str(err.value) and "restore it from a copy of the run directory" in str(err.value)
    result = CliRunner().invoke(main, ["view", str(run), "--port", "1"])
    assert result.exit_code == 2 and result.output.startswith(f"error: {path} ") and result.output.count("\n") == 1


def test_an_nni_written_config_loads_as_nni_loads_it(tmp_path, nni_written):
    import nni
    from nni.experiment.config.utils import diff
    from nni.nas.experiment.config import NasExperimentConfig

    run = _run_dir(tmp_path, json.dumps(nni_written))
    path = run / "nni-experiments" / EXP_ID / "checkpoint" / "config.json"
    ours = read_nas_config(path)
    with path.open() as f:
        theirs = NasExperimentConfig(**nni.load(fp=f))  # our own file: NNI's loader is fine here
    theirs.experiment_working_directory = str(run / "nni-experiments")
    assert diff(theirs, ours) == ""
    assert ours.execution_engine.name == "ts" and ours.max_trial_number == 1
    assert ours.training_service.use_active_gpu is False
    assert ExperimentRef(EXP_ID, run / "nni-experiments").config().json() == ours.json()
    assert ExperimentRef("other", run / "nni-experiments").config() is None  # no checkpoint: a classic experiment


def test_trial_command_and_directories_come_from_us_not_the_file(tmp_path, nni_written):
    evil = "touch /tmp/x; python -m nni.nas.execution.training_service trial"
    data = dict(nni_written, trialCommand=evil, trial_code_directory=str(tmp_path),
                _TRIAL_COMMAND_PARAMS_={"envs": "touch /tmp/x;"}, experimentWorkingDirectory="/elsewhere",
                trainingService=dict(nni_written["trainingService"], trialCommand=evil, trialCodeDirectory="/"))
    run = _run_dir(tmp_path, json.dumps(data))
    canonical = ExperimentRef(EXP_ID, run / "nni-experiments").config().canonical_copy()
    ours = f"{sys.executable} -m nni.nas.execution.training_service trial"
    assert canonical.trial_command == ours and canonical.training_service.trial_command == ours
    assert Path(canonical.trial_code_directory) == Path.cwd() == Path(canonical.training_service.trial_code_directory)
    assert Path(canonical.experiment_working_directory) == run / "nni-experiments"


# ---- the command channel of a resumed experiment ------------------------------------------------

class _Manager:
    """The NNI manager's end of the tuner command channel, as nni_node/core/tuner_command_channel.js
    speaks it: one JSON text frame ``{"type": ..., "content": <string>}`` per command."""

    def __init__(self, frames: list[dict]):
        from websockets.sync.server import serve

        self.frames = frames
        self.received: list[str] = []
        self.server = serve(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/tuner"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handle(self, conn) -> None:
        for frame in self.frames:
            conn.send(json.dumps(frame))
        try:
            for message in conn:
                self.received.append(message)
        except Exception:  # the client closes the connection
            pass

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


def _frame(command_type, content: str = "") -> dict:
    return {"type": command_type.value, "content": content}


def test_nas_channel_commands_are_exactly_what_nni_receive_handles():
    """The commands the patch lets through are the ones NNI's own receive does not call unknown."""
    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel
    from nni.runtime.tuner_command_channel.command_type import CommandType

    original = getattr(TunerCommandChannel.receive, "__wrapped__", TunerCommandChannel.receive)
    manager = _Manager([_frame(t, "0") for t in CommandType])
    channel = TunerCommandChannel(manager.url)
    try:
        channel.connect()
        unknown = set()
        for command_type in CommandType:
            try:
                original(channel)
            except ValueError as err:
                if str(err) == f"Unknown command type: {command_type}":
                    unknown.add(command_type)
            except TypeError:  # a handled command with other content
                pass
    finally:
        channel.disconnect()
        manager.close()
    assert CommandType.ImportData in unknown and CommandType.AddCustomizedTrialJob in unknown
    assert compat.nas_channel_commands() == set(CommandType) - unknown


def test_resumed_channel_skips_unknown_commands_undecoded_and_keeps_listening(tmp_path, caplog):
    """What the manager sends a resumed NAS experiment after Initialized: ImportData (the earlier
    trials) and AddCustomizedTrialJob (the unfinished ones), whose content holds the trials'
    pickled parameters; then the commands the engine lives on. The listener thread, as NNI's
    training service engine runs it, skips the first two without decoding them and goes on."""
    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel
    from nni.runtime.tuner_command_channel.command_type import CommandType

    caplog.set_level(logging.INFO, logger="nni_fedexit.nni_compat")
    compat.accept_import_data()
    compat.accept_import_data()  # idempotent
    assert not hasattr(TunerCommandChannel.receive.__wrapped__, "__wrapped__")
    pwned = tmp_path / "pwned"
    trials = json.dumps([{"parameter": {"parameters": _payload(pwned)}, "value": "0.5"}])
    manager = _Manager([_frame(CommandType.ImportData, trials), _frame(CommandType.AddCustomizedTrialJob, trials),
                        _frame(CommandType.Ping), _frame(CommandType.RequestTrialJobs, "2"),
                        _frame(CommandType.UpdateSearchSpace, "{}"), _frame(CommandType.Terminate)])
    channel = TunerCommandChannel(manager.url)
    heard: list = []
    channel.on_request_trial_jobs(heard.append)
    channel.on_update_search_space(heard.append)
    channel.on_terminate(heard.append)
    failures: list = []
    stop = threading.Event()

    def listen() -> None:
        try:
            channel.listen(stop_event=stop)
        except BaseException as err:  # what would kill NNI's listener thread
            failures.append(err)

    try:
        channel.connect()
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        listener.join(20)
        assert not listener.is_alive() and not failures, failures
    finally:
        channel.disconnect()
        manager.close()
    assert [type(c).__name__ for c in heard] == ["RequestTrialJobs", "UpdateSearchSpace", "Terminate"]
    assert heard[0].count == 2 and stop.is_set()
    skipped = [r.getMessage() for r in caplog.records if r.name == "nni_fedexit.nni_compat"]
    assert [m.split(" command skipped")[0].rsplit(" ", 1)[1] for m in skipped] == [
        "ImportData", "AddCustomizedTrialJob", "Ping"]
    assert not pwned.exists()  # a skipped command's content is never decoded
    assert "_receive" not in vars(channel)  # the patch leaves nothing on the channel

# ==== 2 to 5 and 9. clients, replies, checkpoints =================================================
digits_settings = functools.partial(shared_digits_settings, rounds=1)



class Hostile(SimulationBackend):
    """Client 0 trains honestly, then reports ``claim`` as its sample count (or fails, claim None)."""

    claim = None

    def train_client(self, global_state, task):
        update = super().train_client(global_state, task)
        if task.client == 0:
            if self.claim is None:
                raise ConnectionError("client 0 went offline")
            update.num_samples = self.claim
        return update


torch.manual_seed(0)
NET = tiny_space().build(SAMPLE)


def _run(digits, claim, settings=None, **kw):
    s = settings or digits_settings()
    backend = type("H", (Hostile,), {"claim": claim})
    return federate(copy.deepcopy(NET), s, data=FederatedData(s, bundle=digits), backend_factory=backend,
                    report=False, **kw)


# ---- 2. weight inflation: no client sets the global model --------------------------------------------


@pytest.fixture(scope="module")
def honest_run(digits):
    """Round 1 with client 0 offline: the mean of the three others."""
    return _run(digits, None)


@pytest.mark.parametrize("claim", [1e18, math.inf, 1.7e308, math.nan, -5, [100], "100", True, 10**6])
def test_an_inflated_or_malformed_sample_count_is_rejected_and_the_model_is_the_honest_mean(digits, honest_run, claim,
                                                                                             caplog):
    honest = honest_run
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        attacked = _run(digits, claim)
    record = attacked.history[0]
    assert record["accepted"] == 3 and [r["client"] for r in record["rejected"]] == [0], record
    assert "sample count" in record["rejected"][0]["reason"] or "examples" in record["rejected"][0]["reason"]
    assert "update of client 0" in caplog.text
    for key, value in attacked.model.state_dict().items():
        assert torch.equal(value, honest.model.state_dict()[key]), key
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


@pytest.mark.slow
def test_a_claim_within_the_partition_counts_and_max_client_samples_caps_everyone(digits):
    s = digits_settings()
    data = FederatedData(s, bundle=digits)
    size = len(data.clients[0])
    assert _run(digits, size).history[0]["accepted"] == 4  # the truth is accepted
    assert _run(digits, size + 1).history[0]["rejected"][0]["client"] == 0  # one more is not
    capped = digits_settings(max_client_samples=min(len(c) for c in data.clients) - 1)  # below every client
    with pytest.raises(FederatedError, match="only 0 client updates"):
        _run(digits, size, settings=capped)


@register_aggregator("test-overflowing")
class Overflowing(Aggregator):
    """A (broken) custom rule whose result is not finite: the engine must not accept it."""

    def begin(self, global_state):
        class Broken(WeightedMean):
            def result(self):
                return {k: v * float("inf") if v.is_floating_point() else v for k, v in super().result().items()}

        return Broken(global_state)


def test_a_non_finite_aggregate_is_never_accepted(digits, tmp_path):
    s = digits_settings(aggregator="test-overflowing", round_retries=0, checkpoint_dir=str(tmp_path))
    with pytest.raises(FederatedError, match="round 1"):
        _run(digits, 10, settings=s)
    assert not Checkpoint(tmp_path).exists()  # nothing non-finite was written as a round


# ---- 3 and 9. a malformed Flower reply costs only its sender; replies are bounded before decoding ---------


@pytest.fixture(scope="module")
def server(digits):
    """A ServerApp strategy over a real model and engine (3 partitions of digits)."""
    from nni_fedexit.exits import exit_costs
    from nni_fedexit.federated.backends.flower.common import build_model, load_data, settings_from_config
    from nni_fedexit.federated.backends.flower.server_app import BranchStrategy, NodeProfile
    from nni_fedexit.federated.rounds import RoundEngine
    from helpers import flower_app_config

    config = flower_app_config(server_steps=3)
    settings = settings_from_config(config, num_clients=3, min_clients=2)
    data = load_data(settings)
    model = build_model(config, settings, data.bundle)
    costs = exit_costs(model, data.val.images[:1])
    sizes = [len(c) for c in data.clients]
    profiles = {100 + p: NodeProfile({"partition-id": p, "num-partitions": 3}) for p in range(3)}

    def strategy():
        engine = RoundEngine(copy.deepcopy(model), settings, costs, data.val, client_sizes=sizes,
                             server_train=data.server_train, server_labelled=data.server_labelled)
        return BranchStrategy(engine, profiles)

    return strategy, sizes


def _reply(node, arrays, metrics):
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    content = RecordDict({"arrays": arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays),
                          "metrics": MetricRecord(metrics)})
    meta = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta)


def _round(strategy, hostile=None):
    """One round of ``strategy``: nodes 100..102 reply with their branch moved by +0.01 (node 102:
    ``hostile(update, num_examples)`` -> (arrays, metrics), or an error reply when None)."""
    from flwr.app import Array, Error, Message, Metadata

    s = strategy
    participants = [s.participant(n, s.profiles[n]) for n in sorted(s.profiles)]
    plan = s.engine.plan(1, 0, participants)
    global_state = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.results, s.tasks, s.sent = s.engine.open(plan, global_state), {t.node: t for t in plan.tasks}, []
    replies = []
    for task in plan.tasks:
        keys = s._keys[task.depth]
        update = {k: global_state[k] + 0.01 if global_state[k].is_floating_point() else global_state[k] for k in keys}
        n = task.max_weight
        if task.node != 102:
            replies.append(_reply(task.node, {k: Array(v.numpy()) for k, v in update.items()}, {"num-examples": n}))
        elif hostile is None:
            meta = Metadata(run_id=1, message_id="reply-102", src_node_id=102, dst_node_id=0, reply_to_message_id="",
                            group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
            replies.append(Message(error=Error(code=2, reason="offline"), metadata=meta))
        else:
            arrays, metrics = hostile({k: v.numpy() for k, v in update.items()}, n)
            replies.append(_reply(102, arrays, metrics))
    arrays, metrics = s.aggregate_train(1, replies)
    return s.results, arrays


def _garbage_array(arrays):
    from flwr.app import Array

    key = next(iter(arrays))
    a = arrays[key]
    out = {k: Array(v) for k, v in arrays.items()}
    out[key] = Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=b"\x93NUMPY garbage" * 3)
    return out


def _pickled_array(arrays):
    from flwr.app import Array

    key = next(iter(arrays))
    a = arrays[key]
    out = {k: Array(v) for k, v in arrays.items()}
    out[key] = Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="pickle", data=pickle.dumps(a))
    return out


def _string_array(arrays):
    from flwr.app import Array

    key = next(iter(arrays))
    out = {k: Array(v) for k, v in arrays.items()}
    out[key] = Array(np.array(["x" * 8] * arrays[key].size).reshape(arrays[key].shape))
    return out


def _string_bytes_declared_float(arrays):
    """The declared dtype and shape are right; the npy bytes hold strings."""
    from flwr.app import Array

    key = next(iter(arrays))
    a = arrays[key]
    fake = Array(np.array(["x"] * a.size).reshape(a.shape))
    out = {k: Array(v) for k, v in arrays.items()}
    out[key] = Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=fake.data)
    return out


def _oversized(arrays):
    """A declared shape that fits, carrying 50 MB: refused before it is decoded."""
    from flwr.app import Array

    key = next(iter(arrays))
    a = arrays[key]
    out = {k: Array(v) for k, v in arrays.items()}
    out[key] = Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=bytes(50_000_000))
    return out


def _many_keys(arrays):
    from flwr.app import Array

    out = {k: Array(v) for k, v in arrays.items()}
    out.update({f"junk.{i}": Array(np.zeros(1, np.float32)) for i in range(10_000)})
    return out


def _extra_key(arrays):
    from flwr.app import Array

    out = {k: Array(v) for k, v in arrays.items()}
    key = next(iter(arrays))
    del out[key]
    out["not.in.the.model"] = Array(arrays[key])
    return out


def _array(arrays):
    from flwr.app import Array

    return {k: Array(v) for k, v in arrays.items()}


HOSTILE_REPLIES = {
    "weight 1e18": lambda a, n: (_array(a), {"num-examples": 1e18}),
    "weight inf": lambda a, n: (_array(a), {"num-examples": float("inf")}),
    "weight 1.7e308": lambda a, n: (_array(a), {"num-examples": 1.7e308}),
    "weight list": lambda a, n: (_array(a), {"num-examples": [n, n]}),
    "loss list": lambda a, n: (_array(a), {"num-examples": n, "train-loss": [0.1, 0.2]}),
    "no num-examples": lambda a, n: (_array(a), {"train-loss": 0.1}),
    "garbage npy bytes": lambda a, n: (_garbage_array(a), {"num-examples": n}),
    "pickle stype": lambda a, n: (_pickled_array(a), {"num-examples": n}),
    "string dtype": lambda a, n: (_string_array(a), {"num-examples": n}),
    "string bytes, float declared": lambda a, n: (_string_bytes_declared_float(a), {"num-examples": n}),
    "oversized array": lambda a, n: (_oversized(a), {"num-examples": n}),
    "10,000 keys": lambda a, n: (_many_keys(a), {"num-examples": n}),
    "key outside the model": lambda a, n: (_extra_key(a), {"num-examples": n}),
}


@needs_flwr
@pytest.mark.parametrize("case", list(HOSTILE_REPLIES))
def test_a_malformed_flower_reply_costs_only_its_sender(server, case, caplog):
    strategy, _ = server
    _, honest = _round(strategy())  # node 102 offline: the mean of the two others
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        results, attacked = _round(strategy(), HOSTILE_REPLIES[case])
    assert results.accepted == 2 and [r["node"] for r in results.rejected] == [102], results.rejected
    assert "node 102" in caplog.text and "rejected" in caplog.text
    assert honest is not None and attacked is not None
    honest = honest.to_torch_state_dict()
    for key, value in attacked.to_torch_state_dict().items():
        assert torch.equal(value, honest[key]), key
@needs_flwr
def test_node_profiles_cannot_choose_the_run_size_or_a_taken_partition():
    from nni_fedexit.federated.backends.flower.server_app import NodeProfile, admit_nodes, run_num_clients

    honest = {n: NodeProfile({"partition-id": p, "num-partitions": 3}) for n, p in ((5, 0), (6, 1), (7, 2))}
    liar = NodeProfile({"partition-id": 3, "num-partitions": 1000})
    twin = NodeProfile({"partition-id": 1, "num-partitions": 3})
    nodes = {**honest, 1: liar, 2: twin}
    assert run_num_clients({}, nodes) == 3  # the majority, not the largest claim
    assert run_num_clients({"settings.num_clients": 3}, {1: liar}) == 3  # the run config decides when it says
    holders = {1: 6}  # node 6 claimed partition 1 first
    admitted = admit_nodes(nodes, 3, {}, holders)
    assert sorted(admitted) == [5, 6, 7] and holders == {0: 5, 1: 6, 2: 7}
    for bad in ({"partition-id": "0"}, {"partition-id": -1}, {"budget": float("inf"), "partition-id": 0},
                {"data-dir": ["/etc"]}, {}):
        with pytest.raises(ValueError):
            NodeProfile.checked(bad)
@needs_flwr
def test_a_budget_from_one_node_does_not_switch_the_run_to_capability_mode(server):
    from nni_fedexit.federated.rounds import Participant

    strategy, sizes = server
    engine = strategy().engine
    parts = [Participant(0, 100, 0.01, sizes[0]), Participant(1, 101, None, sizes[1]), Participant(2, 102, None, sizes[2])]
    plan = engine.plan(1, 0, parts)
    assert len(plan.tasks) == 3  # random mode: the 0.01 budget is not a reason to sit out
    assert [t.max_weight for t in plan.tasks] == [float(n) for n in sizes]
@needs_flwr
def test_server_paths_stay_inside_the_configured_root(tmp_path, monkeypatch):
    from nni_fedexit.federated.backends.flower.server_app import SERVER_ROOT_ENV, server_path

    monkeypatch.setenv(SERVER_ROOT_ENV, str(tmp_path / "runs"))
    assert server_path(str(tmp_path / "runs" / "a" / "ckpt"), "checkpoint-dir") == (tmp_path / "runs/a/ckpt").resolve()
    for outside in ("/etc/cron.d", str(tmp_path / "runs" / ".." / "elsewhere"), str(tmp_path / "runs-sibling")):
        with pytest.raises(ValueError, match=f"checkpoint-dir: .*{SERVER_ROOT_ENV}"):
            server_path(outside, "checkpoint-dir")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to("/etc")
    with pytest.raises(ValueError, match="outside"):
        server_path(str(tmp_path / "runs" / "link" / "passwd"), "initial-weights")


# ---- 4. a kill at any instant of a checkpoint write resumes to the uninterrupted model -------------------


class Killed(BaseException):
    """Stands for SIGKILL: raised instead of a rename, nothing after it runs."""


@pytest.mark.slow
def test_a_kill_at_any_point_of_a_save_resumes_to_the_uninterrupted_model(digits, tmp_path, monkeypatch):
    net = NET
    s = digits_settings(rounds=3)
    data = FederatedData(s, bundle=digits)
    full = federate(copy.deepcopy(net), s, data=data, report=False)
    real_replace = os.replace
    point = 0
    while True:
        point += 1
        folder = tmp_path / f"kill{point}"
        federate(copy.deepcopy(net), digits_settings(rounds=1, checkpoint_dir=str(folder)), data=data, report=False)
        calls = 0

        def replace(src, dst, point=point):
            nonlocal calls
            calls += 1
            if calls == point:
                raise Killed
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            federate(copy.deepcopy(net), digits_settings(rounds=2, checkpoint_dir=str(folder)), data=data, report=False)
            killed = False
        except Killed:
            killed = True
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        resumed = federate(copy.deepcopy(net), digits_settings(rounds=3, checkpoint_dir=str(folder)), data=data,
                           report=False)
        assert [h["round"] for h in resumed.history] == [1, 2, 3], point
        assert resumed.best_round == full.best_round
        for key, value in full.model.state_dict().items():
            assert torch.equal(value, resumed.model.state_dict()[key]), (point, key)
        if not killed:
            break
    assert point >= 4  # the weights files, state.json and the moves: every instant was tried


# ---- 5. a damaged checkpoint is refused by name, or resumed without its best file ---------------------


@pytest.fixture(scope="module")
def two_round_checkpoint(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_rounds") / "ckpt"
    s = digits_settings(rounds=2, checkpoint_dir=str(folder))
    data = FederatedData(s, bundle=digits)
    federate(copy.deepcopy(NET), s, data=data, report=False)
    return data, folder


@pytest.fixture
def two_rounds(two_round_checkpoint, tmp_path):
    """A copy of a 2-round checkpoint, to damage."""
    data, folder = two_round_checkpoint
    shutil.copytree(folder, tmp_path / "ckpt")
    return NET, data, tmp_path / "ckpt"


def _resume(net, data, folder, rounds=3):
    return federate(copy.deepcopy(net), digits_settings(rounds=rounds, checkpoint_dir=str(folder)), data=data,
                    report=False)


def _rewrite(folder, name, tensors):
    """Replace a weights file AND its hash in state.json: the tampering a hash cannot catch."""
    import hashlib

    save_file(tensors, str(folder / name))
    state = json.loads((folder / "state.json").read_text())
    role = name.split(".")[0]
    state["files"][role]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))


def _edit_state(folder, change):
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(change(state)))


DAMAGE = {
    "truncated last": ("last.safetensors", lambda f: (f / "last.safetensors").write_bytes((f / "last.safetensors").read_bytes()[:100])),
    "empty last": ("last.safetensors", lambda f: (f / "last.safetensors").write_bytes(b"")),
    "missing last": ("last.safetensors", lambda f: (f / "last.safetensors").unlink()),
    "truncated state": ("state.json", lambda f: (f / "state.json").write_text((f / "state.json").read_text()[:50])),
    "list state": ("state.json", lambda f: (f / "state.json").write_text("[1, 2]")),
    "no history": ("state.json", lambda f: _edit_state(f, lambda s: {k: v for k, v in s.items() if k != "history"})),
    "string round": ("state.json", lambda f: _edit_state(f, lambda s: {**s, "round": "2"})),
    "round 99": ("state.json", lambda f: _edit_state(f, lambda s: {**s, "round": 99})),
    "extra key": ("last.safetensors", lambda f: _rewrite(f, "last.safetensors", {
        **load_file(str(f / "last.safetensors")), "evil": torch.zeros(3)})),
    "wrong shape": ("last.safetensors", lambda f: _rewrite(f, "last.safetensors", {
        k: (torch.zeros(2, 2) if i == 0 else v) for i, (k, v) in enumerate(load_file(str(f / "last.safetensors")).items())})),
    "all NaN": ("last.safetensors", lambda f: _rewrite(f, "last.safetensors", {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in load_file(str(f / "last.safetensors")).items()})),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file(two_rounds, case):
    net, data, folder = two_rounds
    name, damage = DAMAGE[case]
    damage(folder)
    with pytest.raises(FederatedError, match=f"{folder / name}"):
        _resume(net, data, folder)


def test_more_rounds_in_the_checkpoint_than_asked_is_refused(two_rounds):
    net, data, folder = two_rounds
    with pytest.raises(FederatedError, match=r"state.json holds 2 rounds, more than rounds=1"):
        _resume(net, data, folder, rounds=1)


def test_a_truncated_best_file_costs_only_the_best_weights(two_rounds, caplog):
    net, data, folder = two_rounds
    _edit_state(folder, lambda s: {**s, "best_round": 1})  # a best round other than the last, whose weights are lost
    (folder / "best.safetensors").write_bytes((folder / "best.safetensors").read_bytes()[:64])
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        result = _resume(net, data, folder)
    assert [h["round"] for h in result.history] == [1, 2, 3]
    assert "best.safetensors" in caplog.text and "lost its weights" in caplog.text
    assert result.best_round in (2, 3)  # round 1's weights are gone: the best is chosen among the others
    assert Checkpoint(folder).best_weights().keys() == result.model.state_dict().keys()  # rewritten, readable

# ==== 6 and 7. the command line and device images =================================================
CONFIG = EXAMPLES / "tiny_digits.yaml"
STAGES_HELP = "delete it to rerun every stage"


def _runner() -> CliRunner:
    """A runner that keeps stderr apart (click < 8.2 mixes it in unless told; 8.2 dropped the option)."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def user_error(*args: str) -> str:
    """The one line the CLI prints for ``args`` (asserting exit code 2, no traceback, one line)."""
    result = _runner().invoke(main, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def run_dir(tmp_path: Path, stages: str | None = None, files: dict[str, str] | None = None) -> Path:
    """A run directory as `nni-fedexit run` leaves it: config.yaml, stages.json, and ``files`` (path: text)."""
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(CONFIG, d / "config.yaml")
    if stages is not None:
        (d / "stages.json").write_text(stages)
    for name, text in (files or {}).items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return d


# ---- the run directory ---------------------------------------------------------------------------


def test_run_dir_below_a_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    line = user_error("run", str(CONFIG), "--run-dir", str(blocker / "sub"))
    assert f"{blocker} is a file, not a folder" in line and "--run-dir" in line
    assert blocker.read_text() == "not a folder"


CORRUPT_STAGES = {
    "truncated": '{"done": ["search", "fed',
    "not an object": '["search"]',
    "no done": '{"finished": ["search"]}',
    "not stage names": '{"done": ["search", 3]}',
    "empty": "",
}


@pytest.mark.parametrize("content", CORRUPT_STAGES.values(), ids=CORRUPT_STAGES.keys())
@pytest.mark.parametrize("resume", [False, True], ids=["run", "run --resume"])
def test_corrupt_stages_json_on_run(tmp_path, content, resume):
    """Never read as "nothing finished": that would train again over the run's results."""
    arch = json.dumps({"sample": TINY_SAMPLE})
    d = run_dir(tmp_path, content, files={"search/architecture.json": arch})
    line = user_error("run", str(CONFIG), "--run-dir", str(d), *(["--resume"] if resume else []))
    assert str(d / "stages.json") in line and STAGES_HELP in line
    assert (d / "stages.json").read_text() == content and (d / "search/architecture.json").read_text() == arch
    assert not (d / "nni-experiments").exists()


def test_corrupt_stages_json_on_resume(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search", "federate"')
    line = user_error("resume", str(d))
    assert str(d / "stages.json") in line and STAGES_HELP in line and "corrupt" in line


def test_config_of_a_run_dir_that_is_not_text(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search"]}')
    (d / "config.yaml").write_bytes(b"\xff\xfe\x00\x01 binary")
    for command in ("resume", "evaluate", "report"):
        line = user_error(command, str(d))
        assert str(d / "config.yaml") in line and "cannot be read" in line


def test_damaged_stage_records_and_space_files_are_named(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search"]}', {"search/experiment.json": '{"experiment_id": "abc', "report.md": ""})
    assert str(d / "search/experiment.json") in user_error("view", str(d))
    (d / "search/experiment.json").write_text('{"experiment_id": "../../etc"}')
    assert "'experiment_id' must be an NNI experiment id" in user_error("view", str(d))
    space = tmp_path / "space.yaml"
    space.write_bytes(b"\xff\xfe binary")
    assert f"{space} cannot be read (not UTF-8 text" in user_error("space", "--space", str(space))


def test_a_corrupt_result_file_on_report_is_one_error_line(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search", "federate", "evaluate"]}', {"search/architecture.json": '{"sample": {'})
    line = user_error("report", str(d))
    assert "architecture.json" in line or "history.json" in line or "metrics.json" in line


def test_resume_refuses_a_run_directory_others_can_write(tmp_path):
    from nni_fedexit.nni_tools.reopen import check_own_run

    d = run_dir(tmp_path)
    (d / "nni-experiments" / "abcd1234" / "db").mkdir(parents=True)
    check_own_run(d)  # yours, and only you write it: trusted
    os.chmod(d / "nni-experiments" / "abcd1234" / "db", 0o777)
    with pytest.raises(ReopenError, match="writable by others.*view` opens any run safely"):
        check_own_run(d)
    if os.geteuid() == 0:  # root can hand the folder to another user: someone else's run
        os.chmod(d / "nni-experiments" / "abcd1234" / "db", 0o755)
        os.chown(d / "nni-experiments", 65534, 65534)
        with pytest.raises(ReopenError, match="another user"):
            check_own_run(d)


def test_config_yaml_syntax_error_is_one_line(tmp_path):
    d = run_dir(tmp_path)
    (d / "config.yaml").write_text("seed: 0\ndata: [digits\n")
    line = user_error("resume", str(d))
    assert str(d / "config.yaml") in line and "not valid YAML" in line


def test_corrupt_model_json_on_evaluate(tmp_path):
    d = run_dir(tmp_path, '{"done": ["search", "federate"]}', files={"model.json": '{"architecture": '})
    line = user_error("evaluate", str(d))
    assert str(d / "model.json") in line and "corrupt" in line and "federate" in line


# ---- errors of the stages: PipelineError, FederatedError -------------------------------------------


def test_pipeline_error_for_a_damaged_search_result(tmp_path):
    """The search finished, but its architecture.json is truncated: the federate stage says which file
    and how to search again, before it starts an experiment."""
    d = run_dir(tmp_path, '{"done": ["search"]}', files={"search/architecture.json": '{"sample": {"stage1": "res'})
    line = user_error("resume", str(d))
    assert str(d / "search/architecture.json") in line and "stages.json" in line
    assert not (d / "federated").exists() and not (d / "nni-experiments").exists()


def test_federated_error_for_a_checkpoint_of_other_settings(tmp_path):
    """The run's federated checkpoint was written with other settings: the trial could not go on
    from it, so the CLI says so (FederatedError) instead of starting an NNI experiment that fails."""
    from safetensors.torch import save_file

    state = {"round": 1, "best_round": 1, "fingerprint": "written-with-other-settings",
             "history": [{"round": 1, "exit_accuracy": [0.5, 0.6], "total_loss": 1.0}]}
    d = run_dir(tmp_path, '{"done": ["search"]}', files={"search/architecture.json": json.dumps({"sample": TINY_SAMPLE}),
                                                      "federated/state.json": json.dumps(state)})
    save_file({"w": torch.zeros(2)}, str(d / "federated" / "last.safetensors"))
    line = user_error("resume", str(d))
    assert str(d / "federated") in line and "other settings" in line
    assert json.loads((d / "federated/state.json").read_text()) == state  # the checkpoint is kept as it was
    assert not (d / "federated/experiment.json").exists() and not (d / "nni-experiments").exists()


# ---- data: an edge device's image folder, Fashion-MNIST files ------------------------------------


def test_decompression_bomb_png_is_a_data_error(tmp_path):
    """A 400-megapixel PNG (48 KB as a 1-bit image) is refused by name before it is decoded."""
    folder = tmp_path / "device" / "3"
    folder.mkdir(parents=True)
    bomb = folder / "big.png"
    t0 = time.time()
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 200_000
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "device", [str(i) for i in range(10)], 1, 8, [0.5], [0.5])
    message = str(err.value)
    assert str(bomb) in message and "400,000,000 pixels" in message and "resize" in message
    assert f"at most {limit:,} pixels" in message
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global limit is left alone
    assert time.time() - t0 < 20


def test_image_above_pillows_warning_limit_is_refused_too(tmp_path):
    """Between MAX_IMAGE_PIXELS and twice that Pillow only warns, and would decode it: refused as well."""
    folder = tmp_path / "device" / "0"
    folder.mkdir(parents=True)
    big = folder / "mid.png"
    Image.new("1", (10000, 10000)).save(big)
    with pytest.raises(DataError, match=r"mid\.png is too large to read \(100,000,000 pixels\)"):
        load_image_folder(tmp_path / "device", [str(i) for i in range(10)], 1, 8, [0.5], [0.5])


def test_truncated_png_names_the_file(tmp_path):
    folder = tmp_path / "device" / "1"
    folder.mkdir(parents=True)
    image = folder / "cut.png"
    Image.effect_noise((32, 32), 64).save(image)
    image.write_bytes(image.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "device", [str(i) for i in range(10)], 1, 8, [0.5], [0.5])
    message = str(err.value)
    assert str(image) in message and "()" not in message and "truncated" in message


def test_idx_file_with_a_bad_header_says_why(tmp_path, monkeypatch):
    """torchvision's IDX reader asserts on a bad header (an AssertionError without text): the message
    gives the error's type instead of an empty "()"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / stem).write_bytes(b"\x00" * 32)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=folder)
    message = str(err.value)
    assert str(folder / "train-images-idx3-ubyte") in message and "()" not in message
    assert "corrupt (AssertionError)" in message


@pytest.mark.slow
def test_a_slow_nni_manager_start_is_waited_for_not_failed():
    """NNI 3.0 gives a new manager 3 s to answer /check-status; a cold start takes longer."""
    import http.server
    import threading
    import time

    from nni.experiment import launcher

    from helpers import free_port

    port = free_port()

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "RUNNING"}')

        def log_message(self, *args):
            pass

    servers = []

    def start_late():
        time.sleep(4.5)  # later than NNI's own three polls
        servers.append(http.server.HTTPServer(("127.0.0.1", port), Status))
        servers[0].serve_forever()

    threading.Thread(target=start_late, daemon=True).start()
    try:
        launcher._check_rest_server(port)  # NNI's call, as the launcher makes it: no exception
        assert launcher._check_rest_server.patient
    finally:
        while not servers:
            time.sleep(0.1)
        servers[0].shutdown()
