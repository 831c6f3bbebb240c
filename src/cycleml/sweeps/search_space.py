"""A search space written in Hydra's override grammar, as Optuna distributions.

| override                              | Optuna distribution                          |
| ------------------------------------- | -------------------------------------------- |
| ``lr=interval(1e-4, 1e-1)``           | ``FloatDistribution(1e-4, 1e-1)``            |
| ``lr=tag(log, interval(1e-4, 1e-1))`` | ``FloatDistribution(1e-4, 1e-1, log=True)``  |
| ``width=int(interval(8, 64))``        | ``IntDistribution(8, 64)``                   |
| ``width=range(8, 65, 8)``             | ``IntDistribution(8, 64, step=8)``           |
| ``p=range(0.0, 0.5, 0.1)``            | ``FloatDistribution(0.0, 0.4, step=0.1)``    |
| ``bs=choice(32, 64)`` or ``bs=32,64`` | ``CategoricalDistribution([32, 64])``        |
| ``epochs=5``                          | not searched: the same for every trial       |

Like Hydra's ``range``, the stop value is excluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from cycleml.errors import ConfigError
from cycleml.sweeps.overrides import override, override_value

_CATEGORY_TYPES = (str, int, float, bool)


@dataclass
class SearchSpace:
    """The searched parameters (name -> distribution) and the overrides every trial gets."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    # name -> the override's key as written (keeps a `+`/`++` prefix or an `@package`)
    keys: dict[str, str] = field(default_factory=dict)
    # categorical parameters whose choices are override text (lists, dicts), not values
    verbatim: set[str] = field(default_factory=set)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then one per searched parameter."""
        searched = []
        for name in self.distributions:
            value = params[name]
            key = self.keys[name]
            searched.append(f"{key}={value}" if name in self.verbatim else override(key, value))
        return [*self.fixed, *searched]


def parse_search_space(
    params: Mapping[str, Any] | None, arguments: Iterable[str], parser: OverridesParser
) -> SearchSpace:
    """Build the space from the sweeper's ``params`` and the command-line ``arguments``.

    A command-line override of a key in ``params`` replaces it; non-sweep overrides are
    passed unchanged to every trial.
    """
    lines = {}
    for key, value in (params or {}).items():
        lines[str(key)] = f"{key}={value}" if isinstance(value, str) else override(str(key), value)
    parsed = parser.parse_overrides(list(lines.values()))
    by_key = {_name(o): o for o in parsed}
    for item in parser.parse_overrides(list(arguments)):
        by_key.pop(_name(item), None)
        by_key[_name(item)] = item

    space = SearchSpace()
    for name, item in by_key.items():
        if not item.is_sweep_override():
            space.fixed.append(str(item.input_line))
            continue
        space.keys[name] = item.get_key_element()
        space.distributions[name] = _distribution(item, name, space)
    return space


def _name(item: Override) -> str:
    """The parameter's name: the override key without its ``+``/``++``/``~`` prefix."""
    return item.get_key_element().lstrip("+~")


def _distribution(item: Override, name: str, space: SearchSpace) -> BaseDistribution:
    sweep = item.value()
    log = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        if log:
            raise ConfigError(f"sweep '{name}': tag(log, ...) needs an interval or a range")
        if sweep.shuffle:
            raise ConfigError(f"sweep '{name}': shuffle() has no meaning for a sampled choice")
        choices = list(sweep.list)
        if not choices:
            raise ConfigError(f"sweep '{name}': choice() needs at least one value")
        if all(isinstance(c, _CATEGORY_TYPES) for c in choices):
            return CategoricalDistribution(choices)
        space.verbatim.add(name)
        return CategoricalDistribution([override_value(c) for c in choices])
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low is None or high is None or not low < high:
            raise ConfigError(f"sweep '{name}': interval({low}, {high}) needs low < high")
        if log and low <= 0:
            raise ConfigError(f"sweep '{name}': a log interval needs low > 0, got {low}")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep):
        return _range_distribution(sweep, name, log)
    raise ConfigError(f"sweep '{name}': unsupported sweep {item.input_line!r}")


def _range_distribution(sweep: RangeSweep, name: str, log: bool) -> BaseDistribution:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if start is None or stop is None or step is None or step <= 0 or not start < stop:
        raise ConfigError(
            f"sweep '{name}': range({start}, {stop}, {step}) needs start < stop and step > 0"
        )
    if sweep.shuffle:
        raise ConfigError(f"sweep '{name}': shuffle() has no meaning for a sampled range")
    count = math.ceil((stop - start) / step - 1e-9)
    if all(isinstance(v, int) for v in (start, stop, step)):
        if log and step != 1:
            raise ConfigError(f"sweep '{name}': a log range needs step 1, got {step}")
        if log and start <= 0:
            raise ConfigError(f"sweep '{name}': a log range needs start > 0, got {start}")
        high = start + (count - 1) * step
        if high == start:
            return CategoricalDistribution([start])
        return IntDistribution(start, high, log=log, step=1 if log else step)
    if log:
        raise ConfigError(f"sweep '{name}': a log range needs integers; use tag(log, interval())")
    high = round(start + (count - 1) * step, 12)
    if high <= start:
        return CategoricalDistribution([float(start)])
    return FloatDistribution(float(start), float(high), step=float(step))
