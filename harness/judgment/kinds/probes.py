"""Layer-wise linear probes at the hub thought (metric `probe_layer`), with a Hewitt & Liang
control task.

`test = "critical_layer"`: distance (layers) from the probe's critical layer (where its
selectivity rises most) to the nearest critical head's layer, CI by resampling problems;
`test = "final_above_chance"`: the final layer's probe accuracy minus chance (points).
`test = "step_selectivity"`: probes of solution step `step`'s result (its last digit) at every
thought and layer; the (thought, layer) with the highest selectivity on the even-numbered
problems is measured on the odd-numbered ones: task minus control accuracy, points, paired
per problem, bootstrap CI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.judgment.kinds.base import (
    Kind,
    Measured,
    Params,
    Section,
    choices,
    forbid_together,
    nan_effect,
    wilson_err,
)
from harness.measures.causal import RANKINGS, heads_for
from harness.measures.probes import (
    MAX_PROBE_STEPS,
    MIN_PROBE_PROBLEMS,
    TARGETS,
    ProbeResults,
    all_thought_states,
    chance,
    critical_layer,
    probe_targets,
    run_probes,
    step_probes,
    thought_states,
)
from harness.measures.runner import ModelRun
from harness.statistics.effects import PairedEffect, accuracy_above, mean_with_ci
from harness.statistics.verdicts import ClaimResult

TESTS = ("critical_layer", "final_above_chance", "step_selectivity")
N_LAYER_DRAWS = 1000


@dataclass(frozen=True)
class ProbeParams(Params):
    test: str = choices(*TESTS)
    label: str = choices(*TARGETS, default="answer_last_digit")  # what the probe decodes (at the hub)
    step: int = 1  # step_selectivity: which solution step's result
    heads: tuple[str, ...] = ()  # critical_layer: the heads whose layers are compared
    n_heads: int = 3
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"))
        if self.test != "critical_layer" and {"heads", "n_heads", "ranking"} & given:
            raise ValueError(f"heads / n_heads / ranking apply to test 'critical_layer', not {self.test!r}")
        if "step" in given and self.test != "step_selectivity":
            raise ValueError(f"step applies to test 'step_selectivity', not {self.test!r}")
        if "label" in given and self.test == "step_selectivity":
            raise ValueError("label applies to the hub probes; test 'step_selectivity' probes each step's result")
        if not 1 <= self.step <= MAX_PROBE_STEPS:
            raise ValueError(f"step is 1 to {MAX_PROBE_STEPS}, got {self.step}")


def hub_probes(run: ModelRun) -> ProbeResults:
    """Layer-wise probes at the hub thought over the test problems, cached."""

    def compute() -> np.ndarray:
        states = thought_states(run.codi, run.problems, run.hub_thought, run.batch_size, run.progress)
        return run_probes(states, run.problems, run.seed, run.progress).packed()

    def load() -> ProbeResults:
        key = run.key(kind="probes", thought=run.hub, seed=run.seed)
        return ProbeResults.unpack(run.cached(key, f"probes at {run.hub}", compute), run.problems)

    return run.remember("hub_probes", load)


def step_probe_results(run: ModelRun, n_steps: int = MAX_PROBE_STEPS) -> np.ndarray:
    """Probes of each step's result at every thought and layer, with the control task:
    [n_steps, 2, K, L + 1, N] per-problem correctness (-1: no such step), cached."""

    def compute() -> np.ndarray:
        states = all_thought_states(run.codi, run.problems, run.batch_size, run.progress)
        return step_probes(states, run.problems, n_steps, run.seed, run.progress)

    key = run.key(kind="step_probes", n_steps=n_steps, seed=run.seed)
    return run.cached(key, "step-result probes (every thought and layer)", compute)


def step_cell(run: ModelRun, step: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(thought, layer) of the best selectivity for `step` on the even-numbered problems that
    have it, and the task and control correctness there of the odd-numbered ones ([n] each)."""
    probes = step_probe_results(run)[step - 1]  # [2, K, L + 1, N]
    have = np.flatnonzero(probes[0, 0, 0] >= 0)
    if len(have) < 4:  # no probe was fitted: too few problems have the step
        return 0, 0, np.zeros(0), np.zeros(0)
    select, held = have[::2], have[1::2]
    selectivity = probes[0][..., select].mean(-1) - probes[1][..., select].mean(-1)  # [K, L + 1]
    thought, layer = np.unravel_index(int(np.argmax(selectivity)), selectivity.shape)
    return int(thought), int(layer), probes[0, thought, layer, held], probes[1, thought, layer, held]


