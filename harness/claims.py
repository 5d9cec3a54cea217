"""Claims as data (hypotheses/claims.toml) and one generic runner that judges them.

A claim names a metric (below), a threshold and a direction; the runner measures the metric's
effect with a paired bootstrap CI and gives the verdict: SUPPORTED when the CI clears the
threshold, REFUTED when it clears the opposite criterion (`refute_at`, by default the
threshold itself), INCONCLUSIVE otherwise.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tomllib

from harness.data import PROJECT_ROOT
from harness.experiments import ModelRun
from harness.metrics import METRICS
from harness.stats import percentile_of

REGISTRY = PROJECT_ROOT / "hypotheses" / "claims.toml"
VERDICTS = ("SUPPORTED", "REFUTED", "INCONCLUSIVE")
PHASES = (1, 2, 3, 4)
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
    "gate",
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
    gate: str | None = None  # id of a claim that must be SUPPORTED for this one to run

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
    for c in claims:
        if c.phase not in PHASES:
            raise ClaimError(f"{path}: claim {c.id!r} has unknown phase {c.phase!r} (markers phase1..phase4)")
        if c.gate is not None and c.gate not in ids:
            raise ClaimError(f"{path}: claim {c.id!r} is gated on unknown claim id {c.gate!r}")
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
        model=run.name,
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
