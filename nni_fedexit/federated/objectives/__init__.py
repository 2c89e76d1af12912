"""S5 client objectives, by name (``federated.objective``).

base.py        the ClientObjective interface, its context and registry
multi_exit.py  ``multi_exit``: the weighted sum of the exits' cross-entropies (claim 6)
"""

from nni_fedexit.federated.objectives.base import (
    ClientObjective, ObjectiveContext, make_objective, objective_names, register_objective,
)
from nni_fedexit.federated.objectives.multi_exit import MultiExitObjective

__all__ = ["ClientObjective", "MultiExitObjective", "ObjectiveContext", "make_objective", "objective_names",
           "register_objective"]
