"""Drift tests of one window against the reference sample, chosen by sample size.

As Evidently does: up to ``large_window`` rows a numeric feature is tested with the
two-sample Kolmogorov-Smirnov test and the predicted-class distribution with a
chi-square test of homogeneity (both give p-values); above it, with the Wasserstein
distance normed by the reference's standard deviation and the Jensen-Shannon
distance, each against a threshold. The embedding is tested with MMD (RBF kernel,
median-heuristic bandwidth) and a permutation p-value. The p-values of a window are
corrected together (Holm or Bonferroni) so the window's false-alarm rate is ``alpha``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon, pdist, squareform
from scipy.stats import chi2_contingency, ks_2samp, wasserstein_distance

from cycleml.errors import ConfigError

CORRECTIONS = ("holm", "bonferroni")


@dataclass(frozen=True)
class DriftSettings:
    """The ``drift`` node of ``configs/monitor.yaml``."""

    alpha: float = 0.05
    correction: str = "holm"
    # windows with more rows use the distance tests (Evidently's default: 1,000)
    large_window: int = 1000
    wasserstein_threshold: float = 0.1
    jensenshannon_threshold: float = 0.1
    # fewer rows in the window (or reference) than this: the test is skipped
    min_rows: int = 30
    # MMD: rows of the reference and of the window used (random subsample beyond),
    # and the number of permutations of the p-value
    mmd_reference_rows: int = 500
    mmd_window_rows: int = 500
    mmd_permutations: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"drift.alpha={self.alpha}: expected a number between 0 and 1")
        if self.correction not in CORRECTIONS:
            raise ConfigError(
                f"drift.correction={self.correction!r}: expected one of {', '.join(CORRECTIONS)}"
            )
        counts = (self.large_window, self.min_rows, self.mmd_reference_rows,
                  self.mmd_window_rows, self.mmd_permutations)  # fmt: skip
        if min(counts) < 1:
            raise ConfigError(
                "drift.large_window, min_rows, mmd_reference_rows, mmd_window_rows and "
                "mmd_permutations must be positive"
            )


@dataclass
class DriftTest:
    """One test of one feature in one window."""

    feature: str
    test: str
    statistic: float | None = None
    p_value: float | None = None
    # distance tests: drift when statistic > threshold
    threshold: float | None = None
    adjusted_p_value: float | None = None
    drift: bool = False
    skipped: str | None = None
    # window rows whose value is not finite (NaN, infinite, or not logged): not tested
    left_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def numeric_test(
    feature: str, reference: np.ndarray, window: np.ndarray, settings: DriftSettings
) -> DriftTest:
    """KS up to ``large_window`` rows, normed Wasserstein distance above."""
    reference = reference[np.isfinite(reference)]
    finite = np.isfinite(window)
    left_out = int(len(window) - finite.sum())
    window = window[finite]
    large = len(window) > settings.large_window
    test = DriftTest(feature, "wasserstein" if large else "ks", left_out=left_out)
    if not len(window) and left_out:
        test.skipped = (
            f"none of the window's {left_out} rows has a finite value (NaN, infinite or "
            "not logged): nothing to test"
        )
        return test
    if _too_small(test, len(reference), len(window), settings.min_rows):
        if left_out:
            test.skipped = f"{test.skipped} ({left_out} more rows have no finite value)"
        return test
    if large:
        scale = float(np.std(reference))
        # a constant reference feature: any change is a full unit of drift
        distance = wasserstein_distance(reference, window)
        test.statistic = float(distance / scale) if scale > 0 else float(distance > 0)
        test.threshold = settings.wasserstein_threshold
    else:
        result = ks_2samp(reference, window)
        test.statistic, test.p_value = float(result.statistic), float(result.pvalue)
    return test


def categorical_test(
    feature: str,
    reference: np.ndarray,
    window: np.ndarray,
    num_classes: int,
    settings: DriftSettings,
) -> DriftTest:
    """Chi-square test of homogeneity up to ``large_window`` rows, Jensen-Shannon
    distance of the class frequencies above."""
    large = len(window) > settings.large_window
    test = DriftTest(feature, "jensenshannon" if large else "chi2")
    if _too_small(test, len(reference), len(window), settings.min_rows):
        return test
    ref_counts = np.bincount(reference, minlength=num_classes)[:num_classes]
    win_counts = np.bincount(window, minlength=num_classes)[:num_classes]
    if large:
        test.statistic = float(jensenshannon(ref_counts, win_counts, base=2))
        test.threshold = settings.jensenshannon_threshold
        return test
    seen = (ref_counts + win_counts) > 0  # a class neither sample has adds nothing
    if seen.sum() < 2:
        test.skipped = "one class only in reference and window: nothing to compare"
        return test
    result = chi2_contingency(np.stack([ref_counts[seen], win_counts[seen]]), correction=False)
    test.statistic, test.p_value = float(result.statistic), float(result.pvalue)
    return test


def mmd_test(
    feature: str,
    reference: np.ndarray | None,
    window: np.ndarray | None,
    settings: DriftSettings,
    rng: np.random.Generator,
) -> DriftTest:
    """Squared MMD (biased estimate) with an RBF kernel whose bandwidth is the median
    pairwise distance of the pooled sample, and a permutation p-value."""
    test = DriftTest(feature, "mmd")
    if reference is None:
        test.skipped = "the bundle has no embedding output (exported without one)"
        return test
    if window is None:
        test.skipped = "logged predictions in this window have no embedding"
        return test
    if _too_small(test, len(reference), len(window), settings.min_rows):
        return test
    x = _subsample(reference, settings.mmd_reference_rows, rng)
    y = _subsample(window, settings.mmd_window_rows, rng)
    pooled = np.concatenate([x, y]).astype(np.float64)
    squared = pdist(pooled, "sqeuclidean")
    bandwidth = float(np.median(squared[squared > 0])) if np.any(squared > 0) else 1.0

    kernel = np.exp(-squareform(squared) / bandwidth)
    m, n = len(x), len(y)
    weights = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(weights @ kernel @ weights)
    permuted = np.stack([rng.permutation(weights) for _ in range(settings.mmd_permutations)], 1)
    null = np.einsum("ip,ip->p", permuted, kernel @ permuted)
    test.statistic = observed
    test.p_value = float((1 + np.sum(null >= observed)) / (1 + settings.mmd_permutations))
    return test


def correct(tests: list[DriftTest], settings: DriftSettings) -> bool:
    """Adjust the p-values of the window's tests together and mark the drifted ones;
    True when the window drifts: any test rejects after the correction, or any
    distance test exceeds its threshold."""
    ran = [t for t in tests if t.skipped is None and t.p_value is not None]
    adjusted = adjust_p_values([t.p_value for t in ran], settings.correction)
    for test, value in zip(ran, adjusted, strict=True):
        test.adjusted_p_value = value
        test.drift = value <= settings.alpha
    for test in tests:
        if test.skipped is None and test.threshold is not None and test.statistic is not None:
            test.drift = test.statistic > test.threshold
    return any(t.drift for t in tests)


def adjust_p_values(p_values: list[float], method: str) -> list[float]:
    """Family-wise adjusted p-values: Bonferroni (``p·m``) or Holm's step-down
    (sorted ascending, ``max_{j≤i} (m-j)·p_(j)``), capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return []
    if method == "bonferroni":
        return np.minimum(1.0, p * m).tolist()
    order = np.argsort(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted.tolist()


def _too_small(test: DriftTest, reference_rows: int, window_rows: int, minimum: int) -> bool:
    if window_rows == 0:
        test.skipped = "empty window: no logged predictions"
    elif window_rows < minimum:
        test.skipped = f"window has {window_rows} rows, the {test.test} test needs {minimum}"
    elif reference_rows < minimum:
        test.skipped = f"reference has {reference_rows} rows, the {test.test} test needs {minimum}"
    return test.skipped is not None


def _subsample(values: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    if len(values) <= rows:
        return values
    return values[rng.choice(len(values), size=rows, replace=False)]
