"""SizeAwarePGTuner: NNI's classic Tuner API over the shared controller and the size-aware reward."""

import json
import random

import pytest
import yaml

from nni_fedexit import SizeAwarePGTuner
from nni_fedexit.space.nni_json import to_nni_search_space, write_nni_search_space
from nni_fedexit.search.reward import parse_metric
from nni_fedexit.search.tuner import NNICTL_META, STATE_FILE, parse_search_space
from helpers import EXAMPLES, PLANTED, ROOT, PLANTED_SPACE as SPACE


def planted_score(p):
    """0.4, plus 0.3 for every parameter at its planted best value."""
    return 0.4 + sum(0.3 for k, v in PLANTED.items() if p[k] == v)


def run_nni_like(tuner, trials, score, concurrency=2, order_seed=0, start_id=0):
    """What NNI does: keep `concurrency` trials out, results come back in random order.

    Returns [(parameter_id, parameters)] in parameter-id order.
    """
    rng = random.Random(order_seed)
    running, done, next_id = [], [], start_id
    while len(done) < trials:
        while len(running) < concurrency and next_id < start_id + trials:
            running.append((next_id, tuner.generate_parameters(next_id)))
            next_id += 1
        pid, params = running.pop(rng.randrange(len(running)))
        tuner.receive_trial_result(pid, params, score(params), trial_job_id=f"T{pid}")
        done.append((pid, params))
    return sorted(done, key=lambda d: d[0])


def planted_hits_at_the_end(tuner, seed):
    """How many of the last 10 of 40 trials NNI would run with ``tuner`` (results out of order)
    are the planted best; the bar is 6."""
    tuner.update_search_space(SPACE)
    done = run_nni_like(tuner, 40, lambda p: {"default": planted_score(p), "params": 1000}, order_seed=seed + 7)
    return sum(p == PLANTED for _, p in done[-10:]), done


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concentrates_on_the_planted_best_with_results_out_of_order(seed):
    tuner = SizeAwarePGTuner(seed=seed)
    hits, done = planted_hits_at_the_end(tuner, seed)
    assert hits >= 6, done[-10:]
    probs = tuner.learner.probabilities()
    assert probs["a"]["z"] > 0.5 and probs["c"]["2"] > 0.5
    assert tuner.learner.steps == 40 // tuner.settings.samples_per_update


def test_the_bar_needs_learning_nnis_random_sampling_and_our_unlearning_tuner_miss_it():
    """The bar above means something: through the same harness, space, scores and seeds, NNI's
    RandomTuner sampling (without its de-duplication, which ends the experiment after the 9 points
    of this space) and our tuner with a learning rate of 1e-12 hit the planted best about 1 time
    in 9, never 6 of the last 10."""
    from nni.algorithms.hpo.random_tuner import RandomTuner, suggest
    from nni.common.hpo_utils import deformat_parameters

    class Random(RandomTuner):
        def generate_parameters(self, *args, **kwargs):
            return deformat_parameters(suggest(self.rng, self.space), self.space)

    for seed in range(3):
        for tuner in (Random(seed=seed), SizeAwarePGTuner(seed=seed, controller={"lr": 1e-12})):
            hits, done = planted_hits_at_the_end(tuner, seed)
            assert len({(p["a"], p["c"]) for _, p in done}) >= 8  # it did explore the space
            assert hits < 6, (type(tuner).__name__, seed, done[-10:])


def test_size_aware_reward_prefers_the_smaller_network_at_equal_accuracy():
    tuner = SizeAwarePGTuner(seed=0, beta=1, baseline_params=1000)
    tuner.update_search_space({"width": {"_type": "choice", "_value": ["small", "big"]}})
    sizes = {"small": 500, "big": 2000}
    done = run_nni_like(tuner, 40, lambda p: {"default": 0.8, "params": sizes[p["width"]]})
    assert sum(p["width"] == "small" for _, p in done[-10:]) >= 8
    rec = {r["parameters"]["width"]: r["reward"] for r in tuner.records}
    assert rec["small"] == pytest.approx(1.6)  # 0.8 * (500 / 1000) ** (-1 / 1)
    assert rec["big"] == pytest.approx(0.4)  # 0.8 * (2000 / 1000) ** (-1 / 1)


def test_reward_per_trial_is_kept_and_a_plain_number_means_p_h_equals_P():
    tuner = SizeAwarePGTuner(seed=0, beta=14, baseline_params=1000, samples_per_update=8)
    tuner.update_search_space(SPACE)
    p0, p1 = tuner.generate_parameters(0), tuner.generate_parameters(1)
    tuner.receive_trial_result(1, p1, {"default": 0.9, "params": 250})
    tuner.receive_trial_result(0, p0, 0.5)
    assert tuner.rewards[0] == pytest.approx(0.5)
    assert tuner.rewards[1] == pytest.approx(0.9 * (250 / 1000) ** (-1 / 14))
    assert tuner.pending == {}


