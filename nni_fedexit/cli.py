"""The ``nni-fedexit`` command line: argument handling and calls, nothing else."""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable

import click

from .data import DataError
from .presets import PresetError
from .space import SpecError

_USER_ERRORS = (DataError, SpecError, PresetError)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input exits with code 2 and one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nni-fedexit")
def main() -> None:
    """Cloud-edge collaborative training on NNI: ResNet block-pool search, multi-exit networks,
    federated training on edge clients."""


@main.command()
@click.option("--space", "space_preset", default="resnet_pool", show_default=True,
              help="Search-space preset name (search_spaces/) or YAML file.")
@_user_errors
def space(space_preset: str) -> None:
    """Show a block-pool search space: its pools, size and the baseline's parameter count."""
    from .space import ResNetBlockPoolSpace

    s = ResNetBlockPoolSpace.from_preset(space_preset)
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

    from .data import load_dataset, split_roles
    from .space import ResNetBlockPoolSpace
    from .training import TrainSettings, evaluate_accuracy, train_classifier

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


if __name__ == "__main__":
    main()
