"""The configuration reference, written from the settings models themselves.

``docs/configuration.md`` holds the marker ``<!-- config-reference -->``; the docs site's hook
(``docs/_tools/hooks.py``) replaces it with :func:`reference_markdown`, so the page lists every
key of every section, and every parameter of every installed aggregator, objective and backend,
with the default and the documentation the code declares: a new setting is documented where it
is declared, once, and the page cannot drift from it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["model_table", "reference_markdown"]


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(a section)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, dict) and set(value) == {"name"}:
        value = value["name"]
    return f"`{json.dumps(value)}`"


_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
_NAMES = {"integer": "integer", "number": "number", "string": "string", "boolean": "true/false", "array": "list",
          "object": "mapping", "null": "null"}


def _type(schema: dict[str, Any]) -> str:
    """A field's JSON Schema in a few words: ``integer >= 1 or null``, ``one of `iid`, ...``."""
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    words = _NAMES.get(schema.get("type", ""), "any")
    bounds = [f"{sign} {schema[key]}" for key, sign in _BOUNDS if key in schema]
    return " ".join([words, ", ".join(bounds)]).strip() if bounds else words


def _plain(text: str) -> str:
    """A docstring's or description's RST markup as markdown, on one line, safe in a table."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


def model_table(model: type[BaseModel], skip: Iterable[str] = ()) -> str:
    """A markdown table of ``model``'s fields: key, type, default, what it means."""
    properties = model.model_json_schema()["properties"]
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        rows.append(f"| `{name}` | {_plain(_type(properties[name]))} | {_default(field)} | "
                    f"{_plain(field.description or '')} |")
    return "\n".join(rows)


def reference_markdown() -> str:
    """Every section of the run config, and every component's parameters, as markdown."""
    from nni_fedexit.components import component_params
    from nni_fedexit.federated.settings import COMPONENTS, FederatedSettings
    from nni_fedexit.job.config import DATA_KEYS, TOP_KEYS, DataConfig, ExitConfig, NniConfig, RunConfig, SearchConfig

    parts = ["## Top level", model_table(RunConfig, skip=("data", "search", "federated", "exits", "nni", "name"))]
    for key, model in (("data", DataConfig), ("search", SearchConfig)):
        parts += [f"## `{key}`", _plain(model.__doc__.strip()), model_table(model)]
    parts += ["## `federated`",
              "`FederatedSettings`: the data section's keys, `seed` and `device` are set where those are; "
              "`checkpoint_dir` is `<run_dir>/federated`.",
              model_table(FederatedSettings, skip=(*DATA_KEYS, *TOP_KEYS, "checkpoint_dir"))]
    for kind, registry in COMPONENTS.items():
        parts.append(f"### `federated.{kind}`: the choices and their parameters")
        for name in registry.names():
            try:
                params = component_params(registry.get(name))
            except (ValueError, TypeError):
                continue
            doc = (getattr(registry.get(name), "__doc__", None) or "").strip().split("\n\n")[0]
            parts.append(f"**`{name}`**" + (f": {_plain(doc)}" if doc else ""))
            parts.append(model_table(params) if params.model_fields else "No parameters.")
    for key, model in (("exits", ExitConfig), ("nni", NniConfig)):
        parts += [f"## `{key}`", _plain(model.__doc__.strip()), model_table(model)]
    return "\n\n".join(parts) + "\n"