def test_minimize_turns_the_metric_into_a_reward_that_grows_as_it_falls():
    tuner = SizeAwarePGTuner(optimize_mode="minimize", beta=2, baseline_params=100)
    assert tuner.reward(0.2, None) > tuner.reward(0.3, None)
    assert tuner.reward(0.2, 25) > tuner.reward(0.2, 100) > tuner.reward(0.2, 400)
    assert tuner.reward(0.2, 400) == pytest.approx(-0.2 * 2)  # error * (p_h/P) ** (1/beta)


def test_generate_parameters_many_times_before_any_result():
    tuner = SizeAwarePGTuner(seed=3)
    tuner.update_search_space(SPACE)
    params = [tuner.generate_parameters(i) for i in range(6)]
    assert all(p["a"] in ("x", "y", "z") and p["c"] in (0, 1, 2) for p in params)
    assert all(isinstance(p["c"], int) for p in params)
    assert sorted(tuner.pending) == list(range(6))
    json.dumps(params)  # NNI sends them as JSON


def test_a_failed_trial_is_not_counted_and_does_not_crash():
    tuner = SizeAwarePGTuner(seed=0, samples_per_update=2)
    tuner.update_search_space(SPACE)
    p = [tuner.generate_parameters(i) for i in range(3)]
    tuner.trial_end(1, success=False)
    tuner.receive_trial_result(0, p[0], 0.7)
    assert tuner.learner.steps == 0 and len(tuner.buffer) == 1  # the failure added no reward
    tuner.trial_end(0, success=True)  # success without effect: its result was already counted
    tuner.trial_end(99, success=False)  # unknown id: ignored
    tuner.receive_trial_result(2, p[2], 0.4)
    assert tuner.learner.steps == 1 and tuner.failed == 1
    assert sorted(tuner.rewards) == [0, 2] and tuner.pending == {}


def test_unusable_results_are_skipped_not_rewarded():
    tuner = SizeAwarePGTuner(seed=0)
    tuner.update_search_space(SPACE)
    p = tuner.generate_parameters(0)
    tuner.receive_trial_result(0, p, {"loss": 1.0})  # no "default"
    tuner.receive_trial_result(1, {"a": "nope", "c": 0}, 0.9)  # not in the space
    tuner.receive_trial_result(2, p, float("nan"))
    assert tuner.records == [] and tuner.buffer == []


def test_a_continuous_parameter_concentrates_near_its_planted_optimum():
    """The planted-best test with a learning rate: uniform [0, 1], best at 0.8 (the bin [0.75, 0.875))."""
    space = {**SPACE, "lr": {"_type": "uniform", "_value": [0.0, 1.0]}}
    score = lambda p: {"default": planted_score(p) + 0.3 * max(0.0, 1 - 4 * abs(p["lr"] - 0.8)), "params": 1000}  # noqa: E731
    hits = 0
    for seed in range(3):
        tuner = SizeAwarePGTuner(seed=seed)
        tuner.update_search_space(space)
        done = run_nni_like(tuner, 60, score, order_seed=seed)
        lrs = [p["lr"] for _, p in done]
        assert all(0.0 <= lr <= 1.0 for lr in lrs)
        near = sum(abs(lr - 0.8) <= 0.125 for lr in lrs[-10:])
        hits += near >= 6
        assert near > sum(abs(lr - 0.8) <= 0.125 for lr in lrs[:10])  # more of them than at the start
    assert hits >= 2, "the last trials should concentrate near 0.8 in most seeds"


def test_nested_choices_decide_their_sub_parameters_only_when_their_option_is_taken():
    nested = {"model": {"_type": "choice", "_value": [
        {"_name": "cnn", "depth": {"_type": "choice", "_value": [1, 2]}, "lr": {"_type": "loguniform", "_value": [1e-4, 1e-1]}},
        {"_name": "mlp"}]}}
    tuner = SizeAwarePGTuner(seed=0, samples_per_update=2)
    tuner.update_search_space(nested)
    params = [tuner.generate_parameters(i) for i in range(20)]
    for p in params:
        if p["model"]["_name"] == "cnn":
            assert set(p["model"]) == {"_name", "depth", "lr"} and 1e-4 <= p["model"]["lr"] <= 1e-1
        else:
            assert p["model"] == {"_name": "mlp"}
    assert {p["model"]["_name"] for p in params} == {"cnn", "mlp"}
    for i, p in enumerate(params):  # as NNI sends them back: cnn with depth 2 is best
        good = p["model"]["_name"] == "cnn" and p["model"]["depth"] == 2
        tuner.receive_trial_result(i, json.loads(json.dumps(p)), 0.9 if good else 0.3)
    assert len(tuner.records) == 20 and tuner.learner.steps == 10
    with pytest.raises(ValueError, match=r"'model/cnn/depth' \(choice\): duplicate"):
        parse_search_space({"model": {"_type": "choice", "_value": [
            {"_name": "cnn", "depth": {"_type": "choice", "_value": [1, 1]}}]}})


