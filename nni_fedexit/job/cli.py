"""The ``nni-fedexit`` command line: argument handling and calls, nothing else."""

from __future__ import annotations

import functools
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import click

#: what bad input, a damaged run directory or a run that cannot go on raise (the message says what to
#: do), by module: ``nni-fedexit --help`` imports none of them (their modules load torch and NNI)
_USER_ERRORS = {
    "nni_fedexit.job.config": "ConfigError",
    "nni_fedexit.data.datasets": "DataError",
    "nni_fedexit.space.block_pool": "SpecError",
    "nni_fedexit.presets": "PresetError",
    "nni_fedexit.nni_tools.reopen": "ReopenError",
    "nni_fedexit.federated.errors": "FederatedError",
    "nni_fedexit.job.pipeline": "PipelineError",
    "nni_fedexit.components": "SettingsError",
}


def is_user_error(err: BaseException) -> bool:
    """``err`` is one of :data:`_USER_ERRORS` (or a missing or existing file). A class whose module
    was never imported cannot have raised, so only the loaded modules are looked at."""
    if isinstance(err, (FileExistsError, FileNotFoundError)):
        return True
    for module, name in _USER_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(err, getattr(loaded, name)):
            return True
    return False


def _one_line(message: str) -> str:
    """A message on one line: its lines joined (a YAML parser's error spans several, with a caret line)."""
    out = ""
    for line in (line.strip() for line in message.splitlines()):
        if line.strip("^ "):
            out += (" " if out.endswith(":") else "; " if out else "") + line
    return out or message.strip()


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input exits with code 2 and one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not is_user_error(err):
                raise
            click.echo(f"error: {_one_line(str(err)) or type(err).__name__}", err=True)
            sys.exit(2)

    return wrapper


def _show_moved_keys(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                     line: str | None = None) -> None:
    """A setting of an earlier version read under its new key: one line, as the errors are."""
    components = sys.modules.get("nni_fedexit.components")
    if components is not None and issubclass(category, components.MovedSettingWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nni-fedexit")
def main() -> None:
    """Cloud-edge collaborative training on NNI: ResNet block-pool search, multi-exit networks,
    federated training on edge clients."""
    warnings.showwarning = _show_moved_keys


@main.group()
def config() -> None:
    """Run configs: their JSON Schema, and a check of one without running it."""


@config.command()
@click.option("--indent", default=2, show_default=True, help="Spaces per level of the JSON.")
@_user_errors
def schema(indent: int) -> None:
    """Print the JSON Schema of a run config: every key with its type, default and documentation,
    and the installed aggregators', objectives' and backends' own parameters. Point an editor's
    YAML support at it (``# yaml-language-server: $schema=run-config.schema.json``) to complete keys."""
    import json

    from nni_fedexit.job.config import run_config_schema

    click.echo(json.dumps(run_config_schema(), indent=indent))


@config.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@_user_errors
def check(config_path: str) -> None:
    """Check a run config as ``run`` would (every section, before any data loads) and print the
    federated settings it resolves to, every default filled in."""
    from nni_fedexit.job.config import load_config

    settings = load_config(config_path).federated_settings()
    click.echo(f"{config_path}: valid; its federated settings:")
    click.echo(settings.model_dump_json(indent=2, exclude={"checkpoint_dir"}))


@main.command()
@click.option("--space", "space_preset", default="resnet_pool", show_default=True,
              help="Search-space preset name (search_spaces/) or YAML file.")
@click.option("--nni-json", "nni_json", default=None, type=click.Path(dir_okay=False),
              help="Also write the space as NNI search-space JSON (one choice per stage) to this file, "
                   "for a classic nnictl experiment.")
@_user_errors
def space(space_preset: str, nni_json: str | None) -> None:
    """Show a block-pool search space: its pools, size and the baseline's parameter count."""
    from nni_fedexit.space import ResNetBlockPoolSpace

    s = ResNetBlockPoolSpace.from_preset(space_preset)
    if nni_json:
        from nni_fedexit.space.nni_json import write_nni_search_space

        click.echo(f"NNI search space written to {write_nni_search_space(s, nni_json)} "
                   f"(tuner classArgs baseline_params: {s.baseline_params()})")
    click.echo(f"sources: {', '.join(s.spec.sources)}; interface widths {list(s.interface_widths)}")
    for label, pool in s.pools.items():
        click.echo(f"  {label}: " + ", ".join(f"{k} ({v:,} params)" for k, v in pool.items()))
    sizes = [s.count_params(dict(zip(s.labels, combo))) for combo in _extremes(s)]
    click.echo(f"networks in the space: {s.num_architectures():,}")
    click.echo(f"baseline P ({s.spec.sources[0]} at these widths): {s.baseline_params():,} params")
    click.echo(f"smallest / largest network: {min(sizes):,} / {max(sizes):,} params")


def _extremes(s: Any) -> list[tuple[str, ...]]:
    """The per-pool smallest and largest picks (p_h is a sum over pools, so these bound it)."""
    small = tuple(min(pool, key=pool.get) for pool in s.pools.values())
    large = tuple(max(pool, key=pool.get) for pool in s.pools.values())
    return [small, large]


@main.command()
@click.option("--space", "space_preset", default="resnet_pool", show_default=True,
              help="Search-space preset name (search_spaces/) or YAML file.")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "digits"]))
