"""Run directories and NNI commands nni-fedexit did not write: nothing in them is decoded into code.

- A NAS experiment's checkpoint/config.json is read as plain JSON: an ``__nni_obj__`` entry (what
  NNI's encoder writes for an object: a base64 cloudpickle, which ``nni.load`` unpickles) is
  refused with a ReopenError naming the file and the key, in ``ExperimentRef.config()``, in NNI's
  own ``load_checkpoint`` (patched) and in ``nni-fedexit view`` (exit 2, one ``error:`` line).
- A damaged config.json is a ReopenError naming the file; the values that say what a trial runs
  and where come from us, not from the file.
- A resumed experiment's command channel (NNI's real ``TunerCommandChannel``, connected over a
  real WebSocket to a stand-in for the NNI manager) skips the commands NNI's NAS channel does not
  handle, without decoding them, and goes on listening.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from nni_fedexit.job.cli import main
from nni_fedexit.nni_tools import compat
from nni_fedexit.nni_tools.reopen import ExperimentRef, ReopenError, find_experiment, read_nas_config

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
    compat.plain_json_checkpoint_config()
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

    caplog.set_level(logging.INFO, logger="nni_fedexit.nni_tools.compat")
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
    skipped = [r.getMessage() for r in caplog.records if r.name == "nni_fedexit.nni_tools.compat"]
    assert [m.split(" command skipped")[0].rsplit(" ", 1)[1] for m in skipped] == [
        "ImportData", "AddCustomizedTrialJob", "Ping"]
    assert not pwned.exists()  # a skipped command's content is never decoded
    assert "_receive" not in vars(channel)  # the patch leaves nothing on the channel
