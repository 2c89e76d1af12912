"""Importing NNI 3.0 on today's torch, narrowly patched, applied where NNI is used.

Nothing here runs on import: every module of ours that uses NNI calls :func:`import_nni` first,
so ``import nni_fedexit`` costs nothing and the workarounds hold whatever the import order
(NNI imported by the user before us, or after).

- On torch >= 2.1 NNI warns at import for every torch object it cannot trace ("... is found to be
  not a nn.Module ... your PyTorch version might not be supported"). The warning is harmless for
  what we use; :func:`import_nni` filters exactly that message and nothing else before it imports
  NNI (where the user imported ``nni.nas`` first, NNI has printed it already: two lines).
- :func:`patient_manager_start` gives a new NNI manager a minute to come up;
  :func:`report_dispatcher_errors` makes a tuner's exception fail the experiment. Both are
  applied by :func:`import_nni`, idempotently.

An opt-in patch for resuming experiments: :func:`accept_import_data` (a resumed NAS experiment
keeps its command listener). The one for reading their config is
:func:`nni_fedexit.nni_tools.reopen.plain_json_checkpoint_config`. While an experiment runs in
this process, :func:`ctrl_c_not_lost` keeps a Ctrl-C from vanishing in a finaliser.
"""

import _thread
import logging
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Iterator

#: NNI 3.0's import-time warning on torch >= 2.1 (one line per torch object it cannot wrap)
NNI_TORCH_WARNING = r".*is found to be not a nn\.Module.*"

#: seconds an experiment waits for the NNI manager's REST server (NNI 3.0: 3)
MANAGER_START_SECONDS = 60


def import_nni() -> ModuleType:
    """``nni``, imported quietly on today's torch, with :func:`patient_manager_start` and
    :func:`report_dispatcher_errors` applied. Call it before importing anything from NNI;
    idempotent and cheap after the first call."""
    warnings.filterwarnings("ignore", message=NNI_TORCH_WARNING, category=RuntimeWarning)
    import nni

    patient_manager_start()
    report_dispatcher_errors()
    return nni


def patient_manager_start() -> None:
    """Wait up to :data:`MANAGER_START_SECONDS` for a new NNI manager to answer, not NNI's 3 s.

    ``nni.experiment.launcher._check_rest_server`` polls ``/check-status`` three times a second
    apart. A cold start of the manager (node loading its modules from a cold disk cache, a busy
    machine) takes longer, and the experiment then fails with "Create experiment failed ...
    Connection refused" although the manager comes up a moment later (seen on the first
    ``make demo`` after a heavy benchmark). The patch only raises the retry count; each retry is
    NNI's own. Idempotent; applied by :func:`import_nni`.
    """
    from nni.experiment import launcher

    original = launcher._check_rest_server
    if getattr(original, "patient", False):
        return

    def check_rest_server(port: int, retry: int = 3, url_prefix: str | None = None) -> None:
        return original(port, retry=max(retry, MANAGER_START_SECONDS), url_prefix=url_prefix)

    check_rest_server.__wrapped__ = original  # type: ignore[attr-defined]
    check_rest_server.patient = True  # type: ignore[attr-defined]
    launcher._check_rest_server = check_rest_server



def report_dispatcher_errors() -> None:
    """Make an experiment fail at once when its tuner raises, with the tuner's message in NNI's log.

    NNI 3.0's dispatcher (``MsgDispatcherBase.command_queue_worker``) logs an exception from a
    tuner call (``update_search_space`` at start, ``generate_parameters``, ...) in dispatcher.log
    and stops its worker thread, but tells the NNI manager nothing: the experiment stays RUNNING
    with no trials until ``maxExperimentDuration`` runs out. The patched ``process_command``
    first sends the error to the manager (``report_error``, NNI's own call for this, command
    'ER'), which logs "Dispatcher error: <message>" in nnimanager.log and sets the experiment to
    ERROR; then it raises as before. Idempotent; applied by :func:`import_nni` (the dispatcher's
    process calls it when it imports our tuner).
    """
    from nni.runtime.msg_dispatcher_base import MsgDispatcherBase

    original = MsgDispatcherBase.process_command
    if getattr(original, "reports_errors", False):
        return

    def process_command(self, command, data):  # type: ignore[no-untyped-def]
        try:
            return original(self, command, data)
        except Exception as err:
            self.report_error(f"{type(err).__name__} in the tuner ({command}): {err}")
            raise

    process_command.__wrapped__ = original  # type: ignore[attr-defined]
    process_command.reports_errors = True  # type: ignore[attr-defined]
    MsgDispatcherBase.process_command = process_command



