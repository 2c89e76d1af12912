"""S4: the multi-exit network, its branch models, the loss, early exits, export."""

import math

import pytest
import torch

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


def conv_linear_macs(module, x):
    """MACs of one forward of ``module`` on ``x``, counted by hooks on its Conv2d and Linear layers
    (per output element: in_channels / groups * kernel area, or in_features): a second count
    beside exit_costs' torch.utils.flop_counter, which counts the same two kinds of layer."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        per_image = out.numel() // out.shape[0]
        if isinstance(m, torch.nn.Conv2d):
            total += per_image * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += per_image * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            module.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def conv_exit_params(width, classes=10):
    """A conv exit head: 3x3 conv without bias, BatchNorm (weight and bias), linear with bias."""
    return 9 * width * width + 2 * width + width * classes + classes


def test_costs_of_a_small_network_equal_a_count_by_hand():
    stem = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    stages = [torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                  torch.nn.ReLU()),
              torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)]
    model = MultiExitNetwork(stem, stages, [8, 8], num_classes=10, head="conv")
    # 8x8 image. Parameters: stem 4*1*9 = 36; stage 1 8*4*9 + BN 16 = 304; stage 2 8*8*9 + 8 = 584;
    # each exit (width 8) 9*64 + 16 + 80 + 10 = 682. MACs (out elements x in channels x kernel area):
    # stem 4*8*8 * 9 = 2304; stage 1 (4x4 out) 8*16 * 36 = 4608; stage 2 (2x2 out) 8*4 * 72 = 2304;
    # exit 1 conv 8*16 * 72 = 9216 + linear 80 = 9296; exit 2 conv 8*4 * 72 = 2304 + 80 = 2384.
    costs = exit_costs(model, torch.randn(1, 1, 8, 8))
    assert [(c.exit, c.params, c.macs, c.early_exit_macs) for c in costs] == [
        (1, 36 + 304 + 682, 2304 + 4608 + 9296, 2304 + 4608 + 9296),
        (2, 36 + 304 + 584 + 682, 2304 + 4608 + 2304 + 2384, 2304 + 4608 + 2304 + 9296 + 2384),
    ]


def test_costs_grow_with_depth_and_match_an_independent_count(fm_space):
    model = MultiExitNetwork.from_architecture(fm_space, SAMPLE, head="conv")
    x = torch.randn(1, 1, 28, 28)
    costs = exit_costs(model, x)
    assert [c.exit for c in costs] == [1, 2, 3, 4]
    assert all(a.params < b.params and a.early_exit_macs < b.early_exit_macs for a, b in zip(costs, costs[1:]))
    widths = fm_space.spec.widths
    head = widths[-1] * 10 + 10  # the space network's linear head, which the exits replace
    for depth, c in enumerate(costs, start=1):
        # p_h of the space's pool tables (checked against NNI's profiler in test_space), less the
        # head and the stages after this exit, plus this exit's head
        later = sum(fm_space.pools[label][SAMPLE[label]] for label in fm_space.labels[depth:])
        assert c.params == fm_space.count_params(SAMPLE) - head - later + conv_exit_params(widths[depth - 1])
        assert c.macs == conv_linear_macs(model.branch(depth), x)
        # early exit stopping here has run stem, stages 1..depth and exits 1..depth
        assert c.early_exit_macs == conv_linear_macs(model.branch(depth, all_exits=True), x)
    assert costs[0].early_exit_macs == costs[0].macs  # no exit before exit 1


def test_confidence_criteria():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mp = confidence(logits, "max_prob")
    assert mp[0] > 0.99 and mp[1] == pytest.approx(1 / 3)
    ent = confidence(logits, "entropy")
    assert ent[0] > 0.99 and ent[1] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
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
    m = early_exit_metrics(logits, labels, [0.6, 0.8], costs)
    preds, taken = early_exit_predict(trained, digits.test.images, [0.6, 0.8])
    share = torch.bincount(taken - 1, minlength=3).double() / len(taken)
    assert share.tolist() == pytest.approx(m["exit_share"])
    assert float((preds == labels).double().mean()) == pytest.approx(m["accuracy"])


def every_shared_threshold(logits, labels, costs, criterion="max_prob"):
    """(threshold, accuracy, expected MACs) of early exit for every threshold calibrate is
    documented to try (0, 0.01, ..., 1 and one above 1, shared by all exits), sample by sample:
    a sample leaves at the first exit whose confidence reaches the threshold, else at the last."""
    probs = torch.softmax(logits.float(), dim=-1)  # (L, N, C)
    if criterion == "max_prob":
        conf = probs.max(dim=-1).values
    else:  # 1 - entropy / log(classes)
        conf = 1 + (probs * probs.clamp_min(1e-12).log()).sum(dim=-1) / math.log(logits.shape[-1])
    num_exits, n = conf.shape
    conf, correct = conf.tolist(), (logits.argmax(dim=-1) == labels).tolist()
    out = []
    for t in [i / 100 for i in range(101)] + [1.0 + 1e-6]:
        right = macs = 0
        for s in range(n):
            e = next((i for i in range(num_exits - 1) if conf[i][s] >= t), num_exits - 1)
            right += correct[e][s]
            macs += costs[e].early_exit_macs
        out.append((t, right / n, macs / n))
    return out


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.05])
def test_calibration_picks_the_cheapest_threshold_within_the_accuracy_drop(trained, digits, drop):
    result = calibrate(trained, digits.test, max_accuracy_drop=drop, rule="shared")
    costs = exit_costs(trained, digits.test.images[:1])
    assert result.last_exit_macs == costs[-1].macs
    assert trained.thresholds == result.thresholds
    assert len(result.curve) == 102
    tried = every_shared_threshold(*exit_outputs(trained, digits.test), costs)
    last_accuracy = tried[-1][1]  # every sample at the last exit
    assert result.last_exit_accuracy == pytest.approx(last_accuracy)
    feasible = [(macs, t) for t, acc, macs in tried if acc >= last_accuracy - drop - 1e-12]
    assert result.accuracy >= last_accuracy - drop - 1e-12
    assert result.expected_macs == pytest.approx(min(feasible)[0])
    assert result.expected_macs < costs[-1].early_exit_macs  # early exit saves something here


def test_calibration_picks_the_most_accurate_threshold_within_a_compute_budget(trained, digits):
    costs = exit_costs(trained, digits.test.images[:1])
    budget = (costs[0].early_exit_macs + costs[-1].early_exit_macs) / 2
    result = calibrate(trained, digits.test, max_accuracy_drop=None, macs_budget=budget, criterion="entropy", rule="shared")
    assert result.expected_macs <= budget
    assert trained.criterion == "entropy"
    tried = every_shared_threshold(*exit_outputs(trained, digits.test), costs, criterion="entropy")
    best = max(acc for t, acc, macs in tried if macs <= budget)
    assert result.accuracy == pytest.approx(best)
    assert best > tried[0][1]  # the budget allows better than every sample at exit 1 (threshold 0)
    with pytest.raises(ValueError, match="below the cheapest"):
        calibrate(trained, digits.test, max_accuracy_drop=None, macs_budget=costs[0].early_exit_macs / 2)
    with pytest.raises(ValueError, match="exactly one target"):
        calibrate(trained, digits.test, max_accuracy_drop=0.01, macs_budget=budget)


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.05])
def test_per_exit_calibration_is_within_the_drop_and_never_dearer_than_the_shared_rule(trained, digits, drop):
    shared = calibrate(trained, digits.test, max_accuracy_drop=drop, rule="shared")
    mine = calibrate(trained, digits.test, max_accuracy_drop=drop)  # rule="per_exit" is the default
    assert mine.rule == "per_exit" and trained.thresholds == mine.thresholds
    assert mine.accuracy >= mine.last_exit_accuracy - drop - 1e-12
    assert mine.expected_macs <= shared.expected_macs + 1e-9
    # what calibration reports is what early-exit inference then does on the same images
    preds, taken = early_exit_predict(trained, digits.test.images)
    assert float((preds == digits.test.labels).double().mean()) == pytest.approx(mine.accuracy)
    share = (torch.bincount(taken - 1, minlength=trained.num_exits).double() / len(taken)).tolist()
    assert share == pytest.approx(mine.exit_share)


@pytest.mark.slow
def test_a_held_out_split_certifies_the_drop_and_says_so(trained, digits):
    learn, held_out = digits.test.subset(range(0, 180)), digits.test.subset(range(180, 359))
    result = calibrate(trained, learn, max_accuracy_drop=0.05, held_out=held_out, confidence_level=0.9)
    assert result.held_out_images == len(held_out) and result.confidence_level == 0.9
    assert result.drop_bound <= 0.05 and result.held_out["drop"] <= result.drop_bound
    assert result.macs_saved > 0  # 179 held-out images are enough to certify some early exits here
    assert "90% confidence" in result.guarantee and "5.00%" in result.guarantee
    with pytest.raises(ValueError, match="held-out margin keeps an accuracy drop"):
        calibrate(trained, learn, max_accuracy_drop=None, macs_budget=1e9, held_out=held_out)
    with pytest.raises(ValueError, match="rule must be one of"):
        calibrate(trained, learn, rule="mine")


def test_early_exit_inference_runs_each_stage_only_on_the_samples_still_inside(trained, digits):
    x = digits.test.images
    thresholds = [0.6, 0.8]
    with torch.no_grad():
        conf = [torch.softmax(z, dim=-1).max(dim=-1).values for z in trained.eval()(x)]
    # samples still inside after exit i: not confident enough at any exit up to i
    inside = [len(x)]
    still = torch.ones(len(x), dtype=torch.bool)
    for c, t in zip(conf, thresholds):
        still &= c < t
        inside.append(int(still.sum()))
    assert 0 < inside[-1] < inside[1] < len(x)  # the thresholds send samples out of every exit
    seen = {}
    hooks = [m.register_forward_hook(lambda m, inputs, out, key=key: seen.setdefault(key, []).append(len(inputs[0])))
             for key, m in [(f"stage{i + 1}", s) for i, s in enumerate(trained.stages)]
             + [(f"exit{i + 1}", e) for i, e in enumerate(trained.exits)]]
    try:
        _, taken = early_exit_predict(trained, x, thresholds, criterion="max_prob", prediction="exit")
    finally:
        for h in hooks:
            h.remove()
    assert seen == {f"{part}{i + 1}": [n] for i, n in enumerate(inside) for part in ("stage", "exit")}
    assert torch.bincount(taken, minlength=4)[1:].tolist() == [inside[0] - inside[1], inside[1] - inside[2], inside[2]]


@pytest.mark.slow
@torch.no_grad()
def test_exported_branches_match_pytorch(trained, digits, tmp_path):
    import onnxruntime

    x = digits.test.images[:4]
    records = export_branches(trained, tmp_path, x)
    formats = {r["format"] for r in records}
    assert "torchscript" in formats and "onnx" in formats  # make test installs the onnx extra
    assert len(records) == 2 * trained.num_exits
    reported = {(r["format"], r["branch"]): r for r in records}
    other = digits.test.images[4:8]  # not the images the export was checked on
    for depth in range(1, trained.num_exits + 1):
        branch = trained.eval().branch(depth)
        session = onnxruntime.InferenceSession(str(tmp_path / f"branch{depth}.onnx"), providers=["CPUExecutionProvider"])
        scripted = torch.jit.load(str(tmp_path / f"branch{depth}.pt"))
        for images in (x, other):
            want = branch(images)[0]
            onnx_error = float((torch.from_numpy(session.run(None, {"image": images.numpy()})[0]) - want).abs().max())
            script_error = float((scripted(images)[0] - want).abs().max())
            assert onnx_error <= 1e-5 and script_error <= 1e-5, (depth, onnx_error, script_error)
            if images is x:  # what export_branches measured on the same images
                assert reported["onnx", depth]["max_abs_error"] == pytest.approx(onnx_error, abs=1e-9)
                assert reported["torchscript", depth]["max_abs_error"] == pytest.approx(script_error, abs=1e-9)
        assert reported["onnx", depth]["path"] == str(tmp_path / f"branch{depth}.onnx")


class _Noisy(torch.nn.Module):
    """A stage whose output is random: a traced copy cannot reproduce it."""

    def forward(self, x):
        return x + torch.randn_like(x)


class _DataDependent(torch.nn.Module):
    """A stage with Python control flow on a tensor's value: torch.export cannot export it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # what the two bad stages are about
def test_an_export_that_fails_or_differs_is_one_error_naming_the_branch_and_file(tmp_path):
    x = torch.randn(2, 1, 8, 8)

    def network(stage):
        stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        return MultiExitNetwork(stem, [torch.nn.Conv2d(4, 4, 3, padding=1), stage], [4, 4], num_classes=10)

    # branch 1 exports fine; branch 2's TorchScript file differs from PyTorch
    with pytest.raises(RuntimeError, match=r"^exported torchscript branch .*/noisy/branch2\.pt differs from PyTorch by"):
        export_branches(network(_Noisy()), tmp_path / "noisy", x, onnx=False)
    assert (tmp_path / "noisy" / "branch1.pt").is_file()
    # TorchScript traces branch 2 (one path baked in); the ONNX exporter refuses it
    with pytest.raises(RuntimeError, match=r"^could not export branch 2 to onnx .*/datadep/branch2\.onnx: TorchExportError"):
        export_branches(network(_DataDependent()), tmp_path / "datadep", x, onnx=True)
    # a folder that cannot be made: the error names it
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OSError, match="taken"):
        export_branches(network(torch.nn.Identity()), tmp_path / "taken", x, onnx=False)
