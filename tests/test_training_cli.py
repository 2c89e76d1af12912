"""A sampled architecture trains on real data; the CLI shows the space and reports bad input."""

import numpy as np
import pytest
from click.testing import CliRunner

from nni_fedexit import ResNetBlockPoolSpace
from nni_fedexit.job.cli import main
from nni_fedexit.training import TrainSettings, evaluate_accuracy, train_classifier
from helpers import tiny_space


@pytest.mark.slow
def test_sampled_architecture_learns_digits(digits):
    space = tiny_space(widths=(8, 16, 32))
    sample = {}
    model = space.random(memo=sample, random_state=np.random.RandomState(0))
    before = evaluate_accuracy(model, digits.test)
    losses = train_classifier(model, digits.train, TrainSettings(epochs=4, batch_size=32, lr=0.05, seed=0))
    after = evaluate_accuracy(model, digits.test)
    assert losses[-1] < losses[0]
    assert after > 0.7 > before  # chance is 0.1


def test_training_is_deterministic_for_a_seed(digits):
    """TrainSettings.seed alone fixes the run: the global torch RNG is disturbed differently before
    each run (same initial weights); the same seed gives the same weights, another seed others."""
    import copy

    import torch

    torch.manual_seed(1)
    space = tiny_space(widths=(8, 8), sources=("resnet18", "resnet34"))
    initial = space.build(space.baseline_sample())

    def trained(seed, disturb):
        torch.manual_seed(disturb)
        model = copy.deepcopy(initial)
        train_classifier(model, digits.train, TrainSettings(epochs=1, batch_size=64, seed=seed))
        return model.state_dict()

    first, again, other = trained(3, disturb=10), trained(3, disturb=20), trained(4, disturb=10)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
    assert not torch.equal(first["stem.0.weight"], initial.state_dict()["stem.0.weight"])  # it did train


def test_cli_space_reports_size_and_baseline():
    result = CliRunner().invoke(main, ["space", "--space", "resnet_pool"])
    assert result.exit_code == 0, result.output
    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    assert "networks in the space: 81" in result.output
    assert f"baseline P (resnet18 at these widths): {space.baseline_params():,} params" in result.output


def test_cli_demo_trains_one_architecture_on_digits():
    result = CliRunner().invoke(main, ["demo", "--dataset", "digits", "--space", "resnet_pool", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "sampled {'stage1':" in result.output
    assert "accuracy: validation" in result.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["space", "--space", "no_such_preset"], "no search_spaces preset 'no_such_preset'"),
        (["demo", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(args, needle):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output
