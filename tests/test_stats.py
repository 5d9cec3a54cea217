import numpy as np
import pytest
from scipy.stats import binomtest, wilcoxon

from harness.statistics.effects import (
    accuracy_above,
    accuracy_drop,
    difference_of_draws,
    difference_of_drops,
    holm,
    mcnemar_exact,
    mean_with_ci,
    paired_effect,
    percentile_of,
)


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


def test_difference_of_drops_between_independent_groups():
    base_a, treat_a = np.ones(40, bool), np.arange(40) % 2 == 0  # drop 50 points
    base_b, treat_b = np.ones(30, bool), np.ones(30, bool)  # drop 0
    eff = difference_of_drops(base_a, treat_a, base_b, treat_b, n_resamples=2000)
    assert eff.effect == pytest.approx(50.0)
    assert eff.ci_low < 50.0 < eff.ci_high and eff.ci_low > 20.0
    assert eff.p_value < 1e-6 and eff.n == 70
    tiny = difference_of_drops(base_a[:1], treat_a[:1], base_b, treat_b)
    assert np.isnan(tiny.effect)  # a group of one has no spread to judge


def test_accuracy_above_chance_uses_an_exact_binomial_test():
    hits = np.arange(100) < 80
    eff = accuracy_above(hits, 0.5, n_resamples=2000)
    assert eff.effect == pytest.approx(30.0)
    assert eff.ci_low < 30.0 < eff.ci_high
    assert eff.p_value == pytest.approx(binomtest(80, 100, 0.5).pvalue)  # two-sided: no direction favoured
    below = accuracy_above(np.arange(100) < 20, 0.5, n_resamples=2000)  # as far below chance
    assert below.p_value == pytest.approx(eff.p_value) and below.effect == pytest.approx(-30.0)


def test_mean_with_ci_of_per_problem_differences():
    x = np.linspace(-1, 5, 50)
    eff = mean_with_ci(x, n_resamples=2000)
    assert eff.effect == pytest.approx(2.0) and eff.ci_low < 2.0 < eff.ci_high
    assert eff.p_value == pytest.approx(wilcoxon(x, zero_method="zsplit").pvalue)
    assert mean_with_ci(-x, n_resamples=2000).p_value == pytest.approx(eff.p_value), "a 'less' claim's p alike"
    flat = mean_with_ci(np.zeros(10))
    assert (flat.effect, flat.ci_low, flat.ci_high, flat.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_draws_are_averaged_and_their_spread_widens_the_ci():
    rng = np.random.default_rng(0)
    base = np.ones(400)
    steady = [np.where(rng.random(400) < 0.2, 0.0, 1.0) for _ in range(4)]  # every draw about -20
    one = paired_effect(base, steady[:1])
    assert one.test == "McNemar exact" and one.effect == pytest.approx(100 * (1 - steady[0].mean()))
    joint = paired_effect(base, steady)
    assert joint.effect == pytest.approx(np.mean([100 * (1 - s.mean()) for s in steady]))
    assert joint.test == "Wilcoxon signed-rank" and joint.ci_low < joint.effect < joint.ci_high
    # two draws that disagree (drops 0 and 40 points): averaged per problem the CI would be as
    # narrow as one draw's; resampling draws too makes it span both
    split = [np.ones(400), np.where(np.arange(400) % 5 < 2, 0.0, 1.0)]
    wide = paired_effect(base, split)
    per_problem = paired_effect(base, [np.mean(split, axis=0)])
    assert wide.effect == pytest.approx(20.0) and per_problem.effect == pytest.approx(20.0)
    assert wide.ci_high - wide.ci_low > 3 * (per_problem.ci_high - per_problem.ci_low)


def test_log_probability_drops_are_in_nats_with_a_wilcoxon_p():
    rng = np.random.default_rng(1)
    base = rng.normal(-1.0, 0.3, 200)
    treated = base - 0.5 + rng.normal(0, 0.1, 200)
    effect = paired_effect(base, [treated], "answer_logprob")
    assert effect.effect == pytest.approx(np.mean(base - treated)) and effect.ci_low < 0.5 < effect.ci_high
    assert effect.p_value == pytest.approx(wilcoxon(base - treated).pvalue) and effect.test == "Wilcoxon signed-rank"
    with pytest.raises(ValueError, match="unknown measure"):
        paired_effect(base, [treated], "logprob")


def test_a_difference_of_two_randomised_drops_resamples_both_sides_draws():
    """1.2-hub-largest: noise at the hub vs noise at another thought, both over draws. Averaging
    one side's draws into a fixed reference hid their spread (the CI was as narrow as if that
    side were deterministic)."""
    n = 400
    hub = np.stack([np.where(np.arange(n) % 5 < 1, 0.0, 1.0)] * 2)  # [2, N]: the same 20-point drop each draw
    other = np.stack([np.ones(n), np.where(np.arange(n) % 5 < 2, 0.0, 1.0)])  # drops 0 and 40: mean 20
    paired = difference_of_draws(other, hub)  # hub drop minus other drop, draw by draw
    assert paired.effect == pytest.approx(0.0) and paired.n == n
    averaged = difference_of_draws(np.mean(other, axis=0, keepdims=True), hub[:1])
    assert averaged.effect == pytest.approx(0.0)
    assert paired.ci_high - paired.ci_low > 3 * (averaged.ci_high - averaged.ci_low)
    with pytest.raises(AssertionError):
        difference_of_draws(other, hub[:1])
