"""S5 backend ``flower-simulation``: our ServerApp and ClientApp on Flower's simulation engine.

``num_clients`` virtual SuperNodes (node config ``partition-id``, ``num-partitions``, as Flower
gives them) run our ClientApp's training in a pool of Ray actors, each holding
``client_num_cpus`` CPUs and ``client_num_gpus`` GPUs (fractions allowed: 0.25 puts four clients
on one GPU). The ServerApp runs in this process, in a thread Flower starts, with
:class:`~nni_fedexit.federated.backends.flower.server_app.BranchStrategy` on the same
:class:`~nni_fedexit.federated.rounds.RoundEngine` as every backend: the same assignment, seeds,
aggregation, validation, best round and checkpoints, and ``on_record`` once per round (NNI's
intermediate result). The clients train on this process's partitions, put once into Ray's
object store, so a run gives the in-process simulation's weights for the same settings (with one
torch thread per client on both sides).

Ray: without ``ray_address`` the run starts a private Ray instance on 127.0.0.1 with
``workers * client_num_cpus`` CPUs and stops it at the end; with ``ray_address`` it attaches to
that cluster (``ray start --head`` on one machine, ``ray start --address`` on the others) and
the cluster's resources decide how many clients train at once. Needs ``flwr[simulation]``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from typing import Any, Callable, Mapping, Sequence

import torch
from pydantic import Field

from nni_fedexit.components import ComponentParams
from nni_fedexit.data import ImageData
from nni_fedexit.exits import ExitCost
from nni_fedexit.federated.checkpoint import Checkpoint
from nni_fedexit.federated.client_data import FederatedData
from nni_fedexit.federated.errors import FederatedError
from nni_fedexit.federated.rounds import RoundEngine, RunOutcome
from nni_fedexit.federated.settings import FederatedSettings

__all__ = ["RaySession", "backend_config", "check_reachable", "fetch_partition", "put_partitions", "ray_init_args", "run_on_flower_simulation"]

#: keeps every Ray listener on 127.0.0.1 (else Ray binds the host's address on all interfaces)
_LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class FlowerSimulationParams(ComponentParams):
    """The options of backend ``flower-simulation`` (``backend: {name: flower-simulation, ...}``)."""

    workers: int = Field(1, ge=1, description="virtual SuperNodes trained at the same time (Ray actors: a Ray "
                         "instance this run starts gets workers * client_num_cpus CPUs)")
    client_num_cpus: float = Field(1.0, gt=0, description="CPUs each virtual SuperNode's ClientApp holds "
                                   "(a fraction is allowed)")
    client_num_gpus: float = Field(0.0, ge=0, description="GPUs each virtual SuperNode's ClientApp holds "
                                   "(a fraction is allowed; needs device: cuda)")
    ray_address: str | None = Field(None, min_length=1, pattern=r"\S", description="a running Ray cluster "
                                    "(ray start --head), e.g. 127.0.0.1:6379; null: a private Ray instance on this "
                                    "machine, started and stopped by the run")


def ray_init_args(params: FlowerSimulationParams) -> dict[str, Any]:
    """``ray.init`` arguments: a private instance on 127.0.0.1 sized for ``workers`` clients, or
    the cluster at ``ray_address`` (whose own resources then count)."""
    common = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if params.ray_address:
        return {"address": params.ray_address, **common}
    # GPUs: Ray finds the machine's own; workers * client_num_cpus CPUs bound the actors to ``workers``
    return {"address": "local", "num_cpus": params.workers * params.client_num_cpus, "_node_ip_address": "127.0.0.1",
            **common}


def backend_config(params: FlowerSimulationParams) -> dict[str, Any]:
    """Flower's simulation backend config: each virtual SuperNode's resources."""
    return {"client_resources": {"num_cpus": params.client_num_cpus, "num_gpus": params.client_num_gpus}}


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """ConnectionError unless something accepts TCP connections at ``address`` (HOST:PORT, or ray://HOST:PORT)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"{address!r} is not HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(str(err)) from None


class RaySession:
    """Ray for one run: initialised here (or the caller's), and, for an instance this run started,
    its processes waited for at the end. Flower's backend calls ``ray.shutdown()`` itself when the
    ServerApp is done, which orphans the actors for a moment: so the processes are noted while the
    run still holds them (:meth:`note_processes`, at the end of the ServerApp) and waited for after."""

    def __init__(self, params: FlowerSimulationParams):
        try:
            import ray
        except ImportError:
            raise FederatedError("backend 'flower-simulation' needs Ray: pip install 'nni-fedexit[flower]' "
                                 "(it installs flwr[simulation], which pins ray)") from None
        self.ray = ray
        self.params = params
        self.started = False
        self.before: set[int] = set()
        self.processes: list[Any] = []

    def __enter__(self) -> "RaySession":
        import psutil

        self.saved = {k: os.environ.get(k) for k in (*_LOCAL_ONLY, "PYTHONPATH")}
        if self.params.ray_address is None:  # a cluster's nodes must reach each other: not for it
            os.environ.update({k: v for k, v in _LOCAL_ONLY.items() if k not in os.environ})
        if not self.ray.is_initialized():
            self.before = {p.pid for p in psutil.Process().children(recursive=True)}
            try:
                if self.params.ray_address:  # ray.init retries an absent cluster for minutes
                    check_reachable(self.params.ray_address)
                self.ray.init(**ray_init_args(self.params))
            except ConnectionError as err:
                self._restore_env()
                raise FederatedError(f"ray_address: no Ray cluster answers at {self.params.ray_address} ({err}); "
                                     "start one with `ray start --head --port=PORT` or leave ray_address out") from None
            self.started = True
        return self

    def note_processes(self) -> None:
        """Remember the processes of a Ray instance this run started (raylet, GCS, actors)."""
        import psutil

        if self.started and self.params.ray_address is None:
            self.processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in self.before]

    def __exit__(self, *exc: Any) -> None:
        import psutil

        try:
            if not self.processes:
                self.note_processes()
            if self.started and self.ray.is_initialized():
                self.ray.shutdown()
            _, alive = psutil.wait_procs(self.processes, timeout=15)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        for key, value in self.saved.items():  # Flower rewrites PYTHONPATH for its actors
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: each actor's handles of the run's partitions (one Ray object per partition), by the run's object id
_PARTITIONS: dict[str, list[Any]] = {}


