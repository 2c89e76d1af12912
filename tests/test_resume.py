"""S5 checkpoints (nni_fedexit/federated/checkpoint.py) and resuming (RoundEngine.resume): the
checks on state.json, the save journal, damaged files; and that a resumed run really goes on from
the checkpoint (its weights, history, best round and server state) instead of starting over.

A deterministic run ends with the same model whether it resumes or restarts, so these tests look
at what only a resume can show: which rounds the clients train after it, the exact records of
the rounds before it (their timings included), and checkpoints perturbed in a valid way (re-saved
with consistent hashes), whose changes must carry into the resumed run.
"""

from __future__ import annotations

import functools

import copy
import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from helpers import TINY_SAMPLE, digits_settings as shared_digits_settings, tiny_space
from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.exits.costs import exit_costs
from nni_fedexit.federated import FederatedData, FederatedError, SimulationBackend, federate
from nni_fedexit.federated.checkpoint import WEIGHT_FILES, Checkpoint, Resumed, check_state, cpu_tensors
from nni_fedexit.federated.rounds import RoundEngine

LN91 = math.log(91.0)


# ---- check_state ---------------------------------------------------------------------------------


def record(i: int, acc=(0.5,), loss=1.0) -> dict:
    return {"round": i, "exit_accuracy": list(acc), "total_loss": loss}


def valid_state(**overrides) -> dict:
    state = {"round": 2, "best_round": 1, "history": [record(1), record(2)], "fingerprint": "abc"}
    state.update(overrides)
    return state


def test_check_state_accepts_valid_states():
    """A state with its fields in range passes unchanged: rounds >= 0, the best round in 1..round
    (0 only before any round), one record per round, files naming last (and best, server)."""
    state = valid_state(files={"last": {"sha256": "x"}, "best": {"sha256": "y"}, "server": {"sha256": "z"}})
    assert check_state(state, "w") is state
    assert check_state(valid_state(best_round=2), "w")["best_round"] == 2
    assert check_state({"round": 0, "best_round": 0, "history": [], "fingerprint": "f"}, "w")["round"] == 0
    assert check_state(valid_state(history=[record(1, acc=(1, 0)), record(2, loss=3)]), "w")


LACKS = "history entry {} lacks its validation accuracies and total loss"
FILES = r"'files' must map last/best/server to \{'sha256': \.\.\.\}"

#: (state, the exact reason, as a regex)
DAMAGED = [
    ([1, 2], "it holds a JSON list, not an object"),
    ("state", "it holds a JSON str, not an object"),
    ({k: v for k, v in valid_state().items() if k != "round"}, "it has no 'round'"),
    ({k: v for k, v in valid_state().items() if k != "best_round"}, "it has no 'best_round'"),
    ({k: v for k, v in valid_state().items() if k != "history"}, "it has no 'history'"),
    ({k: v for k, v in valid_state().items() if k != "fingerprint"}, "it has no 'fingerprint'"),
    (valid_state(round=-1, best_round=0, history=[]), "'round' must be a whole number >= 0, got -1"),
    (valid_state(round=2.0), r"'round' must be a whole number >= 0, got 2\.0"),
    (valid_state(round=True, best_round=1, history=[record(1)]), "'round' must be a whole number >= 0, got True"),
    (valid_state(best_round=0), r"'best_round' must be a whole number in 1\.\.2, got 0"),
    (valid_state(round=1, best_round=0, history=[record(1)]), r"'best_round' must be a whole number in 1\.\.1, got 0"),
    (valid_state(best_round=3), r"'best_round' must be a whole number in 1\.\.2, got 3"),
    (valid_state(best_round=-1), r"'best_round' must be a whole number in 1\.\.2, got -1"),
    (valid_state(best_round=True), r"'best_round' must be a whole number in 1\.\.2, got True"),
    (valid_state(best_round="1"), r"'best_round' must be a whole number in 1\.\.2, got '1'"),
    (valid_state(round=0, best_round=1, history=[]), r"'best_round' must be a whole number in 1\.\.0, got 1"),
    (valid_state(history={"1": record(1)}), r"'history' must list one record per round \(round 2\), got dict"),
    (valid_state(history=[record(1)]), r"'history' must list one record per round \(round 2\), got 1"),
    (valid_state(history=[record(1), record(1), record(3)]), r"'history' must list one record per round \(round 2\), got 3"),
    (valid_state(history=[record(1), "x"]), "history entry 2 is not the record of round 2"),
    (valid_state(history=[record(2), record(1)]), "history entry 1 is not the record of round 1"),
    (valid_state(history=[{"exit_accuracy": [0.5], "total_loss": 1.0}, record(2)]),
     "history entry 1 is not the record of round 1"),
    (valid_state(history=[record(1, acc=()), record(2)]), LACKS.format(1)),
    (valid_state(history=[record(1), {"round": 2, "exit_accuracy": 0.5, "total_loss": 1.0}]), LACKS.format(2)),
    (valid_state(history=[record(1), record(2, acc=(0.5, "x"))]), LACKS.format(2)),
    (valid_state(history=[record(1), record(2, loss="1")]), LACKS.format(2)),
    (valid_state(history=[record(1), record(2, loss=True)]), LACKS.format(2)),
    (valid_state(history=[record(1), {"round": 2, "exit_accuracy": [0.5]}]), LACKS.format(2)),
    (valid_state(fingerprint=3), "'fingerprint' is not a string"),
    (valid_state(files=["last"]), FILES),
    (valid_state(files={"last": {"sha256": "x"}, "other": {"sha256": "y"}}), FILES),
    (valid_state(files={"last": "x"}), FILES),
    (valid_state(files={"last": {"sha256": 5}}), FILES),
    (valid_state(files={"last": {"md5": "x"}}), FILES),
    (valid_state(files={"best": {"sha256": "y"}}), "'files' names no last.safetensors"),
    (valid_state(files={}), "'files' names no last.safetensors"),
]


