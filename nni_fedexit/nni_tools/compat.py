"""Importing NNI 3.0 on today's torch, narrowly patched.

On torch >= 2.1 NNI warns at import for every torch object it cannot trace ("... is found to be
not a nn.Module ... your PyTorch version might not be supported"). The warning is harmless for
what we use; this module filters exactly that message and nothing else. Import it before nni.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module.*")

import nni  # noqa: E402,F401


def accept_import_data() -> None:
    """Let NNI 3.0's NAS engine resume an experiment on the training service.

    On ``resume`` the NNI manager sends the earlier trials as an ImportData command; the NAS
    command channel (``TunerCommandChannel.receive``) knows no such command and raises
    "Unknown command type: CommandType.ImportData" in its listener thread, which dies: no new
    trial ever starts. The NAS engine restores those trials from its own checkpoint, so this skips
    exactly that command and nothing else. Idempotent.
    """
    import logging

    from nni.runtime.tuner_command_channel.channel import TunerCommandChannel
    from nni.runtime.tuner_command_channel.command_type import CommandType

    original = TunerCommandChannel.receive
    if getattr(original, "skips_import_data", False):
        return

    def receive(self: TunerCommandChannel):  # type: ignore[no-untyped-def]
        while True:
            try:
                return original(self)
            except ValueError as err:
                if str(CommandType.ImportData) not in str(err):
                    raise
                logging.getLogger(__name__).info("Resumed experiment: NNI's ImportData command skipped "
                                                 "(the NAS engine restores its trials from its checkpoint)")

    receive.skips_import_data = True  # type: ignore[attr-defined]
    TunerCommandChannel.receive = receive  # type: ignore[method-assign]
