"""S4: the exit-point model: an exit after every stage, branch models, early-exit inference.

network.py     MultiExitNetwork, BranchModel, the multi-exit loss, exit costs, calibration, export
thresholds.py  per-exit thresholds and the held-out margin that keeps an accuracy target on unseen images
"""

from nni_fedexit.exits.network import (
    EXIT_HEADS, PREDICTIONS, BranchModel, CalibrationResult, ExitCost, MultiExitNetwork, calibrate, confidence,
    early_exit_metrics, early_exit_predict, ensemble_accuracy, ensemble_logits, exit_accuracies, exit_costs, exit_outputs, exit_path_macs, expected_exit_macs, export_branches,
    multi_exit_loss, threshold_curve,
)

__all__ = ["EXIT_HEADS", "PREDICTIONS", "BranchModel", "CalibrationResult", "ExitCost", "MultiExitNetwork", "calibrate", "confidence",
           "early_exit_metrics", "early_exit_predict", "ensemble_accuracy", "ensemble_logits", "exit_accuracies", "exit_costs", "exit_outputs", "exit_path_macs", "expected_exit_macs",
           "export_branches", "multi_exit_loss", "threshold_curve"]