@pytest.mark.parametrize("state,reason", DAMAGED)
def test_check_state_refuses_damage_naming_the_file_and_the_fix(state, reason):
    """Each broken field is refused with exactly what is wrong, the file's name and what to do."""
    with pytest.raises(FederatedError) as err:
        check_state(state, "/x/state.json")
    assert re.fullmatch("checkpoint file /x/state.json is damaged: " + reason + "; move the folder away "
                        r"\(or delete it\) to start over, or restore it from a copy; with resume=False the run "
                        "starts over in place", str(err.value)), str(err.value)


def test_cpu_tensors_are_detached_contiguous_copies_of_the_values():
    """What safetensors takes: contiguous, no autograd, the same values."""
    w = torch.arange(6.0).reshape(2, 3).requires_grad_()
    out = cpu_tensors({"w": w.t()})
    assert out["w"].is_contiguous() and not out["w"].requires_grad
    assert torch.equal(out["w"], torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]))


# ---- save, the journal, load ------------------------------------------------------------------------


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), value), "n": torch.tensor(int(value))}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_commits_state_json_naming_every_file_by_its_hash(tmp_path):
    """A save leaves last/best/server files, no .next file, and state.json with the given state
    plus each file's SHA-256; load reads them back."""
    ckpt = Checkpoint(tmp_path / "c")
    assert not ckpt.exists() and ckpt.state() is None
    ckpt.save(valid_state(round=1, best_round=1, history=[record(1)]), weights(1), weights(2), {"aggregator/m": torch.ones(3)})
    folder = tmp_path / "c"
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "last.safetensors", "server.safetensors",
                                                        "state.json"]
    state = json.loads((folder / "state.json").read_text())
    assert state["files"] == {role: {"sha256": sha(folder / name)} for role, name in WEIGHT_FILES.items()}
    assert state["round"] == 1 and ckpt.exists() and ckpt.state() == state
    resumed = Checkpoint(folder).load()
    assert isinstance(resumed, Resumed) and resumed.round == 1 and resumed.best_round == 1
    assert torch.equal(resumed.last["w"], weights(1)["w"]) and torch.equal(resumed.best["w"], weights(2)["w"])
    assert torch.equal(resumed.server["aggregator/m"], torch.ones(3)) and resumed.best_problem is None
    assert torch.equal(Checkpoint(folder).best_weights()["w"], weights(2)["w"])


def test_a_save_without_best_keeps_the_previous_best_file_and_drops_an_unnamed_server_file(tmp_path):
    """best None keeps the best file (and its hash) of the previous save, also for a new Checkpoint
    object on the folder; server None or empty removes the old server file."""
    ckpt = Checkpoint(tmp_path)
    ckpt.save(valid_state(round=1, best_round=1, history=[record(1)]), weights(1), weights(5), {"aggregator/m": torch.ones(1)})
    best_hash = sha(tmp_path / "best.safetensors")
    ckpt.save(valid_state(), weights(2), None, {})
    state = ckpt.state()
    assert state["files"]["best"] == {"sha256": best_hash} and "server" not in state["files"]
    assert not (tmp_path / "server.safetensors").exists()
    Checkpoint(tmp_path).save(valid_state(round=3, history=[record(1), record(2), record(3)]), weights(3), None)
    again = Checkpoint(tmp_path).load()
    assert torch.equal(again.best["w"], weights(5)["w"]) and torch.equal(again.last["w"], weights(3)["w"])
    assert again.server == {} and again.round == 3


def test_a_best_file_older_than_named_files_is_kept_by_its_hash(tmp_path):
    """A folder whose state.json names no files (an earlier version) but holds best.safetensors:
    the next save without best names that file by its hash."""
    (tmp_path / "best.safetensors").write_bytes(st_save(weights(7)))
    (tmp_path / "state.json").write_text(json.dumps(valid_state(round=1, best_round=1, history=[record(1)])))
    ckpt = Checkpoint(tmp_path)
    ckpt.save(valid_state(), weights(2), None)
    assert ckpt.state()["files"]["best"] == {"sha256": sha(tmp_path / "best.safetensors")}
    assert torch.equal(Checkpoint(tmp_path).load().best["w"], weights(7)["w"])


