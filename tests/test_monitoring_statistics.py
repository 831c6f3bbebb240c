"""The drift tests and the accuracy estimate, tested as statistics: false alarms on
windows from the validation distribution, power against planted shifts, CBPE error.

The model is a real digits CNN exported through the real exporter; each window's
features, probabilities and embeddings come from its ONNX bundle (``Predictor``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cycleml.inference import load_bundle
from cycleml.monitoring.drift import DriftSettings
from cycleml.monitoring.monitor import evaluate_window
from cycleml.monitoring.reference import load_reference_sample
from cycleml.monitoring.windows import Window
from test_monitoring_support import digits_bundle, one_class_half, pool

ALPHA = 0.05
WINDOW = 500
# realised accuracy of n rows is itself noisy (sd ≈ sqrt(a(1-a)/n): 0.017 at 500 rows
# and 0.83 accuracy), so the estimate is compared on windows of 2,000 drawn without
# replacement from 4,376 scans
CBPE_WINDOW = 2000


def drift_rate(pool_name: str, windows: int, seed: int, pick=None) -> tuple[float, list]:
    """Share of ``windows`` resampled windows of ``WINDOW`` rows that drift."""
    bundle = load_bundle(digits_bundle())
    reference = load_reference_sample(bundle)
    source = pool(pool_name)
    rng = np.random.default_rng(seed)
    settings = DriftSettings(alpha=ALPHA)
    results = []
    for index in range(windows):
        rows = pick(source.labels, rng) if pick else rng.choice(len(source.labels), WINDOW)
        window = Window(index, None, None, source.rows.take(rows))
        results.append(evaluate_window(window, reference, bundle.meta, settings, rng))
    return float(np.mean([r["drift"] for r in results])), results


def test_reference_sample_and_calibration_are_in_the_bundle():
    bundle = load_bundle(digits_bundle())
    reference = load_reference_sample(bundle)
    assert len(reference) == 1650  # every validation row (fewer than 2,000)
    assert set(reference.features) == {"brightness", "contrast", "confidence"}
    assert reference.embedding.shape == (1650, bundle.meta.embedding["dim"])
    assert 0.1 < bundle.meta.calibration["temperature"] < 10
    assert bundle.meta.calibration["nll_after"] <= bundle.meta.calibration["nll_before"]


@pytest.mark.parametrize(
    "windows", [pytest.param(60, id="60-windows"), pytest.param(200, marks=pytest.mark.slow)]
)
def test_false_alarm_rate_on_the_validation_distribution(windows):
    rate, results = drift_rate("val", windows, seed=windows)
    print(f"false alarms: {rate:.3f} over {windows} windows")
    # 60 windows: the binomial(60, 0.05) 99th percentile is 7 windows
    limit = ALPHA + 0.02 if windows >= 200 else 7 / 60
    assert rate <= limit, [r["drifted"] for r in results if r["drift"]]
    assert all(not r["skipped"] for r in results)


SHIFTS = {
    "brightened 15%": ("bright", None),
    "class 3 is half the traffic": ("val", lambda labels, rng: one_class_half(labels, WINDOW, rng)),
    "turned and blurred": ("strong", None),
}


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_power_against_planted_shifts(shift):
    pool_name, pick = SHIFTS[shift]
    rate, _ = drift_rate(pool_name, 30, seed=7, pick=pick)
    print(f"power, {shift}: {rate:.3f}")
    assert rate >= 0.9


def test_label_free_estimate_follows_accuracy_under_covariate_shift():
    """Held-out digits scanned at the hard end: realised accuracy falls by more than
    0.10, and the CBPE estimate of every window stays within 0.03 of it."""
    bundle = load_bundle(digits_bundle())
    settings = DriftSettings()
    rng = np.random.default_rng(3)
    accuracies = {}
    for name in ("test", "test-strong"):
        source = pool(name)
        errors, realised = [], []
        for index in range(20):
            rows = rng.choice(len(source.labels), CBPE_WINDOW, replace=False)
            window = source.rows.take(rows)
            labelled = dataclasses.replace(window, labels=[str(y) for y in source.labels[rows]])
            result = evaluate_window(
                Window(index, None, None, labelled), None, bundle.meta, settings, rng
            )
            performance = result["performance"]
            realised.append(performance["accuracy"])
            errors.append(performance["estimated_accuracy"] - performance["accuracy"])
        accuracies[name] = float(np.mean(realised))
        print(f"CBPE {name}: accuracy {accuracies[name]:.3f}, errors {np.round(errors, 3)}")
        assert np.max(np.abs(errors)) <= 0.03
    assert accuracies["test"] - accuracies["test-strong"] >= 0.10
