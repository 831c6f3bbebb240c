"""Evaluate windows of the prediction log against a bundle's reference sample.

For each window: the drift tests of :mod:`cycleml.monitoring.drift` (input and
output features, predicted-class distribution, embedding), corrected together, the
realised performance where labels arrived and the CBPE estimate. The report is a
plain dict (``report.json``); :func:`gauge_values` reads the latest window's numbers
as Prometheus gauges.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from cycleml.inference.bundle import BundleMeta
from cycleml.monitoring.drift import (
    DriftSettings,
    DriftTest,
    categorical_test,
    correct,
    mmd_test,
    numeric_test,
)
from cycleml.monitoring.performance import estimated_accuracy, realised_performance
from cycleml.monitoring.reference import ReferenceSample
from cycleml.monitoring.windows import Window

log = logging.getLogger(__name__)

PREDICTED_CLASS = "predicted_class"
EMBEDDING = "embedding"


def reference_notes(meta: BundleMeta, reference: ReferenceSample | None) -> list[str]:
    """What the bundle lacks for monitoring, one note each."""
    notes = []
    if reference is None or not reference.features:
        notes.append(
            "the bundle has no monitoring reference sample (exported by an older cycleml): "
            "feature and embedding drift are skipped; re-export the model to get them"
        )
    elif reference.embedding is None:
        notes.append("the bundle has no embedding output: embedding drift is skipped")
    if not meta.calibration:
        notes.append(
            "the bundle has no calibration: the accuracy estimate uses the raw probabilities"
        )
    return notes


def fallback_reference(meta: BundleMeta) -> ReferenceSample | None:
    """For a bundle without a reference sample: the predicted-class distribution of
    ``bundle.json``'s reference statistics as rows, so label shift is still tested."""
    stats = meta.reference
    shares, total = stats.get("predicted_class"), stats.get("num_samples")
    if not shares or not total:
        return None
    counts = np.rint(np.asarray(shares, dtype=np.float64) * int(total)).astype(np.int64)
    rows = np.repeat(np.arange(len(counts)), np.maximum(counts, 0))
    return ReferenceSample(features={}, predicted_class=rows, labels=rows, embedding=None)


def evaluate_window(
    window: Window,
    reference: ReferenceSample | None,
    meta: BundleMeta,
    settings: DriftSettings,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Tests, drift verdict, performance and class mix of one window."""
    rows = window.rows
    tests: list[DriftTest] = []
    if reference is not None:
        for name in sorted(reference.features):
            live = rows.features.get(name)
            if live is None and len(rows):
                tests.append(DriftTest(name, "ks", skipped=f"the log has no feature {name!r}"))
                continue
            values = live if live is not None else np.zeros(0, np.float32)
            tests.append(numeric_test(name, reference.features[name], values, settings))
        tests.append(
            categorical_test(
                PREDICTED_CLASS,
                reference.predicted_class,
                rows.predicted_class,
                len(meta.class_names),
                settings,
            )  # fmt: skip
        )
        if reference.features:
            tests.append(mmd_test(EMBEDDING, reference.embedding, rows.embedding, settings, rng))
    drift = correct(tests, settings)
    temperature = float(meta.calibration.get("temperature", 1.0))
    num_classes = len(meta.class_names)
    mix = np.bincount(rows.predicted_class, minlength=num_classes)[:num_classes]
    return {
        "index": window.index,
        "start": window.start.isoformat() if window.start else None,
        "end": window.end.isoformat() if window.end else None,
        "rows": len(rows),
        "drift": drift,
        "drifted": [t.feature for t in tests if t.drift],
        "skipped": {t.feature: t.skipped for t in tests if t.skipped},
        # rows of a tested feature whose value was not finite, left out of its test
        "left_out": {t.feature: t.left_out for t in tests if t.left_out and not t.skipped},
        "tests": [t.to_dict() for t in tests],
        "performance": {
            "estimated_accuracy": estimated_accuracy(rows.probabilities, temperature),
            **realised_performance(rows.predicted_label, rows.labels, meta.class_names),
        },
        "class_mix": (mix / max(1, mix.sum())).tolist(),
    }


def evaluate(
    windows: Sequence[Window],
    reference: ReferenceSample | None,
    meta: BundleMeta,
    settings: DriftSettings,
) -> list[dict[str, Any]]:
    """Every window, with one seeded generator so a report is reproducible."""
    rng = np.random.default_rng(settings.seed)
    return [evaluate_window(w, reference, meta, settings, rng) for w in windows]


def gauge_values(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of the window that decides the verdict (``report["decided_by"]``;
    default: the latest) as Prometheus gauges (name → value):
    ``cycleml_drift_detected`` (0/1), ``cycleml_drift_features`` (tests that drifted),
    ``cycleml_drift_p_value_<feature>`` (adjusted p-values) or
    ``cycleml_drift_distance_<feature>`` (distance tests), ``cycleml_estimated_accuracy``
    and, with labels, ``cycleml_realised_accuracy``. Empty when there is no window."""
    windows = report.get("windows") or []
    if not windows:
        return {}
    decided = report.get("decided_by")
    latest = next((w for w in windows if w["index"] == decided), windows[-1])
    gauges = {
        "cycleml_drift_detected": float(latest["drift"]),
        "cycleml_drift_features": float(len(latest["drifted"])),
    }
    for test in latest["tests"]:
        name = re.sub(r"[^a-zA-Z0-9_]", "_", test["feature"])
        if test["skipped"]:
            continue
        if test["adjusted_p_value"] is not None:
            gauges[f"cycleml_drift_p_value_{name}"] = float(test["adjusted_p_value"])
        elif test["statistic"] is not None:
            gauges[f"cycleml_drift_distance_{name}"] = float(test["statistic"])
    performance = latest["performance"]
    if performance["estimated_accuracy"] is not None:
        gauges["cycleml_estimated_accuracy"] = float(performance["estimated_accuracy"])
    if performance["accuracy"] is not None:
        gauges["cycleml_realised_accuracy"] = float(performance["accuracy"])
    return gauges
