"""S4: the multi-exit network, its branch models, the loss, early exits, export."""

import math

import pytest
import torch
import torch.nn.functional as F

from nni_fedexit import ResNetBlockPoolSpace
from nni_fedexit.exits import (
    MultiExitNetwork,
    calibrate,
    confidence,
    early_exit_metrics,
    early_exit_predict,
    exit_accuracies,
    exit_costs,
    exit_outputs,
    export_branches,
    multi_exit_loss,
)
from nni_fedexit.training import TrainSettings, train_classifier
from helpers import TINY_SAMPLE, tiny_space

SAMPLE = {"stage1": "resnet50", "stage2": "resnet18", "stage3": "resnet34", "stage4": "resnet50"}


@pytest.fixture(scope="module")
def fm_space():
    return ResNetBlockPoolSpace.from_preset("resnet_pool", widths=[8, 16, 16, 32])


@pytest.mark.parametrize("head", ["linear", "conv"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_exit_outputs_class_logits(head, shape):
    space = ResNetBlockPoolSpace(in_chans=shape[0], image_size=shape[1], widths=[8, 16, 16, 32])
    model = MultiExitNetwork.from_architecture(space, SAMPLE, head=head)
    outputs = model(torch.randn(3, *shape))
    assert model.num_exits == len(outputs) == 4
    assert all(o.shape == (3, 10) for o in outputs)
    assert model.arch == SAMPLE


def test_branch_state_dict_is_a_subset_sharing_storage(fm_space):
    model = MultiExitNetwork.from_architecture(fm_space, SAMPLE)
    full = model.state_dict()
    for depth in range(1, 5):
        for all_exits in (False, True):
            branch = model.branch(depth, all_exits=all_exits)
            keys = set(branch.state_dict())
            assert keys <= set(full)
            assert {k.split(".")[0] for k in keys} == {"stem", "stages", "exits"}
            assert {int(k.split(".")[1]) for k in keys if k.startswith("stages.")} == set(range(depth))
            held = set(range(depth)) if all_exits else {depth - 1}
            assert {int(k.split(".")[1]) for k in keys if k.startswith("exits.")} == held
            for k, v in branch.state_dict().items():
                assert v.data_ptr() == full[k].data_ptr(), k
    # the deepest branch with all exits is the whole model
    assert set(model.branch(4, all_exits=True).state_dict()) == set(full)


def test_branch_outputs_equal_the_full_models_exits(fm_space):
    model = MultiExitNetwork.from_architecture(fm_space, SAMPLE).eval()
    x = torch.randn(2, 1, 28, 28)
    full = model(x)
    (z2,) = model.branch(2)(x)
    assert torch.allclose(z2, full[1])
    path = model.branch(3, all_exits=True)(x)
    assert all(torch.allclose(a, b) for a, b in zip(path, full[:3]))


def test_loss_is_the_weighted_sum_of_exit_cross_entropies():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    weights = [0.3, 0.5, 2.0]
    by_hand = 0.0
    for z, w in zip(logits, weights):
        p = torch.softmax(z, dim=1)
        by_hand += w * float(-(p[torch.arange(5), y].log()).mean())
    assert float(multi_exit_loss(logits, y, weights)) == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="one weight per exit"):
        multi_exit_loss(logits, y, [1.0])


def test_loss_weights_are_validated_and_given_to_branches(fm_space):
    model = MultiExitNetwork.from_architecture(fm_space, SAMPLE, loss_weights=[0.1, 0.2, 0.3, 1.0])
    assert model.branch(3, all_exits=True).loss_weights == (0.1, 0.2, 0.3)
    assert model.branch(2).loss_weights == (0.2,)
    with pytest.raises(ValueError, match="loss_weights"):
        MultiExitNetwork.from_architecture(fm_space, SAMPLE, loss_weights=[1.0, -1.0, 1.0, 1.0])


def test_costs_grow_with_depth_and_match_the_branch_modules(fm_space):
    model = MultiExitNetwork.from_architecture(fm_space, SAMPLE, head="conv")
    costs = exit_costs(model, torch.randn(1, 1, 28, 28))
    assert [c.exit for c in costs] == [1, 2, 3, 4]
    assert all(a.params < b.params and a.early_exit_macs < b.early_exit_macs for a, b in zip(costs, costs[1:]))
    for depth, c in enumerate(costs, start=1):
        assert c.params == sum(p.numel() for p in model.branch(depth).parameters())
        assert c.macs <= c.early_exit_macs  # early-exit inference also runs the earlier exits
    assert costs[0].early_exit_macs == costs[0].macs  # no exit before exit 1


def test_confidence_criteria():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mp = confidence(logits, "max_prob")
    assert mp[0] > 0.99 and mp[1] == pytest.approx(1 / 3)
    ent = confidence(logits, "entropy")
    assert ent[0] > 0.99 and ent[1] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = MultiExitNetwork.from_architecture(tiny_space(widths=(8, 16, 32)), TINY_SAMPLE)
    train_classifier(model, digits.train, TrainSettings(epochs=4, batch_size=32, lr=0.05, seed=0),
                     loss_fn=lambda outs, y: multi_exit_loss(outs, y, model.loss_weights))
    return model


def test_threshold_zero_exits_everything_at_exit_1_and_above_one_at_the_last(trained, digits):
    logits, labels = exit_outputs(trained, digits.test)
    accs = exit_accuracies(logits, labels)
    costs = exit_costs(trained, digits.test.images[:1])
    first = early_exit_metrics(logits, labels, [0.0, 0.0], costs)
    assert first["exit_share"] == [1.0, 0.0, 0.0]
    assert first["accuracy"] == pytest.approx(accs[0]) and first["expected_macs"] == costs[0].early_exit_macs
    last = early_exit_metrics(logits, labels, [1.01, 1.01], costs)
    assert last["exit_share"] == [0.0, 0.0, 1.0]
    assert last["accuracy"] == pytest.approx(accs[-1]) and last["expected_macs"] == costs[-1].early_exit_macs
    # the same through real early-exit inference, which stops computing for samples that left
    preds, taken = early_exit_predict(trained, digits.test.images, [0.0, 0.0])
    assert (taken == 1).all() and float((preds == labels).double().mean()) == pytest.approx(accs[0])
    preds, taken = early_exit_predict(trained, digits.test.images, [1.01, 1.01])
    assert (taken == 3).all() and float((preds == labels).double().mean()) == pytest.approx(accs[-1])


def test_early_exit_predict_agrees_with_metrics_for_mixed_thresholds(trained, digits):
    logits, labels = exit_outputs(trained, digits.test)
    costs = exit_costs(trained, digits.test.images[:1])
    m = early_exit_metrics(logits, labels, [0.9, 0.8], costs)
    preds, taken = early_exit_predict(trained, digits.test.images, [0.9, 0.8])
    share = torch.bincount(taken - 1, minlength=3).double() / len(taken)
    assert share.tolist() == pytest.approx(m["exit_share"])
    assert float((preds == labels).double().mean()) == pytest.approx(m["accuracy"])


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.05])
def test_calibration_meets_an_accuracy_drop_target(trained, digits, drop):
    result = calibrate(trained, digits.test, max_accuracy_drop=drop)
    assert result.accuracy >= result.last_exit_accuracy - drop - 1e-12
    assert result.last_exit_macs == exit_costs(trained, digits.test.images[:1])[-1].macs
    assert trained.thresholds == result.thresholds
    assert len(result.curve) == 102
    # it is the cheapest point of the curve that meets the target
    feasible = [p for p in result.curve if p["accuracy"] >= result.last_exit_accuracy - drop - 1e-12]
    assert result.expected_macs == min(p["expected_macs"] for p in feasible)


