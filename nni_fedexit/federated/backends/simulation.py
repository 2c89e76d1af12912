"""S5 backend ``simulation``: edge clients trained in-process (the default).

Memory holds the global model and one client model per worker: each client's turn loads the
global weights into a free client model, trains the branch it was given on its partition (data
loaded once, at the start), and hands the update to the round's results. With ``workers`` > 1
that many clients train at once, in threads of this process (torch releases Python's lock in
its kernels; each client then uses ``client_threads`` torch threads, default 1), on the CPU or
on ``device``'s GPU; updates are aggregated in the plan's order, so the weights do not depend on
which client finished first. The rounds themselves are
:class:`~nni_fedexit.federated.rounds.RoundEngine`'s.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from pydantic import Field

from nni_fedexit.components import ComponentParams
from nni_fedexit.data import ImageData
from nni_fedexit.exits import ExitCost, MultiExitNetwork
from nni_fedexit.federated.checkpoint import Checkpoint
from nni_fedexit.federated.client import ClientUpdate, LocalSettings, train_local
from nni_fedexit.federated.client_data import FederatedData
from nni_fedexit.federated.errors import FederatedError
from nni_fedexit.federated.objectives import ClientObjective, MultiExitObjective
from nni_fedexit.federated.rounds import ClientTask, RoundEngine, RunOutcome, tensor_bytes
from nni_fedexit.federated.settings import FederatedSettings

__all__ = ["SimulationBackend", "run_simulation"]

_logger = logging.getLogger(__name__)


class SimulationBackend:
    """In-process clients. Subclass and override :meth:`train_client` to change a client's work."""

    def __init__(self, template: MultiExitNetwork, client_data: Sequence[ImageData], local: LocalSettings,
                 all_exits: bool = True, objective: ClientObjective | None = None,
                 client_states: dict[int, dict[str, torch.Tensor]] | None = None, workers: int = 1):
        #: clients trained at the same time (threads), each in its own copy of the model
        self.workers = max(1, int(workers))
        self.client_model = copy.deepcopy(template)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for model in [self.client_model] + [copy.deepcopy(template) for _ in range(self.workers - 1)]:
            self._free.put(model)
        self.client_data = list(client_data)
        self.local = local
        self.all_exits = all_exits
        self.objective = objective or MultiExitObjective()
        #: each client's objective state across rounds (the round engine checkpoints it)
        self.client_states = client_states if client_states is not None else {}
        #: the round being trained (objectives may look at it)
        self.round = 0

    @contextlib.contextmanager
    def model(self) -> Iterator[MultiExitNetwork]:
        """A client model no other worker is using."""
        model = self._free.get()
        try:
            yield model
        finally:
            self._free.put(model)

    def train_client(self, global_state: Mapping[str, torch.Tensor], task: ClientTask) -> ClientUpdate:
        assert task.client is not None
        with self.model() as model:
            model.load_state_dict(global_state)
            branch = model.branch(task.depth, all_exits=self.all_exits)
            update = train_local(task.client, branch, self.client_data[task.client], self.local, task.lr, task.seed,
                                 self.objective, global_state, self.client_states.get(task.client), self.round)
        if update.client_state:
            self.client_states[task.client] = update.client_state
        return update

    def _attempt(self, global_state: Mapping[str, torch.Tensor], task: ClientTask) -> ClientUpdate | Exception:
        try:
            return self.train_client(global_state, task)
        except Exception as err:  # a client's failure must not end the round
            return err

    def run_round(
        self,
        global_state: Mapping[str, torch.Tensor],
        tasks: Sequence[ClientTask],
        on_update: Callable[[ClientTask, ClientUpdate], None],
        on_failure: Callable[[ClientTask, BaseException], None],
    ) -> None:
        """Run every task (``workers`` at a time); a client that raises is reported to ``on_failure``
        and skipped. Results are handed on in the order of ``tasks``."""
        if self.workers == 1:
            outcomes: Iterator[ClientUpdate | Exception] = (self._attempt(global_state, t) for t in tasks)
            self._hand_on(tasks, outcomes, on_update, on_failure)
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fedexit-client")
        try:
            futures = [pool.submit(self._attempt, global_state, t) for t in tasks]
            self._hand_on(tasks, (f.result() for f in futures), on_update, on_failure)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _hand_on(tasks: Sequence[ClientTask], outcomes: Iterator[ClientUpdate | Exception],
                 on_update: Callable[[ClientTask, ClientUpdate], None],
                 on_failure: Callable[[ClientTask, BaseException], None]) -> None:
        for task, outcome in zip(tasks, outcomes):
            if isinstance(outcome, Exception):
                on_failure(task, outcome)
            else:
                on_update(task, outcome)


