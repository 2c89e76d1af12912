"""Hostile inputs and crashes, as an attacker and an unlucky operator would try them: no code from
them runs, no client weighs more than its share, a bad reply costs only its sender, a checkpoint
resumes exactly or is refused by name."""

import copy
import json
import logging
import math
import os
import pickle
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nni_fedexit.federated import FederatedData, FederatedError, FederatedSettings, SimulationBackend, federate
from nni_fedexit.federated.aggregators import Aggregator, WeightedMean, register_aggregator
from nni_fedexit.federated.checkpoint import Checkpoint
from helpers import TINY_SAMPLE as SAMPLE, tiny_space


def digits_settings(**overrides):
    base = dict(dataset="digits", rounds=1, num_clients=4, min_clients=2, batch_size=32, lr=0.05, seed=0, head="linear")
    base.update(overrides)
    return FederatedSettings(**base)


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


@pytest.mark.parametrize("claim", [1e18, math.inf, 1.7e308, math.nan, -5, [100], "100", True, 10**6])
def test_an_inflated_or_malformed_sample_count_is_rejected_and_the_model_is_the_honest_mean(digits, claim, caplog):
    honest = _run(digits, None)  # client 0 offline: the mean of the three others
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

    config = flower_app_config()
    settings = settings_from_config(config, num_clients=3, min_clients=2)
    data = load_data(settings)
    model = build_model(config, settings, data.bundle)
    costs = exit_costs(model, data.val.images[:1])
    sizes = [len(c) for c in data.clients]
    profiles = {100 + p: NodeProfile({"partition-id": p, "num-partitions": 3}) for p in range(3)}

    def strategy():
        engine = RoundEngine(copy.deepcopy(model), settings, costs, data.val, client_sizes=sizes)
        return BranchStrategy(engine, profiles, partition_sizes=sizes)

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


@pytest.mark.parametrize("case", list(HOSTILE_REPLIES))
def test_a_malformed_flower_reply_costs_only_its_sender(server, case, caplog):
    strategy, _ = server
    _, honest = _round(strategy())  # node 102 offline: the mean of the two others
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        results, attacked = _round(strategy(), HOSTILE_REPLIES[case])
    assert results.accepted == 2 and [r["node"] for r in results.rejected] == [102], results.rejected
    assert "node 102" in caplog.text and "rejected" in caplog.text
    assert honest is not None and attacked is not None
    for key, value in attacked.to_torch_state_dict().items():
        assert torch.equal(value, honest[key].torch() if hasattr(honest[key], "torch") else
                           torch.from_numpy(honest[key].numpy())), key


def test_node_profiles_cannot_choose_the_run_size_or_a_taken_partition():
    from nni_fedexit.federated.backends.flower.server_app import NodeProfile, admit_nodes, run_num_clients

    honest = {n: NodeProfile({"partition-id": p, "num-partitions": 3}) for n, p in ((5, 0), (6, 1), (7, 2))}
    liar = NodeProfile({"partition-id": 3, "num-partitions": 1000})
    twin = NodeProfile({"partition-id": 1, "num-partitions": 3})
    nodes = {**honest, 1: liar, 2: twin}
    assert run_num_clients({}, nodes) == 3  # the majority, not the largest claim
    assert run_num_clients({"num-clients": 3}, {1: liar}) == 3  # the run config decides when it says
    holders = {1: 6}  # node 6 claimed partition 1 first
    admitted = admit_nodes(nodes, 3, {}, holders)
    assert sorted(admitted) == [5, 6, 7] and holders == {0: 5, 1: 6, 2: 7}
    for bad in ({"partition-id": "0"}, {"partition-id": -1}, {"budget": float("inf"), "partition-id": 0},
                {"data-dir": ["/etc"]}, {}):
        with pytest.raises(ValueError):
            NodeProfile.checked(bad)


def test_a_budget_from_one_node_does_not_switch_the_run_to_capability_mode(server):
    from nni_fedexit.federated.rounds import Participant

    strategy, sizes = server
    engine = strategy().engine
    parts = [Participant(0, 100, 0.01, sizes[0]), Participant(1, 101, None, sizes[1]), Participant(2, 102, None, sizes[2])]
    plan = engine.plan(1, 0, parts)
    assert len(plan.tasks) == 3  # random mode: the 0.01 budget is not a reason to sit out
    assert [t.max_weight for t in plan.tasks] == [float(n) for n in sizes]


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


@pytest.fixture
def two_rounds(digits, tmp_path):
    net = NET
    s = digits_settings(rounds=2, checkpoint_dir=str(tmp_path / "ckpt"))
    data = FederatedData(s, bundle=digits)
    federate(copy.deepcopy(net), s, data=data, report=False)
    return net, data, tmp_path / "ckpt"


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
    state = json.loads((folder / "state.json").read_text())
    (folder / "best.safetensors").write_bytes((folder / "best.safetensors").read_bytes()[:64])
    with caplog.at_level(logging.WARNING, logger="nni_fedexit"):
        result = _resume(net, data, folder)
    assert [h["round"] for h in result.history] == [1, 2, 3]
    if state["best_round"] != 2:
        assert "best.safetensors" in caplog.text and "lost its weights" in caplog.text
    assert Checkpoint(folder).best_weights().keys() == result.model.state_dict().keys()  # rewritten, readable