def measure(p: ProbeParams, run: ModelRun, measure: str) -> Measured:
    if p.test == "step_selectivity":
        thought, layer, task, control = step_cell(run, p.step)
        if len(task) < 2:
            note = f"too few problems with a step {p.step} to probe it"
            return Measured(nan_effect(len(task)), {"step": p.step, "positions": [], "heads": [], "note": note})
        details = {"step": p.step, "positions": [f"CT{thought}"], "layer": layer, "heads": [],
                   "mode": f"probe (step {p.step} result, layer {layer})", "accuracy": float(100 * task.mean()),
                   "control_accuracy": float(100 * control.mean())}  # fmt: skip
        details["units"] = "points over control"
        return Measured(mean_with_ci(100.0 * (task.astype(float) - control), seed=run.seed), details)
    probes = hub_probes(run)
    task, control = probes.task[p.label], probes.control[p.label]  # [L + 1, n]
    if not task.shape[1]:
        n = int((probe_targets(run.problems)[p.label][0] >= 0).sum())
        note = f"{n} problem(s) have a {p.label!r} label: a cross-validated probe needs {MIN_PROBE_PROBLEMS}"
        return Measured(nan_effect(0), {"label": p.label, "positions": [run.hub], "heads": [], "note": note})
    details = {"label": p.label, "hub": run.hub, "positions": [run.hub], "mode": f"probe ({p.label})",
               "critical_layer": critical_layer(task, control), "heads": []}  # fmt: skip
    if p.test == "final_above_chance":
        ch = chance(probes.labels[p.label])
        details.update(chance=100 * ch, units="points over chance")
        return Measured(accuracy_above(task[-1], ch, seed=run.seed), details)
    heads, source = heads_for(run, p.heads, p.n_heads, p.ranking)
    head_layers = sorted({h.layer for h in heads})
    details.update(heads=[str(h) for h in heads], heads_from=source, head_layers=head_layers)
    selectivity = task.mean(-1) - control.mean(-1)  # [L + 1]
    details["selectivity"] = [float(100 * s) for s in selectivity]
    if selectivity[details["critical_layer"] + 1] <= 0:
        note = "the probe never beats its control task after the critical layer: no layer to locate"
        return Measured(nan_effect(task.shape[1]), {**details, "note": note, "units": "layers"})

    def distance(columns: np.ndarray) -> int:
        crit = critical_layer(task[:, columns], control[:, columns])
        return min(abs(crit - layer) for layer in head_layers)

    n = task.shape[1]
    rng = np.random.default_rng(run.seed)
    draws = np.array([distance(rng.integers(0, n, n)) for _ in range(N_LAYER_DRAWS)])
    low, high = np.percentile(draws, [2.5, 97.5])
    effect = PairedEffect(float(distance(np.arange(n))), float(low), float(high), float("nan"), n, "bootstrap share")
    return Measured(effect, {**details, "units": "layers"}, bootstrap=draws)


def step_table(run: ModelRun) -> pd.DataFrame:
    """Per step, thought and layer: task and control accuracy of the step probes (%)."""
    probes = step_probe_results(run)  # [steps, 2, K, L + 1, N]
    rows = []
    for j, thought, layer in np.ndindex(probes.shape[0], probes.shape[2], probes.shape[3]):
        task, control = probes[j, 0, thought, layer], probes[j, 1, thought, layer]
        have = task >= 0
        if have.sum():
            acc, ctrl = 100 * task[have].mean(), 100 * control[have].mean()
            rows.append({"step": j + 1, "thought": f"CT{thought}", "layer": layer, "n": int(have.sum()),
                         "accuracy": acc, "control_accuracy": ctrl, "selectivity": acc - ctrl})  # fmt: skip
    columns = ["step", "thought", "layer", "n", "accuracy", "control_accuracy", "selectivity"]
    return pd.DataFrame(rows, columns=columns)


def _step_figure(model: str, table: pd.DataFrame) -> Figure:
    steps = sorted(table.step.unique())
    fig = Figure(figsize=(3.2 * len(steps), 3.2), layout="constrained")
    for ax, step in zip(np.atleast_1d(fig.subplots(1, len(steps))), steps):
        grid = table[table.step == step].pivot(index="thought", columns="layer", values="selectivity")
        image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-30, vmax=30, aspect="auto")
        ax.set_yticks(range(len(grid.index)), grid.index)
        ax.set(xlabel="layer (0 = the thought as fed in)", title=f"step {step} result")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{model}: probe selectivity (task - control, points) of each step's result")
    return fig


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    hub_models = list(dict.fromkeys(r.model for r in results if r.details.get("label")))
    step_models = list(dict.fromkeys(r.model for r in results if "step" in r.details))
    tables, figures = {}, {}
    if hub_models:
        frames = [hub_probes(runs[m]).table().assign(model=m, hub=runs[m].hub) for m in hub_models]
        table = pd.concat(frames, ignore_index=True)[
            ["model", "hub", "target", "layer", "accuracy", "control_accuracy", "selectivity", "chance"]
        ]
        tables["probes"] = table
        for target, group in table.groupby("target", sort=False):
            fig = Figure(figsize=(6, 4))
            ax = fig.subplots()
            for name, g in group.groupby("model", sort=False):
                n = len(runs[name].problems)
                err = wilson_err(g.accuracy, n)
                probe = ax.errorbar(g.layer, g.accuracy, err, marker="o", capsize=3, label=f"{name} probe")
                colour = probe.lines[0].get_color()
                err = wilson_err(g.control_accuracy, n)
                ax.errorbar(g.layer, g.control_accuracy, err, ls="--", capsize=2, color=colour, label=f"{name} control")
                ax.axhline(g.chance.iloc[0], color=colour, ls=":", lw=1, label=f"{name} chance")
            ax.set(xlabel="layer (0 = the thought as fed in)", ylabel="held-out accuracy (%, 95% Wilson CI)")
            ax.set_title(f"{target} at the hub")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
            figures[f"probes_{target}"] = fig
    if step_models:
        steps = {m: step_table(runs[m]) for m in step_models}
        tables["probe_steps"] = pd.concat([t.assign(model=m) for m, t in steps.items()], ignore_index=True)
        figures.update({f"probe_steps_{m}": _step_figure(m, t) for m, t in steps.items() if len(t)})
    return Section("Linear probes: the answer at the hub thought, each step's result at every thought (3.1)", tables,
                   figures)  # fmt: skip


KIND = Kind(
    "probe_layer",
    ProbeParams,
    measure,
    section,
    "linear probes per layer at the hub thought, with a control task",
    measures=("accuracy",),
    effect_unit="layers or probe accuracy above chance",
)
