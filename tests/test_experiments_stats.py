"""The experiment statistics judged by simulation: power, false winners, peeking, SRM.

Each simulated experiment assigns units to two arms at random (50/50) and draws a
conversion per unit; looks are taken every 1,000 units. Thousands of experiments run
at once as numpy arrays, seeded, so the figures below are exact for this code.

How many repetitions make a rate meaningful: the number of false winners in ``R``
A/A experiments is Binomial(R, q). For q = 0.05, R = 50 gives a standard error of
3.1 points (an estimate anywhere from 0 to 12% is ordinary), so 50 runs cannot tell
5% from 6%. With R = 4,000 the standard error is 0.34 points: a test whose true rate
is 5% stays under 6% with probability ≈ 99.8%, and one at 7.5% exceeds it almost
surely.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from cycleml.errors import ConfigError
from cycleml.experiments import stats

UNITS = 20_000
LOOK_EVERY = 1_000
ALPHA = 0.05


def simulate(
    p_control: float, p_treatment: float, experiments: int, seed: int, units: int = UNITS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (x_c, n_c, x_t, n_t) at each look, shape (experiments, looks)."""
    rng = np.random.default_rng(seed)
    looks = units // LOOK_EVERY
    n_t = rng.binomial(LOOK_EVERY, 0.5, size=(experiments, looks))
    n_c = LOOK_EVERY - n_t
    x_c = rng.binomial(n_c, p_control)
    x_t = rng.binomial(n_t, p_treatment)
    return tuple(np.cumsum(a, axis=1) for a in (x_c, n_c, x_t, n_t))  # type: ignore[return-value]


def final_verdicts(counts: tuple[np.ndarray, ...], test: str) -> np.ndarray:
    x_c, n_c, x_t, n_t = counts
    if test == "sequential":
        p_values = stats.sequential_p_values(x_c, n_c, x_t, n_t)[:, -1]
    else:
        p_values = stats.z_test(x_c[:, -1], n_c[:, -1], x_t[:, -1], n_t[:, -1])[1]
    diff = x_t[:, -1] / n_t[:, -1] - x_c[:, -1] / n_c[:, -1]
    return stats.decide(p_values, diff, ALPHA)


def test_the_vectorised_decision_agrees_with_the_verdict_of_one_experiment() -> None:
    counts = simulate(0.10, 0.12, 50, seed=11)
    codes = final_verdicts(counts, "sequential")
    x_c, n_c, x_t, n_t = counts
    sequential = stats.sequential_p_values(x_c, n_c, x_t, n_t)
    for i in range(50):
        comparison = stats.compare(
            "control", "treatment", x_c[i, -1], n_c[i, -1], x_t[i, -1], n_t[i, -1],
            sequential_p_value=float(sequential[i, -1]),
        )  # fmt: skip
        assert stats.verdict([comparison], None).code == codes[i]


@pytest.mark.parametrize("test", ["sequential", "fixed"])
def test_power_treatment_wins_at_least_80_percent(test: str) -> None:
    # 0.10 vs 0.12 with 20,000 units: the z-test has ~99.7% power, the sequential
    # test (τ = 0.01, looks every 1,000 units) ~95%
    codes = final_verdicts(simulate(0.10, 0.12, 1000, seed=1), test)
    first_50 = np.mean(codes[:50] == "treatment_wins")
    overall = np.mean(codes == "treatment_wins")
    assert first_50 >= 0.80 and overall >= 0.80, (first_50, overall)
    assert not np.any(codes == "control_wins")
    print(f"{test}: treatment wins in {first_50:.0%} of 50 and {overall:.1%} of 1,000")


@pytest.mark.parametrize("test", ["sequential", "fixed"])
def test_a_a_false_winners_at_most_6_percent(test: str) -> None:
    codes = final_verdicts(simulate(0.10, 0.10, 4000, seed=2), test)
    false_winners = np.mean(codes != "no_difference_yet")
    assert false_winners <= 0.06, false_winners
    if test == "fixed":  # a two-sided 5% test: about 5%, not far below
        assert false_winners >= 0.035, false_winners
    print(f"{test}: A/A false winners {false_winners:.2%} of 4,000")


