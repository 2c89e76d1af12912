"""Running a real NNI experiment in a test: a free port, the local training service, the REST API."""

import json
import socket
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trials_experiment(space, evaluator, strategy, work_dir, trials: int, concurrency: int = 2):
    """Run a NasExperiment on the local training service; returns (trial jobs, metric data, top model)."""
    from nni.nas.experiment import NasExperiment

    exp = NasExperiment(space, evaluator, strategy)
    exp.config.max_trial_number = trials
    exp.config.trial_concurrency = concurrency
    exp.config.training_service.use_active_gpu = False
    exp.config.experiment_working_directory = str(work_dir)
    port = free_port()
    try:
        exp.run(port=port)
        api = f"http://127.0.0.1:{port}/api/v1/nni"
        jobs = json.load(urllib.request.urlopen(f"{api}/trial-jobs", timeout=10))
        metrics = json.load(urllib.request.urlopen(f"{api}/metric-data", timeout=10))
        exported = exp.export_top_models(formatter="dict")
    finally:
        exp.stop()
    return jobs, metrics, exported