def test_a_checkpoint_without_named_files_is_read_as_it_is(tmp_path):
    """state.json of an earlier version (no 'files'): last, best and server are read without hash
    checks, each only if it is there; garbage is refused as unreadable safetensors."""
    (tmp_path / "last.safetensors").write_bytes(st_save(weights(1)))
    (tmp_path / "state.json").write_text(json.dumps(valid_state()))
    resumed = Checkpoint(tmp_path).load()
    assert torch.equal(resumed.last["w"], weights(1)["w"]) and resumed.best is None and resumed.server == {}
    assert resumed.best_problem is None
    (tmp_path / "server.safetensors").write_bytes(st_save({"aggregator/m": torch.ones(2)}))
    (tmp_path / "best.safetensors").write_bytes(st_save(weights(4)))
    resumed = Checkpoint(tmp_path).load()
    assert torch.equal(resumed.best["w"], weights(4)["w"]) and torch.equal(resumed.server["aggregator/m"], torch.ones(2))
    (tmp_path / "last.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(FederatedError, match=r"last.safetensors is not a readable safetensors file \(.*\); move the folder"):
        Checkpoint(tmp_path).load()


def test_load_refuses_a_missing_or_replaced_last_file_and_survives_a_bad_best_file(tmp_path):
    """A missing last file or one whose hash is not state.json's is refused by name; an unusable
    best file only costs the best weights (best None, best_problem says why)."""
    ckpt = Checkpoint(tmp_path)
    ckpt.save(valid_state(), weights(1), weights(2))
    (tmp_path / "best.safetensors").write_bytes(st_save(weights(9)))  # valid file, wrong hash
    resumed = Checkpoint(tmp_path).load()
    assert resumed.best is None and torch.equal(resumed.last["w"], weights(1)["w"])
    assert resumed.best_problem.startswith(f"checkpoint file {tmp_path / 'best.safetensors'} does not match state.json "
                                           "(damaged, truncated or replaced); move the folder away")
    with pytest.raises(FederatedError, match="best.safetensors does not match state.json"):
        Checkpoint(tmp_path).best_weights()
    (tmp_path / "last.safetensors").write_bytes(st_save(weights(3)))
    with pytest.raises(FederatedError, match=r"last.safetensors does not match state.json \(damaged, truncated or replaced\)"):
        Checkpoint(tmp_path).load()
    (tmp_path / "last.safetensors").unlink()
    with pytest.raises(FederatedError, match=r"last.safetensors is missing or unreadable \(No such file or directory\); "
                                             "move the folder away"):
        Checkpoint(tmp_path).load()


def test_best_weights_of_a_state_naming_no_best_file_is_an_error(tmp_path):
    """A checkpoint whose state.json names no best file has no best weights to hand on."""
    Checkpoint(tmp_path).save({"round": 0, "best_round": 0, "history": [], "fingerprint": "f"}, weights(1), None)
    assert "best" not in Checkpoint(tmp_path).state()["files"]
    with pytest.raises(FederatedError, match=rf"checkpoint file {tmp_path / 'state.json'} names no best.safetensors; move"):
        Checkpoint(tmp_path).best_weights()
    resumed = Checkpoint(tmp_path).load()  # round 0: no best round to read
    assert resumed.best is None and resumed.best_problem is None


def test_load_reads_no_best_file_before_the_first_round(tmp_path):
    """A round-0 checkpoint has no best round: a best file lying there is not read (even a damaged one)."""
    Checkpoint(tmp_path).save({"round": 0, "best_round": 0, "history": [], "fingerprint": "f"}, weights(1), None)
    (tmp_path / "best.safetensors").write_bytes(b"junk")
    resumed = Checkpoint(tmp_path).load()
    assert resumed.best is None and resumed.best_problem is None


def folders_of_two_saves(tmp_path: Path) -> tuple[Path, Path]:
    """Two checkpoint folders: after save 1 (weights 1/1/server 1) and after save 2 (weights 2/2/server 2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    s1 = valid_state(round=1, best_round=1, history=[record(1)])
    for folder in (one, two):
        Checkpoint(folder).save(s1, weights(1), weights(1), {"aggregator/m": torch.ones(1)})
    Checkpoint(two).save(valid_state(best_round=2), weights(2), weights(2), {"aggregator/m": torch.full((1,), 2.0)})
    return one, two


def test_a_save_killed_after_its_commit_is_finished_on_open(tmp_path):
    """Killed after state.json was replaced but before the renames: the .next files state.json
    names are moved in place, and the run resumes from the second save."""
    one, two = folders_of_two_saves(tmp_path)
    for name in WEIGHT_FILES.values():
        shutil.copy(two / name, one / (name + ".next"))
    shutil.copy(two / "state.json", one / "state.json")
    resumed = Checkpoint(one).load()
    assert resumed.round == 2 and torch.equal(resumed.last["w"], weights(2)["w"])
    assert torch.equal(resumed.best["w"], weights(2)["w"]) and torch.equal(resumed.server["aggregator/m"], torch.full((1,), 2.0))
    assert sorted(p.name for p in one.iterdir()) == sorted([*WEIGHT_FILES.values(), "state.json"])


def test_a_save_killed_before_its_commit_is_dropped_on_open(tmp_path):
    """Killed before state.json was replaced: the .next files are dropped, the first save stays."""
    one, two = folders_of_two_saves(tmp_path)
    for name in WEIGHT_FILES.values():
        shutil.copy(two / name, one / (name + ".next"))
    resumed = Checkpoint(one).load()
    assert resumed.round == 1 and torch.equal(resumed.last["w"], weights(1)["w"])
    assert torch.equal(resumed.server["aggregator/m"], torch.ones(1))
    assert not list(one.glob("*.next"))
    assert Checkpoint(one).state()["files"]["last"]["sha256"] == sha(one / "last.safetensors")


def test_a_save_over_a_half_finished_one_replaces_it(tmp_path):
    """A stale .next file of a save that never committed is not taken for the new save's file."""
    one, two = folders_of_two_saves(tmp_path)
    shutil.copy(two / "best.safetensors", one / "best.safetensors.next")
    ckpt = Checkpoint(one)
    ckpt.save(valid_state(), weights(3), None)
    resumed = Checkpoint(one).load()
    assert torch.equal(resumed.best["w"], weights(1)["w"]) and torch.equal(resumed.last["w"], weights(3)["w"])
    assert not list(one.glob("*.next"))


def test_a_save_into_a_new_nested_folder_creates_it(tmp_path):
    """The checkpoint folder and its missing parents are created by the first save."""
    folder = tmp_path / "runs" / "a" / "federated"
    Checkpoint(folder).save(valid_state(), weights(1), weights(1))
    assert Checkpoint(folder).load().round == 2


def test_a_save_that_fails_before_its_commit_leaves_the_previous_checkpoint(tmp_path):
    """A save that fails while writing state.json (here: a state JSON cannot hold) has written its
    weights only as .next files: the previous checkpoint still loads, unchanged."""
    ckpt = Checkpoint(tmp_path)
    ckpt.save(valid_state(), weights(1), weights(1), {"aggregator/m": torch.ones(1)})
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        ckpt.save(valid_state(extra=loop), weights(2), weights(2), {"aggregator/m": torch.full((1,), 2.0)})
    resumed = Checkpoint(tmp_path).load()
    assert torch.equal(resumed.last["w"], weights(1)["w"]) and torch.equal(resumed.best["w"], weights(1)["w"])
    assert torch.equal(resumed.server["aggregator/m"], torch.ones(1))
    assert not list(tmp_path.glob("*.next"))


def test_a_replaced_best_file_is_not_adopted_by_the_next_save(tmp_path):
    """The best file replaced between two saves: a save without new best weights keeps naming the
    committed best hash (a new Checkpoint object reads it from state.json), so the replaced file
    stays refused instead of being taken for the best weights."""
    Checkpoint(tmp_path).save(valid_state(), weights(1), weights(1))
    (tmp_path / "best.safetensors").write_bytes(st_save(weights(8)))
    Checkpoint(tmp_path).save(valid_state(), weights(2), None)
    resumed = Checkpoint(tmp_path).load()
    assert resumed.best is None and "best.safetensors does not match state.json" in resumed.best_problem


def test_a_running_checkpoint_keeps_its_own_record_of_the_committed_files(tmp_path):
    """The Checkpoint object of a run remembers what its last save committed: with state.json
    damaged and the best file replaced behind its back, its next save still names the best
    file it wrote (which the replaced one does not match)."""
    ckpt = Checkpoint(tmp_path)
    ckpt.save(valid_state(), weights(1), weights(1))
    (tmp_path / "best.safetensors").write_bytes(st_save(weights(8)))
    (tmp_path / "state.json").write_text("{damaged")
    ckpt.save(valid_state(), weights(2), None)
    resumed = Checkpoint(tmp_path).load()
    assert resumed.best is None and "best.safetensors does not match state.json" in resumed.best_problem
    loaded = Checkpoint(tmp_path)
    loaded.load()  # a load also records the committed files
    (tmp_path / "best.safetensors").write_bytes(st_save(weights(9)))
    (tmp_path / "state.json").write_text("{damaged")
    loaded.save(valid_state(), weights(3), None)
    assert Checkpoint(tmp_path).load().best is None


def test_a_replaced_server_file_is_refused(tmp_path):
    """server.safetensors is checked against state.json like the weights: a replaced one is refused."""
    Checkpoint(tmp_path).save(valid_state(), weights(1), weights(1), {"aggregator/m": torch.ones(1)})
    (tmp_path / "server.safetensors").write_bytes(st_save({"aggregator/m": torch.zeros(1)}))
    with pytest.raises(FederatedError, match=r"server.safetensors does not match state.json"):
        Checkpoint(tmp_path).load()


def test_a_damaged_state_json_is_refused_on_load_naming_it(tmp_path):
    """load: state.json with a broken field is refused with its path."""
    (tmp_path / "state.json").write_text(json.dumps(valid_state(best_round=7)))
    with pytest.raises(FederatedError, match=rf"^checkpoint file {tmp_path / 'state.json'} is damaged: 'best_round'"):
        Checkpoint(tmp_path).load()


def test_clear_of_a_folder_without_a_checkpoint_does_nothing(tmp_path):
    """clear on an empty or partial folder (resume=False before any save) removes what is there."""
    Checkpoint(tmp_path).clear()
    (tmp_path / "last.safetensors").write_bytes(b"x")
    Checkpoint(tmp_path).clear()
    assert list(tmp_path.iterdir()) == []


def test_clear_removes_every_file_of_the_checkpoint(tmp_path):
    """clear: state.json, the weights files and any .next file are gone; the next save starts anew
    (keeps no best file of before)."""
    ckpt = Checkpoint(tmp_path)
    ckpt.save(valid_state(), weights(1), weights(2), {"aggregator/m": torch.ones(1)})
    for name in WEIGHT_FILES.values():
        (tmp_path / (name + ".next")).write_bytes(b"x")
    (tmp_path / "other.txt").write_text("kept")
    ckpt.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]
    ckpt.save({"round": 0, "best_round": 0, "history": [], "fingerprint": "f"}, weights(1), None)
    assert set(ckpt.state()["files"]) == {"last"}


