"""S5: federated training of the exit-point model on edge clients.

aggregate.py   depth-aware weighted mean (pure; used by every backend)
assign.py      client selection and branch assignment (random, capability)
local.py       one client's local training
simulation.py  in-process clients (the default backend)
evaluator.py   FederatedEvaluator: rounds, validation, best round, checkpoints, NNI reports
"""

from nni_fedexit.federated.aggregators.fedavg import UpdateRejected, WeightedMean, aggregate, check_update
from nni_fedexit.federated.assign import DEFAULT_PROFILE_MIX, ClientProfile, assign_branches, client_profiles, select_clients
from nni_fedexit.federated.evaluator import FederatedData, FederatedError, FederatedEvaluator, FederatedResult, FederatedSettings, federate, validate
from nni_fedexit.federated.client import ClientUpdate, LocalSettings, train_local
from nni_fedexit.federated.backends.simulation import ClientTask, SimulationBackend

__all__ = [
    "ClientProfile", "ClientTask", "ClientUpdate", "DEFAULT_PROFILE_MIX", "FederatedData", "FederatedError",
    "FederatedEvaluator", "FederatedResult", "FederatedSettings", "LocalSettings", "SimulationBackend",
    "UpdateRejected", "WeightedMean", "aggregate", "assign_branches", "check_update", "client_profiles",
    "federate", "select_clients", "train_local", "validate",
]
