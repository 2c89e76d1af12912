"""S4: the exit-point model: an exit after every stage, branch models, early-exit inference.

network.py     MultiExitNetwork, BranchModel, the multi-exit loss
costs.py       parameters and MACs of each exit's path; the expected MACs of early exits
calibration.py early-exit inference, per-exit metrics, and the thresholds calibrate() chooses
export.py      every branch model to TorchScript and ONNX, checked against PyTorch
thresholds.py  per-exit thresholds and the held-out margin that keeps an accuracy target on unseen images
runtime.py     early-exit inference on exported segments (ONNX Runtime, TorchScript) and its latency
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.exits.network import EXIT_HEADS, PREDICTIONS, BranchModel, MultiExitNetwork, multi_exit_loss
    from nni_fedexit.exits.costs import ExitCost, exit_costs, exit_path_macs, expected_exit_macs
    from nni_fedexit.exits.calibration import (
        CalibrationResult, calibrate, early_exit_metrics, early_exit_predict, ensemble_accuracy, ensemble_logits,
        exit_accuracies, exit_outputs, exit_scores, threshold_curve,
    )
    from nni_fedexit.exits.export import export_branches, onnx_available
    from nni_fedexit.exits.runtime import EarlyExitRuntime, LatencySettings, export_early_exit, measure_latency
    from nni_fedexit.exits.thresholds import (
        CRITERIA, RULES, CertifiedThresholds, ExitScores, ThresholdSetting, certified_thresholds, confidence,
        per_exit_thresholds, shared_thresholds,
    )

__all__ = ["CRITERIA", "EXIT_HEADS", "PREDICTIONS", "RULES", "BranchModel", "CalibrationResult", "CertifiedThresholds",
           "EarlyExitRuntime", "ExitCost", "ExitScores", "LatencySettings", "MultiExitNetwork", "ThresholdSetting",
           "calibrate", "certified_thresholds", "confidence", "early_exit_metrics", "early_exit_predict",
           "ensemble_accuracy", "ensemble_logits", "exit_accuracies", "exit_costs", "exit_outputs", "exit_path_macs",
           "exit_scores", "expected_exit_macs", "export_branches", "export_early_exit", "measure_latency",
           "multi_exit_loss", "onnx_available", "per_exit_thresholds", "shared_thresholds", "threshold_curve"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
