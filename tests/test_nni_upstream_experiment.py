"""NNI 3.0's experiment sanity tests, with SizeAwarePolicyGradient in place of NNI's strategies.

Adapted from microsoft/nni at tag v3.0 (commit 36ba04c94e51eaa2a88b9e6e0a4077f3a9f93004),
``test/ut/nas/experiment/test_experiment.py``: ``test_experiment_sanity`` (NNI's
RegularizedEvolution) with ``mode="trials"``, and ``test_oneshot_sanity`` (NNI's DARTS) with the
shared mode, on NNI's ``SimpleNet`` (``test/ut/nas/nn/models.py``, copied below: a LayerChoice,
an ``nni.choice`` width and an ``InputChoice``, the label kind NNI's PolicyBasedRL refuses for
n_chosen > 1 and ours used to refuse). Sized down for a 2-core CPU: 2 batches per trial instead
of 20, 128 random training images instead of 1,000 and one epoch instead of 2; the trials run on
NNI's sequential engine (``NasExperimentConfig('sequential', 'raw')``, as upstream's
``test_experiment_resume``) rather than as processes (tests/test_strategy.py runs that).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import SGD
from torch.utils.data import DataLoader, Dataset

import nni
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.evaluator.pytorch import Classification
from nni.nas.experiment import NasExperiment
from nni.nas.experiment.config import NasExperimentConfig
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace, MutableLinear

from nni_fedexit import SizeAwarePolicyGradient


# ---- copied from test/ut/nas/nn/models.py ----------------------------------------------------------

class DepthwiseSeparableConv(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, kernel_size=3, groups=in_ch)
        self.pointwise = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class SimpleNet(ModelSpace):
    def __init__(self, value_choice=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = LayerChoice([
            nn.Conv2d(32, 64, 3, 1),
            DepthwiseSeparableConv(32, 64)
        ], label='conv')
        self.maxpool = nn.MaxPool2d(2)
        self.dropout1 = LayerChoice([
            nn.Dropout(.25),
            nn.Dropout(.5),
            nn.Dropout(.75)
        ], label='dropout')
        self.dropout2 = nn.Dropout(0.5)
        if value_choice:
            hidden = nni.choice('hidden', [32, 64, 128])
        else:
            hidden = 64
        self.fc1 = MutableLinear(9216, hidden)
        self.fc2 = MutableLinear(hidden, 10)
        self.rpfc = nn.Linear(10, 10)
        self.input_ch = InputChoice(2, 1, label='input')

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.maxpool(self.conv2(x))
        x = torch.flatten(self.dropout1(x), 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        x1 = self.rpfc(x)
        x = self.input_ch([x, x1])
        output = F.log_softmax(x, dim=1)
        return output


# ---- copied from test_experiment.py (sizes reduced, seeded) ------------------------------------------

class RandomMnistDataset(Dataset):
    def __init__(self, length):
        generator = torch.Generator().manual_seed(length)
        self.len = length
        self.inputs = torch.randn(length, 1, 28, 28, generator=generator)
        self.targets = torch.randint(10, (length,), generator=generator)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]

    def __len__(self):
        return self.len


def simple_evaluation(model, num_batches=2):
    train_loader = DataLoader(RandomMnistDataset(128), 64, shuffle=True)
    valid_loader = DataLoader(RandomMnistDataset(64), 64, shuffle=True)
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    for _, (x, y) in zip(range(num_batches), train_loader):
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    accurate, total = 0, 0
    for _, (x, y) in zip(range(num_batches), valid_loader):
        accurate += (model(x).argmax(1) == y).sum().item()
        total += y.shape[0]
    nni.report_final_result(accurate / total)


def test_experiment_sanity(tmp_path):
    model_space = SimpleNet()
    strategy = SizeAwarePolicyGradient(mode="trials", samples_per_update=1, seed=0)
    config = NasExperimentConfig("sequential", "raw")
    config.max_trial_number = 3
    config.experiment_working_directory = str(tmp_path)
    exp = NasExperiment(model_space, FunctionalEvaluator(simple_evaluation), strategy, config)
    try:
        exp.run()
        assert isinstance(exp.export_top_models(formatter="instance")[0], SimpleNet)
        # ours: the InputChoice was decided, as a list of one input, in every trial
        assert len(strategy.records) == 3 and all(len(r["sample"]["input"]) == 1 for r in strategy.records)
    finally:
        exp.stop()


def test_oneshot_sanity(tmp_path):
    torch.manual_seed(0)
    model_space = SimpleNet()
    evaluator = Classification(num_classes=10,
                               train_dataloaders=DataLoader(RandomMnistDataset(128), 64, shuffle=True),
                               val_dataloaders=DataLoader(RandomMnistDataset(64), 32, shuffle=True),
                               max_epochs=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                               enable_checkpointing=False)
    strategy = SizeAwarePolicyGradient(final_samples=2, samples_per_update=1, seed=0)
    exp = NasExperiment(model_space, evaluator, strategy)
    exp.config.experiment_working_directory = str(tmp_path)
    try:
        exp.run()
        top = exp.export_top_models(formatter="dict")[0]
        assert isinstance(top, dict) and model_space.check_contains(top) is None
    finally:
        exp.stop()
