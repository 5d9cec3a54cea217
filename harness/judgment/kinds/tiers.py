"""Difficulty tiers (metric `tier_drop`): head ablation within tiers of problems (easy / medium
/ hard, from the gold solution's steps and the baseline's answer confidence); one tier's drop,
or the difference of two tiers' drops (`compare = [a, b]`: a's drop minus b's)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.interventions.specs import AblateHeads
from harness.judgment.kinds.base import Kind, Measured, Params, Section, choices, forbid_together, nan_effect
from harness.measures.causal import RANKINGS, heads_for
from harness.measures.runner import ModelRun
from harness.measures.tiers import TIERS, assign_tiers, tier_sizes
from harness.statistics.effects import PairedEffect, accuracy_drop, difference_of_drops
from harness.statistics.verdicts import ClaimResult


@dataclass(frozen=True)
class TierParams(Params):
    tier: str | None = choices(*TIERS, default=None)
    compare: tuple[str, str] | None = choices(*TIERS, default=None)
    heads: tuple[str, ...] = ()
    n_heads: int = 3
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"), ("tier", "compare"))
        if self.tier is None and self.compare is None:
            raise ValueError("give a 'tier' or a pair of tiers to 'compare'")
        if self.compare is not None and self.compare[0] == self.compare[1]:
            raise ValueError("compare needs two different tiers")
        if self.n_heads < 1:
            raise ValueError("n_heads must be at least 1")


def tiers(run: ModelRun) -> np.ndarray:
    """[N] tier of each test problem."""
    return assign_tiers(np.array([p.n_steps for p in run.problems]), run.baseline_confidence)


def measure(p: TierParams, run: ModelRun, measure: str) -> Measured:
    heads, source = heads_for(run, p.heads, p.n_heads, p.ranking)
    groups = tiers(run)
    base = run.baseline.correct.astype(bool)
    ablated = run.measure(AblateHeads(tuple(heads))).correct.astype(bool)
    details = {"heads": [str(h) for h in heads], "heads_from": source, "positions": ["latent"], "mode": "zero",
               "tier_sizes": tier_sizes(groups)}  # fmt: skip
    details["by_tier"] = {
        t: [100.0 * float(base[groups == t].mean()), 100.0 * float(ablated[groups == t].mean())]
        for t in TIERS
        if (groups == t).any()
    }
    details["tier_ci"] = {  # the paired drop's 95% CI in each tier (the figure's error bars)
        t: _ci(accuracy_drop(base[groups == t], ablated[groups == t], seed=run.seed))
        for t in TIERS
        if (groups == t).sum() >= 2
    }
    if p.compare is not None:
        a, b = (groups == name for name in p.compare)
        small = [f"{name} has {int(m.sum())}" for name, m in zip(p.compare, (a, b)) if m.sum() < 2]
        if small:
            note = f"tier {' and '.join(small)} problem(s): fewer than 2 to compare"
            details.update(compare=list(p.compare), note=note)
            return Measured(nan_effect(int(min(a.sum(), b.sum()))), details)
        effect = difference_of_drops(base[a], ablated[a], base[b], ablated[b], seed=run.seed)
        return Measured(effect, {**details, "compare": list(p.compare)})
    in_tier = groups == p.tier
    details["tier"] = p.tier
    if in_tier.sum() < 2:
        return Measured(nan_effect(int(in_tier.sum())), {**details, "note": "tier has fewer than 2 problems"})
    return Measured(accuracy_drop(base[in_tier], ablated[in_tier], seed=run.seed), details)


def _ci(effect: PairedEffect) -> list[float]:
    return [effect.ci_low, effect.ci_high]


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    seen, rows = set(), []
    for r in results:
        if (r.model, tuple(r.details["heads"])) in seen:
            continue
        seen.add((r.model, tuple(r.details["heads"])))
        for tier in TIERS:
            base, acc = r.details["by_tier"].get(tier, [np.nan, np.nan])
            low, high = r.details.get("tier_ci", {}).get(tier, [np.nan, np.nan])
            rows.append({"model": r.model, "heads": " ".join(r.details["heads"]), "tier": tier,
                         "n": r.details["tier_sizes"][tier], "baseline_accuracy": base, "ablated_accuracy": acc,
                         "drop": base - acc, "ci_low": low, "ci_high": high})  # fmt: skip
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    groups = list(table.groupby(["model", "heads"], sort=False))
    width = 0.8 / max(1, len(groups))
    for i, ((model, heads), g) in enumerate(groups):
        ax.bar(
            np.arange(len(TIERS)) + width * i,
            g["drop"],
            width,
            yerr=[g["drop"] - g["ci_low"], g["ci_high"] - g["drop"]],
            capsize=3,
            label=f"{model} {heads} (n = {'/'.join(map(str, g.n))})",
        )
    ax.set_xticks(np.arange(len(TIERS)) + width * (len(groups) - 1) / 2, TIERS)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel="accuracy drop (points, 95% CI)", title="Head ablation by difficulty tier")
    ax.legend(fontsize=7)
    return Section("Difficulty tiers (4.1)", {"tiers": table}, {"tiers": fig})


KIND = Kind(
    "tier_drop",
    TierParams,
    measure,
    section,
    "head ablation within difficulty tiers; a tier's drop or the difference of two tiers' drops",
    measures=("accuracy",),
    effect_unit="drops within difficulty tiers (each tier has its own baseline)",
)
