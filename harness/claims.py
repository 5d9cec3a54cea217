"""Claims as data (hypotheses/claims.toml) and one generic runner that judges them.

A claim names a metric (below), a threshold and a direction; the runner measures the metric's
effect with a paired bootstrap CI and gives the verdict: SUPPORTED when the CI clears the
threshold, REFUTED when it clears the opposite criterion (`refute_at`, by default the
threshold itself), INCONCLUSIVE otherwise.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tomllib

from harness.data import PROJECT_ROOT
from harness.experiments import ModelRun
from harness.stats import PairedEffect, accuracy_drop, mean_drop, percentile_of

REGISTRY = PROJECT_ROOT / "hypotheses" / "claims.toml"
VERDICTS = ("SUPPORTED", "REFUTED", "INCONCLUSIVE")
CLAIM_KEYS = {
    "id",
    "phase",
    "statement",
    "metric",
    "threshold",
    "direction",
    "refute_at",
    "threshold_of_baseline",
    "labels",
    "experiment",
}


class ClaimError(ValueError):
    """A malformed registry entry or an unknown claim id."""


@dataclass(frozen=True)
class Claim:
    id: str
    phase: int
    statement: str
    metric: str
    threshold: float
    direction: str  # "greater": the effect must exceed the threshold; "less": stay below it
    refute_at: float | None = None  # the opposite criterion (default: the threshold)
    threshold_of_baseline: bool = False  # threshold is a fraction of baseline accuracy (points)
    labels: dict = field(default_factory=dict)  # the seed's names for supported / refuted
    experiment: dict = field(default_factory=dict)

    @property
    def marker(self) -> str:
        return f"phase{self.phase}"


def load_registry(path: Path = REGISTRY) -> list[Claim]:
    data = tomllib.loads(Path(path).read_text())
    claims = []
    for entry in data.get("claim", []):
        unknown = set(entry) - CLAIM_KEYS
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, CLAIM_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ClaimError(f"{path}: claim {entry.get('id', '?')!r} has unknown key {key!r}{hint}")
        if entry.get("metric") not in METRICS:
            raise ClaimError(f"{path}: claim {entry.get('id')!r} has unknown metric {entry.get('metric')!r}")
        if entry.get("direction") not in ("greater", "less"):
            raise ClaimError(f"{path}: claim {entry.get('id')!r}: direction must be 'greater' or 'less'")
        claims.append(Claim(**entry))
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ClaimError(f"{path}: duplicate claim ids")
    return claims


@dataclass
class ClaimResult:
    id: str
    phase: int
    model: str
    statement: str
    metric: str
    effect: float
    ci_low: float
    ci_high: float
    threshold: float
    direction: str
    p_value: float
    verdict: str
    point_verdict: str
    n: int
    p_holm: float | None = None
    control_percentile: float | None = None
    details: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        control = f", control percentile {self.control_percentile:.0f}" if self.control_percentile is not None else ""
        return (
            f"{self.id} on {self.model}: {self.verdict} - effect {self.effect:+.1f} points "
            f"(95% CI {self.ci_low:+.1f} to {self.ci_high:+.1f}; needs {self.direction} than {self.threshold:.1f}; "
            f"McNemar p={self.p_value:.3g}{control}; n={self.n})"
        )


def judge(ci_low: float, ci_high: float, threshold: float, direction: str, refute_at: float) -> str:
    if direction == "greater":
        if ci_low > threshold:
            return "SUPPORTED"
        if ci_high < refute_at:
            return "REFUTED"
    else:
        if ci_high < threshold:
            return "SUPPORTED"
        if ci_low > refute_at:
            return "REFUTED"
    return "INCONCLUSIVE"


def point_judge(effect: float, threshold: float, direction: str, refute_at: float, labels: dict) -> str:
    above, below = (
        (effect > threshold, effect < refute_at) if direction == "greater" else (effect < threshold, effect > refute_at)
    )
    key = "supported" if above else "refuted" if below else "inconclusive"
    return labels.get(key, key)


# --- metrics: (claim, run) -> (effect, extra details, control null or None) ------------------------

Measured = tuple[PairedEffect, dict, list[float] | None]


def _drop(run: ModelRun, treated: np.ndarray, reference: np.ndarray | None = None) -> PairedEffect:
    """Paired drop from `reference` (default: the baseline), memoised per run: several claims
    share the same comparisons and the bootstrap is the slow part of a warm run."""
    reference = run.baseline if reference is None else reference
    key = (reference.tobytes(), treated.tobytes())
    if key not in run.drops:
        run.drops[key] = accuracy_drop(reference, treated, seed=run.seed)
    return run.drops[key]


def ablation_drop(claim: Claim, run: ModelRun) -> Measured:
    n = claim.experiment.get("n_heads", 3)
    heads = run.critical_heads(n)
    effect = _drop(run, run.ablation(heads))
    null = [
        mean_drop(run.baseline, run.ablation(s))
        for s in run.random_head_sets(heads, claim.experiment.get("n_random", 20))
    ]
    incremental = {f"top{k}_acc": float(run.ablation(run.critical_heads(k)).mean()) for k in range(1, n + 1)}
    return effect, {"heads": [str(h) for h in heads], "baseline_acc": float(run.baseline.mean()), **incremental}, null


def position_drop(claim: Claim, run: ModelRun) -> Measured:
    mode = claim.experiment.get("mode", "noise")
    drops = {f"CT{i}": _drop(run, run.position_patch(f"CT{i}", mode)) for i in range(run.codi.n_latent)}
    details = {"hub": run.hub, "drops": {k: v.effect for k, v in drops.items()}}
    which = claim.experiment.get("which", "hub")
    if which == "hub":
        return drops[run.hub], details, None
    others = {k: v for k, v in drops.items() if k != run.hub}
    if which == "max_non_hub":  # "each non-hub drop < t": judged on the largest
        worst = max(others, key=lambda k: others[k].effect)
        return others[worst], {**details, "worst": worst}, None
    # "hub drop larger than every non-hub drop": the smallest paired difference
    hub_flags = run.position_patch(run.hub, mode)
    diffs = {k: _drop(run, hub_flags, reference=run.position_patch(k, mode)) for k in others}
    worst = min(diffs, key=lambda k: diffs[k].effect)
    return diffs[worst], {**details, "closest": worst}, None


def pattern_drop(claim: Claim, run: ModelRun) -> Measured:
    pattern = claim.experiment["pattern"]
    x = claim.experiment
    heads = run.scoped_heads(x.get("scope", "top"), x.get("n_heads", 3), x.get("layer"))
    flags = run.pattern(pattern, heads)
    details = {"pattern": pattern, "hub": run.hub, "heads": [str(h) for h in heads], "acc": float(flags.mean())}
    return _drop(run, flags), {**details, "baseline_acc": float(run.baseline.mean())}, None


METRICS: dict[str, Callable[[Claim, ModelRun], Measured]] = {
    "ablation_drop": ablation_drop,
    "position_drop": position_drop,
    "pattern_drop": pattern_drop,
}


def evaluate_claim(claim: Claim, run: ModelRun) -> ClaimResult:
    measured, details, null = METRICS[claim.metric](claim, run)
    threshold = claim.threshold
    if claim.threshold_of_baseline:  # e.g. "keeps > 90% of baseline": drop < 10% of baseline acc
        threshold = claim.threshold * 100.0 * float(run.baseline.mean())
    if claim.experiment.get("against_control") and null:
        threshold = float(np.percentile(null, 95))
    refute_at = claim.refute_at if claim.refute_at is not None else threshold
    return ClaimResult(
        id=claim.id,
        phase=claim.phase,
        model=run.codi.name,
        statement=claim.statement,
        metric=claim.metric,
        effect=measured.effect,
        ci_low=measured.ci_low,
        ci_high=measured.ci_high,
        threshold=threshold,
        direction=claim.direction,
        p_value=measured.p_value,
        verdict=judge(measured.ci_low, measured.ci_high, threshold, claim.direction, refute_at),
        point_verdict=point_judge(measured.effect, threshold, claim.direction, refute_at, claim.labels),
        n=measured.n,
        control_percentile=percentile_of(measured.effect, null) if null else None,
        details={**details, **({"control_drops": null} if null else {})},
    )
