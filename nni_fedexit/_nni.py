"""Importing NNI 3.0 on today's torch, narrowly patched.

On torch >= 2.1 NNI warns at import for every torch object it cannot trace ("... is found to be
not a nn.Module ... your PyTorch version might not be supported"). The warning is harmless for
what we use; this module filters exactly that message and nothing else. Import it before nni.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*is found to be not a nn\.Module.*")

import nni  # noqa: E402,F401