def test_calibration_meets_a_compute_budget(trained, digits):
    costs = exit_costs(trained, digits.test.images[:1])
    budget = (costs[0].early_exit_macs + costs[-1].early_exit_macs) / 2
    result = calibrate(trained, digits.test, max_accuracy_drop=None, macs_budget=budget, criterion="entropy")
    assert result.expected_macs <= budget
    assert trained.criterion == "entropy"
    with pytest.raises(ValueError, match="below the cheapest"):
        calibrate(trained, digits.test, max_accuracy_drop=None, macs_budget=costs[0].early_exit_macs / 2)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(trained, digits.test, max_accuracy_drop=0.01, macs_budget=budget)


def test_exported_branches_match_pytorch(trained, digits, tmp_path):
    x = digits.test.images[:4]
    records = export_branches(trained, tmp_path, x)
    formats = {r["format"] for r in records}
    assert "torchscript" in formats and "onnx" in formats  # make test installs the onnx extra
    assert len(records) == 2 * trained.num_exits
    for r in records:
        assert r["max_abs_error"] <= 1e-5
    loaded = torch.jit.load(str(tmp_path / "branch2.pt"))
    (z,) = loaded(x)
    assert torch.allclose(z, trained.eval().branch(2)(x)[0], atol=1e-5)
