"""Statistics of an A/B experiment on counts: pure functions, no database.

An arm's outcome is a proportion: ``x`` successes (units that converted, requests
that were clicked, labelled predictions that were right) out of ``n`` trials. One
treatment arm is compared with the control arm:

- fixed-horizon two-sided two-proportion z-test with the pooled variance (the test
  a chi-square test of the 2×2 table without continuity correction gives);
- absolute difference ``p_t - p_c`` with a Wald 95% interval (unpooled variance);
- relative difference ``p_t / p_c - 1`` with an interval by the delta method on
  ``log(p_t / p_c)`` (the interval is symmetric on the log scale, not around the
  estimate);
- an always-valid (sequential) p-value by the mixture sequential probability ratio
  test of Johari, Pekelis & Walsh (2017), "Always valid inference": a normal
  mixture ``θ ~ N(0, τ²)`` over the true difference. It stays valid however often
  it is looked at, so a report read every hour does not inflate false positives;
- the sample-ratio-mismatch (SRM) chi-square test of the units per arm against the
  expected split, and the units per arm still needed to detect a minimum effect.

All functions accept numpy arrays as well as numbers, so that simulations can run
thousands of experiments at once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chisquare, norm

from cycleml.errors import ConfigError

# the mixing standard deviation τ of the sequential test, in units of the difference
# of proportions: the spread of the true effects the test expects. Power is best for
# effects near τ and falls off slowly for others (the cost of a τ ten times too
# large is about one extra unit of the log-likelihood threshold).
DEFAULT_TAU = 0.01
SRM_ALPHA = 0.001
TESTS = ("sequential", "fixed")
VERDICTS = ("treatment_wins", "control_wins", "no_difference_yet", "invalid")

ArrayLike = Any  # a number or a numpy array of them


def _rates(x: ArrayLike, n: ArrayLike) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(n) > 0, np.asarray(x, float) / np.asarray(n, float), np.nan)


def _pooled_variance(x_c: ArrayLike, n_c: ArrayLike, x_t: ArrayLike, n_t: ArrayLike) -> np.ndarray:
    """Variance of ``p_t - p_c`` under the null hypothesis of equal rates."""
    n_c, n_t = np.asarray(n_c, float), np.asarray(n_t, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (np.asarray(x_c, float) + np.asarray(x_t, float)) / (n_c + n_t)
        return pooled * (1 - pooled) * (1 / n_c + 1 / n_t)


def z_test(
    x_c: ArrayLike, n_c: ArrayLike, x_t: ArrayLike, n_t: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided two-proportion z-test (pooled variance): ``(z, p_value)``.

    ``z > 0`` when the treatment's rate is higher. Without any variation (no trials,
    or all-or-nothing outcomes in both arms) z is 0 and the p-value 1.
    """
    variance = _pooled_variance(x_c, n_c, x_t, n_t)
    diff = _rates(x_t, n_t) - _rates(x_c, n_c)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(variance > 0, diff / np.sqrt(variance), 0.0)
    z = np.nan_to_num(z, nan=0.0)
    return z, 2 * norm.sf(np.abs(z))


