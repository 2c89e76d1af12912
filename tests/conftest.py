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
torch.set_num_threads(2)


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
