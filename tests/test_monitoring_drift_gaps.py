"""Window rows without a finite feature value (a model emitting NaN, a feature not
logged) are counted and reported, never dropped from a drift test silently."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from cycleml.inference import load_bundle
from cycleml.monitoring.cli import _print_summary
from cycleml.monitoring.drift import DriftSettings, numeric_test
from cycleml.monitoring.log import LoggedPredictions
from cycleml.monitoring.monitor import evaluate_window
from cycleml.monitoring.reference import ReferenceSample
from cycleml.monitoring.report import _window_table
from cycleml.monitoring.windows import Window
from test_export_support import cached_bundle

SETTINGS = DriftSettings(min_rows=30)


def test_non_finite_window_values_are_counted_not_hidden():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=200)
    window = rng.normal(size=60)
    window[:20] = [np.nan, np.inf, -np.inf, np.nan] * 5
    test = numeric_test("confidence", reference, window, SETTINGS)
    assert test.skipped is None and test.left_out == 20

    # every value NaN: not "an empty window" (it holds 60 predictions)
    test = numeric_test("confidence", reference, np.full(60, np.nan), SETTINGS)
    assert test.left_out == 60
    assert test.skipped.startswith("none of the window's 60 rows has a finite value")

    short = numeric_test("confidence", reference, window[:40], SETTINGS)
    assert (
        short.skipped
        == "window has 20 rows, the ks test needs 30 (20 more rows have no finite value)"
    )


def test_the_window_report_names_the_rows_left_out(capsys):
    meta = load_bundle(cached_bundle("image")).meta
    rows, classes = 60, len(meta.class_names)
    rng = np.random.default_rng(1)
    brightness = rng.uniform(size=rows).astype(np.float32)
    brightness[::3] = np.nan
    logged = LoggedPredictions(
        request_ids=[f"r{i}" for i in range(rows)],
        logged_at=[dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * rows,
        predicted_class=np.arange(rows) % classes,
        predicted_label=[meta.class_names[i % classes] for i in range(rows)],
        probabilities=np.full((rows, classes), 1 / classes, np.float32),
        features={"brightness": brightness},
        embedding=None,
        labels=[None] * rows,
    )
    reference = ReferenceSample(
        features={"brightness": rng.uniform(size=200).astype(np.float32)},
        predicted_class=np.arange(200) % classes,
        labels=np.arange(200) % classes,
        embedding=None,
    )
    result = evaluate_window(Window(0, None, None, logged), reference, meta, SETTINGS, rng)
    assert result["left_out"] == {"brightness": 20}
    assert "brightness: 20 rows without a finite value left out" in _window_table([result])
    report = {"model": meta.name, "version": "1", "rows": rows, "windows": [result],
              "window_rule": "60 predictions each", "notes": [], "decided_by": 0}  # fmt: skip
    _print_summary(report, Path("report.html"))
    assert "brightness: 20 of 60 rows have no finite value" in capsys.readouterr().out
