"""Verdicts: the one place a measured effect becomes SUPPORTED / REFUTED / INCONCLUSIVE.

Registry claims and researchers' own Python tests both end here (`ClaimResult`), so their
rows land in the same claims table, CSVs and report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from harness.statistics.effects import UNITS, PairedEffect

NOT_JUDGED_VERDICT = "NOT JUDGED"  # a model below the baseline floor: no verdict at all
VERDICTS = ("SUPPORTED", "REFUTED", "INCONCLUSIVE", NOT_JUDGED_VERDICT)
DIRECTIONS = ("greater", "less")


def judge(ci_low: float, ci_high: float, threshold: float, direction: str, refute_at: float) -> str:
    """SUPPORTED when the CI clears the threshold, REFUTED when it clears the opposite
    criterion (`refute_at`), INCONCLUSIVE otherwise (a NaN CI included)."""
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
    """The seed's criterion on the point estimate alone, in the seed's words (`labels`)."""
    above, below = (
        (effect > threshold, effect < refute_at) if direction == "greater" else (effect < threshold, effect > refute_at)
    )
    key = "supported" if above else "refuted" if below else "inconclusive"
    return labels.get(key, key)


def what_ran(heads: str, positions: str, mode: str) -> list[tuple[str, str]]:
    """(label, value) of what a claim ran, as every report view shows it; empty ones left out."""
    return [(k, v) for k, v in (("heads", heads), ("at", positions), ("mode", mode)) if v]


@dataclass
class ClaimResult:
    """One claim on one model: what was run, what was measured, and the verdict."""

    id: str
    phase: int
    model: str
    statement: str
    metric: str  # the experiment kind
    measure: str  # accuracy (points) or answer_logprob (nats)
    effect: float
    ci_low: float
    ci_high: float
    threshold: float
    direction: str
    p_value: float
    p_test: str  # the test behind p_value
    verdict: str
    point_verdict: str
    n: int
    heads: str = ""  # what was run: heads (and where they came from), positions, mode
    positions: str = ""
    mode: str = ""
    baseline: float = float("nan")  # baseline accuracy (%) or mean answer log-prob (nats)
    refute_at: float = float("nan")  # the opposite criterion (the threshold unless the claim says)
    unit: str = ""  # the effect's unit when the kind's is not the measure's (e.g. rho, layers)
    p_holm: float | None = None
    control_percentile: float | None = None
    details: dict = field(default_factory=dict)

    @property
    def units(self) -> str:
        return self.unit or UNITS.get(self.measure, "")

    def as_row(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        control = f", control percentile {self.control_percentile:.0f}" if self.control_percentile is not None else ""
        ran = "; ".join(f"{k} {v}" for k, v in what_ran(self.heads, self.positions, self.mode))
        needs = criterion(self.direction, self.threshold, self.refute_at)
        return (
            f"{self.id} on {self.model}: {self.verdict} - effect {self.effect:+.2f} {self.units} "
            f"(95% CI {self.ci_low:+.2f} to {self.ci_high:+.2f}; needs {needs}; "
            f"{self.p_test} p={self.p_value:.3g}{control}; n={self.n}" + (f"; {ran}" if ran else "") + ")"
        )


def not_judged(result: ClaimResult, why: str) -> ClaimResult:
    """`result` with no verdict and no effect: its model cannot be judged (`why`)."""
    nan = float("nan")
    return replace(result, effect=nan, ci_low=nan, ci_high=nan, p_value=nan, verdict=NOT_JUDGED_VERDICT,
                   point_verdict="", control_percentile=None, details={"note": why})  # fmt: skip


def refuted_beyond(direction: str, threshold: float, refute_at: float, digits: int = 2) -> str:
    """Where REFUTED starts, in words, when that is not the threshold (`refuted below 2.00`);
    else empty."""
    if math.isnan(refute_at) or refute_at == threshold:
        return ""
    return f"refuted {'below' if direction == 'greater' else 'above'} {refute_at:.{digits}f}"


def criterion(direction: str, threshold: float, refute_at: float, digits: int = 2) -> str:
    """The claim's criteria in words: `greater than 10.00 (refuted below 2.00)`."""
    beyond = refuted_beyond(direction, threshold, refute_at, digits)
    return f"{direction} than {threshold:.{digits}f}" + (f" ({beyond})" if beyond else "")


LABEL_KEYS = ("supported", "refuted", "inconclusive")


def check_criteria(threshold: float, direction: str, refute_at: float | None, labels: dict | None = None) -> None:
    """A claim's criteria make sense together (else ValueError): the refutation criterion lies
    on the refuted side of the threshold (or a CI between them would be judged against both),
    and labels name only verdicts."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    if refute_at is not None and (refute_at > threshold if direction == "greater" else refute_at < threshold):
        side = "at most" if direction == "greater" else "at least"
        raise ValueError(
            f"refute_at {refute_at:g} must be {side} the threshold {threshold:g} for direction {direction!r} "
            "(REFUTED lies beyond it on the other side)"
        )
    if labels is not None and (
        not isinstance(labels, dict) or any(k not in LABEL_KEYS or not isinstance(v, str) for k, v in labels.items())
    ):
        raise ValueError(f"labels maps {', '.join(LABEL_KEYS)} to names, got {labels!r}")


def claim_result(
    effect: PairedEffect,
    *,
    id: str,
    statement: str,
    model: str,
    threshold: float,
    direction: str,
    measure: str = "accuracy",
    refute_at: float | None = None,
    phase: int = 0,
    labels: dict | None = None,
    heads: str = "",
    positions: str = "",
    mode: str = "",
    baseline: float = float("nan"),
    details: dict | None = None,
) -> ClaimResult:
    """The verdict of a measured effect as a claims-table row: what a Python claim returns
    (phase 0: claims outside the registry's phases form their own Holm family)."""
    check_criteria(threshold, direction, refute_at, labels)
    if not isinstance(phase, int) or isinstance(phase, bool):
        raise ValueError(f"phase is a number (1-4, or 0 for claims outside the seed's phases), got {phase!r}")
    if measure not in UNITS:
        raise ValueError(f"unknown measure {measure!r}; choose from {', '.join(UNITS)}")
    refute = threshold if refute_at is None else refute_at
    return ClaimResult(
        id=id,
        phase=phase,
        model=model,
        statement=statement,
        metric="python",  # a row of its own kind: the registry kinds' sections read their own rows only
        measure=measure,
        effect=effect.effect,
        ci_low=effect.ci_low,
        ci_high=effect.ci_high,
        threshold=threshold,
        direction=direction,
        refute_at=refute,
        p_value=effect.p_value,
        p_test=effect.test,
        verdict=judge(effect.ci_low, effect.ci_high, threshold, direction, refute),
        point_verdict=point_judge(effect.effect, threshold, direction, refute, labels or {}),
        n=effect.n,
        heads=heads,
        positions=positions,
        mode=mode,
        baseline=baseline,
        details=details or {},
    )
