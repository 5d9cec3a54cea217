"""Layer-wise linear probes at the hub thought (metric `probe_layer`), with a Hewitt & Liang
control task.

`test = "critical_layer"`: distance (layers) from the probe's critical layer (where its
selectivity rises most) to the nearest critical head's layer, CI by resampling problems;
`test = "final_above_chance"`: the final layer's probe accuracy minus chance (points).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.experiments import RANKINGS, ModelRun
from harness.kinds.base import Kind, Measured, Params, Section, choices, forbid_together, nan_effect
from harness.probes import TARGETS, chance, critical_layer
from harness.stats import PairedEffect, accuracy_above
from harness.verdicts import ClaimResult

TESTS = ("critical_layer", "final_above_chance")
N_LAYER_DRAWS = 1000


@dataclass(frozen=True)
class ProbeParams(Params):
    test: str = choices(*TESTS)
    label: str = choices(*TARGETS, default="answer_last_digit")  # what the probe decodes
    heads: tuple[str, ...] = ()  # critical_layer: the heads whose layers are compared
    n_heads: int = 3
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"))
        if self.test != "critical_layer" and {"heads", "n_heads", "ranking"} & given:
            raise ValueError(f"heads / n_heads / ranking apply to test 'critical_layer', not {self.test!r}")


def measure(p: ProbeParams, run: ModelRun, measure: str) -> Measured:
    probes = run.probes
    task, control = probes.task[p.label], probes.control[p.label]  # [L + 1, n]
    details = {"label": p.label, "hub": run.hub, "positions": [run.hub], "mode": f"probe ({p.label})",
               "critical_layer": critical_layer(task, control), "heads": []}  # fmt: skip
    if p.test == "final_above_chance":
        ch = chance(probes.labels[p.label])
        return Measured(accuracy_above(task[-1], ch, seed=run.seed), {**details, "chance": 100 * ch})
    heads, source = run.heads_for(p.heads, p.n_heads, p.ranking)
    head_layers = sorted({h.layer for h in heads})
    details.update(heads=[str(h) for h in heads], heads_from=source, head_layers=head_layers)
    selectivity = task.mean(-1) - control.mean(-1)  # [L + 1]
    details["selectivity"] = [float(100 * s) for s in selectivity]
    if selectivity[details["critical_layer"] + 1] <= 0:
        note = "the probe never beats its control task after the critical layer: no layer to locate"
        return Measured(nan_effect(task.shape[1]), {**details, "note": note})

    def distance(columns: np.ndarray) -> int:
        crit = critical_layer(task[:, columns], control[:, columns])
        return min(abs(crit - layer) for layer in head_layers)

    n = task.shape[1]
    rng = np.random.default_rng(run.seed)
    draws = np.array([distance(rng.integers(0, n, n)) for _ in range(N_LAYER_DRAWS)])
    low, high = np.percentile(draws, [2.5, 97.5])
    effect = PairedEffect(float(distance(np.arange(n))), float(low), float(high), float("nan"), n, "bootstrap share")
    return Measured(effect, details, bootstrap=draws)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    models = list(dict.fromkeys(r.model for r in results))
    frames = [runs[m].probes.table().assign(model=m, hub=runs[m].hub) for m in models]
    table = pd.concat(frames, ignore_index=True)[
        ["model", "hub", "target", "layer", "accuracy", "control_accuracy", "selectivity", "chance"]
    ]
    figures = {}
    for target, group in table.groupby("target", sort=False):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, g in group.groupby("model", sort=False):
            line = ax.plot(g.layer, g.accuracy, marker="o", label=f"{name} probe")[0]
            ax.plot(g.layer, g.control_accuracy, ls="--", color=line.get_color(), label=f"{name} control")
            ax.axhline(g.chance.iloc[0], color=line.get_color(), ls=":", lw=1)
        ax.set(xlabel="layer (0 = the thought as fed in)", ylabel="probe accuracy (%)", title=f"{target} at the hub")
        ax.legend(fontsize=7)
        figures[f"probes_{target}"] = fig
    return Section("Layer-wise probes at the hub thought (3.1)", {"probes": table}, figures)


KIND = Kind(
    "probe_layer",
    ProbeParams,
    measure,
    section,
    "linear probes per layer at the hub thought, with a control task",
    measures=("accuracy",),
)
