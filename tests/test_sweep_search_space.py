"""Search spaces in Hydra's override grammar, and Python values written back as overrides."""

from __future__ import annotations

import math

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from cycleml.errors import ConfigError
from cycleml.sweeps.overrides import override, override_value
from cycleml.sweeps.resources import cpu_threads_per_trial, split_devices
from cycleml.sweeps.search_space import parse_search_space


@pytest.fixture(scope="module")
def parser() -> OverridesParser:
    return OverridesParser.create()


@pytest.mark.parametrize(
    "value",
    [
        0,
        -3,
        0.001,
        1e-05,
        2.5e10,
        True,
        False,
        None,
        "cnn",
        "resnet18",
        "a b",
        "it's",
        "32",
        "true",
        "null",
        "1e-3",
        "a,b",
        "x=y",
        "back\\slash",
        "sqlite:////tmp/x.db",
        [1, 2],
        ["a b", None, 0.5],
        {"k": 1, "name": "x y"},
        [],
    ],
)
def test_override_value_is_read_back_by_hydra_as_the_same_value(parser, value) -> None:
    parsed = parser.parse_override(override("key", value)).value()
    assert parsed == value
    assert type(parsed) is type(value)


def test_override_value_keeps_plain_words_unquoted_and_rejects_objects() -> None:
    assert override_value("cnn") == "cnn"
    assert override_value("model/cnn.yaml") == "model/cnn.yaml"
    assert override_value("32") == "'32'"
    assert override_value(float("inf")) == "inf"
    assert math.isnan(
        OverridesParser.create().parse_override("a=" + override_value(math.nan)).value()
    )
    with pytest.raises(TypeError, match="object"):
        override_value(object())


def test_every_sweep_form_maps_to_its_optuna_distribution(parser) -> None:
    space = parse_search_space(
        {
            "lr": "tag(log, interval(1e-4, 1e-1))",
            "dropout": "interval(0.0, 0.5)",
            "width": "int(interval(8, 64))",
            "depth": "range(2, 9, 2)",
            "p": "range(0.0, 0.55, 0.1)",
            "units": "tag(log, range(1, 100))",
            "bs": "choice(32, 64)",
            "opt": "adam,sgd",
            "epochs": 5,
        },
        [],
        parser,
    )
    d = space.distributions
    assert d["lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["dropout"] == FloatDistribution(0.0, 0.5)
    assert d["width"] == IntDistribution(8, 64)
    assert d["depth"] == IntDistribution(2, 8, step=2)
    assert d["p"].low == 0.0 and d["p"].high == pytest.approx(0.5) and d["p"].step == 0.1
    assert d["units"] == IntDistribution(1, 99, log=True)
    assert d["bs"] == CategoricalDistribution([32, 64])
    assert d["opt"] == CategoricalDistribution(["adam", "sgd"])
    assert "epochs" not in d
    assert space.fixed == ["epochs=5"]


def test_command_line_replaces_a_configured_range_and_fixed_overrides_pass_through(parser) -> None:
    space = parse_search_space(
        {"lr": "interval(0.1, 0.2)", "bs": "choice(1, 2)"},
        ["lr=tag(log, interval(1e-5, 1e-2))", "trainer.max_epochs=3", "+extra.flag=true"],
        parser,
    )
    assert space.distributions["lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space.fixed == ["trainer.max_epochs=3", "+extra.flag=true"]
    overrides = space.overrides({"lr": 0.001, "bs": 2})
    assert overrides == ["trainer.max_epochs=3", "+extra.flag=true", "bs=2", "lr=0.001"]


def test_prefixed_keys_and_list_choices_come_back_as_valid_overrides(parser) -> None:
    space = parse_search_space(
        {"+model.extra": "choice([1,2],[3])", "name": "choice('a b', c)"}, [], parser
    )
    assert "model.extra" in space.distributions
    overrides = space.overrides({"model.extra": "[3]", "name": "a b"})
    assert overrides == ["+model.extra=[3]", "name='a b'"]
    values = [parser.parse_override(o).value() for o in overrides]
    assert values == [[3], "a b"]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("tag(log, interval(0.0, 1.0))", "log interval needs low > 0"),
        ("interval(2.0, 1.0)", "needs low < high"),
        ("tag(log, choice(1, 2))", "needs an interval or a range"),
        ("tag(log, range(1, 10, 2))", "log range needs step 1"),
        ("range(5, 1)", "start < stop"),
        ("shuffle(choice(1, 2))", "shuffle"),
    ],
)
def test_invalid_sweeps_name_the_parameter(parser, sweep, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_search_space({"model.x": sweep}, [], parser)
    assert "model.x" in str(err.value)


def test_devices_are_dealt_out_evenly_and_never_shared() -> None:
    assert split_devices([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert split_devices([0, 1, 2], 3) == [[0], [1], [2]]
    assert split_devices([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="cannot be split among 3"):
        split_devices([0, 1], 3)
    assert cpu_threads_per_trial(2, cpus=16) == 8
    assert cpu_threads_per_trial(4, cpus=2) == 1
