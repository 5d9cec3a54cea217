import numpy as np
import pytest
from scipy.stats import binomtest

from harness.stats import accuracy_drop, holm, mcnemar_exact, percentile_of


def test_mcnemar_equals_a_binomial_test_on_discordant_pairs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        base = rng.random(200) < 0.7
        treated = np.where(rng.random(200) < 0.2, ~base, base)
        b, c = int(np.sum(base & ~treated)), int(np.sum(~base & treated))
        expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        assert mcnemar_exact(base, treated) == pytest.approx(expected, rel=1e-9)


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 with running max
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []


def test_effect_is_the_paired_drop_in_points():
    base = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], bool)
    treated = np.array([0, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)
    eff = accuracy_drop(base, treated, n_resamples=2000)
    assert eff.effect == pytest.approx(20.0)
    assert eff.ci_low <= eff.effect <= eff.ci_high
    same = accuracy_drop(base, base)
    assert (same.effect, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_ci_covers_the_true_drop_about_95_percent():
    """Known case: each problem's flags are drawn with a true drop of 10 points."""
    rng = np.random.default_rng(1)
    covered = 0
    trials = 200
    for t in range(trials):
        base = rng.random(400) < 0.7
        treated = base & (rng.random(400) >= 1 / 7)  # P(correct) 0.6: a 10-point drop
        eff = accuracy_drop(base, treated, n_resamples=1000, seed=t)
        covered += eff.ci_low <= 10.0 <= eff.ci_high
    assert 0.90 <= covered / trials <= 0.99


def test_percentile_of_a_control_distribution():
    assert percentile_of(5.0, [1.0, 2.0, 3.0, 4.0]) == 100.0
    assert percentile_of(2.0, [1.0, 2.0, 3.0, 4.0]) == 50.0
