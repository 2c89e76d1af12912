"""NNI 3.0's generic tuner checks, with SizeAwarePGTuner in place of NNI's built-in tuners.

Adapted from microsoft/nni at tag v3.0 (commit 36ba04c94e51eaa2a88b9e6e0a4077f3a9f93004),
``test/ut/sdk/test_builtin_tuners.py``: ``BuiltinTunersTestCase.search_space_test_one``,
``check_range``, ``search_space_test_all`` and ``import_data_test`` as pytest functions (the
unittest class is dropped), run with ``SizeAwarePGTuner`` as the factory every built-in tuner test
passes (``test_random_search``, ``test_tpe``, ...): every type in NNI's
``test/ut/sdk/assets/search_space.json`` (copied to ``tests/assets/nni_v3_search_space.json``)
must be generated in range and on its grid, alone and all together, and the one marked ``fail``
must raise. ``check_range``'s branches for classic NAS (``_mutable_layer``) and PBT checkpoint
directories are left out: this tuner serves neither. Seeded (upstream's are not).
"""

from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path

import pytest

from nni.tuner import Tuner

from nni_fedexit import SizeAwarePGTuner

SEARCH_SPACE_ALL = json.loads((Path(__file__).parent / "assets" / "nni_v3_search_space.json").read_text())
SUPPORTED_TYPES = ["choice", "randint", "uniform", "quniform", "loguniform", "qloguniform",
                   "normal", "qnormal", "lognormal", "qlognormal"]
TEST_ROUND, PARAMS_EACH_ROUND = 3, 50
EPS = 1e-6


def send_trial_result(tuner, parameter_id, parameters, metrics):
    if parameter_id % 2 == 1:
        metrics = {"default": metrics, "extra": "hello"}
    tuner.receive_trial_result(parameter_id, parameters, metrics)
    tuner.trial_end(parameter_id, True)


def check_range(generated_params, search_space):
    for param in generated_params:
        for k, v in param.items():
            item = search_space[k]
            if item["_type"] == "choice":
                assert v in item["_value"]
            if item["_type"] == "randint":
                assert isinstance(v, int)
            if item["_type"] == "uniform":
                assert isinstance(v, float)
            if item["_type"] in ("randint", "uniform", "quniform", "loguniform", "qloguniform"):
                assert v >= item["_value"][0]
                assert v <= item["_value"][1]
            if item["_type"].startswith("q"):
                multiple = v / item["_value"][2]
                if item["_value"][0] + EPS < v < item["_value"][1] - EPS:
                    assert int(round(multiple)) == pytest.approx(multiple, abs=1e-7)
            if item["_type"] in ("qlognormal", "lognormal"):
                assert v >= 0


def search_space_test_one(tuner_factory, search_space, rng):
    tuner = tuner_factory()
    assert isinstance(tuner, Tuner)
    tuner.update_search_space(search_space)
    for i in range(TEST_ROUND):
        queue = deque()
        parameters = tuner.generate_multiple_parameters(
            list(range(i * PARAMS_EACH_ROUND, (i + 1) * PARAMS_EACH_ROUND)),
            st_callback=lambda *args: queue.append(tuple(args)))
        check_range(parameters, search_space)
        for k in range(min(len(parameters), PARAMS_EACH_ROUND)):
            send_trial_result(tuner, PARAMS_EACH_ROUND * i + k, parameters[k], rng.uniform(-100, 100))
        while queue:
            id_, params = queue.popleft()
            check_range([params], search_space)
            send_trial_result(tuner, id_, params, rng.uniform(-100, 100))
        if not parameters:
            raise ValueError("No parameters generated")
    return tuner


def factory():
    return SizeAwarePGTuner(seed=0)


@pytest.mark.parametrize("single", sorted(SEARCH_SPACE_ALL))
def test_search_space_test_all_one_type_at_a_time(single):
    """upstream search_space_test_all, one key at a time: supported ones run, 'fail' ones raise."""
    space = {single: SEARCH_SPACE_ALL[single]}
    rng = random.Random(0)
    expected_fail = not any(single.startswith(t) for t in SUPPORTED_TYPES) or "fail" in single
    if expected_fail:
        with pytest.raises(ValueError, match=repr(single)):
            search_space_test_one(factory, space, rng)
        return
    tuner = search_space_test_one(factory, space, rng)
    # ours, beyond upstream: every one of the 150 results reached the controller
    assert len(tuner.records) == TEST_ROUND * PARAMS_EACH_ROUND


@pytest.mark.slow
def test_search_space_test_all_together():
    """upstream's last step: the whole supported space at once."""
    full = {k: v for k, v in SEARCH_SPACE_ALL.items() if "fail" not in k}
    tuner = search_space_test_one(factory, full, random.Random(1))
    assert tuner.learner.steps == TEST_ROUND * PARAMS_EACH_ROUND // tuner.settings.samples_per_update


@pytest.mark.parametrize("stype", ["choice_str", "choice_num"])
def test_import_data_test(stype):
    """upstream import_data_test with support_middle=True (import at the start and in the middle)."""
    if stype == "choice_str":
        search_space = {"choice_str": {"_type": "choice",
                                       "_value": ["cat", "dog", "elephant", "cow", "sheep", "panda", "tiger"]}}
        first = [{"parameter": {"choice_str": "cat"}, "value": 1.1},
                 {"parameter": {"choice_str": "dog"}, "value": {"default": 1.2, "tmp": 2}}]
        middle = first + [{"parameter": {"choice_str": "cow"}, "value": 1.3}]
    else:
        search_space = {"choice_num": {"_type": "choice", "_value": [10, 20, 30, 40, 50, 60]}}
        first = [{"parameter": {"choice_num": 20}, "value": 1.1},
                 {"parameter": {"choice_num": 60}, "value": {"default": 1.2, "tmp": 2}}]
        middle = first + [{"parameter": {"choice_num": 50}, "value": 1.3}]
    rng = random.Random(0)
    tuner = factory()
    tuner.update_search_space(search_space)
    tuner.import_data(first)
    parameters = tuner.generate_multiple_parameters(list(range(3)))
    for i in range(3):
        tuner.receive_trial_result(i, parameters[i], rng.uniform(-100, 100))
    tuner.import_data(middle)
    parameters = tuner.generate_multiple_parameters([3])
    tuner.receive_trial_result(3, parameters[0], rng.uniform(-100, 100))
    # ours: the first import counted twice would be 2 extra records; the middle one adds only "cow"
    assert [r["source"] for r in tuner.records].count("import") == 3
    assert len(tuner.records) == 3 + 3 + 1