def test_peeking_every_1000_units_keeps_sequential_a_a_false_winners_low() -> None:
    x_c, n_c, x_t, n_t = simulate(0.10, 0.10, 4000, seed=3)
    sequential = stats.sequential_p_values(x_c, n_c, x_t, n_t)  # (4000, 20 looks)
    # a winner is declared at the first look whose p-value is below α
    stopped_sequential = np.mean(np.any(sequential < ALPHA, axis=1))
    _, naive = stats.z_test(x_c, n_c, x_t, n_t)
    stopped_naive = np.mean(np.any(naive < ALPHA, axis=1))
    assert stopped_sequential <= 0.06, stopped_sequential
    # the same peeking with the fixed-horizon z-test is what the sequential test
    # guards against: it declares false winners several times as often as α
    assert stopped_naive > 0.15, stopped_naive
    print(
        f"A/A with 20 peeks: sequential {stopped_sequential:.2%}, naive z-test {stopped_naive:.1%}"
    )


def test_peeking_keeps_the_power_of_the_sequential_test() -> None:
    x_c, n_c, x_t, n_t = simulate(0.10, 0.12, 1000, seed=4)
    sequential = stats.sequential_p_values(x_c, n_c, x_t, n_t)
    declared = np.any(sequential < ALPHA, axis=1)
    assert np.mean(declared) >= 0.80
    # stopping at the first significant look also stops early: on average well
    # before the 20,000 units
    first = np.argmax(sequential < ALPHA, axis=1)[declared]
    assert (first.mean() + 1) * LOOK_EVERY < 15_000


def test_sequential_p_value_never_rises_and_is_one_without_data() -> None:
    x_c, n_c, x_t, n_t = simulate(0.10, 0.11, 10, seed=5)
    sequential = stats.sequential_p_values(x_c, n_c, x_t, n_t)
    assert np.all(np.diff(sequential, axis=1) <= 0)
    assert stats.sequential_p_values(0, 0, 0, 0)[-1] == 1.0
    assert stats.sequential_p_values(0, 100, 0, 100)[-1] == 1.0
    with pytest.raises(ConfigError, match="tau"):
        stats.sequential_p_values(1, 10, 2, 10, tau=0)


def test_srm_flags_a_5_percent_loss_of_treatment_units() -> None:
    # the loss is 5% of the treatment's logged assignments. The chi-square test at
    # p < 0.001 catches it in ~60% of experiments of 20,000 units (the loss, 500
    # units, is ~3.6 standard deviations of the split's own noise), in 99% at 50,000
    # and always at 100,000 — the test below uses 50,000 and 100,000.
    rng = np.random.default_rng(6)
    weights = {"control": 0.5, "treatment": 0.5}
    for units, least in ((50_000, 0.97), (100_000, 0.995)):
        n_t = rng.binomial(units, 0.5, size=1000)
        n_c = units - n_t
        kept = rng.binomial(n_t, 0.95)
        lost = [
            stats.srm_test({"control": c, "treatment": t}, weights)
            for c, t in zip(n_c, kept, strict=True)
        ]
        whole = [
            stats.srm_test({"control": c, "treatment": t}, weights)
            for c, t in zip(n_c, n_t, strict=True)
        ]
        flagged = np.mean([r.mismatch for r in lost])
        false_flags = np.mean([r.mismatch for r in whole])
        assert flagged >= least, (units, flagged)
        assert false_flags <= 0.005, (units, false_flags)
    # and the verdict says so, whatever the outcome difference
    srm = lost[0]
    comparison = stats.compare("control", "treatment", 5000, 50000, 6000, 47500)
    decided = stats.verdict([comparison], srm)
    assert decided.code == "invalid" and "do not trust" in decided.text
    assert "sample ratio mismatch" in decided.text


def test_srm_uses_unequal_weights_and_arms_without_weight() -> None:
    fine = stats.srm_test({"control": 9000, "treatment": 1000}, {"control": 0.9, "treatment": 0.1})
    assert not fine.mismatch and fine.expected == {"control": 9000.0, "treatment": 1000.0}
    assert stats.srm_test(
        {"control": 5000, "treatment": 5000}, {"control": 9, "treatment": 1}
    ).mismatch
    stray = stats.srm_test({"control": 100, "treatment": 1}, {"control": 1.0, "treatment": 0.0})
    assert stray.mismatch and stray.p_value == 0.0


