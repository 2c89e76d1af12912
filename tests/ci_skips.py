"""In CI a skip is a failure: `make test` installs everything the suite needs (Fashion-MNIST, flwr,
selenium, chromium, ...), so a test that skips there hides a broken install, not a missing extra.

conftest.py imports these hooks; outside CI (``CI`` unset, empty, ``0``, ``false`` or ``no``) a skip
stays a skip and its reason says what to install.
"""

from __future__ import annotations

import os

import pytest

PREFIX = "skipped with CI={ci}: `make test` installs what this test needs, so the skip is a failure: {reason}"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(longrepr) -> str:
    """The reason pytest recorded for a skip (a (path, line, 'Skipped: reason') tuple or text)."""
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def fail_skip(report) -> None:
    """Turn a skip report into a failure that names what is missing (xfail reports are left alone)."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report.longrepr)
        report.outcome = "failed"
        report.longrepr = PREFIX.format(ci=os.environ.get("CI"), reason=reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if in_ci():
        fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level ``pytest.skip(..., allow_module_level=True)`` is a collection skip: fail it too."""
    outcome = yield
    if in_ci():
        fail_skip(outcome.get_result())
