"""With CI=true a skip is a failure that names what is missing; elsewhere it is a skip that says what
to install. Shown on the suite's own tests, in a pytest subprocess where Fashion-MNIST, flwr,
selenium, chromium and ssh-keygen are really absent (empty data folder, packages that fail to
import, a PATH without /usr/bin)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import BIN, ROOT

pytestmark = pytest.mark.slow  # NNI experiments, Flower or Ray processes, a browser: make test-fast leaves them out

#: one test per thing `make test` installs, and the words its skip reason must contain
NEEDS = {
    "tests/test_data.py::test_fashion_mnist_loads_from_the_debian_package": ("Fashion-MNIST", "make data"),
    "tests/test_flower.py::test_flower_backend_names_the_missing_superlink": ("flwr", "make install"),
    "tests/test_view.py::test_web_ui_trial_page_shows_the_architectures": ("selenium, chromium", "make install browser"),
    "tests/test_flower.py::test_deployment_over_tls_admits_only_registered_supernodes": ("ssh-keygen", "make browser"),
}

SITECUSTOMIZE = """
from pathlib import Path
import nni_fedexit.data, nni_fedexit.data.datasets

nni_fedexit.data.FASHION_MNIST_SYSTEM_DIR = nni_fedexit.data.datasets.FASHION_MNIST_SYSTEM_DIR = Path({empty!r})
"""


@pytest.fixture(scope="module")
def nothing_installed(tmp_path_factory):
    """The environment of a machine without the suite's extras: a sitecustomize empties Fashion-MNIST's
    folder, ``flwr`` and ``selenium`` raise ImportError, PATH holds only the venv's scripts."""
    shadow = tmp_path_factory.mktemp("shadow")
    empty = tmp_path_factory.mktemp("no-fmnist")
    for package in ("flwr", "selenium"):
        (shadow / package).mkdir()
        (shadow / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed here')\n")
    (shadow / "sitecustomize.py").write_text(SITECUSTOMIZE.format(empty=str(empty)))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(shadow), "PATH": str(BIN)}


def run_pytest(env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "-o", "addopts=", *NEEDS]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_in_ci_every_skip_fails_and_names_what_is_missing(nothing_installed):
    done = run_pytest({**nothing_installed, "CI": "true"})
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    failed = [line for line in out.splitlines() if line.startswith("ERROR tests/")]
    assert len(failed) == len(NEEDS), out
    for node, words in NEEDS.items():
        line = next(line for line in failed if line.startswith(f"ERROR {node} "))
        assert "skipped with CI=true" in line and all(w in line for w in words), line
    assert "skipped" not in out.splitlines()[-1], out.splitlines()[-1]  # the summary counts no skip


def test_outside_ci_the_same_tests_skip_and_say_what_to_install(nothing_installed):
    done = run_pytest(nothing_installed)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and f"{len(NEEDS)} skipped" in out.splitlines()[-1], out
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    for words in NEEDS.values():
        assert any(all(w in line for w in words) for line in reasons), (words, reasons)
