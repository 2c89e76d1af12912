"""``workers: N`` of the simulation backend: N clients really train at the same time, and the
weights are those of one client at a time.

The backend is the real one (:class:`~nni_fedexit.federated.backends.simulation.SimulationBackend`
through :func:`~nni_fedexit.federated.backends.simulation.run_simulation`, on the tiny model and
digits); the subclass below uses the documented hook (override ``train_client``) only to note
who trains when, and calls the real ``train_client`` for the work.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers import TINY_SAMPLE, tiny_space
from nni_fedexit.exits import MultiExitNetwork, exit_costs
from nni_fedexit.federated import FederatedData, FederatedSettings
from nni_fedexit.federated.backends.simulation import SimulationBackend, run_simulation

#: 4 clients a round (client_fraction 1) of 32 digits each, one torch thread per client on both sides
BASE = dict(dataset="digits", rounds=2, num_clients=4, min_clients=2, batch_size=16, lr=0.05, seed=0, head="conv",
            client_threads=1, client_samples=128, val_samples=64, bn_samples=64)


class Watched(SimulationBackend):
    """The real clients, noting each client's (round, client, start, end, thread) and the most
    clients inside ``train_client`` at one time (``peak``).

    With ``meet``, the first client of the run waits (up to 60 s) until a second one has entered
    before it trains: clients that can run at once then surely do, and clients that cannot leave
    ``peak`` at 1. A client's start is noted when it enters, its end when its training is done.
    """

    def __init__(self, *args, meet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.meet = meet
        self.log: list[tuple[int, int, float, float, str]] = []
        self.inside = 0
        self.peak = 0
        self._cond = threading.Condition()

    def train_client(self, global_state, task):
        with self._cond:
            start = time.perf_counter()
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            self._cond.notify_all()
            if self.meet:
                self._cond.wait_for(lambda: self.peak >= 2, timeout=60)
        try:
            return super().train_client(global_state, task)
        finally:
            with self._cond:
                self.log.append((self.round, task.client, start, time.perf_counter(), threading.current_thread().name))
                self.inside -= 1


def _run(digits, workers: int, meet: bool) -> tuple[dict[str, torch.Tensor], list[dict], Watched]:
    """Two rounds of the simulation backend with ``workers``; final weights, records, the backend."""
    settings = FederatedSettings(**BASE, backend={"name": "simulation", "workers": workers})
    data = FederatedData(settings, bundle=digits)
    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(), TINY_SAMPLE, head="conv")
    costs = exit_costs(model, data.val.images[:1])
    backends: list[Watched] = []

    def clients(*args, **kwargs) -> Watched:
        backends.append(Watched(*args, meet=meet, **kwargs))
        return backends[0]

    records: list[dict] = []
    run_simulation(model, settings, data, costs, records.append, clients=clients)
    assert len(backends) == 1
    return {k: v.clone() for k, v in model.state_dict().items()}, records, backends[0]


@pytest.mark.slow
def test_two_workers_train_two_clients_at_once_and_give_the_sequential_weights(digits):
    """With ``workers: 2`` two clients are inside their training at the same time (their time
    spans overlap, in two different pool threads), never more than two; with ``workers: 1`` one
    at a time, in the caller's thread. The clients, their records and the final weights of the
    two runs are the same, tensor by tensor."""
    seq_weights, seq_records, seq = _run(digits, workers=1, meet=False)
    par_weights, par_records, par = _run(digits, workers=2, meet=True)

    # one at a time: no two spans overlap, every client in the thread that called the backend
    assert seq.peak == 1 and seq.workers == 1
    spans = sorted((start, end) for _, _, start, end, _ in seq.log)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert {name for *_, name in seq.log} == {threading.current_thread().name}

    # two at a time: the backend was built with 2 workers, two clients overlapped, never three
    assert par.workers == 2 and par.peak == 2
    overlapping = [(a[1], b[1]) for a in par.log for b in par.log
                   if a[0] == b[0] and a[1] < b[1] and a[2] < b[3] and b[2] < a[3]]
    assert overlapping, par.log
    threads = {name for *_, name in par.log}
    assert len(threads) == 2 and all(name.startswith("fedexit-client") for name in threads), threads

    # every client of every round trained once on both sides, and the runs agree exactly
    assert sorted((r, c) for r, c, *_ in par.log) == sorted((r, c) for r, c, *_ in seq.log) == \
        [(r, c) for r in (1, 2) for c in range(4)]
    assert [r["clients"] for r in par_records] == [r["clients"] for r in seq_records]
    assert [r["exit_accuracy"] for r in par_records] == [r["exit_accuracy"] for r in seq_records]
    assert par_weights.keys() == seq_weights.keys()
    for key, value in seq_weights.items():
        assert torch.equal(par_weights[key], value), key