def test_state_is_none_while_state_json_is_unreadable_or_damaged(tmp_path):
    """A watcher sees None for a missing, non-JSON or invalid state.json."""
    ckpt = Checkpoint(tmp_path)
    assert ckpt.state() is None
    (tmp_path / "state.json").write_text("{not json")
    assert ckpt.state() is None and ckpt.exists()
    (tmp_path / "state.json").write_text(json.dumps(valid_state(best_round=5)))
    assert ckpt.state() is None
    (tmp_path / "state.json").write_text(json.dumps(valid_state()))
    assert ckpt.state() == valid_state()


def test_an_unreadable_state_json_is_refused_on_load(tmp_path):
    """load: a corrupt state.json is a FederatedError naming it and the fix."""
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(FederatedError, match=r"state.json is unreadable or corrupt .*move the folder away"):
        Checkpoint(tmp_path).load()


fed_settings = functools.partial(shared_digits_settings, rounds=3, num_clients=2, min_clients=1, lr=0.1,
                                 bn_stats="average", server_steps=0)



def test_resume_point_follows_the_resume_setting_the_fingerprint_and_the_rounds(tmp_path):
    """resume_point: None without a checkpoint or with resume off; other settings or more rounds
    than asked are errors naming the fix; rounds equal to the checkpoint's is fine."""
    s = fed_settings(rounds=2)
    ckpt = Checkpoint(tmp_path)
    assert ckpt.resume_point(s) is None
    ckpt.save(valid_state(fingerprint=s.fingerprint()), weights(1), weights(1))
    assert ckpt.resume_point(fed_settings(rounds=2, resume=False)) is None
    assert ckpt.resume_point(s).round == 2
    assert ckpt.resume_point(fed_settings(rounds=5, checkpoint_dir="elsewhere")).round == 2
    with pytest.raises(FederatedError, match=rf"^checkpoint in {tmp_path} was written with other settings \(data, "
                                             r"partition, model or training\); use another checkpoint directory, or "
                                             r"resume=False \(resume=false in a Flower run config\) to start over$"):
        ckpt.resume_point(fed_settings(rounds=2, lr=0.2))
    with pytest.raises(FederatedError, match=rf"^checkpoint {tmp_path / 'state.json'} holds 2 rounds, more than "
                                             r"rounds=1: set rounds to at least 2 to go on from it"):
        ckpt.resume_point(fed_settings(rounds=1))


