"""S5 under label skew: depth-wise training within a branch's memory, the label-skew objective, the
server's correction step and the best-round rule, each checked against what it must reduce to."""

import pytest
import torch
import torch.nn.functional as F

from nni_fedexit.exits import MultiExitNetwork, multi_exit_loss
from nni_fedexit.federated import FederatedData, FederatedSettings, LocalSettings, ObjectiveContext, train_local
from nni_fedexit.federated.depthwise import Segment, depthwise_segments, segment_schedule, training_step_bytes
from nni_fedexit.federated.objectives import LogitAdjusted, MultiExitObjective, label_prior_shift, make_objective
from nni_fedexit.federated.rounds import better
from nni_fedexit.federated.server_pass import server_batches, server_pass
from helpers import TINY_SAMPLE as SAMPLE, tiny_space


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MultiExitNetwork.from_architecture(tiny_space(), SAMPLE, head="conv")


# ---- the segment schedule --------------------------------------------------------------------------


def table_cost(stem, stages, exits, fixed=0):
    """cost(first, last, batch) from per-image bytes of each part, plus ``fixed`` bytes per stage
    that do not grow with the batch (BatchNorm's statistics)."""
    def cost(first, last, batch):
        per_image = (stem if first == 1 else 0) + sum(stages[first - 1:last]) + sum(exits[first - 1:last])
        return per_image * batch + fixed * (last - first + 1)
    return cost


@pytest.mark.parametrize("stages", [[50, 30, 20, 10], [40, 40, 40, 40], [30, 20, 25, 5], [100, 1, 1, 1, 1, 1]])
def test_schedule_covers_every_stage_once_within_the_branch_budget(stages):
    exits = [2] * len(stages)
    cost = table_cost(8, stages, exits, fixed=3)
    for depth in range(1, len(stages) + 1):
        segments = segment_schedule(cost, len(stages), depth, 32)
        budget = cost(1, depth, 32)
        assert segments[0] == Segment(1, depth, budget)
        covered = [i for seg in segments for i in range(seg.first, seg.last + 1)]
        assert covered == list(range(1, len(stages) + 1)), (depth, segments)  # each once, in order
        assert all(seg.saved == cost(seg.first, seg.last, 32) <= budget and seg.micro_batches == 1 for seg in segments)
        # greedy: no segment could have taken the next stage as well
        for seg, nxt in zip(segments[1:], segments[2:]):
            assert cost(seg.first, nxt.first, 32) > budget


def test_schedule_cuts_the_batch_of_a_stage_that_alone_exceeds_the_budget():
    cost = table_cost(0, [10, 50, 5, 5], [0, 0, 0, 0])
    # branch 1 saves 10 per image, 320 a batch; stage 2 alone 50: parts of at most 6 images fit (6 parts)
    assert segment_schedule(cost, 4, 1, 32) == [Segment(1, 1, 320), Segment(2, 2, 50 * 6, 6), Segment(3, 4, 320)]
    assert segment_schedule(cost, 4, 2, 32) == [Segment(1, 2, 60 * 32), Segment(3, 4, 320)]
    # a stage that does not fit one image at a time is left out
    assert segment_schedule(table_cost(0, [1, 50, 1], [0, 0, 0], fixed=40), 3, 1, 8) == [Segment(1, 1, 48), Segment(3, 3, 48)]
    with pytest.raises(ValueError, match="depth"):
        segment_schedule(cost, 4, 5, 32)


