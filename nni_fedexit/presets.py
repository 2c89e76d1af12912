"""Declarative presets: YAML files in ``search_spaces/`` and ``strategies/``, loaded by name or path.

The folders sit at the top of the source tree; an installed (non-editable) copy finds them
under ``<prefix>/share/nni-fedexit/`` where setup.cfg's data_files puts them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PresetError", "preset_dirs", "list_presets", "load_preset", "read_yaml_mapping"]


class PresetError(ValueError):
    """A preset is missing or is not valid YAML."""


def preset_dirs(kind: str) -> list[Path]:
    """Folders searched for presets of ``kind`` (``search_spaces`` or ``strategies``)."""
    here = Path(__file__).resolve().parent.parent / kind
    installed = Path(sys.prefix) / "share" / "nni-fedexit" / kind
    return [d for d in (here, installed) if d.is_dir()]


def list_presets(kind: str) -> list[str]:
    names = {p.stem for d in preset_dirs(kind) for p in d.glob("*.yaml")}
    return sorted(names)


def load_preset(kind: str, name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a preset; returns (mapping, where it came from). A path wins over a name."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        candidates = [d / f"{name_or_path}.yaml" for d in preset_dirs(kind)]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise PresetError(
                f"no {kind} preset {str(name_or_path)!r}: give a YAML file path or one of "
                f"{list_presets(kind)} (searched {[str(d) for d in preset_dirs(kind)]})"
            )
        path = found[0]
    return read_yaml_mapping(path, PresetError), str(path)


def read_yaml_mapping(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A YAML file that must hold a mapping; bad YAML raises ``error`` naming the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise error(f"{path} cannot be read (not UTF-8 text: {err.reason} at byte {err.start}): give a YAML file") from None
    except OSError as err:
        raise error(f"{path} cannot be read ({err.strerror or err}): give a readable YAML file") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data