def test_z_test_matches_the_chi_square_test_of_the_table() -> None:
    z, p_value = stats.z_test(1000, 10_000, 1100, 10_000)
    table = [[1000, 9000], [1100, 8900]]
    assert p_value == pytest.approx(chi2_contingency(table, correction=False).pvalue, rel=1e-9)
    assert z > 0


def test_confidence_intervals_cover_the_true_difference_95_percent() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    x_c = rng.binomial(n, 0.10, size=4000)
    x_t = rng.binomial(n, 0.12, size=4000)
    _, low, high = stats.difference_ci(x_c, n, x_t, n)
    _, rel_low, rel_high = stats.relative_ci(x_c, n, x_t, n)
    covered = np.mean((low <= 0.02) & (high >= 0.02))
    rel_covered = np.mean((rel_low <= 0.2) & (rel_high >= 0.2))
    assert 0.935 <= covered <= 0.965, covered
    assert 0.935 <= rel_covered <= 0.965, rel_covered


def test_sample_sizes_give_the_power_they_promise() -> None:
    fixed = stats.sample_size_fixed(0.10, 0.02)
    sequential = stats.sample_size_sequential(0.10, 0.02)
    assert 3700 <= fixed <= 4000  # the textbook figure for 10% → 12% is ~3,840
    assert sequential > fixed  # always-valid inference costs samples
    rng = np.random.default_rng(8)
    for n, test in ((fixed, "fixed"), (sequential, "sequential")):
        x_c, x_t = rng.binomial(n, 0.10, 4000), rng.binomial(n, 0.12, 4000)
        if test == "fixed":
            p_values = stats.z_test(x_c, n, x_t, n)[1]
        else:
            p_values = stats.sequential_p_values(x_c[:, None], n, x_t[:, None], n)[:, -1]
        assert 0.77 <= np.mean(p_values < ALPHA) <= 0.85, (test, np.mean(p_values < ALPHA))
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stats.sample_size_fixed(0.99, 0.02)


def test_verdict_without_a_difference_names_the_units_still_needed() -> None:
    comparison = stats.compare("control", "treatment", 100, 1000, 104, 1000)
    decided = stats.verdict([comparison], None, min_effect=0.02, test="fixed")
    assert decided.code == "no_difference_yet"
    assert decided.needed_per_arm == stats.sample_size_fixed(0.10, 0.02)
    assert decided.remaining_units == decided.needed_per_arm - 1000
    assert f"{decided.needed_per_arm:,}" in decided.text
    worse = stats.compare("control", "treatment", 1200, 10_000, 1000, 10_000)
    assert stats.verdict([worse], None).code == "control_wins"
    assert stats.verdict([worse], None, higher_is_better=False).code == "treatment_wins"


def test_an_arm_ramped_to_weight_0_splits_no_alpha_and_sets_no_units_needed() -> None:
    ramped_out = stats.compare("control", "t1", 1000, 10_000, 10, 100)  # stopped early
    live = stats.compare("control", "t2", 1000, 10_000, 1085, 10_000)  # p ≈ 0.049
    both = [ramped_out, live]
    # two live treatments: alpha / 2, no winner
    assert stats.verdict(both, None, test="fixed").code == "no_difference_yet"
    decided = stats.verdict(both, None, test="fixed", idle_arms=["t1"])
    assert decided.code == "treatment_wins" and decided.arm == "t2"
    assert "< 0.05" in decided.text
    # the units still needed: from the arms that still get units, not t1's 100
    tiny = stats.compare("control", "t2", 1000, 10_000, 1001, 10_000)
    waiting = stats.verdict([ramped_out, tiny], None, test="fixed", idle_arms=["t1"])
    assert waiting.code == "no_difference_yet"
    assert waiting.remaining_units == max(0, waiting.needed_per_arm - 10_000)
    assert waiting.needed_per_arm == stats.sample_size_fixed(0.10, 0.01, 0.05)
    # every treatment ramped out: the verdict still reads them all
    assert stats.verdict(both, None, test="fixed", idle_arms=["t1", "t2"]).code == (
        "no_difference_yet"
    )
    assert stats.judged_comparisons(both, ["t1", "t2"]) == both