def counted_step_bytes(segment, x, y):
    """Bytes autograd keeps for backward in one training step of ``segment``, counted here with
    saved_tensors_hooks (each storage once, parameters left out) and released by backward."""
    params = {p.untyped_storage().data_ptr() for p in segment.full_model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = multi_exit_loss(segment(x), y, segment.loss_weights)
    loss.backward()
    return sum(kept.values())


def test_depthwise_segments_never_save_more_than_the_branch(digits):
    model = tiny_model().train()
    x, y = digits.train.images[:32], digits.train.labels[:32]
    full = counted_step_bytes(model.branch(model.num_exits, all_exits=True), x, y)
    for depth in range(1, model.num_exits + 1):
        branch = counted_step_bytes(model.branch(depth, all_exits=True), x, y)
        segments = depthwise_segments(model, depth, x)
        assert [i for s in segments for i in range(s.first, s.last + 1)] == list(range(1, model.num_exits + 1))
        for seg in segments:
            part = -(-32 // seg.micro_batches)  # the largest part of a cut batch
            assert counted_step_bytes(model.segment(seg.first, seg.last), x[:part], y[:part]) <= branch, (depth, seg)
        if depth < model.num_exits:
            assert branch < full  # the schedule is what lets a shallow client train the deep stages
    # this space's stage 2 (ResNet-50 blocks) alone saves more than branch 1: it is cut into parts
    assert [(s.first, s.last, s.micro_batches) for s in depthwise_segments(model, 1, x)] == [(1, 1, 1), (2, 2, 2), (3, 3, 1)]
    # the prefix of a segment keeps nothing: its bytes are those of its own stages and exits
    assert training_step_bytes(model, x)(3, 3, 32) < training_step_bytes(model, x)(1, 3, 32)


def test_a_segment_trains_only_its_stages_and_exits_and_names_them_as_the_full_model():
    model = tiny_model()
    seg = model.segment(2, 3)
    names = {n.split(".")[0] + "." + n.split(".")[1] for n, _ in seg.named_parameters()}
    assert names == {"stages.1", "stages.2", "exits.1", "exits.2"}
    assert set(seg.state_dict()) <= set(model.state_dict())
    assert set(model.segment(1, 2).state_dict()) == set(model.branch(2, all_exits=True).state_dict())
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    outputs = model(x)
    seg_out = seg.eval()(x)
    assert len(seg_out) == 2 and torch.allclose(seg_out[0], outputs[1]) and torch.allclose(seg_out[1], outputs[2])
    seg_out[1].sum().backward()
    assert all(p.grad is None for p in model.stem.parameters()) and all(p.grad is None for p in model.stages[0].parameters())
    assert any(p.grad is not None for p in model.stages[2].parameters())


def test_depthwise_client_trains_every_stage_and_a_branch_client_only_its_own(digits):
    data = FederatedData(FederatedSettings(dataset="digits", num_clients=4, partition="iid", seed=0), bundle=digits).clients[0]
    start = tiny_model().state_dict()
    for mode, changed_stages in (("branch", {0}), ("depthwise", {0, 1, 2})):
        model = tiny_model()
        update = train_local(0, model.branch(1, all_exits=True), data, LocalSettings(mode=mode), 0.05, 3)
        sent = {k.split(".")[1] for k in update.state if k.startswith("stages.")}
        assert sent == {str(i) for i in changed_stages}, mode
        moved = {k.split(".")[1] for k, v in update.state.items()
                 if k.startswith("stages.") and v.is_floating_point() and not torch.equal(v, start[k])}
        assert moved == {str(i) for i in changed_stages}, mode
        if mode == "depthwise":
            assert set(update.state) == set(start)  # every exit too
            assert update.loss > 0
    with pytest.raises(ValueError, match="depthwise"):
        train_local(0, tiny_model().branch(1), data, LocalSettings(mode="layerwise"), 0.05, 3)


def test_split_segment_data_deals_each_image_to_one_segment(digits):
    """segment_data="split": every image of the client trains exactly one segment in a pass (one
    pass costs about one branch pass); "all": every segment trains on every image."""
    data = FederatedData(FederatedSettings(dataset="digits", num_clients=4, partition="iid", seed=0), bundle=digits).clients[0]

    class Counting(MultiExitObjective):
        def __init__(self):
            super().__init__(FederatedSettings(objective={"name": "logit_adjusted", "distill_weight": 0.0}))
            self.seen = {}

        def loss(self, ctx, outputs, labels):
            self.seen[ctx.branch.first] = self.seen.get(ctx.branch.first, 0) + len(labels)
            return super().loss(ctx, outputs, labels)

    for how, expect in (("split", None), ("all", len(data))):
        objective = Counting()
        train_local(0, tiny_model().branch(1, all_exits=True), data, LocalSettings(mode="depthwise", segment_data=how),
                    0.05, 5, objective)
        assert sorted(objective.seen) == [1, 2, 3], how  # the three segments of branch 1 in this space
        if expect is None:
            assert sum(objective.seen.values()) == len(data) and max(objective.seen.values()) - min(objective.seen.values()) <= 1
        else:
            assert set(objective.seen.values()) == {expect}
    with pytest.raises(ValueError, match="segment_data"):
        FederatedSettings(segment_data="some")


# ---- the label-skew objective ------------------------------------------------------------------------


def test_logit_adjustment_is_cross_entropy_when_the_classes_are_balanced():
    torch.manual_seed(0)
    model = tiny_model()
    branch = model.branch(3, all_exits=True)
    x, y = torch.randn(12, 1, 8, 8), torch.arange(12) % 10
    outputs = branch(x)
    settings = FederatedSettings(objective={"name": "logit_adjusted", "tau": 1.0})
    objective = make_objective(settings)
    assert isinstance(objective, LogitAdjusted)
    balanced = ObjectiveContext(branch, {}, class_counts=torch.full((10,), 37))
    objective.begin(balanced)
    plain = MultiExitObjective(settings).loss(ObjectiveContext(branch, {}), outputs, y)
    assert float(objective.loss(balanced, outputs, y).detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    # skewed: the loss is the cross-entropy of z + log p, exit by exit (by hand, no distillation)
    counts = torch.tensor([90, 10, 0, 0, 0, 0, 0, 0, 0, 0])
    no_kd = FederatedSettings(objective={"name": "logit_adjusted", "distill_weight": 0.0})
    skewed = ObjectiveContext(branch, {}, class_counts=counts)
    adjusted = make_objective(no_kd)
    adjusted.begin(skewed)
    log_p = torch.log(counts.clamp(min=1).double() / counts.clamp(min=1).sum()).float()
    by_hand = sum(F.cross_entropy(z + log_p, y) for z in outputs)
    assert float(adjusted.loss(skewed, outputs, y)) == pytest.approx(float(by_hand), rel=1e-6)
    # an absent class counts as one example, so it is all but masked: log(1/108) against log(90/108)
    shift = label_prior_shift(counts, 1.0)
    assert float(shift[0]) == pytest.approx(float(torch.log(torch.tensor(90 / 108))), rel=1e-5)
    assert float(shift[2]) == pytest.approx(float(torch.log(torch.tensor(1 / 108))), rel=1e-5)
    assert torch.equal(label_prior_shift(counts, 0.0), torch.zeros(10))  # tau 0: plain cross-entropy
    with pytest.raises(ValueError, match="class counts"):
        adjusted.begin(ObjectiveContext(branch, {}))


@pytest.mark.slow
def test_logit_adjusted_client_pushes_down_the_classes_it_lacks_far_less(digits):
    """A client holding two classes, trained with the plain loss, learns to give the other eight
    almost no probability; with logit adjustment its unshifted outputs keep much more of it there
    (what it learnt of the prior sits in the shift, not in the weights the server averages)."""
    from nni_fedexit.data import ImageData

    idx = torch.nonzero(digits.train.labels <= 1).flatten()
    client = ImageData(digits.train.images[idx], digits.train.labels[idx])
    others = digits.train.images[digits.train.labels > 1]
    absent = {}
    for name in ("multi_exit", "logit_adjusted"):
        model = tiny_model()
        settings = FederatedSettings(objective={"name": name, "distill_weight": 0.0})
        train_local(0, model.branch(3, all_exits=True), client, LocalSettings(epochs=3), 0.05, 1, make_objective(settings))
        with torch.no_grad():
            probs = model.eval()(others)[-1].softmax(1)
        absent[name] = float(probs[:, 2:].sum(1).mean())
    assert absent["logit_adjusted"] > 3 * absent["multi_exit"], absent


# ---- the server's step and the best-round rule ----------------------------------------------------------


def test_server_batches_use_every_image_once_before_any_twice():
    idx = server_batches(10, steps=7, batch_size=4, seed=3)
    assert len(idx) == 28
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:20].tolist()) == list(range(10))
    assert torch.equal(idx, server_batches(10, 7, 4, 3)) and not torch.equal(idx, server_batches(10, 7, 4, 4))
    with pytest.raises(ValueError, match="no labelled images"):
        server_batches(0, 1, 4, 0)


def test_the_server_makes_one_pass_over_its_labelled_images_unless_told_a_step_count():
    from nni_fedexit.federated.backends.flower.common import settings_from_config

    default = FederatedSettings()
    assert default.server_steps is None
    assert default.server_images(9_600) == 4_800 and default.server_step_count(4_800) == 150  # the demo
    assert default.server_step_count(115) == 3 and default.server_step_count(5) == 1  # digits; never none
    off = FederatedSettings(server_steps=0)
    assert off.server_images(9_600) == 0 and off.server_step_count(4_800) == 0
    assert FederatedSettings(server_steps=7).server_step_count(4_800) == 7
    # a Flower run config: left out is the default, 0 turns the steps off
    assert settings_from_config({}).server_steps is None
    assert settings_from_config({"settings.server_steps": 0}).server_steps == 0
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="server_steps"):
            FederatedSettings(server_steps=bad)