def difference_ci(
    x_c: ArrayLike, n_c: ArrayLike, x_t: ArrayLike, n_t: ArrayLike, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p_t - p_c, low, high)``: the Wald interval with the unpooled variance."""
    p_c, p_t = _rates(x_c, n_c), _rates(x_t, n_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(
            p_c * (1 - p_c) / np.asarray(n_c, float) + p_t * (1 - p_t) / np.asarray(n_t, float)
        )
    half = norm.isf(alpha / 2) * se
    diff = p_t - p_c
    return diff, diff - half, diff + half


def relative_ci(
    x_c: ArrayLike, n_c: ArrayLike, x_t: ArrayLike, n_t: ArrayLike, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p_t / p_c - 1, low, high)`` by the delta method on ``log(p_t / p_c)``:
    ``Var ≈ (1 - p_t) / x_t + (1 - p_c) / x_c``. NaN where an arm has no successes."""
    x_c, x_t = np.asarray(x_c, float), np.asarray(x_t, float)
    p_c, p_t = _rates(x_c, n_c), _rates(x_t, n_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.where((x_c > 0) & (x_t > 0), np.log(p_t / p_c), np.nan)
        se = np.sqrt((1 - p_t) / x_t + (1 - p_c) / x_c)
    half = norm.isf(alpha / 2) * se
    return np.expm1(log_ratio), np.expm1(log_ratio - half), np.expm1(log_ratio + half)


def msprt_likelihood_ratio(
    x_c: ArrayLike, n_c: ArrayLike, x_t: ArrayLike, n_t: ArrayLike, tau: float = DEFAULT_TAU
) -> np.ndarray:
    """The mixture likelihood ratio Λ of "difference ≠ 0" against "difference = 0".

    With ``d = p_t - p_c`` approximately ``N(θ, v)`` (``v``: the pooled variance
    under the null) and the mixture ``θ ~ N(0, τ²)``, Λ is the ratio of the
    marginal density of ``d`` to its null density:
    ``Λ = sqrt(v / (v + τ²)) · exp(τ² d² / (2 v (v + τ²)))``
    (Johari et al. 2017, eq. for two-stream normal data with ``v = 2σ²/n``). Under
    the null, Λ over a growing sample is a martingale with mean 1, so by Ville's
    inequality it exceeds ``1/α`` at any time with probability at most α.
    """
    if not tau > 0:
        raise ConfigError(f"sequential tau={tau}: expected a positive number")
    variance = _pooled_variance(x_c, n_c, x_t, n_t)
    diff = np.nan_to_num(_rates(x_t, n_t) - _rates(x_c, n_c), nan=0.0)
    tau2 = tau * tau
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_ratio = 0.5 * np.log(variance / (variance + tau2)) + tau2 * diff**2 / (
            2 * variance * (variance + tau2)
        )
    return np.where(variance > 0, np.exp(np.nan_to_num(log_ratio, nan=0.0)), 1.0)


def sequential_p_values(
    x_c: ArrayLike, n_c: ArrayLike, x_t: ArrayLike, n_t: ArrayLike, tau: float = DEFAULT_TAU
) -> np.ndarray:
    """Always-valid p-values at successive looks: ``min(1, 1 / max Λ so far)``.

    The inputs are cumulative counts, one per look, along the last axis (shape
    ``(looks,)`` or ``(experiments, looks)``). The p-value never rises: rejecting
    when it falls below α at any look keeps the false-positive rate at most α.
    """
    ratio = msprt_likelihood_ratio(x_c, n_c, x_t, n_t, tau)
    return np.minimum(1.0, 1.0 / np.maximum.accumulate(np.atleast_1d(ratio), axis=-1))


@dataclass(frozen=True)
class SrmResult:
    """Sample-ratio-mismatch test of the units per arm against the expected split."""

    counts: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    alpha: float
    mismatch: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form: an infinite chi-square (units in an arm expected to get
        none) is null, as strict JSON has no Infinity."""
        values = asdict(self)
        if not np.isfinite(self.chi2):
            values["chi2"] = None
        return values


def srm_test(
    counts: Mapping[str, int],
    expected_shares: Mapping[str, float],
    alpha: float = SRM_ALPHA,
) -> SrmResult:
    """Chi-square goodness of fit of ``counts`` to ``expected_shares`` (any scale).

    A mismatch (p < ``alpha``, 0.001 by default: the test runs on every report, so
    it must rarely cry wolf) means units were lost or added unevenly between arms
    (a crash in one arm, a redirect, a logging bug) and no comparison can be trusted.
    An arm with units but no expected share is a mismatch outright.
    """
    arms = sorted(set(counts) | set(expected_shares))
    observed = np.array([counts.get(arm, 0) for arm in arms], float)
    shares = np.array([max(float(expected_shares.get(arm, 0.0)), 0.0) for arm in arms])
    total = observed.sum()
    if shares.sum() <= 0:
        raise ConfigError("the expected split of the arms has no positive weight")
    expected = shares / shares.sum() * total
    if total == 0:
        return SrmResult(
            {a: 0 for a in arms},
            dict(zip(arms, expected.tolist(), strict=True)),
            0.0,
            1.0,
            alpha,
            False,
        )
    if np.any((expected == 0) & (observed > 0)):
        chi2, p_value = float("inf"), 0.0
    else:
        keep = expected > 0
        if keep.sum() < 2:
            chi2, p_value = 0.0, 1.0
        else:
            result = chisquare(observed[keep], expected[keep])
            chi2, p_value = float(result.statistic), float(result.pvalue)
    return SrmResult(
        counts={arm: int(c) for arm, c in zip(arms, observed, strict=True)},
        expected={arm: float(e) for arm, e in zip(arms, expected, strict=True)},
        chi2=chi2,
        p_value=p_value,
        alpha=alpha,
        mismatch=p_value < alpha,
    )


def sample_size_fixed(
    p_control: float, min_effect: float, alpha: float = 0.05, power: float = 0.8,
    ratio: float = 1.0,
) -> int:  # fmt: skip
    """Control-arm units for the two-sided z-test to detect ``min_effect`` (absolute)
    with ``power``; the treatment arm has ``ratio`` times as many.

    ``n = (z_{1-α/2} sqrt(p̄q̄(1 + 1/k)) + z_power sqrt(p_c q_c + p_t q_t / k))² / δ²``
    (the normal approximation, as in Fleiss; ``k`` = ratio).
    """
    p_c, p_t, k = _check_design(p_control, min_effect, alpha, power, ratio)
    pooled = (p_c + k * p_t) / (1 + k)
    root = norm.isf(alpha / 2) * np.sqrt(pooled * (1 - pooled) * (1 + 1 / k)) + norm.isf(
        1 - power
    ) * np.sqrt(p_c * (1 - p_c) + p_t * (1 - p_t) / k)
    return int(np.ceil(root**2 / min_effect**2))


def sequential_power(
    n_control: float, p_control: float, min_effect: float, alpha: float = 0.05,
    tau: float = DEFAULT_TAU, ratio: float = 1.0,
) -> float:  # fmt: skip
    """Power of the sequential test judged at one final look with ``n_control`` units
    (a lower bound: earlier looks can only add rejections)."""
    p_c, p_t, k = _check_design(p_control, min_effect, alpha, 0.5, ratio)
    n_t = k * n_control
    pooled = (p_c + k * p_t) / (1 + k)
    v0 = pooled * (1 - pooled) * (1 / n_control + 1 / n_t)
    v1 = p_c * (1 - p_c) / n_control + p_t * (1 - p_t) / n_t
    tau2 = tau * tau
    # Λ > 1/α  ⇔  d² > 2 v0 (v0 + τ²) / τ² · (log(1/α) + ½ log((v0 + τ²) / v0))
    threshold = np.sqrt(
        2 * v0 * (v0 + tau2) / tau2 * (np.log(1 / alpha) + 0.5 * np.log((v0 + tau2) / v0))
    )
    sd = np.sqrt(v1)
    return float(norm.sf((threshold - min_effect) / sd) + norm.cdf((-threshold - min_effect) / sd))


def sample_size_sequential(
    p_control: float, min_effect: float, alpha: float = 0.05, power: float = 0.8,
    tau: float = DEFAULT_TAU, ratio: float = 1.0,
) -> int:  # fmt: skip
    """Control-arm units for the sequential test to reach ``power`` at ``min_effect``,
    judged at one final look (:func:`sequential_power`)."""
    _check_design(p_control, min_effect, alpha, power, ratio)
    low = 2.0
    high = 2.0 * sample_size_fixed(p_control, min_effect, alpha, power, ratio) + 10
    while sequential_power(high, p_control, min_effect, alpha, tau, ratio) < power:
        high *= 2
        if high > 1e13:
            raise ConfigError(f"no sample size reaches power {power} for tau={tau}")
    found = brentq(
        lambda n: sequential_power(n, p_control, min_effect, alpha, tau, ratio) - power, low, high
    )
    return int(np.ceil(found))


def _check_design(
    p_control: float, min_effect: float, alpha: float, power: float, ratio: float
) -> tuple[float, float, float]:
    p_t = p_control + min_effect
    if not 0 < p_control < 1 or not 0 < p_t < 1:
        raise ConfigError(
            f"cannot size for a control rate of {p_control:.4g} and a minimum effect of "
            f"{min_effect:.4g}: both rates must lie strictly between 0 and 1"
        )
    if min_effect == 0:
        raise ConfigError("min_effect must not be 0")
    if not 0 < alpha < 1 or not 0 < power < 1 or not ratio > 0:
        raise ConfigError(f"alpha={alpha}, power={power}, ratio={ratio}: out of range")
    return p_control, p_t, ratio


@dataclass(frozen=True)
class ArmComparison:
    """One treatment arm against the control arm on one proportion metric."""

    control: str
    treatment: str
    n_control: int
    x_control: int
    n_treatment: int
    x_treatment: int
    rate_control: float | None
    rate_treatment: float | None
    difference: float | None
    difference_ci: tuple[float | None, float | None]
    relative_difference: float | None
    relative_ci: tuple[float | None, float | None]
    z: float
    p_value: float
    sequential_p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else value


def compare(
    control: str, treatment: str, x_c: int, n_c: int, x_t: int, n_t: int,
    alpha: float = 0.05, sequential_p_value: float | None = None, tau: float = DEFAULT_TAU,
) -> ArmComparison:  # fmt: skip
    """Every statistic of one comparison at the latest counts.

    ``sequential_p_value``: the running always-valid p-value computed over the
    looks so far (:func:`sequential_p_values`); None computes it from this one look.
    """
    z, p_value = z_test(x_c, n_c, x_t, n_t)
    diff, low, high = difference_ci(x_c, n_c, x_t, n_t, alpha)
    rel, rel_low, rel_high = relative_ci(x_c, n_c, x_t, n_t, alpha)
    if sequential_p_value is None:
        sequential_p_value = float(sequential_p_values(x_c, n_c, x_t, n_t, tau)[-1])
    return ArmComparison(
        control=control,
        treatment=treatment,
        n_control=int(n_c),
        x_control=int(x_c),
        n_treatment=int(n_t),
        x_treatment=int(x_t),
        rate_control=_number(_rates(x_c, n_c)),
        rate_treatment=_number(_rates(x_t, n_t)),
        difference=_number(diff),
        difference_ci=(_number(low), _number(high)),
        relative_difference=_number(rel),
        relative_ci=(_number(rel_low), _number(rel_high)),
        z=float(z),
        p_value=float(p_value),
        sequential_p_value=float(sequential_p_value),
    )


def decide(
    p_values: ArrayLike, differences: ArrayLike, alpha: float = 0.05,
    higher_is_better: bool = True,
) -> np.ndarray:  # fmt: skip
    """The verdict code per comparison, vectorised: ``treatment_wins`` /
    ``control_wins`` when the p-value is below ``alpha`` (the better side by the sign
    of the difference), else ``no_difference_yet``."""
    p_values = np.asarray(p_values, float)
    better = np.asarray(differences, float) * (1 if higher_is_better else -1)
    significant = p_values < alpha
    return np.where(
        significant & (better > 0),
        "treatment_wins",
        np.where(significant & (better < 0), "control_wins", "no_difference_yet"),
    )


@dataclass(frozen=True)
class Verdict:
    """The experiment's conclusion."""

    code: str
    text: str
    # the winning arm (treatment_wins / control_wins)
    arm: str | None = None
    # no_difference_yet: units per arm the chosen test needs for ``min_effect``, and
    # how many more than now (the arm that is furthest from it)
    needed_per_arm: int | None = None
    remaining_units: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(
    comparisons: list[ArmComparison],
    srm: SrmResult | None,
    *,
    alpha: float = 0.05,
    test: str = "sequential",
    min_effect: float = 0.01,
    power: float = 0.8,
    tau: float = DEFAULT_TAU,
    higher_is_better: bool = True,
    idle_arms: Collection[str] = (),
) -> Verdict:
    """Invalid on a sample-ratio mismatch; else a winner when the chosen test
    (``sequential`` or ``fixed``) is significant at ``alpha`` two-sided — split by
    Bonferroni over several treatment arms — else "no detectable difference yet"
    with the units still needed to detect ``min_effect`` with ``power``.

    ``idle_arms``: the arms that get no units now (weight 0, ramped out). A treatment
    among them takes no part in the verdict nor in the split of ``alpha`` (unless every
    treatment is idle: then all of them do), and no idle arm sets the units still
    needed (it gets no more)."""
    if test not in TESTS:
        raise ConfigError(f"test={test!r}: expected one of {', '.join(TESTS)}")
    if srm is not None and srm.mismatch:
        shown = ", ".join(f"{arm} {count}" for arm, count in srm.counts.items())
        expected = ", ".join(f"{arm} {value:.0f}" for arm, value in srm.expected.items())
        return Verdict(
            "invalid",
            f"do not trust: sample ratio mismatch (units {shown}; expected {expected}; "
            f"chi-square p = {srm.p_value:.2g} < {srm.alpha:g}). Find out why units "
            "are missing from an arm before reading any difference.",
        )
    if not comparisons:
        return Verdict("no_difference_yet", "no treatment arm to compare with the control")
    idle = set(idle_arms)
    comparisons = judged_comparisons(comparisons, idle)
    level = alpha / len(comparisons)
    chosen = [c.sequential_p_value if test == "sequential" else c.p_value for c in comparisons]
    diffs = [c.difference if c.difference is not None else 0.0 for c in comparisons]
    codes = decide(chosen, diffs, level, higher_is_better)
    sign = 1 if higher_is_better else -1
    winners = [c for c, code in zip(comparisons, codes, strict=True) if code == "treatment_wins"]
    if winners:
        best = max(winners, key=lambda c: sign * (c.difference or 0.0))
        return Verdict(
            "treatment_wins",
            f"{best.treatment} wins: {_change(best)} ({test} p = "
            f"{_p_of(best, test):.2g} < {level:.3g})",
            arm=best.treatment,
        )
    losers = [c for c, code in zip(comparisons, codes, strict=True) if code == "control_wins"]
    if losers and len(losers) == len(comparisons):
        worst = min(losers, key=lambda c: sign * (c.difference or 0.0))
        return Verdict(
            "control_wins",
            f"{worst.control} wins: {worst.treatment} {_change(worst)} ({test} p = "
            f"{_p_of(worst, test):.2g} < {level:.3g})",
            arm=worst.control,
        )
    return _not_yet(comparisons, level, test, min_effect, power, tau, losers, idle)


def judged_comparisons(
    comparisons: list[ArmComparison], idle_arms: Collection[str]
) -> list[ArmComparison]:
    """The comparisons the verdict judges (and splits ``alpha`` over): those of the
    treatments that still get units, or all of them when none does."""
    live = [c for c in comparisons if c.treatment not in idle_arms]
    return live or list(comparisons)


def _p_of(comparison: ArmComparison, test: str) -> float:
    return comparison.sequential_p_value if test == "sequential" else comparison.p_value


def _change(c: ArmComparison) -> str:
    text = f"{c.rate_treatment:.4g} vs {c.rate_control:.4g} ({c.difference:+.4g}"
    if c.relative_difference is not None:
        text += f", {c.relative_difference:+.1%}"
    return text + ")"


def _not_yet(
    comparisons: list[ArmComparison], level: float, test: str, min_effect: float,
    power: float, tau: float, losers: list[ArmComparison], idle: Collection[str] = (),
) -> Verdict:  # fmt: skip
    text = "no detectable difference yet"
    if losers:
        text += " for " + ", ".join(c.treatment for c in comparisons if c not in losers)
        text += "; worse than control: " + ", ".join(c.treatment for c in losers)
    first = comparisons[0]
    n_total = first.n_control + sum(c.n_treatment for c in comparisons)
    x_total = first.x_control + sum(c.x_treatment for c in comparisons)
    base = first.rate_control if first.rate_control else (x_total / n_total if n_total else 0.0)
    try:
        if test == "sequential":
            needed = sample_size_sequential(base, min_effect, level, power, tau)
        else:
            needed = sample_size_fixed(base, min_effect, level, power)
    except ConfigError as err:
        return Verdict("no_difference_yet", f"{text} (no sample size: {err})")
    counts = {first.control: first.n_control, **{c.treatment: c.n_treatment for c in comparisons}}
    # an arm that gets no units now never catches up: the others set what is missing
    have = min([n for arm, n in counts.items() if arm not in idle] or counts.values())
    remaining = max(0, needed - have)
    if remaining:
        text += (
            f"; to detect a difference of {min_effect:+.4g} from {base:.4g} with power "
            f"{power:.0%} the {test} test needs about {needed:,} units per arm "
            f"({remaining:,} more for the smallest arm)"
        )
    else:
        text += (
            f"; with {have:,} units per arm there is power {power:.0%} to detect "
            f"{min_effect:+.4g}: an effect that large is unlikely"
        )
    return Verdict("no_difference_yet", text, needed_per_arm=needed, remaining_units=remaining)
