"""nni-fedexit: cloud-edge collaborative training as an NNI plugin.

S1 ResNetBlockPoolSpace (block pools cropped from timm ResNets), S2 data roles and client
partitions, S3 SizeAwarePolicyGradient (LSTM controller, REINFORCE, size-aware reward), S4
MultiExitNetwork (exits after every stage, branch models, early exits), S5 FederatedEvaluator
(depth-aware federated averaging over edge clients, simulated in-process or real Flower
SuperNodes). SizeAwarePGTuner is the S3 search as a classic NNI tuner for nnictl experiments.

One subpackage per step: space (S1), data (S2), search (S3), exits (S4), federated (S5); job is
the main job (config, pipeline, report, CLI), nni_tools the NNI tooling (web UI, view/resume, nnictl trial), nni_compat NNI 3.0's workarounds.
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.data import DataBundle, DataError, ImageData, load_dataset, partition, split_roles
    from nni_fedexit.space import ResNetBlockPoolSpace, SpaceSpec, SpecError, load_space_spec
    from nni_fedexit.search import (
        ControllerSettings, HardBudgetReward, LinearPenaltyReward, PolicyGradient, SizeAwarePGTuner, SizeAwarePolicyGradient,
        SizeAwareReward, size_aware_reward,
    )
    from nni_fedexit.exits import BranchModel, MultiExitNetwork, calibrate, multi_exit_loss
    from nni_fedexit.federated import FederatedEvaluator, FederatedSettings, aggregate

__version__ = "0.1.0"

__all__ = [
    "FederatedEvaluator",
    "FederatedSettings",
    "aggregate",
    "BranchModel",
    "MultiExitNetwork",
    "calibrate",
    "multi_exit_loss",
    "ControllerSettings",
    "HardBudgetReward",
    "LinearPenaltyReward",
    "PolicyGradient",
    "SizeAwarePolicyGradient",
    "SizeAwarePGTuner",
    "SizeAwareReward",
    "size_aware_reward",
    "DataBundle",
    "DataError",
    "ImageData",
    "ResNetBlockPoolSpace",
    "SpaceSpec",
    "SpecError",
    "load_dataset",
    "load_space_spec",
    "partition",
    "split_roles",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