def test_server_pass_trains_every_exit_on_the_server_images_and_is_seeded(digits):
    settings = FederatedSettings(dataset="digits", server_steps=5, batch_size=16, objective={"name": "logit_adjusted", "distill_weight": 0.0})
    data = digits.train
    a, b = tiny_model(), tiny_model()
    start = tiny_model().state_dict()
    loss = server_pass(a, data, settings, lr=0.05, seed=11)
    server_pass(b, data, settings, lr=0.05, seed=11)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k, v in a.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, start[k]) and k.startswith(("stages", "exits"))}
    assert moved == {"stages.0", "stages.1", "stages.2", "exits.0", "exits.1", "exits.2"}
    assert loss > 0
    untouched = tiny_model()
    server_pass(untouched, data, FederatedSettings(server_steps=0), 0.05, 11)
    assert all(torch.equal(v, start[k]) for k, v in untouched.state_dict().items())


def test_best_round_by_last_exit_accuracy():
    early = {"total_loss": 1.0, "exit_accuracy": [0.8, 0.7]}
    late = {"total_loss": 1.2, "exit_accuracy": [0.7, 0.75]}
    assert better(late, early, "total_loss") is False
    assert better(late, early, "last_exit") is True
    tie = {"total_loss": 0.9, "exit_accuracy": [0.7, 0.75]}
    assert better(tie, late, "last_exit") is True and better(late, tie, "last_exit") is False
    with pytest.raises(ValueError, match="best_by"):
        better(late, early, "accuracy")
    with pytest.raises(ValueError, match="best_by"):
        FederatedSettings(best_by="accuracy")


