"""S1 for ``nnictl``: a block-pool space as NNI's classic search-space JSON.

A classic NNI experiment (``nnictl create``) describes its search space as JSON, not as a model
space. :func:`to_nni_search_space` writes one ``choice`` per block pool (stage label), whose values
are the pool's candidate names, in the space's own order. It is computed from the space, so the
JSON always agrees with it: a trial that receives ``{"stage1": "resnet34", ...}`` builds exactly
that network with ``space.build(sample)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["to_nni_search_space", "write_nni_search_space"]


def to_nni_search_space(space: Any) -> dict[str, dict[str, Any]]:
    """``{label: {"_type": "choice", "_value": [candidate, ...]}}`` for every block pool of ``space``.

    ``space`` is a :class:`~nni_fedexit.space.ResNetBlockPoolSpace` (anything with
    ``pools = {label: {candidate: params}}``).
    """
    pools = getattr(space, "pools", None)
    if not isinstance(pools, dict) or not pools:
        raise TypeError(f"expected a block-pool space with a non-empty 'pools' mapping, got {type(space).__name__}")
    return {str(label): {"_type": "choice", "_value": [str(name) for name in pool]} for label, pool in pools.items()}


def write_nni_search_space(space: Any, path: str | Path) -> Path:
    """Write :func:`to_nni_search_space` of ``space`` to ``path`` (JSON); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_nni_search_space(space), indent=2) + "\n")
    return path