class SimulationParams(ComponentParams):
    """The options of backend ``simulation`` (``backend: {name: simulation, workers: 2}``)."""

    workers: int = Field(1, ge=1, description="clients trained at the same time, as threads of this process (each "
                         "with its own copy of the model)")


def run_simulation(
    model: MultiExitNetwork, settings: FederatedSettings, data: FederatedData, costs: Sequence[ExitCost],
    on_record: Callable[[dict[str, Any]], None] | None = None, clients: Callable[..., SimulationBackend] | None = None,
) -> RunOutcome:
    """The rounds of the ``simulation`` backend. ``clients(template, client_data, local_settings,
    all_exits, objective, client_states)`` builds the in-process clients (default :class:`SimulationBackend`)."""
    from nni_fedexit.federated.objectives import make_objective

    s = settings
    ckpt = Checkpoint(s.checkpoint_dir) if s.checkpoint_dir else None
    engine = RoundEngine(model, s, costs, data.val, ckpt, on_record, client_sizes=[len(c) for c in data.clients],
                         server_train=data.server_train, server_labelled=data.server_labelled)
    engine.resume()
    factory = clients or SimulationBackend
    params = s.params("backend")
    workers = params.workers if isinstance(params, SimulationParams) else 1
    backend = factory(model, data.clients, s.local_settings(), s.branch_all_exits, make_objective(s),
                      engine.client_states, **({"workers": workers} if workers > 1 else {}))
    threads = s.client_threads or (1 if workers > 1 else 0)
    with _torch_threads(threads):
        _run_rounds(engine, backend, model, s, ckpt)
    return engine.outcome(data.summary)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the rounds (0: left as they are)."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_rounds(engine: RoundEngine, backend: SimulationBackend, model: MultiExitNetwork, s: FederatedSettings,
                ckpt: Checkpoint | None) -> None:
    def accept(results: Any, task: ClientTask, update: ClientUpdate) -> None:
        results.bytes_sent += tensor_bytes(global_state, [k for k in update.state if k in global_state])
        results.bytes_received += tensor_bytes(update.state)
        results.accept(task, update.state, update.num_samples, update.loss)

    for t in range(engine.done + 1, s.rounds + 1):
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        backend.round = t
        new_state = None
        for attempt in range(s.round_retries + 1):
            plan = engine.plan(t, attempt)
            results = engine.open(plan, global_state)
            backend.run_round(
                global_state, plan.tasks,
                lambda task, update: accept(results, task, update),
                lambda task, err: results.fail(task, f"{type(err).__name__}: {err}"),
            )
            new_state = engine.close(results)
            if new_state is not None:
                break
            _logger.warning("Round %d: only %d of %d client updates accepted (min_clients=%d)%s", t, results.accepted,
                            len(plan.tasks), s.min_clients, "; retrying" if attempt < s.round_retries else "")
        if new_state is None:
            raise FederatedError(
                f"round {t}: only {results.accepted} client updates were accepted after {s.round_retries + 1} "
                f"attempts, fewer than min_clients={s.min_clients}. Rounds 1..{t - 1} are kept"
                + (f" in {ckpt.folder}; rerun to resume" if ckpt else "")
                + "; lower min_clients or check the failing clients in the log."
            )
        engine.finish(results, new_state)


run_simulation.Params = SimulationParams  # type: ignore[attr-defined]
