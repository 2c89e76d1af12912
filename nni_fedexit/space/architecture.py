"""How an architecture (a sample of a search space) is written for people: web UI, logs, reports.

Plain Python, apart from the space itself, so the tuner, the trials and the federated stage can
label what they run without importing NNI's model spaces.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["architecture_label"]


def architecture_label(sample: Mapping[str, Any]) -> str:
    """``stage1=resnet34 stage2=resnet50-d1 ...``: an architecture as people read it (web UI, logs)."""
    return " ".join(f"{label}={value}" for label, value in sample.items())
