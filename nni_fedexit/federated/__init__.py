"""S5: federated training of the exit-point model on edge clients.

settings.py     FederatedSettings: every setting of a run, checked once
client_data.py  FederatedData: the server's validation split, the test set, the clients' partitions
assign.py       client selection and branch assignment (random, capability)
client.py       one client's local training (every backend)
depthwise.py    depth-wise training: the segments a client trains within its branch's memory
server_pass.py  the server's own training steps on its labelled split after each aggregation
rounds.py       the round engine every backend uses: plan, collect replies, aggregate, validate,
                keep the best round, checkpoint
aggregators/    server aggregation rules by name: fedavg (depth-aware weighted mean)
objectives/     client objectives by name: multi_exit (claim 6's weighted loss), logit_adjusted (the
                same on logits shifted by the client's label prior), fedprox, feddyn
checkpoint.py   state.json and the safetensors weights it names
backends/       where clients train, by name: simulation (in-process), flower (SuperLink/SuperNodes)
evaluator.py    FederatedEvaluator (an NNI evaluator) and federate()
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.federated.errors import FederatedError, UpdateRejected
    from nni_fedexit.federated.settings import FederatedSettings
    from nni_fedexit.federated.assign import (
        DEFAULT_PROFILE_MIX, ClientProfile, assign_branches, client_profiles, select_clients,
    )
    from nni_fedexit.federated.aggregators import (
        Aggregator, FedAvg, RoundAggregate, WeightedMean, aggregate, check_update, register_aggregator,
    )
    from nni_fedexit.federated.objectives import ClientObjective, MultiExitObjective, ObjectiveContext, register_objective
    from nni_fedexit.federated.client import ClientUpdate, LocalSettings, train_local
    from nni_fedexit.federated.client_data import FederatedData
    from nni_fedexit.federated.checkpoint import Checkpoint
    from nni_fedexit.federated.rounds import ClientTask, RoundEngine, RoundResults, RunOutcome, stable_seed, validate
    from nni_fedexit.federated.backends import register_backend
    from nni_fedexit.federated.backends.simulation import SimulationBackend
    from nni_fedexit.federated.evaluator import FederatedEvaluator, FederatedResult, federate

__all__ = [
    "Aggregator", "Checkpoint", "ClientObjective", "ClientProfile", "ClientTask", "ClientUpdate", "DEFAULT_PROFILE_MIX",
    "FedAvg", "FederatedData", "FederatedError", "FederatedEvaluator", "FederatedResult", "FederatedSettings",
    "LocalSettings", "MultiExitObjective", "ObjectiveContext", "RoundAggregate", "RoundEngine", "RoundResults",
    "RunOutcome", "SimulationBackend", "UpdateRejected", "WeightedMean", "aggregate", "assign_branches",
    "check_update", "client_profiles", "federate", "register_aggregator", "register_backend", "register_objective",
    "select_clients", "stable_seed", "train_local", "validate",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
