"""Package namespaces that import a submodule only when one of its names is first used.

``import nni_fedexit`` and ``nni-fedexit --help`` must not pay for torch and NNI (NNI's
dispatcher gives a tuner 10 s to connect, and the maths modules must load without NNI at all).
Each package ``__init__`` therefore lists its public names as imports under
``if TYPE_CHECKING:`` (what IDEs, type checkers and the API reference read) and hands that same
block to :func:`lazy_exports`, which reads it from the source once and imports a name's module
on first attribute access (PEP 562), as SciPy and scikit-image do. One list, no second copy.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

__all__ = ["lazy_exports", "type_checking_imports"]


def type_checking_imports(init_file: str | Path) -> dict[str, str]:
    """``{name: absolute module}`` of every ``from X import name`` under ``if TYPE_CHECKING:`` in
    ``init_file`` (an ``as`` alias gives the alias; relative imports are not used here)."""
    tree = ast.parse(Path(init_file).read_text(encoding="utf-8"), filename=str(init_file))
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
                    for alias in statement.names:
                        found[alias.asname or alias.name] = statement.module
    return found


def lazy_exports(package: str, init_file: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names are its ``TYPE_CHECKING`` imports.

    Usage, at the end of a package ``__init__``::

        __getattr__, __dir__ = lazy_exports(__name__, __file__)
    """
    exports = type_checking_imports(init_file)
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")  # a subpackage, as an eager __init__ gave it
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
