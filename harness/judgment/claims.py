"""Claims as data (hypotheses/claims.toml) and one generic runner that judges them.

A claim names an experiment kind (`metric`), its typed parameters (`experiment`), a measure,
a threshold and a direction. Every key is validated at load against the claim schema and the
kind's parameters (`harness.judgment.kinds`): a mistake is a `ClaimError` naming the claim and the key,
before any model loads. The runner measures the effect with a paired CI and gives the verdict
(`harness.statistics.verdicts`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import tomllib

from harness.data.problems import WORK_ROOT
from harness.interventions.specs import with_draw
from harness.judgment.error_analysis import by_type, group_draws
from harness.judgment.kinds import KINDS, ClaimError, Params
from harness.judgment.kinds.base import baseline_value, close_hint, coerce
from harness.measures.runner import ModelRun
from harness.runtime.arch import HeadGeometry
from harness.statistics.effects import MEASURES, percentile_of
from harness.statistics.verdicts import DIRECTIONS, ClaimResult, check_criteria, judge, not_judged, point_judge

REGISTRY = WORK_ROOT / "hypotheses" / "claims.toml"
PHASES = (1, 2, 3, 4)


@dataclass(frozen=True)
class Claim:
    id: str
    phase: int
    statement: str
    metric: str  # the experiment kind (see `harness.judgment.kinds.KINDS`)
    threshold: float
    direction: str  # "greater": the effect must exceed the threshold; "less": stay below it
    params: Params = field(compare=False)  # the kind's typed parameters (TOML: `experiment`)
    measure: str = "accuracy"  # accuracy (points) or answer_logprob (nats)
    refute_at: float | None = None  # the opposite criterion (default: the threshold)
    threshold_of_baseline: bool = False  # threshold and refute_at are fractions of baseline accuracy
    labels: dict = field(default_factory=dict)  # the seed's names for supported / refuted
    gate: str | None = None  # id of a claim that must be SUPPORTED for this one to run

    @property
    def marker(self) -> str:
        return f"phase{self.phase}"

    def describe(self) -> str:
        """One line for --list-claims: id, phase, kind, every parameter (defaults filled in)."""
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.describe().items())
        base = " x baseline" if self.threshold_of_baseline else ""
        refute = f", refute_at {self.refute_at:g}{base}" if self.refute_at is not None else ""
        gate = f", gate {self.gate}" if self.gate else ""
        return (
            f"{self.id}  phase {self.phase}  {self.metric}({params})  measure {self.measure}, "
            f"{self.direction} than {self.threshold:g}{base}{refute}{gate}\n    {self.statement}"
        )


# the TOML keys of a claim: every `Claim` field, `experiment` in place of `params`
TOP_KEYS = [f.name for f in fields(Claim) if f.name != "params"] + ["experiment"]
REQUIRED = ("id", "phase", "statement", "metric", "threshold", "direction")


def parse_claim(entry: dict, where: str) -> Claim:
    """One registry entry -> a `Claim`, every key checked (a `ClaimError` names the first bad one)."""
    cid = entry.get("id", "?")
    where = f"{where}: claim {cid!r}"
    for key in entry:
        if key not in TOP_KEYS:
            hint = close_hint(key, TOP_KEYS)
            raise ClaimError(f"{where}: unknown key {key!r}{hint}; claims take {', '.join(TOP_KEYS)}")
    for key in REQUIRED:
        if key not in entry:
            raise ClaimError(f"{where}: missing key {key!r}")
    hints = typing.get_type_hints(Claim)
    values = {}
    for key, value in entry.items():
        if key in ("experiment", "labels"):
            continue
        values[key] = coerce(value, hints[key], f"{where}: {key}")
    if values["metric"] not in KINDS:
        metric = values["metric"]
        raise ClaimError(
            f"{where}: unknown metric {metric!r}{close_hint(metric, list(KINDS))}; choose from {', '.join(KINDS)}"
        )
    if values["phase"] not in PHASES:
        raise ClaimError(f"{where}: unknown phase {values['phase']!r} (markers phase1..phase4)")
    if values["direction"] not in DIRECTIONS:
        raise ClaimError(f"{where}: direction must be 'greater' or 'less', got {values['direction']!r}")
    kind = KINDS[values["metric"]]
    measure = values.get("measure", "accuracy")
    if measure not in MEASURES:
        raise ClaimError(f"{where}: unknown measure {measure!r}{close_hint(measure, list(MEASURES))}")
    if measure not in kind.measures:
        raise ClaimError(f"{where}: metric {kind.metric!r} measures {', '.join(kind.measures)}, not {measure!r}")
    if values.get("threshold_of_baseline") and measure != "accuracy":
        raise ClaimError(f"{where}: threshold_of_baseline is a fraction of baseline accuracy; measure is {measure!r}")
    if values.get("threshold_of_baseline") and not kind.baseline_relative:
        raise ClaimError(
            f"{where}: threshold_of_baseline scales an accuracy drop; metric {kind.metric!r} measures "
            f"{kind.effect_unit}, not a drop from baseline accuracy"
        )
    labels = entry.get("labels", {})
    experiment = entry.get("experiment", {})
    if not isinstance(experiment, dict):
        raise ClaimError(f"{where}: experiment must be a table, got {experiment!r}")
    params = kind.params.from_table(experiment, where)
    try:  # the criteria make sense together, and the kind can judge the direction
        check_criteria(values["threshold"], values["direction"], values.get("refute_at"), labels)
        params.check_direction(values["direction"])
        params.check_measure(measure)
    except ValueError as e:
        raise ClaimError(f"{where}: {e}") from None
    if getattr(params, "against_control", False):
        if values.get("threshold_of_baseline"):
            raise ClaimError(
                f"{where}: against_control judges against the control; threshold_of_baseline would be ignored"
            )
        if values["direction"] != "greater":
            raise ClaimError(
                f"{where}: against_control needs direction 'greater' (the effect above the control's 95th percentile)"
            )
        if "refute_at" in values:
            raise ClaimError(
                f"{where}: against_control judges both ways against the control (the threshold is a margin above "
                "its 95th percentile); refute_at would be an absolute number beside it"
            )
    return Claim(**values, labels=labels, params=params)


def load_registry(path: Path = REGISTRY) -> list[Claim]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ClaimError(f"{path}: cannot read the claims registry ({e})") from None
    claims = [parse_claim(entry, str(path)) for entry in data.get("claim", [])]
    ids = [c.id for c in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ClaimError(f"{path}: duplicate claim id {duplicates[0]!r}")
    gates = {c.id: c.gate for c in claims}
    for c in claims:
        if c.gate is not None and c.gate not in ids:
            raise ClaimError(f"{path}: claim {c.id!r} is gated on unknown claim id {c.gate!r}")
        chain = [c.id]
        while gates.get(chain[-1]) is not None:
            chain.append(gates[chain[-1]])
            if chain[-1] in chain[:-1]:
                raise ClaimError(f"{path}: claim {c.id!r}: its gates form a cycle ({' -> '.join(chain)})")
    return claims


def check_against_model(claims: list[Claim], geo: HeadGeometry, n_latent: int, model: str) -> None:
    """Named heads, positions and layers exist in `model`; else a `ClaimError`."""
    for c in claims:
        try:
            c.params.check_model(geo, n_latent, model)
        except ValueError as e:
            raise ClaimError(f"claim {c.id!r}: {e}") from None


def _heads_text(details: dict) -> str:
    heads = " ".join(details.get("heads", []))
    source = details.get("heads_from")
    return f"{heads} ({source})" if heads and source else heads


def evaluate_claim(claim: Claim, run: ModelRun) -> ClaimResult:
    start = len(run.log)
    kind = KINDS[claim.metric]
    measured = kind.measure(claim.params, run, claim.measure)
    effect, details, null = measured.effect, measured.details, measured.null
    conditions = group_draws(run.log[start:])  # what this claim measured, for the error analysis
    main = with_draw(measured.main, 0).describe() if measured.main is not None else next(iter(conditions), None)
    if kind.error_analysis and main in conditions and claim.measure in MEASURES:
        details = {
            **details,
            "condition": main,
            "by_type": by_type(run.problems, run.baseline, conditions, claim.measure, run.seed, main),
        }
    threshold = claim.threshold
    if claim.threshold_of_baseline:  # e.g. "keeps > 90% of baseline": drop < 10% of baseline acc
        threshold = claim.threshold * baseline_value(run, "accuracy")
    p_value, p_test = effect.p_value, effect.test
    if measured.bootstrap is not None:  # the share of resampled effects against the claim (never exactly 0)
        draws = measured.bootstrap[~np.isnan(measured.bootstrap)]  # a resample with no effect counts for neither
        against = draws > threshold if claim.direction == "less" else draws < threshold
        p_value = (1 + int(against.sum())) / (1 + len(draws)) if len(draws) else float("nan")
    if getattr(claim.params, "against_control", False) and null:
        threshold = claim.threshold + float(np.percentile(null, 95))  # a margin above the control
        p_value = (1 + sum(x >= effect.effect for x in null)) / (1 + len(null))
        p_test = f"control share ({len(null)} random sets)"
    refute_at = threshold
    if claim.refute_at is not None:  # a fraction of baseline accuracy like the threshold, when it is one
        refute_at = claim.refute_at * (baseline_value(run, "accuracy") if claim.threshold_of_baseline else 1.0)
    statement = claim.statement
    if str(details.get("heads_from", "")).startswith("--heads"):
        statement += f" [run on the heads named by --heads: {', '.join(details['heads'])}]"
    return ClaimResult(
        id=claim.id,
        phase=claim.phase,
        model=run.name,
        statement=statement,
        metric=claim.metric,
        measure=claim.measure,
        effect=effect.effect,
        ci_low=effect.ci_low,
        ci_high=effect.ci_high,
        threshold=threshold,
        direction=claim.direction,
        refute_at=refute_at,
        unit=str(details.get("units", "")),
        p_value=p_value,
        p_test=p_test,
        verdict=judge(effect.ci_low, effect.ci_high, threshold, claim.direction, refute_at),
        point_verdict=point_judge(effect.effect, threshold, claim.direction, refute_at, claim.labels),
        n=effect.n,
        heads=_heads_text(details),
        positions=" ".join(details.get("positions", [])),
        mode=str(details.get("mode", "")),
        baseline=baseline_value(run, claim.measure) if "baseline_accuracy" in details else float("nan"),
        control_percentile=percentile_of(effect.effect, null) if null else None,
        details={**details, **({"control": null} if null else {})},
    )


def unjudged(claim: Claim, run: ModelRun, why: str) -> ClaimResult:
    """`claim`'s row on a model that cannot be judged (`why`), measured not at all."""
    nan = float("nan")
    row = ClaimResult(id=claim.id, phase=claim.phase, model=run.name, statement=claim.statement, metric=claim.metric,
                      measure=claim.measure, effect=nan, ci_low=nan, ci_high=nan, threshold=claim.threshold,
                      direction=claim.direction, p_value=nan, p_test="", verdict="", point_verdict="",
                      n=len(run.problems), baseline=run.baseline.mean(claim.measure))  # fmt: skip
    return not_judged(row, why)
