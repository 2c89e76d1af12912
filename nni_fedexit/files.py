"""Files written so that a crash at any instant leaves the old version or the new one, never half."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from nni_fedexit.checks import reason

__all__ = ["fsync_dir", "read_json", "sha256_file", "write_atomic", "write_json", "write_text"]


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX: the directory entry is flushed)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:  # not supported here (e.g. some network file systems): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], Any], durable: bool = True) -> Path:
    """``write(tmp)`` to a fresh temporary file beside ``path``, flush it to disk, then rename it
    over ``path`` (atomic on POSIX). Each call gets its own temporary name, so two writers never
    share one; a failed write removes its temporary file and leaves ``path`` as it was. The file is
    readable by its owner only (``mkstemp``): run files are nobody else's business."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if durable:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def read_json(path: str | Path, error: type[Exception], fix: str) -> Any:
    """The JSON in ``path``; a file that cannot be read, is not UTF-8 or not JSON raises ``error``
    naming it, why, and ``fix`` (what the user can do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise error(f"{path} is unreadable or corrupt ({reason(err)}): {fix}") from None


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path``, atomically."""
    return write_atomic(path, lambda p: p.write_text(text))


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """``data`` as JSON at ``path``, atomically (non-JSON values such as paths become strings)."""
    return write_text(path, json.dumps(data, indent=indent, default=str))



def sha256_file(path: str | Path) -> str:
    """The file's SHA-256 (hex): what a checkpoint's state names its files by."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
