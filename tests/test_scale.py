"""Scale-out: clients in parallel, in this process (``workers``) and on Flower's simulation engine.

Real Ray every time: a private instance the backend starts and stops, and a cluster of a head
and a worker node started here with ``ray start`` on 127.0.0.1. Each run is compared, tensor by
tensor, with the in-process simulation of the same settings (one torch thread per client on
both sides, as the backends' docs say).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import TINY_SAMPLE, RayCluster, max_abs_difference, needs_flwr, processes_with, tiny_space, torch_threads
from nni_fedexit.exits import MultiExitNetwork, exit_costs
from nni_fedexit.federated import FederatedData, FederatedSettings
from nni_fedexit.federated.backends import get_backend
from nni_fedexit.federated.rounds import stable_seed

pytestmark = pytest.mark.slow  # NNI experiments, Flower or Ray processes, a browser: make test-fast leaves them out

#: FedDyn keeps client state across rounds; depth-wise clients train every stage; the server trains
#: on its own images after each aggregation: all must come out the same on every backend
BASE = dict(dataset="digits", rounds=2, num_clients=4, min_clients=2, batch_size=16, lr=0.05, seed=0, head="linear",
            client_threads=1, objective="feddyn", dyn_alpha=0.05, client_training="depthwise", server_steps=3)


def _model(settings: FederatedSettings) -> MultiExitNetwork:
    torch.manual_seed(stable_seed(settings.seed))
    network = tiny_space().build(TINY_SAMPLE)
    network.arch = dict(TINY_SAMPLE)
    torch.manual_seed(stable_seed(settings.seed, 0))
    return MultiExitNetwork.from_network(network, head=settings.head, loss_weights=settings.loss_weights)


def _run(settings: FederatedSettings, data: FederatedData) -> tuple[dict, list[dict]]:
    """The backend's rounds, called as federate() calls them; the final weights and the per-round records."""
    records: list[dict] = []
    model = _model(settings)
    costs = exit_costs(model, data.val.images[:1])
    outcome = get_backend(settings.name("backend"))(model, settings, data, costs, records.append)
    assert [r["round"] for r in outcome.history] == list(range(1, settings.rounds + 1))
    return {k: v.clone() for k, v in model.state_dict().items()}, records