# ---- each option on a tiny label-skewed run ----------------------------------------------------------

#: the patent's training with every label-skew option off, and each option alone
SKEW_OPTIONS = {
    "branch": {"client_training": "branch", "objective": "multi_exit", "server_steps": 0},
    "depthwise": {"client_training": "depthwise", "objective": "multi_exit", "server_steps": 0},
    "logit_adjusted": {"client_training": "branch", "objective": "logit_adjusted", "server_steps": 0},
    "server_steps": {"client_training": "branch", "objective": "multi_exit", "server_steps": 10},
}


@pytest.fixture(scope="module")
def skewed_runs(digits):
    """Each option's tiny run on digits: 5 clients holding 2 classes each, every client every round."""
    from nni_fedexit.federated import federate

    out = {}
    for name, options in SKEW_OPTIONS.items():
        settings = FederatedSettings(dataset="digits", rounds=6, num_clients=5, partition="shards", classes_per_client=2,
                                     local_epochs=2, head="conv", bn_samples=230, seed=0, **options)
        data = FederatedData(settings, bundle=digits)
        torch.manual_seed(0)
        out[name] = federate(tiny_space().build(SAMPLE), settings, data=data, report=False)
    return out


#: how far below the first exit the last one may end on the test images
MARGIN = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("option", ["depthwise", "logit_adjusted", "server_steps"])
def test_each_label_skew_option_keeps_the_last_exit_level_with_the_first(skewed_runs, option):
    """With two classes per client the patent's training ends with its last exit below its first
    (the deep stage is trained by few clients, each with two classes); each option alone keeps
    the last exit no more than MARGIN below the first, and beats the patent's last exit."""
    base, result = skewed_runs["branch"].test_accuracy, skewed_runs[option].test_accuracy
    assert base[-1] < base[0] - MARGIN, base  # the failure the options are for, on this split
    assert result[-1] >= result[0] - MARGIN, (option, result)
    assert result[-1] > base[-1] + 0.05, (option, result, base)


def test_server_steps_are_recorded_per_round(skewed_runs):
    assert all(h["server_loss"] > 0 for h in skewed_runs["server_steps"].history)
    assert all("server_loss" not in h for h in skewed_runs["branch"].history)


@pytest.mark.slow
def test_a_run_with_the_label_skew_options_resumes_where_it_stopped(digits, tmp_path):
    """Stopped after round 1 and resumed: rounds 2 and 3 are trained once each (counted), round 1
    is not trained again, and the weights are those of the uninterrupted run: depth-wise clients,
    the label-prior objective and the server's steps are all seeded by the round."""
    import copy

    from nni_fedexit.federated import SimulationBackend, federate

    trained = []

    class Counting(SimulationBackend):
        def train_client(self, global_state, task):
            trained.append(self.round)
            return super().train_client(global_state, task)

    def run(rounds, folder=None):
        settings = FederatedSettings(dataset="digits", rounds=rounds, num_clients=4, client_fraction=0.5,
                                     partition="shards", classes_per_client=3, server_steps=3, seed=0,
                                     checkpoint_dir=str(folder) if folder else None)
        assert settings.client_training == "depthwise" and settings.name("objective") == "logit_adjusted"  # the defaults
        torch.manual_seed(0)
        net = tiny_space().build(SAMPLE)
        return federate(copy.deepcopy(net), settings, data=FederatedData(settings, bundle=digits),
                        backend_factory=Counting, report=False)

    straight = run(3)
    trained.clear()
    run(1, tmp_path)
    assert trained == [1, 1]
    trained.clear()
    resumed = run(3, tmp_path)
    assert trained == [2, 2, 3, 3]  # two clients a round; round 1 is not trained again
    assert [h["round"] for h in resumed.history] == [1, 2, 3] and resumed.best_round == straight.best_round
    assert [h["server_loss"] for h in resumed.history] == [h["server_loss"] for h in straight.history]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
