"""Attention-pattern override (metric `pattern_drop`): chosen heads' attention at the latent
queries forced to the hub, uniform or sequential pattern; the drop from baseline. The hub
pattern rewrites only the thoughts after the hub (the claim's positions say which); a hub at
the last thought leaves nothing to rewrite, and the claim is INCONCLUSIVE with a note.

Heads: named `heads`, or a `scope`: the top `n_heads` of the ranking (default), every head of
one `layer`, or every head of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.interventions.specs import AttentionPattern
from harness.judgment.kinds.base import (
    Kind,
    Measured,
    Params,
    Section,
    baseline_value,
    choices,
    forbid_together,
    nan_effect,
)
from harness.measures.causal import RANKINGS, heads_for
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head, HeadGeometry
from harness.statistics.verdicts import ClaimResult

PATTERNS = ("hub", "uniform", "sequential")
SCOPES = ("top", "layer", "all")


@dataclass(frozen=True)
class PatternParams(Params):
    pattern: str = choices(*PATTERNS)
    heads: tuple[str, ...] = ()
    scope: str = choices(*SCOPES, default="top")
    n_heads: int = 3  # scope "top"
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking
    layer: int | None = None  # scope "layer"

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"), ("heads", "scope"))
        if self.scope == "layer" and self.layer is None:
            raise ValueError("scope 'layer' needs a layer")
        if self.layer is not None and self.scope != "layer":
            raise ValueError(f"layer applies to scope 'layer', not {self.scope!r}")
        for key in ("n_heads", "ranking"):
            if key in given and self.scope != "top":
                raise ValueError(f"{key} applies to scope 'top', not {self.scope!r}")
        if self.n_heads < 1:
            raise ValueError("n_heads must be at least 1")

    def unused(self) -> set[str]:
        out = super().unused() | ({"layer"} if self.scope != "layer" else set())
        return out | ({"n_heads", "ranking"} if self.scope != "top" else set())

    def check_model(self, geo: HeadGeometry, n_latent: int, model: str) -> None:
        super().check_model(geo, n_latent, model)
        if self.layer is not None and not 0 <= self.layer < geo.n_layers:
            raise ValueError(f"layer {self.layer} out of range for {model}: layers 0..{geo.n_layers - 1}")


def scoped_heads(p: PatternParams, run: ModelRun) -> tuple[list[Head], str]:
    geo = run.geometry
    if p.scope == "layer":
        return [Head(p.layer, h) for h in range(geo.n_heads)], f"layer {p.layer}"
    if p.scope == "all":
        return [Head(layer, h) for layer in range(geo.n_layers) for h in range(geo.n_heads)], "all heads"
    return heads_for(run, p.heads, p.n_heads, p.ranking)


def measure(p: PatternParams, run: ModelRun, measure: str) -> Measured:
    heads, source = scoped_heads(p, run)
    condition = AttentionPattern(tuple(heads), p.pattern, run.hub)
    details = {
        "pattern": p.pattern,
        "hub": run.hub,
        "heads": [str(h) for h in heads],
        "heads_from": source,
        "positions": condition.rewritten(run.n_latent),  # the queries rewritten: after the hub for "hub"
        "mode": p.pattern,
        "baseline_accuracy": baseline_value(run, "accuracy"),
    }
    if not details["positions"]:
        note = f"the hub {run.hub} is the last thought: no thought's query can see it, the pattern changes nothing"
        return Measured(nan_effect(len(run.problems)), {**details, "accuracy": np.nan, "note": note})
    details["accuracy"] = 100.0 * run.measure(condition).accuracy
    return Measured(run.effect(condition, measure), details)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    rows = [
        {
            "model": r.model,
            "pattern": r.details["pattern"],
            "heads": " ".join(r.details["heads"]),
            "heads_from": r.details["heads_from"],
            "hub": r.details["hub"],
            "measure": r.measure,
            "baseline_accuracy": r.details["baseline_accuracy"],
            "accuracy": r.details["accuracy"],
            "drop": r.effect,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
        }  # fmt: skip
        for r in results
    ]
    table = pd.DataFrame(rows).drop_duplicates(subset=["model", "pattern", "heads", "measure"])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    acc = table[table.measure == "accuracy"].reset_index(drop=True)
    labels = [f"{r.pattern}\n{r.heads}" for r in acc.itertuples()]
    models = list(dict.fromkeys(acc.model))
    for j, model in enumerate(models):
        g = acc[acc.model == model]
        err = [g["drop"] - g["ci_low"], g["ci_high"] - g["drop"]]
        ax.bar(g.index + 0.0, g["drop"], 0.8, yerr=err, capsize=3, label=model, color=f"C{j}")
    ax.set_xticks(np.arange(len(acc)), labels, fontsize=6)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel="accuracy drop (points, 95% CI)", title="Attention pattern forced at the latent queries")
    if models:
        ax.legend(fontsize=7)
    seed = {"pattern": ["baseline", *PATTERNS]}  # the seed's shape: pattern, <model>_acc
    for model, g in acc.groupby("model", sort=False):
        ranked = g[g.heads_from == "ranking"]  # the seed's rows: the attention ranking's top heads
        first = (ranked if len(ranked) else g).drop_duplicates("pattern")  # the registry's first claim per pattern
        by_pattern = dict(zip(first.pattern, first.accuracy))
        seed[f"{model}_acc"] = [g.baseline_accuracy.iloc[0], *(by_pattern.get(p, np.nan) for p in PATTERNS)]
    tables = {"patterns": pd.DataFrame(seed), "pattern_claims": table}
    return Section("Attention patterns", tables, {"patterns": fig})


KIND = Kind(
    "pattern_drop",
    PatternParams,
    measure,
    section,
    "heads' attention at the thoughts forced to a pattern (hub / uniform / sequential); drop from baseline",
    baseline_relative=True,
)