def _ray_processes() -> list[str]:
    return processes_with(lambda cmd: "raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd)


@pytest.fixture(scope="module")
def simulated():
    """The in-process simulation of BASE: weights and records (one torch thread, like each virtual client)."""
    settings = FederatedSettings(**BASE)
    with torch_threads(1):
        data = FederatedData(settings)
        weights, records = _run(settings, data)
    return data, weights, records


@needs_flwr
def test_flower_simulation_gives_the_in_process_weights_and_stops_its_ray(simulated):
    """Four virtual SuperNodes on a private Ray instance with 2 one-CPU actors: every round is
    reported once, with the same clients, depths and seeds; the weights are the in-process
    simulation's exactly (FedDyn's per-client state kept across rounds on both); no Ray process
    is left afterwards."""
    data, expected, sim_records = simulated
    before = _ray_processes()
    settings = FederatedSettings(**BASE, backend={"name": "flower-simulation", "workers": 2})
    with torch_threads(1):
        weights, records = _run(settings, data)
    # the same clients (each virtual SuperNode also names its node id), depths and seeds
    assert [[{k: v for k, v in c.items() if k != "node"} for c in r["clients"]] for r in records] == \
        [r["clients"] for r in sim_records]
    assert all(c["node"] for r in records for c in r["clients"])
    assert [r["exit_accuracy"] for r in records] == [r["exit_accuracy"] for r in sim_records]
    assert max_abs_difference(weights, expected) == 0.0
    # what moved: the branches out and back; Flower's ArrayRecords add a key name and a 128-byte npy
    # header to each tensor (this tiny model's tensors are small, so that is up to a fifth here)
    for r, s in zip(records, sim_records):
        assert r["bytes_sent"] >= s["bytes_sent"] > 0 and r["bytes_received"] >= s["bytes_received"] > 0
        assert r["bytes_sent"] < 1.25 * s["bytes_sent"] and r["bytes_received"] < 1.25 * s["bytes_received"]
    assert _ray_processes() == before, "the run left Ray processes running"


def test_workers_in_threads_give_the_same_weights(simulated):
    """Three clients at a time in threads of this process: the same weights as one at a time."""
    data, expected, sim_records = simulated
    settings = FederatedSettings(**BASE, backend={"name": "simulation", "workers": 3})
    with torch_threads(1):
        weights, records = _run(settings, data)
    assert max_abs_difference(weights, expected) == 0.0
    assert [r["clients"] for r in records] == [r["clients"] for r in sim_records]


@needs_flwr
def test_flower_simulation_on_a_ray_cluster_of_a_head_and_a_worker(simulated, tmp_path):
    """``ray start --head`` with no CPUs and ``ray start --address`` with two, both with token
    authentication: every client can only train on the worker node. A user's process holding the
    token (a fresh one: Ray reads its token once per process) attaches by ``ray_address`` and
    gets the in-process weights; the cluster stays up (it is the user's); stopping it leaves nothing."""
    from safetensors.torch import load_file

    data, expected, _ = simulated
    cluster = RayCluster(tmp_path)
    out = tmp_path / "weights.safetensors"
    try:
        cluster.node("head", num_cpus=0, head=True)
        cluster.wait_nodes(1, timeout=90)
        cluster.node("worker", num_cpus=2)
        cluster.wait_nodes(2, timeout=90)
        res = subprocess.run([sys.executable, __file__, cluster.address, str(out)], env=cluster.env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:] + cluster.diag()
        assert all(proc.poll() is None for _, proc in cluster.procs), cluster.diag()
    finally:
        cluster.stop_all()
    assert max_abs_difference(load_file(str(out)), expected) == 0.0
    assert cluster.leftovers() == []


def test_scale_settings_name_the_key_and_the_fix():
    sim = "flower-simulation"
    with pytest.raises(ValueError, match=r"^backend\.workers: Input should be greater than or equal to 1 \(got 0\)$"):
        FederatedSettings(backend={"name": "simulation", "workers": 0})
    with pytest.raises(ValueError, match=r"^backend\.client_num_gpus: .*set device: cuda"):
        FederatedSettings(backend={"name": sim, "client_num_gpus": 0.25})
    with pytest.raises(ValueError, match=r"^backend\.client_num_cpus: Input should be greater than 0"):
        FederatedSettings(backend={"name": sim, "client_num_cpus": 0})
    with pytest.raises(ValueError, match=r"^backend\.ray_address: String should match pattern"):
        FederatedSettings(backend={"name": sim, "ray_address": "  "})
    # a fraction of a CPU or GPU is a setting, not an error
    gpu = FederatedSettings(backend={"name": sim, "client_num_cpus": 0.5, "client_num_gpus": 0.25}, device="cuda")
    assert gpu.params("backend").client_num_gpus == 0.25
    # a private Ray is sized by workers and stays local; a cluster is never given sizes (ray.init refuses both)
    from nni_fedexit.federated.backends.flower.simulation_engine import (
        FlowerSimulationParams, backend_config, ray_init_args,
    )

    private = ray_init_args(FlowerSimulationParams(workers=3, client_num_cpus=0.5))
    assert private["address"] == "local" and private["num_cpus"] == 1.5 and private["_node_ip_address"] == "127.0.0.1"
    cluster = ray_init_args(FlowerSimulationParams(ray_address="10.0.0.1:6379"))
    assert cluster["address"] == "10.0.0.1:6379" and "num_cpus" not in cluster and "num_gpus" not in cluster
    assert backend_config(gpu.params("backend")) == {"client_resources": {"num_cpus": 0.5, "num_gpus": 0.25}}
    # none of them changes what a run computes: a checkpoint resumes with others
    base = FederatedSettings()
    moved = base.replace(backend={"name": sim, "workers": 4, "client_num_cpus": 2.0, "ray_address": "127.0.0.1:1"})
    assert moved.fingerprint() == base.fingerprint()
    # the settings of earlier versions (top-level workers, ray_address ...) move into the backend's section
    with pytest.warns(FutureWarning, match=r"workers is now backend\.workers"):
        old = FederatedSettings(backend=sim, workers=2, ray_address="10.0.0.1:6379")
    assert old.backend == {"name": sim, "workers": 2, "client_num_cpus": 1.0, "client_num_gpus": 0.0,
                           "ray_address": "10.0.0.1:6379"}


@needs_flwr
def test_flower_simulation_refuses_an_address_where_no_cluster_runs(simulated):
    from helpers import free_port
    from nni_fedexit.federated import FederatedError

    data, _, _ = simulated
    settings = FederatedSettings(**BASE, backend={"name": "flower-simulation", "ray_address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(FederatedError, match=r"^ray_address: no Ray cluster answers at 127\.0\.0\.1:\d+"):
        _run(settings, data)


if __name__ == "__main__":  # the cluster test's driver: python test_scale.py RAY_ADDRESS OUT.safetensors
    from safetensors.torch import save_file

    settings = FederatedSettings(**BASE, backend={"name": "flower-simulation", "ray_address": sys.argv[1]})
    with torch_threads(1):
        weights, _ = _run(settings, FederatedData(FederatedSettings(**BASE)))
    save_file(weights, sys.argv[2])
