"""S5 aggregation rules, by name (``federated.aggregator``).

base.py    the Aggregator interface and its registry
fedavg.py      ``fedavg``: the depth-aware sample-weighted mean (the patent's aggregation)
server_opt.py  ``fedavgm``, ``fedadam``, ``fedyogi``: a server optimiser stepping on that mean
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.federated.aggregators.base import (
        Aggregator, RoundAggregate, aggregator_names, make_aggregator, register_aggregator,
    )
    from nni_fedexit.federated.aggregators.fedavg import FedAvg, WeightedMean, aggregate, check_update
    from nni_fedexit.federated.aggregators.server_opt import FedAdam, FedAvgM, FedYogi, ServerOptimizer

__all__ = ["Aggregator", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "RoundAggregate", "ServerOptimizer", "WeightedMean", "aggregate", "aggregator_names", "check_update",
           "make_aggregator", "register_aggregator"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
