"""Checks of setting values, shared by every settings dataclass: one error, naming the key.

:func:`check_type`: a value must fit a field's annotation (``int``, ``float``, ``str``, ``bool``,
``list``, ``dict``, each ``| None`` or not), so a YAML ``lr: "0.1"`` is refused by name. Used by
the settings that are not pydantic models yet (the strategy's arguments, ``search.trial``).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["check_type", "positive_int", "reason"]


def reason(err: BaseException) -> str:
    """What went wrong, for a message: the exception's text, else its type's name (an ``assert`` in
    a reader, for one, raises an AssertionError with no text)."""
    return str(err) or type(err).__name__


def check_type(key: str, value: Any, annotation: str) -> None:
    """Raise ``ValueError("<key>: expected ...")`` unless ``value`` fits ``annotation`` (a string)."""
    kinds = {part.strip().split("[")[0] for part in annotation.split("|")}
    if value is None:
        if "None" in kinds:
            return
        raise ValueError(f"{key}: must not be empty (null)")
    if "Any" in kinds:
        return
    if "bool" in kinds:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
    elif "int" in kinds and "float" not in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    elif "float" in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
    elif "str" in kinds:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
    elif "list" in kinds or "tuple" in kinds:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
    elif "dict" in kinds:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping of keys to values, got {value!r}")


def positive_int(key: str, value: Any) -> int:
    """``value`` if it is an integer >= 1; else ``ValueError("<key>: expected a positive integer ...")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    return value