@pytest.mark.parametrize("spec, message", [
    ({"_type": "gaussian", "_value": [0, 1]}, "type 'gaussian', which NNI does not define"),
    ({"_type": "uniform", "_value": [1.0, 0.0]}, r"\(uniform\): low must be <= high"),
    ({"_type": "loguniform", "_value": [0.0, 1.0]}, "low must be > 0 on a log scale"),
    ({"_type": "qnormal", "_value": [0.0, 1.0]}, r"_value must be \[mu, sigma, q\]"),
    ({"_type": "normal", "_value": [0.0, -1.0]}, "sigma must be > 0"),
    ({"_type": "quniform", "_value": [0, 10, 0]}, "q must be > 0"),
])
def test_bad_numerical_parameters_are_an_error_naming_the_parameter(spec, message):
    with pytest.raises(ValueError, match=r"'learning_rate'.*" + message):
        SizeAwarePGTuner().update_search_space({"a": SPACE["a"], "learning_rate": spec})


def test_search_space_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"'n' \(randint\).*lower < upper"):
        parse_search_space({"n": {"_type": "randint", "_value": [3, 3]}})
    with pytest.raises(ValueError, match="duplicate"):
        parse_search_space({"a": {"_type": "choice", "_value": [1, 1, 2]}})
    with pytest.raises(ValueError, match="'b'.*_type"):
        parse_search_space({"b": [1, 2]})
    assert parse_search_space({"n": {"_type": "randint", "_value": [2, 5]}})["n"].values == [2, 3, 4]


def test_class_args_are_checked_with_clear_messages():
    with pytest.raises(ValueError, match="classArgs.beta"):
        SizeAwarePGTuner(beta=0)
    with pytest.raises(ValueError, match="optimize_mode"):
        SizeAwarePGTuner(optimize_mode="max")
    with pytest.raises(ValueError, match=r"controller: unknown key\(s\) \['lrate'\]"):
        SizeAwarePGTuner(controller={"lrate": 0.1})
    with pytest.raises(ValueError, match=r"unknown classArgs \['batch'\]"):
        SizeAwarePGTuner(batch=4)


def test_parse_metric_reads_numbers_dicts_and_json():
    assert parse_metric(0.5) == (0.5, None)
    assert parse_metric({"default": 0.5, "params": 10}) == (0.5, 10)
    assert parse_metric('{"default": 0.5, "params": 10}') == (0.5, 10)
    assert parse_metric({"default": "x"}) == (None, None)


def test_import_data_feeds_the_controller():
    data = [{"parameter": {"a": a, "c": c}, "value": {"default": planted_score({"a": a, "c": c}), "params": 1000}}
            for a in "xyz" for c in range(3)] * 4
    tuner = SizeAwarePGTuner(seed=0)
    tuner.update_search_space(SPACE)
    before = tuner.learner.probabilities()
    tuner.import_data(data + [{"parameter": {"a": "w", "c": 0}, "value": 1.0}])  # the last is not in the space
    assert len(tuner.records) == 36 and tuner.learner.steps == 36 // 4
    after = tuner.learner.probabilities()
    assert after["a"]["z"] > before["a"]["z"] and after["c"]["2"] > before["c"]["2"]
    tuner.import_data(data)  # the same records again add nothing
    assert len(tuner.records) == 36


def test_state_is_saved_and_a_resumed_tuner_continues_without_double_counting(tmp_path):
    score = lambda p: {"default": planted_score(p), "params": 1000}  # noqa: E731
    first = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path))
    first.update_search_space(SPACE)
    done = run_nni_like(first, 14, score)  # 3 updates, 2 rewards left in the buffer
    assert (tmp_path / STATE_FILE).is_file()
    summary = json.loads((tmp_path / "size_aware_pg_tuner.json").read_text())
    assert len(summary["trials"]) == 14 and summary["trials"][0]["architecture"].startswith("a=")

    # nnictl resume: a new dispatcher process loads the state, NNI replays the finished trials
    resumed = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path))
    resumed.load_checkpoint()
    resumed.update_search_space(SPACE)
    resumed.import_data([{"parameter": p, "value": score(p), "trialJobId": f"T{i}"} for i, p in done])
    assert resumed.learner.steps == first.learner.steps == 3
    assert resumed.buffer == first.buffer and len(resumed.records) == 14
    # it samples what the first one would have sampled next (same weights, optimiser, generator)
    assert [resumed.generate_parameters(i) for i in range(1, 5)] == [first.generate_parameters(i) for i in range(20, 24)]



