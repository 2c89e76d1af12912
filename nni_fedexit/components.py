"""Parameters a component declares on itself, and the settings section that chooses one.

An aggregator, a client objective or a backend declares its parameters once, as a nested
``Params`` model (pydantic) with their defaults and documentation::

    class FedAdam(ServerOptimizer):
        class Params(ComponentParams):
            lr: float = Field(0.01, gt=0, description="server step size")

A run config chooses it in one section, by name, with any of those parameters beside the name
(``aggregator: {name: fedadam, lr: 0.02}``; ``aggregator: fedadam`` takes every default).
:func:`choose` turns either form into the section's one canonical value: a plain mapping of
``name`` and every parameter, which is what the settings hold, what JSON carries across a process
boundary (an NNI trial, a Flower run config, a Ray actor) and what builds the component again on
the other side. Errors name the section's dotted key (``aggregator.lr``).
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ComponentParams", "MovedSettingWarning", "SettingsError", "choose", "component_params", "error_line", "params_for", "validation_message"]


class SettingsError(ValueError):
    """Settings that cannot be used; the message starts with the dotted key and says what to do.

    Raised in a model's validator, the key is that model's (``host: ...`` in the ``nni`` section's
    check becomes ``nni.host: ...``)."""


class MovedSettingWarning(FutureWarning):
    """A setting of an earlier version, read under its new key (the message names both)."""


class ComponentParams(BaseModel):
    """The parameters of a component: subclass it as the component's ``Params`` (no parameters: this)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def component_params(component: Any) -> type[ComponentParams]:
    """The ``Params`` model a component (class or function) declares; :class:`ComponentParams` if none."""
    params = getattr(component, "Params", ComponentParams)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise TypeError(f"{getattr(component, '__name__', component)!r}.Params must be a pydantic model "
                        f"(a subclass of nni_fedexit.components.ComponentParams), got {params!r}")
    return params


def _input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def error_line(error: Mapping[str, Any], prefix: str = "") -> str:
    """One of pydantic's errors as ``"<prefix><dotted.key>: <message> (got <value>)"``."""
    where = ".".join(str(part) for part in error.get("loc", ()))
    key = prefix + where if where else prefix.rstrip(".") or "settings"
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        message = "unknown key"
    elif error.get("type") == "missing":
        message = "required, and not given"
    elif "input" in error and error.get("type") != "value_error":
        message = f"{message} (got {_input(error['input'])})"
    return f"{key}: {message}"


def validation_message(err: ValidationError, prefix: str = "", known: Any = None, top: str = "it") -> str:
    """The first error of ``err`` as one line (:func:`error_line`), with the keys the model takes
    when the key was unknown (``known``: the pydantic model validated; ``top``: its name in the
    message when the unknown key is one of its own)."""
    first = err.errors()[0]
    raised = (first.get("ctx") or {}).get("error")
    if isinstance(raised, SettingsError):  # a check of ours: its message names the key, from the model it checks
        message, loc = str(raised), [str(part) for part in first.get("loc", ())]
        if loc and message.startswith((loc[-1] + ":", loc[-1] + ".")):
            loc = loc[:-1]  # a field's check names the field
        return prefix + "".join(part + "." for part in loc) + message
    line = error_line(first, prefix)
    if first.get("type") == "extra_forbidden" and known is not None:
        loc = [str(part) for part in first.get("loc", ())]
        for part in loc[:-1]:  # the model the unknown key is in
            inner = known.model_fields.get(part) if isinstance(known, type) and issubclass(known, BaseModel) else None
            known = inner.annotation if inner is not None else None
        if isinstance(known, type) and issubclass(known, BaseModel):
            where = (prefix + ".".join(loc[:-1])).rstrip(".") or top
            line += f"; {where} takes {sorted(known.model_fields)}"
    if first.get("type") == "value_error":  # a validator's own ValueError: its text already says it
        line = line.replace("Value error, ", "")
    return line


def choose(kind: str, value: Any, component: Any) -> dict[str, Any]:
    """The canonical section value choosing ``component``: ``{"name": ..., **every parameter}``.

    ``value`` is the section as given (a name, or a mapping with ``name``); ``component`` the
    implementation that name resolves to. Raises :class:`SettingsError` naming ``<kind>.<key>``."""
    if isinstance(value, str):
        name, given = value, {}
    elif isinstance(value, Mapping):
        given = dict(value)
        name = given.pop("name", None)
        if not isinstance(name, str):
            raise SettingsError(f"{kind}.name: give the {kind}'s name, e.g. {kind}: {{name: ..., ...}}, got {name!r}")
    else:
        raise SettingsError(f"{kind}: expected a name or a mapping {{name: ..., <parameters>}}, got {_input(value)}")
    model = component_params(component)
    try:
        params = model(**given)
    except ValidationError as err:
        raise SettingsError(validation_message(err, f"{kind}.", model)) from None
    return {"name": name, **params.model_dump()}


def params_for(component: Any, kind: str, settings: Any = None, params: ComponentParams | None = None) -> ComponentParams:
    """A component's parameters when it is built: ``params`` if given (the registry gives them),
    else those of its own ``Params`` that the settings' ``kind`` section holds (so
    ``FedProx(settings)`` takes ``objective.mu`` from them), else its defaults."""
    model = component_params(component)
    if params is not None:
        return params
    section = getattr(settings, kind, None)
    if not isinstance(section, Mapping):
        return model()
    return model(**{k: v for k, v in section.items() if k in model.model_fields})
