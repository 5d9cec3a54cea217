"""Error analysis: which problem types an intervention hurts most (the seed's open question).

Every condition a claim measured is broken down by problem type (number of reasoning steps;
the operations its solution uses) into a paired drop with a 95% CI per type. Rows travel
with the claim's result (`details["by_type"]`) and become `by_type.csv`, a figure and a
sentence in summary.md.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from harness.data import Problem
from harness.stats import paired_effect
from harness.verdicts import ClaimResult

if TYPE_CHECKING:
    from harness.experiments import Condition
    from harness.specs import Spec

TYPE_RESAMPLES = 2_000  # bootstrap resamples per type (many small CIs: a tenth of a claim's)
MIN_PROBLEMS = 10  # a type with fewer problems gets no row (its CI would say nothing)
_OPERATION = re.compile(r"\d\s*([-+*/x×÷])\s*-?\d")
_NAMES = {"+": "+", "-": "-", "*": "×", "x": "×", "×": "×", "/": "÷", "÷": "÷"}


def operations(problem: Problem) -> str:
    """The operations the gold solution uses, in a fixed order (e.g. '+ ×'); '?' if none parse."""
    found = {_NAMES[m] for step in re.findall(r"<<([^>]*)>>", problem.cot) for m in _OPERATION.findall(step)}
    return " ".join(op for op in ("+", "-", "×", "÷") if op in found) or "?"


def problem_types(problem: Problem) -> dict[str, str]:
    """The types a problem belongs to, one per dimension."""
    return {"steps": f"{problem.n_steps} step{'s' if problem.n_steps != 1 else ''}", "operations": operations(problem)}


def by_type(
    problems: list[Problem],
    baseline: Condition,
    conditions: dict[str, list[Condition]],
    measure: str = "accuracy",
    seed: int = 0,
) -> list[dict]:
    """Per condition (its draws), per type: n, baseline and treated mean, the paired drop and its CI."""
    types = [problem_types(p) for p in problems]
    ref = baseline.values(measure)  # [N]
    rows = []
    for what, draws in conditions.items():
        treated = np.stack([c.values(measure) for c in draws])  # [D, N]
        for dimension in ("steps", "operations"):
            labels = np.array([t[dimension] for t in types])
            for label in sorted(set(labels)):
                mask = labels == label
                if mask.sum() < MIN_PROBLEMS:
                    continue
                e = paired_effect(ref[mask], treated[:, mask], measure, n_resamples=TYPE_RESAMPLES, seed=seed)
                scale = 100.0 if measure == "accuracy" else 1.0
                rows.append(
                    {
                        "condition": what,
                        "measure": measure,
                        "dimension": dimension,
                        "type": label,
                        "n": int(mask.sum()),
                        "baseline": scale * float(ref[mask].mean()),
                        "treated": scale * float(treated[:, mask].mean()),
                        "drop": e.effect,
                        "ci_low": e.ci_low,
                        "ci_high": e.ci_high,
                    }
                )
    return rows


def group_draws(log: list[tuple[Spec, Condition]]) -> dict[str, list[Condition]]:
    """Measured conditions by spec, the draws of a randomised one together (baseline left out)."""
    from harness.specs import Baseline, with_draw

    grouped: dict[str, list[Condition]] = {}
    seen: set[str] = set()
    for spec, condition in log:
        if isinstance(spec, Baseline) or spec.describe() in seen:
            continue
        seen.add(spec.describe())
        grouped.setdefault(with_draw(spec, 0).describe(), []).append(condition)
    return grouped


def most_affected(rows: list[dict]) -> dict | None:
    """The type with the largest drop whose CI excludes zero, else None."""
    clear = [r for r in rows if r["ci_low"] > 0]
    return max(clear, key=lambda r: r["drop"]) if clear else None


def figure(results: list[ClaimResult]) -> Figure | None:
    """Each claim's main condition: drop by type with its CI, one panel per model and dimension."""
    main = [(r, [row for row in r.details.get("by_type", []) if row["condition"] == r.details.get("condition")])
            for r in results if r.measure == "accuracy"]  # fmt: skip
    main = [(r, rows) for r, rows in main if rows]
    if not main:
        return None
    models = list(dict.fromkeys(r.model for r, _ in main))
    fig = Figure(figsize=(10, 3.2 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    for i, model in enumerate(models):
        for j, dimension in enumerate(("steps", "operations")):
            ax = axes[i, j]
            claims = [(r, [x for x in rows if x["dimension"] == dimension]) for r, rows in main if r.model == model]
            labels = sorted({x["type"] for _, rows in claims for x in rows})
            width = 0.8 / max(len(claims), 1)
            for k, (r, rows) in enumerate(claims):
                at = {x["type"]: x for x in rows}
                xs = [labels.index(t) + (k - (len(claims) - 1) / 2) * width for t in at]
                drops = [at[t]["drop"] for t in at]
                err = [[at[t]["drop"] - at[t]["ci_low"] for t in at], [at[t]["ci_high"] - at[t]["drop"] for t in at]]
                ax.bar(xs, drops, width, yerr=err, capsize=2, label=r.id, color=f"C{k % 10}")
            ax.set_xticks(range(len(labels)), labels)
            ax.axhline(0, color="black", lw=0.5)
            ax.set(title=f"{model}: drop by {dimension} (95% CI)", ylabel="accuracy drop (points)")
            if j == 1:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
