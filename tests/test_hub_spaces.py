"""SizeAwarePolicyGradient(mode="trials") on NNI 3.0's hub spaces, as a user would plug it in.

Each space (``nni.nas.hub.pytorch``, small settings from ../shared/notes/nni-3.0.md) is searched
with a budget of 3 trials on NNI's sequential engine; each trial trains the frozen network for a
few steps on real digits images (sklearn's, upsampled to 3x32x32) and reports its accuracy. The
test checks what a user relies on: every submitted sample lies in the space (InputChoice labels
included), each trial ran and was rewarded with its parameter count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nni
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.execution import SequentialExecutionEngine
from nni.nas.hub import pytorch as hub
from nni.nas.space import RawFormatModelSpace
from nni.mutable import CategoricalMultiple

from nni_fedexit import SizeAwarePolicyGradient

pytestmark = pytest.mark.slow  # NNI experiments, Flower or Ray processes, a browser: make test-fast leaves them out

SPACES = {
    "NasBench201": lambda: hub.NasBench201(stem_out_channels=8, num_modules_per_stack=1, num_labels=10),
    "DARTS": lambda: hub.DARTS(width=8, num_cells=4, dataset="cifar"),
    "ENAS": lambda: hub.ENAS(width=8, num_cells=4, dataset="cifar"),
    "ProxylessNAS": lambda: hub.ProxylessNAS(num_labels=10, width_mult=0.25),
    "MobileNetV3Space": lambda: hub.MobileNetV3Space(num_labels=10, width_multipliers=(0.25, 0.5)),
}


@pytest.fixture(scope="module")
def images(digits):
    """128 digits images as 3x32x32 tensors (the hub spaces' CIFAR-sized input), with labels."""
    x, y = digits.train.images[:128], digits.train.labels[:128]
    return F.interpolate(x, size=32, mode="bilinear").repeat(1, 3, 1, 1), y


#: what each trial of the running test reported: (its accuracy, its network's parameter count)
REPORTED: list[tuple[float, int]] = []


def train_a_few_steps(model, images):
    x, y = images
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(3):
        batch = slice(32 * i, 32 * (i + 1))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[96:]).argmax(1) == y[96:]).float().mean())
    REPORTED.append((accuracy, sum(p.numel() for p in model.parameters())))
    nni.report_final_result(accuracy)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_trials_mode_samples_and_runs_on_the_hub_space(name, images):
    space = SPACES[name]()
    evaluator = FunctionalEvaluator(train_a_few_steps, images=images)
    model_space = RawFormatModelSpace(space, evaluator)
    engine = SequentialExecutionEngine(max_model_count=3)
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=1, seed=0)
    REPORTED.clear()
    strategy(model_space, engine)

    models = list(engine.list_models())
    assert len(models) == 3 and all(space.check_contains(m.sample) is None for m in models)
    assert len(strategy.records) == 3 and strategy.learner.steps == 3
    # each record holds what its trial measured: the accuracy it reported and the parameter count
    # of the network it trained (counted here on the frozen module), and the patent's reward of
    # them, by hand: Acc * (p_h / P) ** (-1 / beta), beta = 14
    assert [(r["accuracy"], r["params"]) for r in strategy.records] == REPORTED
    for r in strategy.records:
        assert r["reward"] == pytest.approx(r["accuracy"] * (r["params"] / strategy.baseline_params) ** (-1 / 14))
    multiple = [label for label, m in space.simplify().items() if isinstance(m, CategoricalMultiple)]
    if name in ("DARTS", "ENAS"):  # their cells pick inputs with InputChoice
        assert multiple and all(isinstance(models[0].sample[label], list) for label in multiple)


def test_shared_mode_searches_the_darts_cells_input_choices(images, tmp_path):
    """The one-shot (shared) mode on DARTS: NNI's supernet samples InputChoice paths; ours picks them."""
    from nni.nas.evaluator.pytorch import Classification, DataLoader
    from torch.utils.data import TensorDataset

    from helpers import run_shared_experiment

    x, y = images
    g = torch.Generator().manual_seed(0)
    evaluator = Classification(
        train_dataloaders=DataLoader(TensorDataset(x[:96], y[:96]), batch_size=16, shuffle=True, generator=g),
        val_dataloaders=DataLoader(TensorDataset(x[96:], y[96:]), batch_size=8), max_epochs=1, num_classes=10,
        learning_rate=0.01, accelerator="cpu", enable_progress_bar=False, logger=False, enable_checkpointing=False)
    torch.manual_seed(0)
    space = hub.DARTS(width=8, num_cells=4, dataset="cifar")
    strategy = SizeAwarePolicyGradient(final_samples=3, samples_per_update=2, seed=0)
    (sample,) = run_shared_experiment(space, evaluator, strategy, tmp_path)
    multiple = [label for label, m in space.simplify().items() if isinstance(m, CategoricalMultiple)]
    assert space.check_contains(sample) is None and strategy.learner.steps == 2  # 4 validation batches
    assert multiple and all(isinstance(sample[label], list) and len(sample[label]) == 1 for label in multiple)
