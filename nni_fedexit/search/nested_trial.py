"""Report to a trial's NNI experiment from inside NNI's sequential engine run in that trial.

The shared search runs on NNI's sequential engine (a one-shot strategy needs it), inside one
trial of a training-service experiment so the web UI shows it. NNI 3.0's sequential engine
(``nni/nas/execution/sequential.py``, ``_run_single_model``) takes over the process's trial
command channel while it trains and calls ``nni.get_next_parameter()`` on its own channel, which
replaces the trial's parameter record (``nni.trial._params``, a module global) and never gives it
back. A report made during the search then goes to the inner engine, which drops it, and one made
after carries the inner parameter id. :class:`OuterTrial` keeps the trial's own channel and record
from before the engine starts and puts them back for each report (and at the end), so
``nni.report_intermediate_result`` / ``report_final_result`` reach the experiment's manager with
the trial's ids. Outside a trial (standalone), reports are only logged, as NNI does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from nni_fedexit.nni_compat import import_nni

nni = import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
import nni.trial  # noqa: E402
from nni.runtime.trial_command_channel import get_default_trial_command_channel, set_default_trial_command_channel

__all__ = ["OuterTrial"]


class OuterTrial:
    """The trial's command channel and parameter record, as they were when this was made."""

    def __init__(self) -> None:
        self.channel = get_default_trial_command_channel()
        self.record = nni.trial._params  # NNI keeps no public handle on it: see the module docstring

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The trial's own channel and record while inside; whatever was there before, after."""
        inner = get_default_trial_command_channel(), nni.trial._params
        set_default_trial_command_channel(self.channel)
        nni.trial._params = self.record
        try:
            yield
        finally:
            set_default_trial_command_channel(inner[0])
            nni.trial._params = inner[1]

    def report_intermediate(self, metric: dict[str, Any]) -> None:
        with self.active():
            nni.report_intermediate_result(metric)

    def report_final(self, metric: dict[str, Any]) -> None:
        with self.active():
            nni.report_final_result(metric)

    def restore(self) -> None:
        """Give the trial its channel and record back for good (after the inner engine is done)."""
        set_default_trial_command_channel(self.channel)
        nni.trial._params = self.record
