"""Component options are checked against the builder's annotations and declared limits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytest

from polytask.errors import ConfigError
from polytask.options import (
    CHANNELS,
    MAX_SAMPLES,
    SEED_LIMIT,
    Budget,
    Limit,
    check_options,
    option_schema,
)
from polytask.registry import Registry, call_with_options


def builder(
    *,
    input_shape: Sequence[int],
    channels: Sequence[int] = (8, 8),
    out_features: int = 16,
    dropout: float = 0.0,
    rate: float | None = None,
    mode: Literal["a", "b"] = "a",
    flag: bool = False,
    name: str = "x",
    pair: tuple[float, float] = (0.5, 0.5),
    sizes: tuple[int, ...] = (),
    per_task: int | Mapping[str, int] = 1,
    seed: int = 0,
) -> dict[str, Any]:
    return dict(locals())


LIMITS = {"channels": CHANNELS, "out_features": Limit(ge=1, le=100), "dropout": Limit(ge=0, lt=1)}


def check(**options: Any) -> dict[str, Any]:
    schema = option_schema(builder, ["input_shape"], LIMITS)
    return check_options(schema, options, where="model.backbone_options", provided=["input_shape"])


def refused(match: str, **options: Any) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        check(**options)
    return str(info.value)


def test_the_schema_comes_from_the_signature() -> None:
    schema = option_schema(builder, ["input_shape"], LIMITS)
    assert "input_shape" not in schema.options
    assert schema.options["channels"].default == (8, 8)
    assert schema.options["seed"].limit == SEED_LIMIT  # an integer option named seed
    assert schema.describe("channels") == "a list of integers >= 1 and <= 4096 (1 to 64 items)"
    assert schema.describe("rate") == "a finite number or null"
    assert schema.describe("mode") == "one of a, b"
    assert not schema.accepts_any


def test_valid_options_pass_and_numbers_written_as_text_are_converted() -> None:
    assert check() == {}
    got = check(channels=[4, 8], out_features="1e1", dropout="5e-1", rate=None, mode="b")
    assert got == {
        "channels": [4, 8],
        "out_features": 10,
        "dropout": 0.5,
        "rate": None,
        "mode": "b",
    }
    assert isinstance(got["out_features"], int)
    assert check(pair=[0.1, 2])["pair"] == [0.1, 2.0]
    assert check(sizes=(1, 2))["sizes"] == (1, 2)
    assert check(per_task={"left": 3})["per_task"] == {"left": 3}
    assert check(out_features=5.0)["out_features"] == 5


def test_types() -> None:
    refused(
        r"model\.backbone_options\.channels: expected a list of integers .*found 27\.", channels=27
    )
    refused(r"channels: .*found 'abc'", channels="abc")
    refused(r"channels: .*found \[True\]", channels=[True])
    refused(r"channels: .*found \[1\.5\]", channels=[1.5])
    refused(
        r"out_features: expected an integer >= 1 and <= 100, found \[True\]", out_features=[True]
    )
    refused(r"out_features: .*found True", out_features=True)
    refused(r"flag: expected true or false, found 1", flag=1)
    refused(r"name: expected a string, found 3", name=3)
    refused(r"pair: expected a list of finite numbers \(2 items\), found \[1\]", pair=[1])
    refused(r"sizes: expected a list of integers, found \{", sizes={"a": 1})
    refused(r"per_task: expected an integer or a mapping to integers", per_task={"a": "b"})


def test_ranges() -> None:
    refused(r"channels: .*>= 1 .*found \[8, 0\]", channels=[8, 0])
    refused(r"channels: .*<= 4096 .*found \[5000\]", channels=[5000])
    refused(r"channels: .*\(1 to 64 items\), found \[\]", channels=[])
    refused(r"channels: .*found \[1, 1, 1", channels=[1] * 65)
    refused(r"out_features: .*<= 100, found '9e10'", out_features="9e10")
    refused(r"out_features: .*found 0", out_features=0)
    refused(r"dropout: expected a finite number >= 0 and < 1, found 1\.0", dropout=1.0)
    refused(r"seed: expected an integer >= 0 and <= 18446744073709551615, found -1", seed=-1)
    refused(r"seed: .*found 18446744073709551616", seed=2**64)
    assert check(seed=2**64 - 1) == {"seed": 2**64 - 1}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", ".inf", "inf", 10**400])
def test_floats_must_be_finite(value: Any) -> None:
    refused(r"dropout: expected a finite number", dropout=value)


def test_none_and_literal() -> None:
    assert check(rate=None) == {"rate": None}
    refused(r"rate: expected a finite number or null, found nan", rate=math.nan)
    refused(r"out_features: .*found None", out_features=None)
    refused(r"mode: expected one of a, b, found 'c'", mode="c")


def test_unknown_options_are_refused_with_a_suggestion() -> None:
    message = refused(r"unknown option model\.backbone_options\.chanels", chanels=[4])
    assert "Did you mean 'channels'?" in message and "Accepted options:" in message
    refused(r"input_shape is set by polytask", input_shape=[1])


def test_a_plugin_without_annotations_is_not_checked() -> None:
    def plugin(*, input_shape, width=3, **extra):  # type: ignore[no-untyped-def]
        return {"width": width, **extra}

    schema = option_schema(plugin, ["input_shape"])
    assert schema.accepts_any
    got = check_options(schema, {"width": "abc", "anything": math.nan}, where="w")
    assert got["width"] == "abc" and math.isnan(got["anything"])
    built = call_with_options(
        plugin, {"width": "abc", "free": 1}, where="w", provided={"input_shape": (1,)}
    )
    assert built == {"width": "abc", "free": 1}


def test_a_plugin_declares_limits_at_registration() -> None:
    registry: Registry[Any] = Registry("backbone")

    @registry.register("mine", limits={"width": Limit(ge=1, le=10)})
    def mine(*, input_shape: Sequence[int], width: int = 3, scale: float = 1.0) -> int:
        return width

    schema = registry.schema("mine", ["input_shape"])
    with pytest.raises(
        ConfigError, match=r"w\.width: expected an integer >= 1 and <= 10, found 11"
    ):
        call_with_options(
            mine, {"width": 11}, where="w", provided={"input_shape": (1,)}, schema=schema
        )
    with pytest.raises(ConfigError, match=r"w\.scale: expected a finite number, found nan"):
        call_with_options(mine, {"scale": math.nan}, where="w", provided={"input_shape": (1,)})
    assert call_with_options(mine, {"width": 4}, where="w", provided={"input_shape": (1,)}) == 4
    registry.unregister("mine")


def test_limits_must_name_real_options() -> None:
    registry: Registry[Any] = Registry("thing")

    @registry.register("x", limits={"nope": Limit(ge=0)})
    def x(*, a: int = 1) -> int:
        return a

    with pytest.raises(TypeError, match="nope"):
        registry.schema("x")


def test_a_budget_bounds_an_estimate_from_all_options() -> None:
    def data(*, n: int = 10, side: int = 4) -> None:
        return None

    budget = Budget(lambda o: o["n"] * o["side"] ** 2, 1000, "the pixels generated", ("n", "side"))
    schema = option_schema(data, budgets=[budget])
    assert check_options(schema, {"n": 60}, where="data.options") == {"n": 60}
    with pytest.raises(ConfigError) as info:
        check_options(schema, {"n": 100}, where="data.options")
    message = str(info.value)
    assert "the pixels generated would be 1.6e+03, above the limit of 1e+03" in message
    assert "lower data.options.n, data.options.side" in message


def test_built_in_components_declare_their_limits() -> None:
    from polytask.balancing import BALANCERS
    from polytask.data import DATASETS
    from polytask.models import ARCHITECTURES, BACKBONES

    for registry, provided in (
        (BACKBONES, ["input_shape"]),
        (ARCHITECTURES, ["tasks", "backbone", "head", "input_shape"]),
        (BALANCERS, ["tasks"]),
        (DATASETS, []),
    ):
        for name in registry:
            schema = registry.schema(name, provided)
            for option in schema.options.values():  # every annotation resolves
                assert option.annotation is not Any or option.name in ("root",), (name, option)
    schema = DATASETS.schema("multidigits")
    assert schema.options["n_train"].limit == Limit(ge=1, le=MAX_SAMPLES)
    with pytest.raises(
        ConfigError,
        match=r"data\.options: the values generated, .* would be 2\.36e\+12, above the limit of 2\.15e\+09 \(8 GiB of float32\); lower data\.options\.n_train",
    ):
        check_options(schema, {"n_train": 9_000_000, "canvas": 512}, where="data.options")
    with pytest.raises(ConfigError, match=r"estimated number of parameters would be"):
        check_options(
            BACKBONES.schema("small_cnn", ["input_shape"]),
            {"channels": [4096] * 8},
            where="model.backbone_options",
        )
