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
    p_value: float  # exact McNemar
    n: int


def _as_bool(x) -> np.ndarray:
    arr = np.asarray(x, dtype=bool)
    assert arr.ndim == 1, "expected one correctness flag per problem"
    return arr


def accuracy_drop(
    baseline, treated, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> PairedEffect:
    """Drop in accuracy (points) with a paired percentile-bootstrap CI and McNemar's exact p."""
    base, treat = _as_bool(baseline), _as_bool(treated)
    assert base.shape == treat.shape and base.size > 0, "paired flags over the same non-empty problem set"
    effect = 100.0 * (base.mean() - treat.mean())
    diff = 100.0 * (base.astype(float) - treat.astype(float))
    if np.all(diff == diff[0]):
        low = high = float(diff[0])  # no variation to resample
    else:
        res = scipy_stats.bootstrap(
            (diff,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedEffect(float(effect), low, high, mcnemar_exact(base, treat), int(base.size))


def mean_drop(baseline, treated) -> float:
    """The accuracy drop alone (points), for control distributions that need no CI."""
    base, treat = _as_bool(baseline), _as_bool(treated)
    assert base.shape == treat.shape, "paired flags over the same problems"
    return 100.0 * float(base.mean() - treat.mean())


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
    if not p_values:
        return []
    return [float(p) for p in multipletests(p_values, method="holm")[1]]


def percentile_of(value: float, null: list[float]) -> float:
    """Percent of the null distribution (e.g. random head sets) at or below `value`."""
    assert null, "an empty control distribution"
    return float(scipy_stats.percentileofscore(null, value, kind="weak"))