# ---- RoundEngine.resume on planted rounds (fast) ------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> MultiExitNetwork:
    torch.manual_seed(0)
    return MultiExitNetwork.from_architecture(tiny_space(), TINY_SAMPLE, loss_weights=(0.5, 1.0, 2.0))


@pytest.fixture(scope="module")
def val() -> ImageData:
    g = torch.Generator().manual_seed(1)
    return ImageData(torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 0, 0, 1]))


@pytest.fixture(scope="module")
def costs(template, val):
    return exit_costs(template, val.images[:1])


def planted(template, top: int, value: float = LN91) -> dict[str, torch.Tensor]:
    """A state whose every exit gives class ``top`` the logit ``value`` (others 0) on any image."""
    state = {k: v.clone() for k, v in template.state_dict().items()}
    for i in range(3):
        state[f"exits.{i}.2.weight"].zero_()
        state[f"exits.{i}.2.bias"].zero_()
        state[f"exits.{i}.2.bias"][top] = value
    return state


def make_engine(template, val, costs, folder, s=None) -> RoundEngine:
    model = copy.deepcopy(template)
    torch.nn.init.normal_(model.exits[0][2].weight)  # a fresh model differs from any planted state
    return RoundEngine(model, s or fed_settings(), costs, val, Checkpoint(folder))


def play(engine: RoundEngine, t: int, state: dict[str, torch.Tensor]) -> dict:
    """Round ``t`` with ``state`` as its only update (weight 5)."""
    plan = engine.plan(t)
    results = engine.open(plan, {k: v.clone() for k, v in engine.model.state_dict().items()})
    assert results.accept(plan.tasks[0], state, 5, 0.1)
    new = engine.close(results)
    assert new is not None
    return engine.finish(results, new)


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def good_then_bad(template, val, costs, tmp_path):
    """A checkpoint of 2 planted rounds: round 1 good (p = 0.91 on class 0, the best), round 2 bad."""
    engine = make_engine(template, val, costs, tmp_path)
    play(engine, 1, planted(template, 0))
    play(engine, 2, planted(template, 1))
    assert engine.best_round == 1
    return tmp_path, engine.history


