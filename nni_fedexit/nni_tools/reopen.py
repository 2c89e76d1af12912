"""Open the NNI experiments of a run again: ``nni-fedexit view`` and ``nni-fedexit resume``.

NNI 3.0's ``nnictl view ID`` (and the deprecated ``NasExperiment.view(ID)``) fail for NAS
experiments ("`search_space` field can not be customized in NAS experiment"): they rebuild the
experiment from the HPO config in NNI's database. A NAS experiment keeps its own config in
``<working dir>/<id>/checkpoint/config.json``; loading that and viewing through
``NasExperiment(..., config=config, id=ID).view()`` serves the finished or stopped experiment
again (status VIEWED; trials, metrics and logs from its database). That is the whole workaround:
NNI's files are not touched.

A run's experiments are found from its run directory (each stage writes its experiment id to
``<stage>/experiment.json``) or by id through NNI's experiment manifest (what ``nnictl
experiment list`` reads), whose ``logDir`` is the experiment's working directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nni_fedexit.nni_tools import compat  # noqa: F401

__all__ = ["ExperimentRef", "ReopenError", "experiment_manifest", "find_experiment", "run_experiments", "view_experiment"]

#: the stages of a run that are NNI experiments, and the file that names each one's id
STAGE_RECORDS = {"search": "search/experiment.json", "federate": "federated/experiment.json"}
#: what finished stages also record (runs written before experiment.json existed)
_FINISHED_RECORDS = {"search": "search/architecture.json", "federate": "federated/metrics.json"}


class ReopenError(RuntimeError):
    """The experiment or run cannot be found or opened; the message says what to give instead."""


@dataclass
class ExperimentRef:
    """One NNI experiment on disk: its id and the working directory that holds ``<id>/``."""

    id: str
    working_dir: Path
    #: the run stage it belongs to (``search`` / ``federate``), None when not part of a run
    stage: str | None = None

    @property
    def folder(self) -> Path:
        return self.working_dir / self.id

    def config(self) -> Any:
        """The experiment's own config: a NasExperimentConfig, or None for a classic experiment."""
        import nni
        from nni.nas.experiment.config import NasExperimentConfig

        path = self.folder / "checkpoint" / "config.json"
        if not path.is_file():
            return None
        with path.open() as f:
            config = NasExperimentConfig(**nni.load(fp=f))
        config.experiment_working_directory = str(self.working_dir)  # the run directory may have moved
        return config

    def has_web_ui(self) -> bool:
        """False for experiments on NNI's sequential engine (a one-shot search: no trials, no server)."""
        config = self.config()
        return config is None or getattr(config.execution_engine, "name", "") != "sequential"

    @property
    def run_dir(self) -> Path | None:
        """The nni-fedexit run directory the experiment belongs to (``<run>/nni-experiments/<id>``)."""
        run = self.working_dir.parent
        return run if (run / "config.yaml").is_file() and self.working_dir.name == "nni-experiments" else None


def run_experiments(run_dir: str | Path) -> dict[str, ExperimentRef]:
    """The NNI experiments of a run directory, by stage (only stages that started one)."""
    run = Path(run_dir).resolve()
    out: dict[str, ExperimentRef] = {}
    for stage, record in STAGE_RECORDS.items():
        for path in (run / record, run / _FINISHED_RECORDS[stage]):
            exp_id = json.loads(path.read_text()).get("experiment_id") if path.is_file() else None
            if exp_id:
                out[stage] = ExperimentRef(exp_id, run / "nni-experiments", stage)
                break
    return out


def experiment_manifest() -> dict[str, dict[str, Any]]:
    """NNI's experiment manifest (what ``nnictl experiment list --all`` reads), by experiment id."""
    from nni.tools.nnictl.config_utils import Experiments

    return Experiments().get_all_experiments()


def find_experiment(target: str, stage: str | None = None) -> ExperimentRef:
    """The experiment ``target`` names: a run directory (with ``stage``, default the last one
    that started an experiment) or an experiment id known to NNI's manifest."""
    path = Path(target)
    if path.is_dir():
        found = run_experiments(path)
        if not found:
            raise ReopenError(f"{target} holds no NNI experiment of nni-fedexit (no {' or '.join(STAGE_RECORDS.values())})")
        if stage is None:
            stage = "federate" if "federate" in found else "search"
        if stage not in found:
            raise ReopenError(f"{target}: the {stage} stage has not started an experiment; stages with one: {sorted(found)}")
        return found[stage]
    if stage is not None:
        raise ReopenError(f"--stage needs a run directory, got the experiment id {target!r}")
    entry = experiment_manifest().get(target)
    if entry is None:
        raise ReopenError(f"{target!r} is neither a run directory nor an experiment id that `nnictl experiment list "
                          "--all` knows")
    ref = ExperimentRef(target, Path(entry["logDir"]))
    if ref.run_dir is not None:
        for st, other in run_experiments(ref.run_dir).items():
            if other.id == ref.id:
                ref.stage = st
    return ref


def view_experiment(ref: ExperimentRef, port: int) -> Any:
    """Serve a finished or stopped experiment again (web UI and REST API, status VIEWED); returns
    the experiment (``.stop()`` ends it). NAS experiments go through their own config."""
    if not ref.folder.is_dir():
        raise ReopenError(f"experiment {ref.id}: its folder {ref.folder} is gone")
    if not ref.has_web_ui():
        raise ReopenError(
            f"experiment {ref.id} ran on NNI's sequential engine (a one-shot search in shared mode): it has no "
            "trials and no web UI to open. Its results are in the run's search/history.json and report.md; "
            "search in trials mode (search.strategy: size_aware_pg_trials) for one web UI trial per network"
        )
    _check_port(port)
    config = ref.config()
    if config is None:  # a classic (HPO) experiment: NNI's own view works
        from nni.experiment import Experiment

        exp = Experiment(None, id=ref.id)
    else:
        from nni.nas.experiment import NasExperiment

        exp = NasExperiment(None, None, None, config=config, id=ref.id)
    if ref.id not in experiment_manifest():
        raise ReopenError(f"experiment {ref.id} is not in NNI's experiment manifest (`nnictl experiment list --all`)")
    # NNI checks that a NAS experiment's trial code directory is the current directory
    code_dir = Path(getattr(config, "trial_code_directory", None) or ".")
    here = Path.cwd()
    if config is not None and not code_dir.is_dir():
        config.trial_code_directory = str(here)
        config.training_service.trial_code_directory = str(here)
    os.chdir(code_dir if code_dir.is_dir() else here)
    try:
        exp.view(port=port, non_blocking=True)
    finally:
        os.chdir(here)
    return exp


def _check_port(port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            raise ReopenError(f"port {port} is in use: pass another one with --port") from None
