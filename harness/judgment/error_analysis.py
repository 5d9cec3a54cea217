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

from harness.data.problems import Problem
from harness.statistics.effects import paired_effect
from harness.statistics.verdicts import ClaimResult

if TYPE_CHECKING:
    from harness.interventions.specs import Spec
    from harness.measures.runner import Condition

TYPE_RESAMPLES = 2_000  # bootstrap resamples per type (many small CIs: a tenth of a claim's)
MIN_PROBLEMS = 10  # a type with fewer problems gets no row (its CI would say nothing)
FIGURE_MIN = 40  # types with fewer problems stay out of the figure (still in by_type.csv)
# an operator between two operands; lookarounds consume no operand, so a chained step
# (15*3/5) yields each operator, and a decimal like .5 counts as an operand
_OPERATION = re.compile(r"(?<=[\d)])\s*([-+*/x×÷])(?=\s*[-(.\d])")
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
    with_ci: str | None = None,
) -> list[dict]:
    """Per condition (its draws), per type: n, baseline and treated mean and the paired drop;
    the drop's CI for the condition `with_ci` (a claim's own intervention: the figure and the
    summary read it; a bootstrap per control condition and type would dominate a warm run)."""
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
                scale = 100.0 if measure == "accuracy" else 1.0
                if what == with_ci:
                    e = paired_effect(ref[mask], treated[:, mask], measure, n_resamples=TYPE_RESAMPLES, seed=seed)
                    low, high = e.ci_low, e.ci_high
                else:
                    low = high = float("nan")
                rows.append(
                    {
                        "condition": what,
                        "measure": measure,
                        "dimension": dimension,
                        "type": label,
                        "n": int(mask.sum()),
                        "baseline": scale * float(ref[mask].mean()),
                        "treated": scale * float(treated[:, mask].mean()),
                        "drop": scale * float(ref[mask].mean() - treated[:, mask].mean()),
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
    return rows


def group_draws(log: list[tuple[Spec, Condition]]) -> dict[str, list[Condition]]:
    """Measured conditions by spec, the draws of a randomised one together (baseline left out)."""
    from harness.interventions.specs import Baseline, with_draw

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
    """Per model, a heat map of each claim's own intervention (rows) by problem type (columns:
    steps, then operations with at least FIGURE_MIN problems): the accuracy drop, its 95% CI
    written in the cell."""
    cells: dict[str, dict[str, tuple[list[str], dict[str, dict]]]] = {}  # model -> condition -> (claims, type -> row)
    for r in results:
        main = [x for x in r.details.get("by_type", []) if x["condition"] == r.details.get("condition")]
        if r.measure != "accuracy" or not main:
            continue
        claims, by = cells.setdefault(r.model, {}).setdefault(main[0]["condition"], ([], {}))
        claims.append(r.id)
        by.update({f"{x['dimension']}: {x['type']}": x for x in main if x["n"] >= FIGURE_MIN})
    if not cells:
        return None
    heights = [0.45 * len(c) + 1.6 for c in cells.values()]
    fig = Figure(figsize=(11, sum(heights)), layout="constrained")
    axes = fig.subplots(len(cells), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (model, conditions) in zip(axes, cells.items()):
        types = sorted({t for _, by in conditions.values() for t in by}, key=lambda t: (not t.startswith("steps"), t))
        drop = np.full((len(conditions), len(types)), np.nan)
        for i, (_, by) in enumerate(conditions.values()):
            for j, t in enumerate(types):
                if t in by:
                    drop[i, j] = by[t]["drop"]
        bound = np.nanmax(np.abs(drop)) if np.isfinite(drop).any() else 1.0
        ax.imshow(drop, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        for i, (_, by) in enumerate(conditions.values()):
            for j, t in enumerate(types):
                if t in by:
                    x = by[t]
                    text = f"{x['drop']:+.0f}\n[{x['ci_low']:+.0f},{x['ci_high']:+.0f}]"
                    ax.text(j, i, text, ha="center", va="center", fontsize=5.5)
        ax.set_xticks(range(len(types)), [t.replace(": ", "\n") for t in types], fontsize=7)
        ax.set_yticks(range(len(conditions)), [", ".join(c[:2]) + (" ..." if len(c) > 2 else "")
                                               for c, _ in conditions.values()], fontsize=7)  # fmt: skip
        ax.set_title(f"{model}: accuracy drop by problem type under each claim's intervention (points, 95% CI)")
    return fig
