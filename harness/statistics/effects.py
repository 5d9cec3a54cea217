"""Statistics for claims: paired bootstrap CIs of accuracy drops, exact McNemar, Holm.

Accuracy drops are in percentage points, paired over the same problems (baseline minus
intervention), so a positive effect means the intervention hurt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

N_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedEffect:
    effect: float  # accuracy drop, percentage points
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    test: str = "McNemar exact"  # the test behind p_value


def _as_bool(x) -> np.ndarray:
    arr = np.asarray(x, dtype=bool)
    assert arr.ndim == 1, "expected one correctness flag per problem"
    return arr


def _percentile_ci(samples: tuple, statistic, n_resamples: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile-bootstrap CI of `statistic(*samples)` (scipy resamples each sample on its
    own); a sample set without variation has the point value as its CI."""
    if all(np.all(s == s[0]) for s in samples):
        value = float(statistic(*samples, axis=-1))
        return value, value
    res = scipy_stats.bootstrap(
        samples,
        statistic,
        n_resamples=n_resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _mean_difference(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def accuracy_drop(
    baseline, treated, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> PairedEffect:
    """Drop in accuracy (points) with a paired percentile-bootstrap CI and McNemar's exact p."""
    base, treat = _as_bool(baseline), _as_bool(treated)
    assert base.shape == treat.shape and base.size > 0, "paired flags over the same non-empty problem set"
    effect = 100.0 * (base.mean() - treat.mean())
    diff = 100.0 * (base.astype(float) - treat.astype(float))
    low, high = _percentile_ci((diff,), _mean, n_resamples, level, seed)
    return PairedEffect(float(effect), low, high, mcnemar_exact(base, treat), int(base.size))


def difference_of_drops(
    base_a, treat_a, base_b, treat_b, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> PairedEffect:
    """Drop in group a minus drop in group b (points), groups of different problems: a
    bootstrap resampling each group independently, and Welch's two-sided t-test for p."""
    da = 100.0 * (_as_bool(base_a).astype(float) - _as_bool(treat_a).astype(float))
    db = 100.0 * (_as_bool(base_b).astype(float) - _as_bool(treat_b).astype(float))
    if da.size < 2 or db.size < 2:
        nan = float("nan")
        return PairedEffect(nan, nan, nan, nan, int(da.size + db.size), "Welch t")
    low, high = _percentile_ci((da, db), _mean_difference, n_resamples, level, seed)
    effect = float(da.mean() - db.mean())
    p = scipy_stats.ttest_ind(da, db, equal_var=False).pvalue
    p = float(effect == 0) if np.isnan(p) else float(p)  # no variance in either group
    return PairedEffect(effect, low, high, p, int(da.size + db.size), "Welch t")


def accuracy_above(correct, chance: float, n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedEffect:
    """Accuracy minus a chance level (points) with a bootstrap CI, and the two-sided exact
    binomial p of doing as well as chance."""
    hits = _as_bool(correct)
    ci = accuracy_drop(hits, np.zeros_like(hits), n_resamples=n_resamples, seed=seed)  # CI of the accuracy
    p = scipy_stats.binomtest(int(hits.sum()), hits.size, chance).pvalue
    shift = 100.0 * chance
    shifted = (ci.effect - shift, ci.ci_low - shift, ci.ci_high - shift)
    return PairedEffect(*shifted, float(p), int(hits.size), "binomial exact (vs chance)")


def mean_with_ci(values, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> PairedEffect:
    """Mean of per-problem differences with a bootstrap CI, and a two-sided Wilcoxon
    signed-rank p that the differences are centred on zero."""
    x = np.asarray(values, dtype=float)
    assert x.ndim == 1 and x.size > 1, "per-problem differences"
    low, high = _percentile_ci((x,), _mean, n_resamples, level, seed)
    p = 1.0 if np.all(x == 0) else float(scipy_stats.wilcoxon(x, zero_method="zsplit").pvalue)
    return PairedEffect(float(x.mean()), low, high, p, int(x.size), "Wilcoxon signed-rank")


MEASURES = ("accuracy", "answer_logprob")
UNITS = {"accuracy": "points", "answer_logprob": "nats"}


def paired_effect(
    reference, treated, measure: str = "accuracy", n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> PairedEffect:
    """Drop from `reference` [N] to `treated` [D, N] (D independent draws of a randomised
    condition, or 1), paired over the same N problems: accuracy in points (flags), or answer
    log-probability in nats.

    One draw: accuracy (0/1 flags) has the paired bootstrap CI and exact McNemar p of
    `accuracy_drop`; log-probability (or accuracy averaged over draws) a paired bootstrap CI
    and a two-sided Wilcoxon signed-rank p. Several
    draws: the bootstrap resamples problems and draws together (a verdict cannot hinge on one
    draw) and p is a two-sided Wilcoxon signed-rank test of the per-problem differences
    averaged over draws."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    ref = np.asarray(reference, dtype=float)
    treat = np.atleast_2d(np.asarray(treated, dtype=float))  # [D, N]
    assert ref.ndim == 1 and treat.shape[1] == ref.size and ref.size > 0, "paired values over the same problems"
    scale = 100.0 if measure == "accuracy" else 1.0
    binary = np.isin(ref, (0.0, 1.0)).all() and np.isin(treat, (0.0, 1.0)).all()
    if treat.shape[0] == 1 and measure == "accuracy" and binary:
        return accuracy_drop(ref.astype(bool), treat[0].astype(bool), n_resamples, seed, level)
    return _mean_of_differences(scale * (ref[None] - treat), n_resamples, level, seed)


def difference_of_draws(
    reference, treated, measure: str = "accuracy", n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> PairedEffect:
    """Drop from `reference` [D, N] to `treated` [D, N], two randomised conditions paired
    problem by problem and draw by draw (e.g. noise at the hub vs noise at another thought: the
    difference of their drops). The CI resamples problems and draws of both sides together."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    ref, treat = np.atleast_2d(np.asarray(reference, float)), np.atleast_2d(np.asarray(treated, float))
    assert ref.shape == treat.shape and ref.size > 0, "the same draws of the same problems"
    return _mean_of_differences((100.0 if measure == "accuracy" else 1.0) * (ref - treat), n_resamples, level, seed)


def _mean_of_differences(diff: np.ndarray, n_resamples: int, level: float, seed: int) -> PairedEffect:
    """Mean of per-problem differences `diff` [D, N] over D draws: a percentile bootstrap CI
    (problems, and draws when D > 1) and a two-sided Wilcoxon signed-rank p of the per-problem
    means."""
    per_problem = diff.mean(0)  # [N]
    if diff.shape[0] == 1:
        low, high = _percentile_ci((per_problem,), _mean, n_resamples, level, seed)
    else:
        low, high = _joint_ci(diff, n_resamples, level, seed)
    if np.all(per_problem == 0):
        p = 1.0
    else:
        p = float(scipy_stats.wilcoxon(per_problem, zero_method="zsplit").pvalue)
    return PairedEffect(float(diff.mean()), low, high, p, int(diff.shape[1]), "Wilcoxon signed-rank")


def _joint_ci(diff: np.ndarray, n_resamples: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile CI of the mean of `diff` [D, N] when draws and problems are both resampled
    (with replacement, independently), in chunks of 1,000 resamples: a resample's mean is the
    mean, over its resampled problems, of the per-problem sum over its resampled draws."""
    rng = np.random.default_rng(seed)
    n_draws, n = diff.shape
    stats = []
    for start in range(0, n_resamples, 1000):
        size = min(1000, n_resamples - start)
        draw_counts = rng.multinomial(n_draws, np.full(n_draws, 1 / n_draws), size=size)  # [S, D]
        per_problem = draw_counts @ diff  # [S, N]
        problems = rng.integers(0, n, size=(size, n))  # [S, N]
        stats.append(np.take_along_axis(per_problem, problems, axis=1).sum(1) / (n_draws * n))
    values = np.concatenate(stats)
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def mcnemar_exact(baseline, treated) -> float:
    """Exact McNemar p-value (two-sided binomial test on the discordant pairs)."""
    base, treat = _as_bool(baseline), _as_bool(treated)
    table = [
        [int(np.sum(base & treat)), int(np.sum(base & ~treat))],
        [int(np.sum(~base & treat)), int(np.sum(~base & ~treat))],
    ]
    return float(mcnemar(table, exact=True).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (family: one phase's claims)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    measured = ~np.isnan(p)  # claims that could not be measured stay out of the family
    if measured.any():
        out[measured] = multipletests(p[measured], method="holm")[1]
    return [float(x) for x in out]


def percentile_of(value: float, null: list[float]) -> float:
    """Percent of the null distribution (e.g. random head sets) at or below `value`."""
    assert null, "an empty control distribution"
    return float(scipy_stats.percentileofscore(null, value, kind="weak"))
