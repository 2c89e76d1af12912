"""Fixtures the tests share (session-scoped: built once per run). Plain helpers: tests/helpers.py."""

import os
import sys
from pathlib import Path

import pytest
import torch

# `from helpers import ...` in every test module, whatever pytest's --import-mode
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  (CI: a skip fails)

os.environ.setdefault("OMP_NUM_THREADS", "2")
# benchmarks/mutation.py runs one test process per core with OMP_NUM_THREADS=1
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def digits():
    from nni_fedexit.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def fmnist_space():
    from nni_fedexit import ResNetBlockPoolSpace

    return ResNetBlockPoolSpace.from_preset("resnet_pool_depth")


@pytest.fixture(scope="session")
def cifar_space():
    from nni_fedexit import ResNetBlockPoolSpace

    return ResNetBlockPoolSpace.from_preset("resnet_pool_cifar", widths=[8, 16, 32, 64])


@pytest.fixture(scope="session")
def trained(digits):
    """A 3-exit network of the tiny space trained on digits (4 epochs): the exits' tests share it."""
    from helpers import TINY_SAMPLE, tiny_space
    from nni_fedexit.exits import MultiExitNetwork, multi_exit_loss
    from nni_fedexit.training import TrainSettings, train_classifier

    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(widths=(8, 16, 32)), TINY_SAMPLE)
    train_classifier(model, digits.train, TrainSettings(epochs=4, batch_size=32, lr=0.05, seed=0),
                     loss_fn=lambda outs, y: multi_exit_loss(outs, y, model.loss_weights))
    return model


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """A third-party plugin distribution (aggregator ``logged_fedavg``, objective ``logged_multi_exit``)
    built and installed with pip into a folder of its own: put it on PYTHONPATH to use it."""
    from helpers import install_plugin_distribution

    return install_plugin_distribution(tmp_path_factory.mktemp("plugin"))
