"""Imports that cost nothing until used, each checked in a fresh interpreter.

``import nni_fedexit`` and ``nni-fedexit --help`` load neither torch nor NNI; the maths modules load
no NNI module at all; the nnictl tuner's module loads no torch (NNI's dispatcher gives it 10 s to
connect, and torch is most of that on a busy machine); NNI's workarounds hold whatever the import
order; every lazily exported name resolves to the object its module defines.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nni_fedexit.lazy import type_checking_imports

ROOT = Path(__file__).resolve().parents[1]

#: the modules of pure maths: tensors in, tensors out, nothing of NNI's
MATHS = [
    "nni_fedexit.federated.aggregators.base", "nni_fedexit.federated.aggregators.fedavg",
    "nni_fedexit.federated.aggregators.server_opt", "nni_fedexit.federated.objectives.base",
    "nni_fedexit.federated.objectives.multi_exit", "nni_fedexit.federated.objectives.regularised",
    "nni_fedexit.federated.objectives.label_skew", "nni_fedexit.federated.rounds",
    "nni_fedexit.federated.batchnorm", "nni_fedexit.federated.depthwise", "nni_fedexit.exits.thresholds",
    "nni_fedexit.search.reward", "nni_fedexit.search.controller", "nni_fedexit.search.decisions",
]
#: every package whose __init__ exports names lazily
LAZY_PACKAGES = [
    "nni_fedexit", "nni_fedexit.data", "nni_fedexit.space", "nni_fedexit.search", "nni_fedexit.exits",
    "nni_fedexit.federated", "nni_fedexit.federated.aggregators", "nni_fedexit.federated.objectives",
]


def loaded_after(code: str) -> dict[str, list[str]]:
    """The torch, nni, pytorch_lightning and flwr modules a fresh interpreter holds after ``code``."""
    probe = (code + "\nimport json, sys\n"
             "print(json.dumps({top: sorted(m for m in sys.modules if m == top or m.startswith(top + '.'))"
             " for top in ('torch', 'nni', 'pytorch_lightning', 'flwr')}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_loads_neither_torch_nor_nni():
    loaded = loaded_after("import nni_fedexit; nni_fedexit.__version__")
    assert loaded == {"torch": [], "nni": [], "pytorch_lightning": [], "flwr": []}


def test_cli_help_loads_neither_torch_nor_nni():
    code = ("import sys\nfrom nni_fedexit.job.cli import main\n"
            "for args in (['--help'], ['run', '--help'], ['federate', '--help'], ['view', '--help']):\n"
            "    try:\n        main(args, prog_name='nni-fedexit')\n    except SystemExit as e:\n"
            "        assert e.code == 0, (args, e.code)")
    loaded = loaded_after(code)
    assert loaded["torch"] == [] and loaded["nni"] == [], loaded


@pytest.mark.slow
def test_maths_modules_load_no_nni_module():
    loaded = loaded_after("\n".join(f"import {m}" for m in MATHS))
    if loaded["nni"] or loaded["pytorch_lightning"] or loaded["flwr"]:
        culprits = [m for m in MATHS if loaded_after(f"import {m}")["nni"]]
        pytest.fail(f"these maths modules load NNI: {culprits} ({len(loaded['nni'])} nni modules)")
    assert loaded["torch"], "the maths modules are tensor code: torch is expected"


def test_nnictl_tuner_module_loads_no_torch():
    """Everything the dispatcher runs before it connects: import the tuner and build it."""
    loaded = loaded_after("from nni_fedexit.search.tuner import SizeAwarePGTuner\n"
                          "SizeAwarePGTuner(beta=14, baseline_params=1000, controller={'lr': 0.05})")
    assert loaded["torch"] == [] and loaded["pytorch_lightning"] == [], loaded["torch"][:5]
    assert "nni.tuner" in loaded["nni"]


@pytest.mark.slow
def test_the_tuner_loads_torch_when_the_search_space_arrives():
    code = ("from nni_fedexit.search.tuner import SizeAwarePGTuner\n"
            "t = SizeAwarePGTuner(seed=3)\n"
            "t.update_search_space({'a': {'_type': 'choice', '_value': [1, 2, 3]}})\n"
            "assert t.generate_parameters(0)['a'] in (1, 2, 3)")
    assert "torch" in loaded_after(code)["torch"]


@pytest.mark.slow
@pytest.mark.parametrize("first", ["import nni", "import nni.nas.nn.pytorch", "pass"])
def test_nni_workarounds_hold_whatever_the_import_order(first):
    code = (f"{first}\nimport nni_fedexit.search.tuner\n"
            "from nni.experiment import launcher\n"
            "from nni.runtime.msg_dispatcher_base import MsgDispatcherBase\n"
            "assert launcher._check_rest_server.patient\n"
            "assert MsgDispatcherBase.process_command.reports_errors")
    loaded_after(code)


@pytest.mark.slow
def test_workarounds_are_not_applied_by_importing_the_package():
    """Importing us does not patch NNI: only the modules that use NNI apply the workarounds."""
    code = ("import nni_fedexit, nni_fedexit.federated.aggregators\nimport nni\nfrom nni.experiment import launcher\n"
            "assert not getattr(launcher._check_rest_server, 'patient', False)")
    loaded_after(code)


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_name_is_its_module_object(package):
    module = importlib.import_module(package)
    exports = type_checking_imports(module.__file__)
    assert sorted(module.__all__) == sorted(exports), "__all__ and the TYPE_CHECKING imports must list the same names"
    for name, source in exports.items():
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(source), name), (package, name)
        assert name in dir(module)


def test_unknown_attribute_is_an_attribute_error():
    import nni_fedexit

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        nni_fedexit.nothing_here  # noqa: B018
    assert not hasattr(nni_fedexit, "_private")


@pytest.mark.slow
def test_subpackages_are_attributes_as_before():
    code = "import nni_fedexit\nassert nni_fedexit.federated.aggregators.make_aggregator"
    assert loaded_after(code)["nni"] == []
