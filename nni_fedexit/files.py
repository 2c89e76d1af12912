"""Files written so that a crash at any instant leaves the old version or the new one, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["write_atomic", "write_json"]


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """``data`` as JSON at ``path``, atomically (non-JSON values such as paths become strings)."""
    return write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=indent, default=str)))
