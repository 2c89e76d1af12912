"""S3: the size-aware policy-gradient search (LSTM controller, REINFORCE, claims 3 and 4).

controller.py  the LSTM controller and its REINFORCE learner (PolicyGradient)
reward.py      R(h) = Acc(h) * (p_h / P) ** (-1 / beta), MnasNet's target form, the other forms, the parameter profiler
cost.py        what a sample costs (params, MACs, expected early-exit MACs), counted without building
strategy.py    SizeAwarePolicyGradient: an NNI strategy, ``shared`` (ENAS) or ``trials`` mode
tuner.py       SizeAwarePGTuner: the same search as a classic NNI tuner for nnictl
trial.py       the trial of the ``trials`` mode: train a sampled network, report accuracy and size
"""

from nni_fedexit.search.controller import ControllerSettings, LSTMController, PolicyGradient
from nni_fedexit.search.reward import (
    DEFAULT_BETA, HardBudgetReward, LinearPenaltyReward, ParamsProfiler, Reward, SizeAwareReward, SizeTarget,
    TargetReward, hard_budget_reward, linear_penalty_reward, parse_metric, size_aware_reward, target_reward,
)
from nni_fedexit.search.cost import CostModel
from nni_fedexit.search.strategy import FixedArchitecture, SizeAwarePolicyGradient
from nni_fedexit.search.tuner import SizeAwarePGTuner, TunerSettings

__all__ = ["ControllerSettings", "LSTMController", "PolicyGradient", "DEFAULT_BETA", "HardBudgetReward",
           "LinearPenaltyReward", "ParamsProfiler", "Reward", "SizeAwareReward", "hard_budget_reward",
           "linear_penalty_reward", "parse_metric", "size_aware_reward", "SizeTarget", "TargetReward", "target_reward",
           "CostModel", "FixedArchitecture",
           "SizeAwarePolicyGradient", "SizeAwarePGTuner", "TunerSettings"]
