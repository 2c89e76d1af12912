"""Declarative presets: YAML files in ``search_spaces/`` and ``strategies/``, loaded by name or path.

The folders sit at the top of the source tree; an installed (non-editable) copy finds them
under ``<prefix>/share/nni-fedexit/`` where setup.cfg's data_files puts them. A distribution
adds presets of its own with entry points in the groups of :data:`PRESET_GROUPS`: the entry
point names a mapping (the preset itself) or a YAML file (a path, or an
``importlib.resources`` file of the package). The package's own presets win over a plugin's of
the same name.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PRESET_GROUPS", "PresetError", "preset_dirs", "plugin_presets", "list_presets", "load_preset",
           "read_yaml_mapping"]

log = logging.getLogger(__name__)

#: the entry-point group a plugin distribution's presets of each kind are announced in
PRESET_GROUPS = {"search_spaces": "nni_fedexit.search_spaces", "strategies": "nni_fedexit.strategies"}


class PresetError(ValueError):
    """A preset is missing or is not valid YAML."""


def preset_dirs(kind: str) -> list[Path]:
    """Folders searched for presets of ``kind`` (``search_spaces`` or ``strategies``)."""
    here = Path(__file__).resolve().parent.parent / kind
    installed = Path(sys.prefix) / "share" / "nni-fedexit" / kind
    return [d for d in (here, installed) if d.is_dir()]


def plugin_presets(kind: str) -> dict[str, EntryPoint]:
    """The installed distributions' presets of ``kind`` (entry points), by name."""
    return {point.name: point for point in entry_points(group=PRESET_GROUPS[kind])} if kind in PRESET_GROUPS else {}


def list_presets(kind: str) -> list[str]:
    names = {p.stem for d in preset_dirs(kind) for p in d.glob("*.yaml")}
    return sorted(names | set(plugin_presets(kind)))


def _load_plugin_preset(kind: str, point: EntryPoint) -> tuple[dict[str, Any], str]:
    """A plugin's preset: the mapping its entry point names, or the YAML file it names."""
    where = f"entry point {point.name} = {point.value} ({PRESET_GROUPS[kind]}, distribution {point.dist.name if point.dist else '?'})"
    try:
        value = point.load()
    except Exception as err:
        raise PresetError(f"{kind} preset {point.name!r}: {where} failed to load: {type(err).__name__}: {err}; "
                          "fix or uninstall that distribution") from err
    if isinstance(value, Mapping):
        return dict(value), where
    if isinstance(value, (str, Path)) or hasattr(value, "read_text"):
        source = Path(value) if isinstance(value, str) else value
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise PresetError(f"{kind} preset {point.name!r}: {where}: the YAML file {value} cannot be read: {err}") from None
        if not isinstance(data, dict):
            raise PresetError(f"{kind} preset {point.name!r}: {where}: expected a mapping of keys to values, "
                              f"got {type(data).__name__}")
        return data, f"{value} ({where})"
    raise PresetError(f"{kind} preset {point.name!r}: {where} names a {type(value).__name__}; it must name a mapping "
                      "or a YAML file")


def load_preset(kind: str, name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """Parse a preset; returns (mapping, where it came from). A path wins over a name."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        candidates = [d / f"{name_or_path}.yaml" for d in preset_dirs(kind)]
        found = [c for c in candidates if c.is_file()]
        plugin = plugin_presets(kind).get(str(name_or_path))
        if found and plugin is not None:
            log.warning("%s preset %r of %s ignored: the package has one of that name", kind, plugin.name, plugin.value)
        elif plugin is not None:
            return _load_plugin_preset(kind, plugin)
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
