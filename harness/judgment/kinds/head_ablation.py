"""Head ablation (metric `ablation_drop`): heads' outputs replaced at named positions; the drop
from baseline, against random head sets matched by layer (the control)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from statsmodels.stats.proportion import proportion_confint

from harness.interventions.hooks import InterventionError
from harness.interventions.specs import HEAD_MODES, AblateHeads, check_head_mode
from harness.judgment.kinds.base import (
    Kind,
    Measured,
    Params,
    Section,
    baseline_value,
    by_model,
    choices,
    forbid_together,
    mean_drop,
)
from harness.measures.causal import RANKINGS, heads_for, ranking_thought
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head
from harness.statistics.verdicts import ClaimResult

DEFAULT_CONTROLS = 20  # random head sets of a claim judged against them, unless n_random says
MAX_INCREMENTAL = 5  # top-k curves only for short ranked lists (each k is a condition)


@dataclass(frozen=True)
class AblationParams(Params):
    heads: tuple[str, ...] = ()  # named heads, e.g. ["L2H3", "L3H1"]; else the top `n_heads`
    n_heads: int = 3
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking
    positions: tuple[str, ...] = ("latent",)  # CT<i>, bot, eot, question, answer, latent
    mode: str = choices(*HEAD_MODES, default="zero")
    n_random: int | None = None  # random head sets matched by layer (the control); default 20 if judged on it, else 0
    against_control: bool = False  # threshold: the claim's threshold above the control's 95th percentile
    n_draws: int = 5  # independent derangements (mode "resample")

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"))
        if self.n_heads < 1 or self.n_controls < 0 or self.n_draws < 1:
            raise ValueError("n_heads and n_draws must be at least 1, n_random at least 0")
        if "n_draws" in given and self.mode != "resample":
            raise ValueError(f"n_draws applies to mode 'resample'; mode {self.mode!r} is deterministic")
        if self.against_control and self.n_controls < 2:
            raise ValueError("against_control needs n_random of at least 2")
        check_head_mode(self.mode, self.positions)
        if self.ranking == "causal" and not self.heads:
            ranking_thought(self.positions)

    @property
    def n_controls(self) -> int:
        """Random head sets measured: `n_random` where given, else 20 for a claim judged
        against them and none otherwise (a control no verdict reads is not computed)."""
        if self.n_random is not None:
            return self.n_random
        return DEFAULT_CONTROLS if self.against_control else 0

    def describe(self) -> dict:
        return {**super().describe(), "n_random": self.n_controls}  # what runs, not None


def random_head_sets(run: ModelRun, like: list[Head], n_sets: int = 20) -> list[list[Head]]:
    """`n_sets` distinct random head sets matched by layer to `like`, never containing its
    heads; fewer when fewer exist (one head of an 8-head layer has 7), so a control of
    "20 sets" is never one set counted twice."""
    n_heads = run.geometry.n_heads
    per_layer = Counter(h.layer for h in like)
    for layer, m in per_layer.items():
        if n_heads - m < m:
            raise InterventionError(f"no random heads matched by layer: layer {layer} has no {m} other heads")
    possible = math.prod(math.comb(n_heads - m, m) for m in per_layer.values())
    rng, sets, seen = random.Random(run.seed), [], set()
    while len(sets) < min(n_sets, possible):
        chosen: list[Head] = []
        for h in like:
            options = [Head(h.layer, k) for k in range(n_heads) if Head(h.layer, k) not in like + chosen]
            chosen.append(rng.choice(options))
        if frozenset(chosen) not in seen:
            seen.add(frozenset(chosen))
            sets.append(chosen)
    return sets


def measure(p: AblationParams, run: ModelRun, measure: str) -> Measured:
    heads, source = heads_for(run, p.heads, p.n_heads, p.ranking, p.positions)
    spec = AblateHeads(tuple(heads), p.positions, p.mode)
    draws = run.measure_draws(spec, p.n_draws)
    effect = run.effect(draws, measure)
    reference = run.baseline.values(measure)
    null = [
        mean_drop(reference, run.measure(AblateHeads(tuple(s), p.positions, p.mode)).values(measure), measure)
        for s in random_head_sets(run, heads, p.n_controls)
    ]
    details = {
        "heads": [str(h) for h in heads],
        "heads_from": source,
        "positions": list(spec.positions),
        "mode": p.mode,
        "n_draws": len(draws),
        "accuracy": 100.0 * float(np.mean([d.accuracy for d in draws])),
        "baseline_accuracy": baseline_value(run, "accuracy"),
    }
    if source != "claim" and len(heads) <= MAX_INCREMENTAL:  # an ordered list: the top-k curve
        details["incremental"] = [
            100.0 * run.measure(AblateHeads(tuple(heads[:k]), p.positions, p.mode)).accuracy
            for k in range(1, len(heads))
        ] + [details["accuracy"]]
    return Measured(effect, details, null or None)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    rows = [
        {
            "claim": r.id,
            "model": r.model,
            "heads": " ".join(r.details["heads"]),
            "heads_from": r.details["heads_from"],
            "positions": " ".join(r.details["positions"]),
            "mode": r.details["mode"],
            "measure": r.measure,
            "n": r.n,
            "n_draws": r.details["n_draws"],
            "n_random": len(r.details.get("control", [])),
            "baseline_accuracy": r.details["baseline_accuracy"],
            "accuracy": r.details["accuracy"],
            "drop": r.effect,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
            "control_p5": np.percentile(r.details["control"], 5) if r.details.get("control") else np.nan,
            "control_p95": np.percentile(r.details["control"], 95) if r.details.get("control") else np.nan,
        }
        for r in results
    ]
    same = ["model", "heads", "positions", "mode", "measure", "n_draws", "n_random"]  # one condition, one row
    table = pd.DataFrame(rows)
    table["claim"] = table.groupby(same)["claim"].transform(lambda ids: " ".join(dict.fromkeys(ids)))
    tables = {"ablation_claims": table.drop_duplicates(subset=same)}
    curves = {}  # the seed's shape: n_heads, <model>_acc, control band at the full set
    for model, group in by_model(results).items():
        ranked = [r for r in group if "incremental" in r.details and r.measure == "accuracy"]
        if ranked:
            r = ranked[0]
            curves[model] = ([r.details["baseline_accuracy"], *r.details["incremental"]], r)
    figures = {}
    if curves:
        n = max(len(acc) for acc, _ in curves.values())
        seed = {"n_heads": list(range(n))}
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for j, (model, (acc, r)) in enumerate(curves.items()):
            seed[f"{model}_acc"] = acc + [np.nan] * (n - len(acc))
            low, high = proportion_confint(np.round(np.array(acc) * r.n / 100), r.n, method="wilson")  # 95% CI
            err = [np.array(acc) - 100 * low, 100 * high - np.array(acc)]
            label = f"{model} ({', '.join(r.details['heads'])}; {r.details['mode']})"
            line = ax.errorbar(range(len(acc)), acc, err, marker="o", capsize=3, label=label).lines[0]
            control = r.details.get("control")
            if control:
                base = r.details["baseline_accuracy"]
                lo, hi = base - np.percentile(control, 95), base - np.percentile(control, 5)
                x = len(acc) - 1 + 0.1 * (j + 1)
                label = f"{model}: random sets matched by layer (p5-p95)"
                mid, half = (lo + hi) / 2, (hi - lo) / 2
                ax.errorbar([x], [mid], [half], fmt="none", capsize=4, lw=2, color=line.get_color(), label=label)
                seed[f"{model}_random_p5"] = [np.nan] * (len(acc) - 1) + [lo] + [np.nan] * (n - len(acc))
                seed[f"{model}_random_p95"] = [np.nan] * (len(acc) - 1) + [hi] + [np.nan] * (n - len(acc))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(
            xlabel="heads ablated (in ranked order)",
            ylabel="accuracy (%, 95% Wilson CI)",
            title="Head ablation, top-k heads",
        )
        ax.legend(fontsize=7)
        figures["ablation"] = fig
        tables["ablation"] = pd.DataFrame(seed)
    return Section("Head ablation", tables, figures)


KIND = Kind(
    "ablation_drop",
    AblationParams,
    measure,
    section,
    "heads' outputs replaced (zero / mean / resample) at named positions; drop from baseline",
    baseline_relative=True,
)
