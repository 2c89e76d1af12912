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


def test_a_value_is_shown_whole_up_to_80_characters_and_cut_after():
    def line(value):
        return error_line({"loc": ("k",), "msg": "bad", "type": "x", "input": value})

    exact = "a" * 78  # repr adds the two quotes: 80 characters
    assert line(exact) == f"k: bad (got '{exact}')"
    longer = "a" * 79
    assert line(longer) == f"k: bad (got '{longer[:76]}...)"


@pytest.mark.parametrize("error, prefix, line", [
    ({"loc": (), "msg": "wrong", "type": "x"}, "federated.", "federated: wrong"),
    ({"loc": (), "msg": "wrong", "type": "x"}, "", "settings: wrong"),
    ({"loc": ("a", 0, "b"), "type": "x"}, "", "a.0.b: invalid"),
    ({"loc": ("lr",), "msg": "Field required", "type": "missing", "input": {}}, "x.", "x.lr: required, and not given"),
    ({"loc": ("lr",), "msg": "Extra inputs are not permitted", "type": "extra_forbidden", "input": 3}, "",
     "lr: unknown key"),
    ({"loc": ("lr",), "msg": "Value error, too big", "type": "value_error", "input": 3}, "", "lr: Value error, too big"),
    ({"loc": ("lr",), "msg": "too big", "type": "x", "input": 3}, "", "lr: too big (got 3)"),
])
def test_each_kind_of_error_becomes_one_line(error, prefix, line):
    assert error_line(error, prefix) == line


def test_a_params_attribute_that_is_no_pydantic_model_is_refused_by_name():
    def backend():
        pass

    backend.Params = dict
    with pytest.raises(TypeError, match=r"^'backend'\.Params must be a pydantic model \(a subclass of "
                                        r"nni_fedexit\.components\.ComponentParams\), got <class 'dict'>$"):
        component_params(backend)
    backend.Params = "not a class"
    with pytest.raises(TypeError, match="got 'not a class'"):
        component_params(backend)


def test_unknown_keys_name_the_model_they_sit_in_at_any_depth():
    from pydantic import BaseModel, ConfigDict

    class Leaf(BaseModel):
        model_config = ConfigDict(extra="forbid")
        size: int = 1

    class Mid(BaseModel):
        model_config = ConfigDict(extra="forbid")
        leaf: Leaf = Leaf()
        free: dict = {}

    class Top(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mid: Mid = Mid()

    def message(data, prefix=""):
        with pytest.raises(ValidationError) as caught:
            Top(**data)
        return validation_message(caught.value, prefix, Top, "the config")

    assert message({"mdi": {}}) == "mdi: unknown key; the config takes ['mid']"
    assert message({"mid": {"lef": {}}}, "run.") == "run.mid.lef: unknown key; run.mid takes ['free', 'leaf']"
    assert message({"mid": {"leaf": {"sise": 2}}}) == "mid.leaf.sise: unknown key; mid.leaf takes ['size']"
    # a plain ValueError of a validator: pydantic's "Value error, " prefix is dropped
    from pydantic import field_validator

    class Checked(BaseModel):
        n: int = 0

        @field_validator("n")
        @classmethod
        def _small(cls, value):
            if value > 3:
                raise ValueError("at most 3")
            return value

    with pytest.raises(ValidationError) as caught:
        Checked(n=5)
    assert validation_message(caught.value, "s.") == "s.n: at most 3"


def test_our_own_check_two_levels_down_keeps_the_whole_path():
    from pydantic import BaseModel, model_validator

    class Inner(BaseModel):
        a: int = 0

        @model_validator(mode="after")
        def _check(self):
            raise SettingsError("a: must be even")

    class Mid(BaseModel):
        inner: Inner = Inner.model_construct()

    class Outer(BaseModel):
        mid: Mid = Mid.model_construct()

    with pytest.raises(ValidationError) as caught:
        Outer(mid={"inner": {"a": 1}})
    assert validation_message(caught.value, "run.", Outer) == "run.mid.inner.a: must be even"