def accept_import_data() -> None:
    """Let NNI 3.0's NAS engine resume an experiment on the training service.

    On ``resume`` the NNI manager answers the engine's Initialized with the earlier trials
    (ImportData) and the unfinished ones (AddCustomizedTrialJob). The NAS command channel
    (``TunerCommandChannel.receive``) handles only the commands NAS needs (NNI's
    ``TunerIncomingCommand`` classes: Initialize, RequestTrialJobs, UpdateSearchSpace,
    ReportMetricData, TrialEnd, Terminate) and raises "Unknown command type: ..." for any other in
    its listener thread, which dies: the engine hears no metric or trial end again. The NAS
    engine restores its trials from its own checkpoint, so the patched ``receive`` skips exactly
    those commands (one info line each) and hands every other one to NNI's ``receive`` unchanged.

    A skipped command's content is never decoded: NNI's ``receive`` decodes before it looks at the
    type, and ImportData's content holds every earlier trial's parameters (cloudpickled models,
    from the experiment's database). Only ``receive`` is patched, not ``_receive``: NNI's HPO
    dispatcher reads ``_receive`` itself and needs those commands. Idempotent.
    """
    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel

    original = TunerCommandChannel.receive
    if getattr(original, "skips_unknown_commands", False):
        return
    known = nas_channel_commands()

    def receive(self: TunerCommandChannel):  # type: ignore[no-untyped-def]
        while True:
            command_type, data = self._receive()
            if command_type is None or command_type in known:
                break
            logging.getLogger(__name__).info(
                "Resumed experiment: NNI's %s command skipped (NNI 3.0's NAS command channel does not handle it; "
                "the NAS engine restores its trials from its own checkpoint)", command_type.name)
        # hand exactly this command to NNI's own receive, which reads it through self._receive()
        self._receive = lambda: (command_type, data)
        try:
            return original(self)
        finally:
            del self._receive

    receive.__wrapped__ = original  # type: ignore[attr-defined]
    receive.skips_unknown_commands = True  # type: ignore[attr-defined]
    TunerCommandChannel.receive = receive  # type: ignore[method-assign]


def nas_channel_commands() -> frozenset:
    """The command types NNI 3.0's ``TunerCommandChannel.receive`` turns into NAS commands; it
    raises "Unknown command type" for every other one."""
    from nni.runtime.tuner_command_channel.command_type import TunerIncomingCommand

    return frozenset(cls.command_type for cls in TunerIncomingCommand.__subclasses__())


@contextmanager
def ctrl_c_not_lost() -> Iterator[None]:
    """Inside, a Ctrl-C that lands in a finaliser still interrupts the main thread.

    CPython runs a ``weakref.finalize`` callback (or a ``__del__``) wherever the last reference
    to its object goes, and an exception raised in it is "unraisable": printed ("Exception ignored
    in: <finalize object ...; dead>", a traceback through ``weakref.py`` ``__call__``) and dropped.
    A KeyboardInterrupt is no exception to that: when SIGINT's handler runs inside such a callback,
    the Ctrl-C is gone. While a NAS experiment runs, NNI 3.0's main thread polls its manager
    twice a second (``TrainingServiceExecutionEngine.wait_models``: ``requests``, and urllib3 2.x
    gives each connection pool a ``weakref.finalize``, run in the main thread as the request ends),
    so now and then a Ctrl-C is lost: NNI never stops the experiment and the command waits on for
    its trial (forever when the trial is stuck).

    The hook hands such a KeyboardInterrupt of the main thread back to it, with one line on stderr:
    a helper thread sends SIGINT to the main thread again (as if Ctrl-C came again) once that
    thread is out of the hook (an interrupt raised in the hook itself would be dropped as well).
    Every other unraisable exception goes to the hook before, unchanged; that hook is back on exit
    (if nothing replaced ours meanwhile).
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:  # type: ignore[no-untyped-def]
        if (isinstance(unraisable.exc_value, KeyboardInterrupt) and threading.current_thread() is threading.main_thread()
                and not sys.is_finalizing()):
            try:
                threading.Thread(target=_interrupt_main_out_of, args=(hook.__code__,), name="fedexit-ctrl-c",
                                 daemon=True).start()
            except RuntimeError:  # no new thread (the interpreter is shutting down): as before
                pass
            else:
                with suppress(OSError, ValueError):  # stderr closed: the Ctrl-C goes on all the same
                    print("Ctrl-C caught inside a finaliser (where Python drops it): passed on", file=sys.stderr,
                          flush=True)
                return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _interrupt_main_out_of(code: object, poll: float = 0.02) -> None:
    """SIGINT to the main thread as soon as none of its frames runs ``code``: a real one where it
    can be sent to that thread (it also cuts a ``time.sleep`` short, as Ctrl-C does), else
    ``_thread.interrupt_main()``."""
    main = threading.main_thread().ident
    while True:
        time.sleep(poll)
        frame = sys._current_frames().get(main)
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        if frame is None:
            break
    if main is not None and hasattr(signal, "pthread_kill") and callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(main, signal.SIGINT)
    else:
        _thread.interrupt_main()