def test_resume_goes_on_from_the_checkpoint_weights_history_and_best_round(template, val, costs, good_then_bad, caplog):
    """resume: the model holds the last round's weights, done and the history are the checkpoint's
    (exactly, timings included), the best round and its weights too; round 3 is recorded after them."""
    folder, history = good_then_bad
    engine = make_engine(template, val, costs, folder)
    with caplog.at_level(logging.INFO, logger="nni_fedexit"):
        resumed = engine.resume()
    assert [rec.getMessage() for rec in caplog.records if rec.name == "nni_fedexit.federated.rounds"] == [
        f"Resuming from {folder} after round 2"]
    assert resumed is not None and resumed.round == 2
    assert engine.done == 2 and engine.best_round == 1 and engine.rewrite_best is False
    assert engine.history == history
    assert_same(engine.model.state_dict(), planted(template, 1))
    assert_same(engine.best_state, planted(template, 0))
    play(engine, 3, planted(template, 2))  # worse than round 1
    assert [h["round"] for h in engine.history] == [1, 2, 3] and engine.history[:2] == history
    assert engine.best_round == 1
    assert Checkpoint(folder).state()["best_round"] == 1
    assert_same(Checkpoint(folder).best_weights(), planted(template, 0))


def test_resume_without_a_checkpoint_or_with_resume_off_starts_at_round_one(template, val, costs, good_then_bad, tmp_path):
    """No checkpoint, or resume=False: nothing is loaded, the run starts at round 1."""
    folder, _ = good_then_bad
    empty = make_engine(template, val, costs, tmp_path / "empty")
    before = {k: v.clone() for k, v in empty.model.state_dict().items()}
    assert empty.resume() is None and empty.done == 0 and empty.history == [] and empty.best_state is None
    assert_same(empty.model.state_dict(), before)
    off = make_engine(template, val, costs, folder, fed_settings(resume=False))
    assert off.resume() is None and off.done == 0 and off.best_round == 0
    no_ckpt = RoundEngine(copy.deepcopy(template), fed_settings(), costs, val)
    assert no_ckpt.resume() is None


def test_a_perturbed_checkpoint_carries_into_the_resumed_run(template, val, costs, good_then_bad):
    """Re-saved (consistent hashes) with other last weights and another history, the checkpoint is
    what the resumed run goes on from: the model holds the perturbed weights, and round 3's best
    round is chosen against the perturbed record of round 1 (a restart would ignore both)."""
    folder, history = good_then_bad
    state = Checkpoint(folder).state()
    perturbed = planted(template, 3, 2.0)
    history = copy.deepcopy(state["history"])
    history[0]["total_loss"] = 100.0  # round 1 is now worse than any real round
    state = {**{k: v for k, v in state.items() if k != "files"}, "history": history}
    Checkpoint(folder).save(state, perturbed, None)
    engine = make_engine(template, val, costs, folder)
    engine.resume()
    assert_same(engine.model.state_dict(), perturbed)
    assert engine.history[0]["total_loss"] == 100.0
    play(engine, 3, planted(template, 1))  # the bad round 2's weights again: better than the perturbed record
    assert engine.best_round == 3


def test_a_lost_best_file_makes_the_last_round_the_best_and_rewrites_it(template, val, costs, good_then_bad, caplog):
    """best.safetensors gone (best round 1, last round 2): round 2 takes the best's place, the log
    says so, and the next save writes best.safetensors again, even in a round that is not better."""
    folder, _ = good_then_bad
    (folder / "best.safetensors").unlink()
    engine = make_engine(template, val, costs, folder)
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        engine.resume()
    assert engine.best_round == 2 and engine.rewrite_best is True
    assert_same(engine.best_state, planted(template, 1))
    assert "The best round so far (1) has lost its weights: the last round (2) takes its place" in caplog.text
    assert "best.safetensors is missing or unreadable" in caplog.text
    play(engine, 3, planted(template, 1, 2 * LN91))  # worse than round 2: not the best
    assert engine.best_round == 2 and engine.rewrite_best is False
    saved = Checkpoint(folder)
    assert saved.state()["best_round"] == 2
    assert_same(saved.best_weights(), planted(template, 1))


def test_a_checkpoint_that_never_named_a_best_file_resumes_with_the_last_round_as_best(template, val, costs,
                                                                                      good_then_bad, caplog):
    """state.json names no best file and none is there: the log says the file is missing, and the
    last round takes the best round's place."""
    folder, _ = good_then_bad
    state = json.loads((folder / "state.json").read_text())
    del state["files"]["best"]
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "best.safetensors").unlink()
    engine = make_engine(template, val, costs, folder)
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        engine.resume()
    assert [rec.getMessage() for rec in caplog.records] == [
        f"{folder / 'best.safetensors'} is missing. The best round so far (1) has lost its weights: the last round "
        "(2) takes its place, and the best round is chosen among it and the rounds still to run."]
    assert engine.best_round == 2 and engine.rewrite_best is True


def test_a_best_file_that_does_not_fit_the_model_costs_only_the_best_weights(template, val, costs, good_then_bad, caplog):
    """A best file with consistent hashes but for another network: refused as the best weights
    (the log names the file and why), the resume goes on with the last round as best."""
    folder, _ = good_then_bad
    state = Checkpoint(folder).state()
    last = Checkpoint(folder).load().last
    wrong = {k: v for k, v in planted(template, 0).items() if k != "exits.2.2.bias"}
    Checkpoint(folder).save({k: v for k, v in state.items() if k != "files"}, last, wrong)
    engine = make_engine(template, val, costs, folder)
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        engine.resume()
    assert engine.best_round == 2 and engine.rewrite_best is True
    assert_same(engine.best_state, planted(template, 1))
    assert f"checkpoint file {folder / 'best.safetensors'} does not fit this model: it lacks 1 entries" in caplog.text


