"""S3: the size-aware policy-gradient search (LSTM controller, REINFORCE, claims 3 and 4).

controller.py  the LSTM controller and its REINFORCE learner (PolicyGradient)
controller_settings.py  ControllerSettings and RewardBatch (plain Python: the nnictl tuner builds them quickly)
decisions.py   how each kind of NNI label becomes controller steps
reward.py      R(h) = Acc(h) * (p_h / P) ** (-1 / beta), MnasNet's target form, the other forms
profiler.py    ParamsProfiler: p_h of a sample of any NNI model space
cost.py        what a sample costs (params, MACs, expected early-exit MACs), counted without building
strategy.py    SizeAwarePolicyGradient: an NNI strategy (what both modes share; mode=... builds the mode's class)
shared_strategy.py  ``shared`` mode (ENAS, the default); enas_module.py its Lightning training loop
trials_strategy.py  ``trials`` mode: one NNI trial per sampled network
labelled.py    what the web UI shows of a trial (its architecture); FixedArchitecture (one given network)
tuner.py       SizeAwarePGTuner: the same search as a classic NNI tuner for nnictl
trial.py       the trial of the ``trials`` mode: train a sampled network, report accuracy and size
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.search.controller import ControllerSettings, LSTMController, PolicyGradient
    from nni_fedexit.search.reward import (
        DEFAULT_BETA, HardBudgetReward, LinearPenaltyReward, Reward, SizeAwareReward, SizeTarget,
        TargetReward, hard_budget_reward, linear_penalty_reward, parse_metric, size_aware_reward, target_reward,
    )
    from nni_fedexit.search.profiler import ParamsProfiler
    from nni_fedexit.search.cost import CostModel
    from nni_fedexit.search.strategy import SizeAwarePolicyGradient
    from nni_fedexit.search.shared_strategy import SharedSizeAwarePolicyGradient
    from nni_fedexit.search.trials_strategy import TrialsSizeAwarePolicyGradient
    from nni_fedexit.search.labelled import FixedArchitecture
    from nni_fedexit.search.tuner import SizeAwarePGTuner, TunerSettings

__all__ = ["ControllerSettings", "LSTMController", "PolicyGradient", "DEFAULT_BETA", "HardBudgetReward",
           "LinearPenaltyReward", "ParamsProfiler", "Reward", "SizeAwareReward", "hard_budget_reward",
           "linear_penalty_reward", "parse_metric", "size_aware_reward", "SizeTarget", "TargetReward", "target_reward",
           "CostModel", "FixedArchitecture",
           "SizeAwarePolicyGradient", "SharedSizeAwarePolicyGradient", "TrialsSizeAwarePolicyGradient",
           "SizeAwarePGTuner", "TunerSettings"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