def put_partitions(ray: Any, clients: Sequence[ImageData]) -> Callable[[int], ImageData]:
    """Put each partition into Ray's object store once; the function the actors call for partition ``i``."""
    return functools.partial(fetch_partition, ray.put([ray.put(c) for c in clients]))


def fetch_partition(ref: Any, i: int) -> ImageData:
    """Partition ``i`` of the run whose partition handles are the Ray object ``ref``. An actor keeps
    only the handles: its memory holds the partition it trains, not all of them."""
    import ray

    key = ref.hex()
    if key not in _PARTITIONS:
        _PARTITIONS.clear()
        _PARTITIONS[key] = ray.get(ref)
    return ray.get(_PARTITIONS[key][i])


def _apps(engine: RoundEngine, cfg: Mapping[str, Any], partition: Callable[[int], ImageData], data_shape: dict,
          session: RaySession) -> tuple:
    """Our ServerApp (on ``engine``, in this process) and ClientApp (in the actors, with ``cfg``)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from nni_fedexit.federated.backends.flower import client_app
    from nni_fedexit.federated.backends.flower.common import to_array_record
    from nni_fedexit.federated.backends.flower.server_app import BranchStrategy, discover_nodes

    s = engine.settings
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        profiles = discover_nodes(grid, s.num_clients, s.node_wait, s.round_timeout)
        if len(profiles) < s.num_clients:
            raise FederatedError(f"only {len(profiles)} of {s.num_clients} virtual SuperNodes reported in "
                                 f"node_wait={s.node_wait} s; raise node_wait, or check the Ray log")
        strategy = BranchStrategy(engine, profiles, node_wait=s.node_wait, query_timeout=s.round_timeout,
                                  data_shape=data_shape)
        engine.checkpoint_extra = strategy.checkpoint_extra
        try:
            strategy.start(grid=grid, initial_arrays=to_array_record(engine.model.state_dict()),
                           num_rounds=s.rounds - engine.done, timeout=s.round_timeout, evaluate_fn=strategy.evaluate)
        finally:
            session.note_processes()

    client = ClientApp()
    client.query()(client_app.query)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return client_app.train_branch(msg, context, cfg, partition)

    return server, client


def run_on_flower_simulation(
    model: torch.nn.Module, settings: FederatedSettings, data: FederatedData, costs: Sequence[ExitCost],
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> RunOutcome:
    """The ``flower-simulation`` backend: ``settings.rounds`` rounds on ``num_clients`` virtual SuperNodes."""
    s = settings
    params = s.params("backend")
    if not isinstance(params, FlowerSimulationParams):
        params = FlowerSimulationParams()
    if getattr(model, "arch", None) is None or getattr(model, "spec", None) is None:
        raise FederatedError("backend 'flower-simulation' rebuilds the network in its ClientApps from its architecture: "
                             "give federate() a network of ResNetBlockPoolSpace (space.build(sample) or NNI's trial model)")
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise FederatedError("backend 'flower-simulation' needs flwr[simulation]: pip install 'nni-fedexit[flower]'") from None
    from nni_fedexit.federated.backends.flower.common import DataShape, run_config

    ckpt = Checkpoint(s.checkpoint_dir) if s.checkpoint_dir else None
    engine = RoundEngine(model, s, costs, data.val, ckpt, on_record, client_sizes=[len(c) for c in data.clients],
                         server_train=data.server_train, server_labelled=data.server_labelled)
    engine.resume()
    if s.rounds > engine.done:
        cfg = run_config(s, model.arch, model.spec)
        with RaySession(params) as session:
            partition = put_partitions(session.ray, data.clients)
            server, client = _apps(engine, cfg, partition, DataShape.of(data.bundle).to_config(), session)
            run_simulation(server_app=server, client_app=client, num_supernodes=s.num_clients,
                           backend_config=backend_config(params))
        if engine.done < s.rounds:
            raise FederatedError(f"the Flower simulation ended after round {engine.done} of {s.rounds} (see the log above)"
                                 + (f"; rounds 1..{engine.done} are kept in {ckpt.folder}: rerun to resume" if ckpt else ""))
    return engine.outcome(data.summary)


run_on_flower_simulation.Params = FlowerSimulationParams  # type: ignore[attr-defined]