def test_a_lost_best_file_of_the_last_round_keeps_it_and_rewrites_it(template, val, costs, tmp_path):
    """Best round = last round and its file lost: the best round stays, its weights are the last
    round's, and they are written again at the next save."""
    engine = make_engine(template, val, costs, tmp_path)
    play(engine, 1, planted(template, 1))
    play(engine, 2, planted(template, 0))
    assert engine.best_round == 2
    (tmp_path / "best.safetensors").unlink()
    resumed = make_engine(template, val, costs, tmp_path)
    resumed.resume()
    assert resumed.best_round == 2 and resumed.rewrite_best is True
    assert_same(resumed.best_state, planted(template, 0))
    play(resumed, 3, planted(template, 1))
    assert resumed.best_round == 2
    assert_same(Checkpoint(tmp_path).best_weights(), planted(template, 0))


def test_resume_from_a_round_zero_checkpoint_loads_only_the_weights(template, val, costs, tmp_path):
    """A checkpoint before any round: its weights are loaded, no round is done, no best exists."""
    s = fed_settings()
    start = planted(template, 2)
    Checkpoint(tmp_path).save({"fingerprint": s.fingerprint(), "round": 0, "best_round": 0, "history": []}, start, None)
    engine = make_engine(template, val, costs, tmp_path)
    assert engine.resume().round == 0
    assert engine.done == 0 and engine.best_round == 0 and engine.best_state is None and engine.rewrite_best is False
    assert_same(engine.model.state_dict(), start)


def test_last_weights_that_do_not_fit_the_model_are_refused_by_name(template, val, costs, tmp_path):
    """A last file lacking an entry, or with a wrong shape, is refused naming the file and the fix."""
    s = fed_settings()
    state = {"fingerprint": s.fingerprint(), "round": 1, "best_round": 1, "history": [record(1)]}
    lacking = {k: v for k, v in planted(template, 0).items() if k not in ("exits.0.2.bias", "exits.1.2.bias")}
    Checkpoint(tmp_path).save(state, lacking, lacking)
    with pytest.raises(FederatedError, match=rf"^checkpoint file {tmp_path / 'last.safetensors'} does not fit this "
                                             r"model: it lacks 2 entries of the model, e.g. 'exits.0.2.bias'; it was "
                                             r"written for another network or damaged. Use another checkpoint "
                                             r"directory, or resume=False to start over$"):
        make_engine(template, val, costs, tmp_path).resume()
    misshapen = {**planted(template, 0), "exits.0.2.bias": torch.zeros(11)}
    Checkpoint(tmp_path).save(state, misshapen, None)
    with pytest.raises(FederatedError, match=r"last.safetensors does not fit this model: 'exits.0.2.bias' has shape \(11,\)"):
        make_engine(template, val, costs, tmp_path).resume()


def test_the_server_state_is_restored_into_the_aggregator_and_the_clients(template, val, costs, tmp_path):
    """server.safetensors' aggregator/* entries go to the aggregator (FedAvgM's momentum, here
    perturbed and re-saved), client/<c>/* to that client's objective state."""
    s = fed_settings(aggregator={"name": "fedavgm", "lr": 1.0, "momentum": 0.5})
    engine = make_engine(template, val, costs, tmp_path, s)
    play(engine, 1, planted(template, 0))
    saved = engine.server_state()
    assert saved and all(k.startswith("aggregator/momentum/") for k in saved)
    assert_same(Checkpoint(tmp_path).load().server, saved)  # finish wrote it
    key = "aggregator/momentum/exits.0.2.bias"
    perturbed = {k: v * 3 + 1 for k, v in saved.items()}
    perturbed["client/1/h"] = torch.arange(3.0)
    perturbed["client/1/prox/w"] = torch.ones(2)  # an objective state's own names may hold "/"
    state = {k: v for k, v in Checkpoint(tmp_path).state().items() if k != "files"}
    Checkpoint(tmp_path).save(state, Checkpoint(tmp_path).load().last, None, perturbed)
    resumed = make_engine(template, val, costs, tmp_path, s)
    resumed.resume()
    assert_same(resumed.server_state(), perturbed)
    assert torch.equal(resumed.aggregator.state_dict()[key.partition("/")[2]], saved[key] * 3 + 1)
    assert set(resumed.client_states) == {1} and torch.equal(resumed.client_states[1]["h"], torch.arange(3.0))
    assert torch.equal(resumed.client_states[1]["prox/w"], torch.ones(2))


@pytest.mark.parametrize("entry", ["client/2/h", "client/x/h", "client/1/", "client/-1/h", "other/h", "aggregator/",
                                   "h"])