@click.option("--data-dir", default=None, help="Folder with the data set's files (default: the system copy).")
@click.option("--download/--no-download", default=False, show_default=True,
              help="Let torchvision download the data set when no local copy is found.")
@click.option("--train-samples", default=None, type=int, help="Cap on training images (default: the whole server search-train split).")
@click.option("--epochs", default=2, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=0.05, show_default=True)
@click.option("--seed", default=0, show_default=True)
@_user_errors
def demo(space_preset: str, dataset: str, data_dir: str | None, download: bool, train_samples: int,
         epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Sample one architecture of the space, train it briefly on real data, print accuracy and size."""
    import numpy as np
    import torch

    from nni_fedexit.data import load_dataset, split_roles
    from nni_fedexit.space import ResNetBlockPoolSpace
    from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier

    torch.manual_seed(seed)
    t0 = time.time()
    data = load_dataset(dataset, data_dir=data_dir, download=download)
    click.echo(f"data: {data.name} from {data.source}: {len(data.train):,} train / {len(data.test):,} test images")
    roles = split_roles(len(data.train), seed=seed)
    train = data.train.subset(roles.search_train[:train_samples])
    val = data.train.subset(roles.search_val)
    s = ResNetBlockPoolSpace.from_preset(
        space_preset, in_chans=data.in_chans, image_size=data.image_size, num_classes=data.num_classes
    )
    rs = np.random.RandomState(seed)
    sample = {label: choice.random(random_state=rs) for label, choice in s.simplify().items()}
    model = s.build(sample)
    p_h, big_p = s.count_params(sample), s.baseline_params()
    click.echo(f"space: {s.num_architectures()} networks; sampled {sample}")
    click.echo(f"size: p_h = {p_h:,} parameters, baseline P = {big_p:,} (p_h/P = {p_h / big_p:.2f})")
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    t1 = time.time()
    train_classifier(model, train, settings, progress=True)
    t_train = time.time() - t1
    val_acc = evaluate_accuracy(model, val)
    test_acc = evaluate_accuracy(model, data.test)
    click.echo(f"trained {epochs} epoch(s) on {len(train):,} images in {t_train:.0f} s "
               f"({epochs * len(train) / t_train:.0f} images/s)")
    click.echo(f"accuracy: validation {val_acc:.4f} ({len(val):,} images), test {test_acc:.4f} ({len(data.test):,} images)")
    click.echo(f"total {time.time() - t0:.0f} s")


def _run_stages(config_path: str, stages: tuple[str, ...], resume: bool, port: int | None, run_dir: str | None,
                use_nni: bool = True) -> None:
    from nni_fedexit.job.config import load_config
    from nni_fedexit.job.pipeline import Run
    from nni_fedexit.nni_compat import ctrl_c_not_lost  # a Ctrl-C in a finaliser still stops the run

    overrides: dict[str, Any] = {}
    if run_dir:
        overrides["run_dir"] = run_dir
    if port is not None:
        overrides["nni.port"] = port
    run = Run(load_config(config_path, overrides), echo=click.echo, use_nni=use_nni)  # checked once, here
    try:
        with ctrl_c_not_lost():
            run.run(resume=resume, stages=stages)
    except KeyboardInterrupt:
        again = (f"nni-fedexit resume {run.dir}" if use_nni
                 else f"nni-fedexit run {config_path} --resume --no-nni --run-dir {run.dir}")
        click.echo(f"\ninterrupted: finished stages and federated rounds are kept in {run.dir}; "
                   f"continue with: {again}", err=True)
        sys.exit(130)
    _summary(run)


def _summary(run: Any) -> None:
    d = run.dir
    click.echo("\nrun directory: " + str(d))
    for name in ("report.md", "search/architecture.json", "federated/metrics.json", "evaluation.json", "model.safetensors", "export"):
        if (d / name).exists():
            click.echo(f"  {d / name}")
    if run.use_nni:
        click.echo(f"NNI experiments: nnictl experiment list (working directory {run.experiments_dir()})")


def _stage_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The arguments every command that runs stages from a config takes."""
    for option in reversed((
        click.argument("config", type=click.Path(dir_okay=False)),
        click.option("--resume", is_flag=True, help="Continue the run in the config's run_dir: finished stages "
                     "are skipped, federated rounds resume from the last checkpoint."),
        click.option("--port", type=int, default=None, help="Port of NNI's web UI (default: the config's nni.port)."),
        click.option("--run-dir", default=None, help="Run directory (default: the config's run_dir, else "
                     "runs/<config name>)."),
        click.option("--nni/--no-nni", "use_nni", default=True, show_default=True,
                     help="Run the search and federated stages as NNI experiments (watched in NNI's web UI), or "
                          "in this process with the same results and checkpoints (shared search mode only)."),
    )):
        fn = option(fn)
    return main.command()(_user_errors(fn))


@_stage_command
def run(config: str, resume: bool, port: int | None, run_dir: str | None, use_nni: bool) -> None:
    """S1 to S5 end to end: search, federated training, early-exit evaluation, export, report."""
    _run_stages(config, ("search", "federate", "evaluate", "export", "report"), resume, port, run_dir, use_nni)


@_stage_command
def search(config: str, resume: bool, port: int | None, run_dir: str | None, use_nni: bool) -> None:
    """S3 only: search the block-pool space; writes search/architecture.json."""
    _run_stages(config, ("search",), resume, port, run_dir, use_nni)


@_stage_command
def federate(config: str, resume: bool, port: int | None, run_dir: str | None, use_nni: bool) -> None:
    """S4 + S5: federated training of the searched architecture's exit-point model (needs a search)."""
    _run_stages(config, ("federate",), True, port, run_dir, use_nni)


def _existing_run(run_dir: str, port: int | None = None) -> Any:
    from nni_fedexit.job.config import load_config
    from nni_fedexit.job.pipeline import Run

    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: {run_dir} is not a run directory of nni-fedexit")
    overrides: dict[str, Any] = {"run_dir": run_dir}
    if port is not None:
        overrides["nni.port"] = port
    return Run(load_config(cfg, overrides), echo=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@_user_errors
def evaluate(run_dir: str) -> None:
    """Early-exit curve of a trained run: per-exit test accuracy, calibrated thresholds."""
    _existing_run(run_dir).stage_evaluate()


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@_user_errors
def export(run_dir: str) -> None:
    """Export every branch model of a trained run to TorchScript (and ONNX)."""
    _existing_run(run_dir).stage_export()


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@_user_errors
def report(run_dir: str) -> None:
    """Write report.md and its plots for a finished run."""
    _existing_run(run_dir).stage_report()


@main.command()
@click.argument("target")
@click.option("--stage", type=click.Choice(["search", "federate"]), default=None,
              help="Which stage's experiment of a run directory (default: federate, else search).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port of the web UI.")
@click.option("--host", type=click.Choice(["127.0.0.1", "localhost", "all"]), default="127.0.0.1", show_default=True,
              help="Where the web UI listens: this machine only, or every interface (NNI's default; no authentication).")
@click.option("--detach", is_flag=True, help="Return at once and leave the web UI running (stop it with nnictl stop ID).")
@_user_errors
def view(target: str, stage: str | None, port: int, host: str, detach: bool) -> None:
    """Open the web UI of a finished or stopped NNI experiment of a run (TARGET: a run directory
    or an experiment id), where NNI 3.0's `nnictl view` fails for NAS experiments."""
    from nni_fedexit.nni_tools.reopen import find_experiment, view_experiment
    from nni_fedexit.nni_tools.webui import nni_manager_env, web_ui_message

    ref = find_experiment(target, stage)
    with nni_manager_env(host):
        exp = view_experiment(ref, port)
    click.echo(f"experiment {ref.id}{f' ({ref.stage} stage)' if ref.stage else ''} is served again (status VIEWED)")
    click.echo(web_ui_message(port, host))
    click.echo(f"trials: http://127.0.0.1:{port}/detail; REST API: http://127.0.0.1:{port}/api/v1/nni/trial-jobs")
    if detach:
        click.echo(f"stop it with: nnictl stop {ref.id}")
        return
    click.echo("Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        exp.stop()


@main.command()
@click.argument("target")
@click.option("--port", type=int, default=None, help="Port of NNI's web UI (default: the run config's nni.port).")
@_user_errors
def resume(target: str, port: int | None) -> None:
    """Go on with a stopped run (TARGET: its run directory, or the id of one of its experiments):
    finished stages are kept, the interrupted stage's NNI experiment is resumed under its id."""
    from nni_fedexit.job.pipeline import STAGES
    from nni_fedexit.nni_compat import ctrl_c_not_lost
    from nni_fedexit.nni_tools.reopen import ReopenError, find_experiment

    run_dir = Path(target)
    if not run_dir.is_dir():
        ref = find_experiment(target)
        if ref.run_dir is None:
            raise ReopenError(f"experiment {target} is not part of an nni-fedexit run directory: resume it from the "
                              f"Python that created it, NasExperiment(space, evaluator, strategy, id={target!r}).resume()")
        run_dir = ref.run_dir
    run = _existing_run(str(run_dir), port)
    if run.done() == list(STAGES):
        click.echo(f"every stage of {run.dir} has finished: `nni-fedexit view {run.dir}` opens its web UI")
        return
    try:
        with ctrl_c_not_lost():
            run.run(resume=True)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: continue with: nni-fedexit resume {run.dir}", err=True)
        sys.exit(130)
    _summary(run)


@main.command()
@_user_errors
def register() -> None:
    """Register SizeAwarePGTuner with nnictl as tuner "SizeAwarePG"; running it again updates it."""
    from nni_fedexit.nni_compat import import_nni

    nni = import_nni()
    from nni.runtime.config import get_config_file
    from nni.tools import package_utils

    from nni_fedexit.search.tuner import NNICTL_META, SizeAwarePGTuner  # noqa: F401  (the class must import, as nnictl checks)

    name = NNICTL_META["builtinName"]
    old = package_utils.get_algo_meta(name)
    if old is not None and old.is_builtin:
        raise click.ClickException(f"{name!r} is one of NNI's built-in algorithms and cannot be replaced")
    meta = package_utils.AlgoMeta.load({**NNICTL_META, "nniVersion": nni.__version__})
    package_utils.register_algo_meta(meta)
    action = "registered" if old is None else ("already registered" if old.class_name == meta.class_name else "updated")
    click.echo(f"{name} {action}: {meta.class_name} ({get_config_file('registered_algorithms.yml')})")
    found = package_utils.get_algo_meta(name)  # read back, as nnictl does
    module, cls = found.class_name.rsplit(".", 1)
    click.echo("nnictl algo list now shows:")
    click.echo(f"| {found.name:15s} | {found.algo_type:10s} | {'user':9s} | {cls:20s} | {module:40s} |")
    click.echo(f"Use it in an experiment config as: tuner: {{name: {name}, classArgs: {{beta: 14, baseline_params: P}}}}")


if __name__ == "__main__":
    main()