def test_state_of_another_space_is_not_loaded(tmp_path):
    first = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path))
    first.update_search_space(SPACE)
    run_nni_like(first, 8, planted_score)
    other = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path))
    other.load_checkpoint()
    other.update_search_space({"a": SPACE["a"]})
    assert other.learner.steps == 0 and other.records == []


def test_a_trial_running_at_the_stop_is_counted_once_across_two_resumes(tmp_path):
    first = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path), samples_per_update=2)
    first.update_search_space(SPACE)
    p0, p1 = first.generate_parameters(0), first.generate_parameters(1)
    first.receive_trial_result(0, p0, 0.5, trial_job_id="A")
    # stopped while trial B (parameter 1) ran; NNI re-runs it after the resume and sends its
    # result through import_data without a trial id
    second = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path), samples_per_update=2)
    second.load_checkpoint()
    second.update_search_space(SPACE)
    second.import_data([{"parameter": p0, "value": 0.5, "trialJobId": "A"}])
    second.import_data([{"parameter": p1, "value": 0.9}])
    assert len(second.records) == 2 and second.learner.steps == 1
    # the next resume replays both, now with their trial ids
    third = SizeAwarePGTuner(seed=0, state_dir=str(tmp_path), samples_per_update=2)
    third.load_checkpoint()
    third.update_search_space(SPACE)
    third.import_data([{"parameter": p0, "value": 0.5, "trialJobId": "A"},
                       {"parameter": p1, "value": 0.9, "trialJobId": "B"}])
    assert len(third.records) == 2 and third.learner.steps == 1


def test_nnictl_meta_file_matches_the_code():
    meta = yaml.safe_load((ROOT / "strategies" / "size_aware_pg_tuner.meta.yml").read_text())
    assert meta == NNICTL_META


def test_block_pool_space_as_nni_json_agrees_with_the_space(fmnist_space, tmp_path):
    ss = to_nni_search_space(fmnist_space)
    assert list(ss) == fmnist_space.labels
    for label, spec in ss.items():
        assert spec == {"_type": "choice", "_value": list(fmnist_space.pools[label])}
    assert {k: d.values for k, d in parse_search_space(ss).items()} == {label: list(pool) for label, pool in fmnist_space.pools.items()}
    path = write_nni_search_space(fmnist_space, tmp_path / "ss.json")
    assert json.loads(path.read_text()) == ss
    tuner = SizeAwarePGTuner(seed=0)
    tuner.update_search_space(ss)
    sample = tuner.generate_parameters(0)
    assert fmnist_space.count_params(sample) > 0  # a sample the space can build


def test_example_search_space_is_the_exported_block_pool_space():
    from nni_fedexit import ResNetBlockPoolSpace

    example = EXAMPLES / "nnictl"
    config = yaml.safe_load((example / "config.yml").read_text())
    committed = json.loads((example / config["searchSpaceFile"]).read_text())
    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    assert committed == to_nni_search_space(space)
    assert config["tuner"]["name"] == NNICTL_META["builtinName"]
    assert config["tuner"]["classArgs"]["baseline_params"] == space.baseline_params()


def test_register_command_is_idempotent_and_nnictl_finds_the_tuner(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from nni.tools.package_utils import get_algo_meta

    from nni_fedexit.job.cli import main

    monkeypatch.setenv("NNI_CONFIG_DIR", str(tmp_path))  # NNI's registered_algorithms.yml goes here
    first = CliRunner().invoke(main, ["register"])
    assert first.exit_code == 0, first.output
    assert "SizeAwarePG registered" in first.output and str(tmp_path) in first.output
    second = CliRunner().invoke(main, ["register"])
    assert second.exit_code == 0 and "SizeAwarePG already registered" in second.output
    assert "| SizeAwarePG     | tuner      | user      | SizeAwarePGTuner     | nni_fedexit.search.tuner" in second.output
    meta = get_algo_meta("SizeAwarePG")
    assert meta.class_name == NNICTL_META["className"] and not meta.is_builtin
    assert (tmp_path / "registered_algorithms.yml").read_text().count("builtinName: SizeAwarePG") == 1


def test_space_command_writes_the_nni_json(tmp_path):
    from click.testing import CliRunner

    from nni_fedexit import ResNetBlockPoolSpace
    from nni_fedexit.job.cli import main

    out = tmp_path / "ss.json"
    result = CliRunner().invoke(main, ["space", "--space", "resnet_pool", "--nni-json", str(out)])
    assert result.exit_code == 0, result.output
    space = ResNetBlockPoolSpace.from_preset("resnet_pool")
    assert json.loads(out.read_text()) == to_nni_search_space(space)
    assert f"baseline_params: {space.baseline_params()}" in result.output
