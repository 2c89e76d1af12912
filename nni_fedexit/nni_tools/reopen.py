"""Open the NNI experiments of a run again: ``nni-fedexit view`` and ``nni-fedexit resume``.

NNI 3.0's ``nnictl view ID`` (and the deprecated ``NasExperiment.view(ID)``) fail for NAS
experiments ("`search_space` field can not be customized in NAS experiment"): they rebuild the
experiment from the HPO config in NNI's database. A NAS experiment keeps its own config in
``<working dir>/<id>/checkpoint/config.json``; loading that and viewing through
``NasExperiment(..., config=config, id=ID).view()`` serves the finished or stopped experiment
again (status VIEWED; trials, metrics and logs from its database). That is the whole workaround:
NNI's files are not touched.

A run directory may come from someone else (a shared disk, a download), so config.json is read
as plain JSON (:func:`read_nas_config`), never with ``nni.load``: NNI's decoder unpickles an
``__nni_obj__`` entry and imports what ``__nni_type__`` names, i.e. runs the file author's code.
A config NNI writes for a NAS experiment holds plain values only; a file with an encoded object is
refused (ReopenError naming the file and the key), and the values that would say what to run or
where are derived here (trial command and code directory: NNI's defaults for this Python and
directory; working directory: where the file lies). Viewing goes through the same reader
(:func:`plain_json_checkpoint_config`).

A run's experiments are found from its run directory (each stage writes its experiment id to
``<stage>/experiment.json``) or by id through NNI's experiment manifest (what ``nnictl
experiment list`` reads), whose ``logDir`` is the experiment's working directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nni_fedexit.files import read_json
from nni_fedexit.nni_compat import import_nni

__all__ = ["ExperimentRef", "ReopenError", "check_own_run", "experiment_manifest", "find_experiment", "plain_json_checkpoint_config", "read_nas_config",
           "run_experiments", "view_experiment"]

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
        """The experiment's own config: a NasExperimentConfig, or None for a classic experiment
        (no checkpoint/config.json). Read as plain JSON: see :func:`read_nas_config`."""
        return read_nas_config(self.folder / "checkpoint" / "config.json")

    def has_web_ui(self) -> bool:
        """False for experiments on NNI's sequential engine (a one-shot search: no trials, no server)."""
        config = self.config()
        return config is None or getattr(config.execution_engine, "name", "") != "sequential"

    @property
    def run_dir(self) -> Path | None:
        """The nni-fedexit run directory the experiment belongs to (``<run>/nni-experiments/<id>``)."""
        run = self.working_dir.parent
        return run if (run / "config.yaml").is_file() and self.working_dir.name == "nni-experiments" else None


#: config fields whose value is derived here, not taken from the file (keys compared as NNI's
#: config classes do: case and underscores ignored): what a trial runs, in which directory, and
#: where the experiment lives
_DERIVED_FIELDS = {"trialcommand", "trialcommandparams", "trialcodedirectory", "experimentworkingdirectory"}


def read_nas_config(path: Path) -> Any:
    """A NAS experiment's ``<working dir>/<id>/checkpoint/config.json`` as a NasExperimentConfig
    built from plain JSON values, or None when there is no such file.

    Never decodes objects: an entry NNI's or json-tricks' decoder would turn into an object (any
    key ``__...``: ``__nni_obj__`` is a cloudpickle, ``__nni_type__`` an import) makes it a
    ReopenError that names the file and the key; so does a damaged or non-JSON file, or one that
    is not a NAS experiment's config. The trial command and code directory are NNI's defaults here
    (this Python, the current directory), the working directory the one that holds the file.
    """
    import_nni()
    from nni.nas.experiment.config import NasExperimentConfig

    path = Path(path)
    if not path.is_file():
        return None
    what = ("restore it from a copy of the run directory; NNI cannot view or resume experiment "
            f"{path.parent.parent.name} without it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        encoded = _encoded_key(data)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ReopenError(f"{path} is not a readable JSON file ({type(err).__name__}: {err}): NNI's checkpoint config "
                          f"of the experiment is damaged; {what}") from None
    if not isinstance(data, dict) or data.get("experimentType") != "nas":
        raise ReopenError(f"{path} is not the config of an NNI NAS experiment (a JSON object with \"experimentType\": "
                          f"\"nas\"); {what}")
    if encoded is not None:
        raise ReopenError(
            f"{path} holds an encoded object at {encoded!r}: decoding it (what nni.load does) would run code from the "
            "file. A config.json that NNI writes holds plain values only, so nni-fedexit does not open this one: open "
            "only run directories you trust"
        )
    plain = {k: v for k, v in data.items() if _field(k) not in _DERIVED_FIELDS}
    service = plain.get("trainingService")
    if isinstance(service, dict):
        plain["trainingService"] = {k: v for k, v in service.items() if _field(k) not in _DERIVED_FIELDS}
    try:
        config = NasExperimentConfig(**plain)
    except (TypeError, ValueError, AttributeError, AssertionError, KeyError) as err:
        raise ReopenError(f"{path} is not a config NNI 3.0 can load ({type(err).__name__}: {err}); {what}") from None
    config.experiment_working_directory = str(path.absolute().parent.parent.parent)  # the run directory may have moved
    return config


def _field(key: str) -> str:
    return key.replace("_", "").lower()


