"""Components that declare their own parameters: choosing one by name, its section's canonical
form, and one-line errors that name the dotted key."""

import pytest
from pydantic import Field, ValidationError

from nni_fedexit.components import (
    ComponentParams, SettingsError, choose, component_params, error_line, params_for, validation_message,
)


class Plain:
    """A component without parameters."""


class Tuned:
    class Params(ComponentParams):
        lr: float = Field(0.1, gt=0, description="step size")
        name_of_run: str | None = None


def test_a_section_is_a_name_or_a_mapping_and_becomes_the_name_and_every_parameter():
    assert choose("aggregator", "tuned", Tuned) == {"name": "tuned", "lr": 0.1, "name_of_run": None}
    assert choose("aggregator", {"name": "tuned", "lr": 2}, Tuned) == {"name": "tuned", "lr": 2.0,
                                                                       "name_of_run": None}
    assert choose("objective", "plain", Plain) == {"name": "plain"}
    # the canonical form reads back to itself: what crosses a process boundary builds the same component
    once = choose("aggregator", {"name": "tuned", "lr": 0.5}, Tuned)
    assert choose("aggregator", once, Tuned) == once
    assert component_params(Plain) is ComponentParams and component_params(Tuned) is Tuned.Params


@pytest.mark.parametrize("value, message", [
    ({"lr": 1.0}, "aggregator.name: give the aggregator's name, e.g. aggregator: {name: ..., ...}, got None"),
    ({"name": 3}, "aggregator.name: give the aggregator's name, e.g. aggregator: {name: ..., ...}, got 3"),
    (["tuned"], "aggregator: expected a name or a mapping {name: ..., <parameters>}, got ['tuned']"),
    ({"name": "tuned", "lr": 0}, "aggregator.lr: Input should be greater than 0 (got 0)"),
    ({"name": "tuned", "lr": "fast"}, "aggregator.lr: Input should be a valid number (got 'fast')"),
    ({"name": "tuned", "lr": float("nan")}, "aggregator.lr: Input should be a finite number (got nan)"),
    ({"name": "tuned", "lrr": 1.0}, "aggregator.lrr: unknown key; aggregator takes ['lr', 'name_of_run']"),
])
def test_a_bad_section_is_one_line_naming_the_dotted_key(value, message):
    with pytest.raises(SettingsError) as caught:
        choose("aggregator", value, Tuned)
    assert str(caught.value) == message


def test_a_long_value_is_cut_in_the_message():
    line = error_line({"loc": ("lr",), "msg": "Input should be a valid number", "type": "float_type",
                       "input": "x" * 500}, "federated.")
    assert line.startswith("federated.lr: Input should be a valid number (got 'xxx") and len(line) < 140


def test_a_check_of_ours_inside_a_nested_model_is_prefixed_with_where_it_sits():
    from pydantic import BaseModel, field_validator

    class Inner(BaseModel):
        host: str = "a"

        @field_validator("host")
        @classmethod
        def _known(cls, value):
            raise SettingsError(f"host: must be a or b, got {value!r}")

    class Outer(BaseModel):
        nni: Inner = Inner.model_construct()

    with pytest.raises(ValidationError) as caught:
        Outer(nni={"host": "c"})
    assert validation_message(caught.value, "", Outer) == "nni.host: must be a or b, got 'c'"


def test_a_component_built_from_settings_takes_the_parameters_it_declares():
    class Settings:
        aggregator = {"name": "other", "lr": 0.3, "beta": 0.5}

    assert params_for(Tuned, "aggregator", Settings()).lr == 0.3  # its own, by name; others ignored
    assert params_for(Tuned, "aggregator", None).lr == 0.1
    given = Tuned.Params(lr=0.7)
    assert params_for(Tuned, "aggregator", Settings(), given) is given
