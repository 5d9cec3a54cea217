"""Hub rerouting (metric `reroute_drop`): the chosen heads' attention mass on the hub thought,
at the latent queries, moved to another thought; the drop from baseline.

`target`: `other_hub` (the other model's hub position: needs a second model in the run),
`neighbour` (the thought next to this model's hub) or a thought `CT<i>`. Only the queries
after both the hub and the target are rerouted (the claim's positions say which); when none
is, or the target is the hub itself, nothing is tested and the claim is INCONCLUSIVE.
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
    wilson_err,
)
from harness.measures.causal import RANKINGS, heads_for
from harness.measures.runner import ModelRun
from harness.runtime.arch import HeadGeometry
from harness.runtime.positions import thought_number
from harness.statistics.verdicts import ClaimResult

TARGETS = ("other_hub", "neighbour")


@dataclass(frozen=True)
class RerouteParams(Params):
    target: str  # other_hub, neighbour or CT<i>
    heads: tuple[str, ...] = ()
    n_heads: int = 3
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"))
        if self.target not in TARGETS and thought_number(self.target) is None:
            raise ValueError(f"target {self.target!r}: choose other_hub, neighbour or a thought CT<i>")
        if self.n_heads < 1:
            raise ValueError("n_heads must be at least 1")

    def check_model(self, geo: HeadGeometry, n_latent: int, model: str) -> None:
        super().check_model(geo, n_latent, model)
        thought = thought_number(self.target)
        if thought is not None and thought >= n_latent:
            raise ValueError(f"target {self.target} out of range for {model}: thoughts CT0..CT{n_latent - 1}")


def reroute_target(run: ModelRun, target: str) -> str | None:
    """The thought the hub's mass moves to (None: `other_hub` without another model)."""
    if target == "other_hub":
        return next(iter(run.peers.values())).hub if run.peers else None
    if target == "neighbour":
        hub = run.hub_thought
        return f"CT{hub + 1 if hub + 1 < run.n_latent else hub - 1}"
    return target


def measure(p: RerouteParams, run: ModelRun, measure: str) -> Measured:
    heads, source = heads_for(run, p.heads, p.n_heads, p.ranking)
    details = {"hub": run.hub, "heads": [str(h) for h in heads], "heads_from": source, "positions": ["latent"],
               "mode": f"reroute ({p.target})", "reroute_to": p.target,
               "baseline_accuracy": baseline_value(run, "accuracy")}  # fmt: skip
    target = reroute_target(run, p.target)
    if target is None:
        return Measured(nan_effect(len(run.problems)), {**details, "note": "needs a second model in the run"})
    if p.target == "other_hub":  # the first other model of the run (`--model` order)
        details["other_model"] = next(iter(run.peers))
    details["target"] = target
    whose = f" ({details['other_model']}'s hub)" if p.target == "other_hub" else ""
    details["mode"] = f"reroute {run.hub} -> {target}{whose}"
    condition = AttentionPattern(tuple(heads), "reroute", run.hub, target) if target != run.hub else None
    details["positions"] = condition.rewritten(run.n_latent) if condition else []  # the queries rerouted
    if condition is None or not details["positions"]:
        note = (
            "the target is this model's hub: rerouting is the identity"
            if condition is None
            else f"no thought's query comes after both the hub {run.hub} and {target}: rerouting changes nothing"
        )
        return Measured(nan_effect(len(run.problems)), {**details, "note": note})
    return Measured(run.effect(condition, measure), {**details, "accuracy": 100.0 * run.measure(condition).accuracy})


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    rows = [
        {
            "model": r.model,
            "reroute_to": r.details["reroute_to"],
            "hub": r.details["hub"],
            "target": r.details.get("target", ""),
            "heads": " ".join(r.details["heads"]),
            "measure": r.measure,
            "n": r.n,
            "accuracy": r.details.get("accuracy", np.nan),
            "baseline_accuracy": r.details["baseline_accuracy"],
            "drop": r.effect,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
        }  # fmt: skip
        for r in results
    ]
    table = pd.DataFrame(rows).drop_duplicates(subset=["model", "reroute_to", "heads", "measure"])
    table["kept_fraction"] = table.accuracy / table.baseline_accuracy
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    acc = table[(table.measure == "accuracy") & table.accuracy.notna()].reset_index(drop=True)
    for j, model in enumerate(dict.fromkeys(acc.model)):
        g = acc[acc.model == model]
        ax.bar(g.index, g.accuracy, 0.8, yerr=wilson_err(g.accuracy, g.n), capsize=3, label=model, color=f"C{j}")
        ax.hlines(g.baseline_accuracy, g.index - 0.4, g.index + 0.4, colors="black", linestyles="--", lw=1)
    ax.set_xticks(np.arange(len(acc)), [f"{r.reroute_to}\n{r.hub} -> {r.target}" for r in acc.itertuples()], fontsize=7)
    ax.set(ylabel="accuracy (%, 95% Wilson CI; dashed: baseline)", title="Hub attention rerouted")
    if len(acc):
        ax.legend(fontsize=7)
    return Section("Hub rerouting (2.2)", {"rerouting": table}, {"rerouting": fig})


KIND = Kind(
    "reroute_drop",
    RerouteParams,
    measure,
    section,
    "heads' hub attention moved to another thought at the latent queries; drop from baseline",
    baseline_relative=True,
)
