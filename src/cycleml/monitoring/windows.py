"""Cutting the log of one model version into windows: by count or by time."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cycleml.errors import ConfigError
from cycleml.monitoring.log import LoggedPredictions

BY = ("count", "time")


@dataclass(frozen=True)
class Window:
    """Consecutive logged predictions; ``start``/``end`` bound their log times."""

    index: int
    start: dt.datetime | None
    end: dt.datetime | None
    rows: LoggedPredictions


def parse_duration(text: str) -> dt.timedelta:
    """``"1h"``, ``"30min"``, ``"1d"``, ``"2 days"`` → a positive timedelta."""
    try:
        duration = pd.Timedelta(str(text)).to_pytimedelta()
    except ValueError as err:
        raise ConfigError(
            f"window.duration={text!r} is not a duration (e.g. 1h, 30min, 1d)"
        ) from err
    if duration <= dt.timedelta(0):
        raise ConfigError(f"window.duration={text!r}: expected a positive duration")
    return duration


def count_windows(logged: LoggedPredictions, size: int) -> list[Window]:
    """Windows of ``size`` consecutive predictions, oldest first; the newest window
    holds what is left (possibly fewer rows)."""
    if size < 1:
        raise ConfigError(f"window.size={size}: expected a positive number of predictions")
    windows = []
    for index, start in enumerate(range(0, len(logged), size)):
        rows = logged.take(slice(start, start + size))
        windows.append(Window(index, rows.logged_at[0], rows.logged_at[-1], rows))
    return windows


def time_windows(
    logged: LoggedPredictions,
    duration: dt.timedelta,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> list[Window]:
    """Consecutive windows of ``duration`` from ``start`` (default: the first logged
    time) to ``end`` (default: just after the last); a window with no predictions in
    it is kept, empty, so a gap in traffic shows in the report."""
    if not len(logged) and (start is None or end is None):
        return []
    first = start or logged.logged_at[0]
    last = end or (logged.logged_at[-1] + dt.timedelta(microseconds=1))
    times = np.array([(t - first).total_seconds() for t in logged.logged_at], dtype=np.float64)
    seconds = duration.total_seconds()
    count = max(1, int(np.ceil((last - first).total_seconds() / seconds)))
    windows = []
    for index in range(count):
        lo, hi = first + index * duration, min(last, first + (index + 1) * duration)
        inside = np.flatnonzero((times >= index * seconds) & (times < (index + 1) * seconds))
        windows.append(Window(index, lo, hi, logged.take(inside)))
    return windows
