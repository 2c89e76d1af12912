"""S5 client objectives, by name (``federated.objective``).

base.py        the ClientObjective interface, its context and registry
multi_exit.py  ``multi_exit``: the weighted sum of the exits' cross-entropies (claim 6), with
               optional self-distillation between the exits (DepthFL)
regularised.py ``fedprox`` and ``feddyn``: the same loss plus a drift-limiting term
label_skew.py  ``logit_adjusted``: the same loss on logits shifted by the client's label prior (FedLC)
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.federated.objectives.base import (
        ClientObjective, ObjectiveContext, make_objective, objective_names, register_objective,
    )
    from nni_fedexit.federated.objectives.multi_exit import MultiExitObjective, self_distillation
    from nni_fedexit.federated.objectives.regularised import FedDynObjective, FedProxObjective
    from nni_fedexit.federated.objectives.label_skew import LogitAdjusted, label_prior_shift

__all__ = ["ClientObjective", "FedDynObjective", "FedProxObjective", "LogitAdjusted", "MultiExitObjective",
           "ObjectiveContext", "label_prior_shift", "make_objective", "objective_names", "register_objective",
           "self_distillation"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
