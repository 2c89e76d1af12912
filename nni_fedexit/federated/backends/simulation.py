"""S5: the ``simulation`` backend: edge clients trained in-process, one after another.

Memory holds the global model and one client model: each client's turn loads the global weights
into that one model, trains the branch it was given on its partition (data loaded once, at the
start), and hands the update to the server's aggregator before the next client starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from nni_fedexit.data import ImageData
from nni_fedexit.exits import MultiExitNetwork
from nni_fedexit.federated.client import ClientUpdate, LocalSettings, train_local

__all__ = ["ClientTask", "SimulationBackend"]


@dataclass(frozen=True)
class ClientTask:
    """One client's job in one round."""

    client: int
    depth: int
    lr: float
    seed: int


class SimulationBackend:
    """In-process clients. Subclass and override :meth:`train_client` to change a client's work."""

    name = "simulation"

    def __init__(self, template: MultiExitNetwork, client_data: Sequence[ImageData], local: LocalSettings,
                 all_exits: bool = True):
        self.client_model = copy.deepcopy(template)
        self.client_data = list(client_data)
        self.local = local
        self.all_exits = all_exits

    def train_client(self, global_state: Mapping[str, torch.Tensor], task: ClientTask) -> ClientUpdate:
        self.client_model.load_state_dict(global_state)
        branch = self.client_model.branch(task.depth, all_exits=self.all_exits)
        return train_local(task.client, branch, self.client_data[task.client], self.local, task.lr, task.seed)

    def run_round(
        self,
        global_state: Mapping[str, torch.Tensor],
        tasks: Sequence[ClientTask],
        on_update: Callable[[ClientTask, ClientUpdate], None],
        on_failure: Callable[[ClientTask, BaseException], None],
    ) -> None:
        """Run every task; a client that raises is reported to ``on_failure`` and skipped."""
        for task in tasks:
            try:
                update = self.train_client(global_state, task)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a client's failure must not end the round
                on_failure(task, err)
                continue
            on_update(task, update)