def test_server_entries_of_no_known_owner_are_refused(template, val, costs, tmp_path, entry):
    """An entry that is neither aggregator/<name> nor client/<0..num_clients-1>/<name> is refused by name."""
    s = fed_settings()
    state = {"fingerprint": s.fingerprint(), "round": 1, "best_round": 1, "history": [record(1)]}
    Checkpoint(tmp_path).save(state, planted(template, 0), None, {entry: torch.ones(1)})
    with pytest.raises(FederatedError, match=rf"^checkpoint file {tmp_path / 'server.safetensors'} holds the entry "
                                             rf"'{entry}', which is neither 'aggregator/<name>' nor 'client/<0\.\.1>/<name>'; "
                                             r"use another checkpoint directory, or resume=False to start over$"):
        make_engine(template, val, costs, tmp_path).resume()


def test_server_state_of_another_aggregator_is_refused(template, val, costs, tmp_path):
    """fedavg keeps no server state: a checkpoint holding aggregator entries does not fit it."""
    s = fed_settings()
    state = {"fingerprint": s.fingerprint(), "round": 1, "best_round": 1, "history": [record(1)]}
    Checkpoint(tmp_path).save(state, planted(template, 0), None, {"aggregator/momentum/x": torch.ones(1)})
    with pytest.raises(FederatedError, match=rf"^checkpoint file {tmp_path / 'server.safetensors'} does not fit the "
                                             r"aggregator 'fedavg': FedAvg keeps no server state, .*; use another "
                                             r"checkpoint directory, or resume=False to start over$"):
        make_engine(template, val, costs, tmp_path).resume()


# ---- a real run stopped and resumed (digits, 2 + 1 rounds) ---------------------------------------------


digits_settings = functools.partial(shared_digits_settings, num_clients=3, batch_size=64, client_samples=120)



class Recording(SimulationBackend):
    """The in-process clients, recording (round, client, the global weights it was given)."""

    log: list[tuple[int, int, dict[str, torch.Tensor]]]

    def train_client(self, global_state, task):
        self.log.append((self.round, task.client, {k: v.clone() for k, v in global_state.items()}))
        return super().train_client(global_state, task)


def recording():
    made: list[Recording] = []

    def factory(*args, **kwargs):
        backend = Recording(*args, **kwargs)
        backend.log = []
        made.append(backend)
        return backend

    return factory, made


@pytest.fixture(scope="module")
def stopped_run(digits, tmp_path_factory):
    """A run stopped after round 2 (its checkpoint), and its data."""
    folder = tmp_path_factory.mktemp("stopped")
    s = digits_settings(checkpoint_dir=str(folder))
    data = FederatedData(s, bundle=digits)
    factory, made = recording()
    torch.manual_seed(0)
    net = tiny_space().build(TINY_SAMPLE)
    federate(copy.deepcopy(net), s, data=data, backend_factory=factory, report=False)
    assert sorted({(t, c) for t, c, _ in made[0].log}) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    return net, data, folder


def resume_copy(stopped_run, tmp_path, perturb=None):
    net, data, folder = stopped_run
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(folder, copy_dir)
    if perturb is not None:
        perturb(Checkpoint(copy_dir))
    factory, made = recording()
    result = federate(copy.deepcopy(net), digits_settings(rounds=3, checkpoint_dir=str(copy_dir)), data=data,
                      backend_factory=factory, report=False)
    return result, made[0].log, copy_dir


@pytest.fixture(scope="module")
def true_resume(stopped_run, tmp_path_factory):
    """The stopped run resumed from its checkpoint as it is, to round 3."""
    return resume_copy(stopped_run, tmp_path_factory.mktemp("resumed"))


@pytest.mark.slow
def test_a_resumed_run_trains_only_the_rounds_after_the_checkpoint(stopped_run, true_resume):
    """Resumed with rounds=3 from a 2-round checkpoint: the clients train round 3 only (each client
    once), starting from the checkpoint's last weights; rounds 1-2's records are the checkpoint's
    exactly (a restart would redo them, with other timings)."""
    saved = Checkpoint(stopped_run[2]).load()
    result, log, folder = true_resume
    assert sorted((t, c) for t, c, _ in log) == [(3, 0), (3, 1), (3, 2)]
    for _, _, given in log:
        assert_same(given, saved.last)
    assert result.history[:2] == saved.state["history"]
    assert [h["round"] for h in result.history] == [1, 2, 3]
    assert Checkpoint(folder).state()["round"] == 3


def test_a_resumed_run_goes_on_from_perturbed_weights(stopped_run, true_resume, tmp_path):
    """The checkpoint's last weights halved and re-saved (consistent hashes): round 3's clients are
    given exactly those weights, and the run ends with another model than from the true checkpoint."""
    def halve(ckpt: Checkpoint):
        loaded = ckpt.load()
        halved = {k: v * 0.5 if v.is_floating_point() else v for k, v in loaded.last.items()}
        ckpt.save({k: v for k, v in loaded.state.items() if k != "files"}, halved, None, loaded.server)

    saved = Checkpoint(stopped_run[2]).load()
    result, log, folder = resume_copy(stopped_run, tmp_path, halve)
    assert sorted((t, c) for t, c, _ in log) == [(3, 0), (3, 1), (3, 2)]
    key = "exits.2.2.weight"
    for _, _, given in log:
        assert torch.equal(given[key], saved.last[key] * 0.5)
    assert not torch.equal(Checkpoint(folder).load().last[key], Checkpoint(true_resume[2]).load().last[key])
    assert result.history[2]["total_loss"] != true_resume[0].history[2]["total_loss"]
    assert result.history[:2] == saved.state["history"]