def _encoded_key(value: Any, where: str = "") -> str | None:
    """The first key (as a dotted path) that marks an encoded object for NNI's decoder or
    json-tricks' hooks (all start with ``__``), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if str(key).startswith("__"):
                return here
            found = _encoded_key(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _encoded_key(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def plain_json_checkpoint_config() -> None:
    """Make ``NasExperiment.load_checkpoint`` read ``checkpoint/config.json`` as plain JSON.

    NNI reads it with ``nni.load``, whose decoder unpickles (cloudpickle) any ``__nni_obj__``
    entry and imports what ``__nni_type__`` names: a config.json someone else wrote runs their
    code in ``view`` and ``resume``. A config NNI writes holds plain values only; this reads it
    with :func:`read_nas_config` (refuses encoded objects with a
    ReopenError) and otherwise does what NNI's method does: compare it with the current config
    (log only) and, once the engine exists, load the strategy's state (NNI's torch serializer;
    torch's ``weights_only`` default applies). Idempotent.
    """
    import_nni()
    from nni.nas.experiment import NasExperiment

    original = NasExperiment.load_checkpoint
    if getattr(original, "plain_json_config", False):
        return

    def load_checkpoint(self: NasExperiment) -> None:
        from nni.experiment.config.utils import diff
        from nni.nas.utils.serializer import get_default_serializer

        path = self._checkpoint_directory / "config.json"
        config = read_nas_config(path)
        if config is None:
            raise ReopenError(f"{path} is missing: NNI saved no checkpoint for experiment {self.id}")
        log = logging.getLogger("nni.nas.experiment.experiment")
        config_diff = diff(self.config, config, "Current", "Loaded")
        if config_diff:
            log.error("Config is found but does not match the current config:\n%s", config_diff)
            log.error("NAS experiment loading will probably fail for inconsistent config. "
                      "The experiment now continues with the new config.")
        if self._engine is not None:
            ckpt_path = self._checkpoint_directory / "state.ckpt"
            try:
                self.load_state_dict(get_default_serializer().load(ckpt_path))
            except FileNotFoundError:
                log.warning("Checkpoint file %s does not exist. Skip loading.", ckpt_path)

    load_checkpoint.__wrapped__ = original  # type: ignore[attr-defined]
    load_checkpoint.plain_json_config = True  # type: ignore[attr-defined]
    NasExperiment.load_checkpoint = load_checkpoint  # type: ignore[method-assign]


def run_experiments(run_dir: str | Path) -> dict[str, ExperimentRef]:
    """The NNI experiments of a run directory, by stage (only stages that started one)."""
    run = Path(run_dir).resolve()
    out: dict[str, ExperimentRef] = {}
    for stage, record in STAGE_RECORDS.items():
        for path in (run / record, run / _FINISHED_RECORDS[stage]):
            exp_id = _experiment_id(path)
            if exp_id:
                out[stage] = ExperimentRef(exp_id, run / "nni-experiments", stage)
                break
    return out


def _experiment_id(path: Path) -> str | None:
    """The ``experiment_id`` a stage record names (None without the file or the key); a damaged
    record is a ReopenError naming it."""
    if not path.is_file():
        return None
    data = read_json(path, ReopenError, "it names the stage's NNI experiment; restore it from a copy of the run "
                                        "directory, or give the experiment id instead")
    exp_id = data.get("experiment_id") if isinstance(data, dict) else None
    if exp_id is not None and (not isinstance(exp_id, str) or not exp_id.isalnum()):
        raise ReopenError(f"{path}: 'experiment_id' must be an NNI experiment id (letters and digits), got {exp_id!r}")
    return exp_id


def check_own_run(run_dir: str | Path) -> None:
    """Refuse to resume a run directory another user owns, or others may write to.

    Resuming re-runs the unfinished trials with the parameters in the experiment's NNI database,
    which NNI's trials unpickle: whoever could write the run directory could run code as you. A
    run directory you own and others cannot write is trusted (see docs/security.md; a copy you
    downloaded is yours: resume only what you trust); viewing any run is safe.
    """
    import stat

    run = Path(run_dir).resolve()
    me = os.getuid()
    for path in (run, run / "nni-experiments", *run.glob("nni-experiments/*"), *run.glob("nni-experiments/*/db")):
        try:
            info = path.stat()
        except OSError:
            continue
        if info.st_uid != me or info.st_mode & stat.S_IWOTH:
            owner = "another user" if info.st_uid != me else "writable by others"
            raise ReopenError(
                f"{path} is {owner}: resuming re-runs trials from its NNI database, which would run code of whoever "
                "wrote it. Resume only run directories you own and others cannot write (chmod o-w); `nni-fedexit "
                "view` opens any run safely"
            )


def experiment_manifest() -> dict[str, dict[str, Any]]:
    """NNI's experiment manifest (what ``nnictl experiment list --all`` reads), by experiment id."""
    import_nni()
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
    config = ref.config()  # plain JSON; its trial code directory is the current one, as NNI requires
    if config is not None and getattr(config.execution_engine, "name", "") == "sequential":
        raise ReopenError(
            f"experiment {ref.id} ran on NNI's sequential engine (a one-shot search started from Python, or a run's "
            "shared search from before nni-fedexit ran it as a trial): it has no "
            "trials and no web UI to open. Its results are in the run's search/history.json and report.md; "
            "search in trials mode (search.strategy: size_aware_pg_trials) for one web UI trial per network"
        )
    _check_port(port)
    import_nni()
    if config is None:  # a classic (HPO) experiment: NNI's own view works
        from nni.experiment import Experiment

        exp = Experiment(None, id=ref.id)
    else:
        from nni.nas.experiment import NasExperiment

        plain_json_checkpoint_config()  # NNI's view reads config.json again: not with nni.load
        exp = NasExperiment(None, None, None, config=config, id=ref.id)
    if ref.id not in experiment_manifest():
        raise ReopenError(f"experiment {ref.id} is not in NNI's experiment manifest (`nnictl experiment list --all`)")
    exp.view(port=port, non_blocking=True)
    return exp


def _check_port(port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            raise ReopenError(f"port {port} is in use: pass another one with --port") from None
