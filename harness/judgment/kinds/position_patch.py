"""Thought patching (metric `position_drop`): continuous thoughts replaced by norm-matched
noise, zero, the discovery mean or another problem's thought; the drop from baseline.

`which` names the seed's comparisons over every thought (`hub`, `max_non_hub`,
`hub_minus_non_hub`); `positions` patches the named thoughts together in one condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from harness.interventions.specs import THOUGHT_MODES, PatchThoughts, check_thought_positions
from harness.judgment.kinds.base import Kind, Measured, Params, Section, baseline_value, choices
from harness.measures.runner import Condition, ModelRun
from harness.statistics.effects import difference_of_draws
from harness.statistics.verdicts import ClaimResult

WHICH = ("hub", "max_non_hub", "hub_minus_non_hub")


@dataclass(frozen=True)
class PositionParams(Params):
    which: str | None = choices(*WHICH, default=None)  # default "hub" unless `positions` is given
    positions: tuple[str, ...] = ()  # thoughts patched together: CT<i> or latent
    mode: str = choices(*THOUGHT_MODES, default="noise")
    n_draws: int = 5  # independent draws of noise / derangements

    def validate(self, given: set[str]) -> None:
        if "which" in given and "positions" in given:
            raise ValueError("give 'which' or 'positions', not both: one would be ignored")
        if "positions" in given and not self.positions:
            raise ValueError("positions is empty")
        check_thought_positions(self.positions)
        if self.n_draws < 1:
            raise ValueError("n_draws must be at least 1")
        if "n_draws" in given and self.mode not in ("noise", "resample"):
            raise ValueError(f"n_draws applies to modes 'noise' and 'resample'; mode {self.mode!r} is deterministic")

    def check_direction(self, direction: str) -> None:
        """The composite comparisons judge one member, chosen for one direction: the largest
        non-hub drop answers "every non-hub drop is below t", the smallest hub-minus-non-hub
        difference "the hub's drop exceeds every non-hub drop"."""
        judged = {"max_non_hub": ("less", "the largest non-hub drop"),
                  "hub_minus_non_hub": ("greater", "the smallest hub-minus-non-hub difference")}  # fmt: skip
        if self.which in judged and direction != judged[self.which][0]:
            needs, member = judged[self.which]
            raise ValueError(
                f"which {self.which!r} judges {member}: it answers direction {needs!r} only "
                "(name thoughts with positions for other comparisons)"
            )


def _draws(run: ModelRun, positions: tuple[str, ...], p: PositionParams) -> list[Condition]:
    return run.measure_draws(PatchThoughts(positions, p.mode), p.n_draws)


def measure(p: PositionParams, run: ModelRun, measure: str) -> Measured:
    base = {"mode": p.mode, "baseline_accuracy": baseline_value(run, "accuracy"), "hub": run.hub}
    if p.positions:
        draws = _draws(run, p.positions, p)
        details = {**base, "positions": list(p.positions), "n_draws": len(draws), "heads": []}
        return Measured(run.effect(draws, measure), {**details, "accuracy": _acc(draws)})
    names = [f"CT{i}" for i in range(run.n_latent)]
    draws = {name: _draws(run, (name,), p) for name in names}
    effects = {name: run.effect(d, measure) for name, d in draws.items()}
    details = {
        **base,
        "n_draws": len(draws[run.hub]),
        "per_thought": {k: [v.effect, v.ci_low, v.ci_high] for k, v in effects.items()},
        "per_thought_accuracy": {k: _acc(d) for k, d in draws.items()},
    }
    which = p.which or "hub"
    patch = lambda name: PatchThoughts((name,), p.mode)  # noqa: E731  (the claim's own, for the error analysis)
    if which == "hub":
        return Measured(effects[run.hub], {**details, "positions": [run.hub]}, main=patch(run.hub))
    others = [k for k in names if k != run.hub]
    if which == "max_non_hub":  # "each non-hub drop < t": judged on the largest
        worst = max(others, key=lambda k: effects[k].effect)
        return Measured(effects[worst], {**details, "positions": [worst], "worst": worst}, main=patch(worst))
    # "the hub's drop exceeds every non-hub drop": the smallest paired difference, draw by draw
    diffs = {}
    hub_values = np.stack([d.values(measure) for d in draws[run.hub]])  # [D, N]
    for k in others:
        other = np.stack([d.values(measure) for d in draws[k]])  # [D, N]: draw d beside the hub's draw d
        diffs[k] = difference_of_draws(other, hub_values, measure, seed=run.seed)
    closest = min(diffs, key=lambda k: diffs[k].effect)
    return Measured(
        diffs[closest], {**details, "positions": [run.hub, closest], "closest": closest}, main=patch(run.hub)
    )


def _acc(draws: list[Condition]) -> float:
    return 100.0 * float(np.mean([d.accuracy for d in draws]))


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    per_thought = [r for r in results if "per_thought" in r.details and r.measure == "accuracy"]
    rows = []
    for r in {(r.model, r.details["mode"]): r for r in per_thought}.values():
        for name, (effect, low, high) in r.details["per_thought"].items():
            rows.append({"model": r.model, "mode": r.details["mode"], "position": name, "hub": name == r.details["hub"],
                         "n_draws": r.details["n_draws"], "accuracy": r.details["per_thought_accuracy"][name],
                         "drop": effect, "ci_low": low, "ci_high": high})  # fmt: skip
    named = [
        {
            "claim": r.id,
            "model": r.model,
            "positions": " ".join(r.details["positions"]),
            "mode": r.details["mode"],
            "measure": r.measure,
            "n_draws": r.details["n_draws"],
            "drop": r.effect,
            "ci_low": r.ci_low,
            "ci_high": r.ci_high,
        }  # fmt: skip
        for r in results
        if "per_thought" not in r.details
    ]
    tables = {}
    if rows:  # the seed's shape: position, <model>_drop (noise; other modes <model>_<mode>_drop), CIs
        long = pd.DataFrame(rows)
        wide = pd.DataFrame({"position": list(dict.fromkeys(long.position))})
        for (model, mode), g in long.groupby(["model", "mode"], sort=False):
            prefix = model if mode == "noise" else f"{model}_{mode}"
            for column in ("drop", "ci_low", "ci_high"):
                wide[f"{prefix}_{column}"] = g[column].to_numpy()
        tables["positions"] = wide
    if named:
        tables["positions_named"] = pd.DataFrame(named)
    figures = {}
    if rows:
        table = pd.DataFrame(rows)
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        groups = list(table.groupby(["model", "mode"], sort=False))
        width = 0.8 / len(groups)
        handles = []
        for j, ((model, mode), g) in enumerate(groups):
            x = np.arange(len(g)) + j * width
            err = [g["drop"] - g["ci_low"], g["ci_high"] - g["drop"]]
            bars = ax.bar(x, g["drop"], width, yerr=err, capsize=3, color=f"C{j}")
            handles.append(Patch(color=f"C{j}", label=f"{model} ({mode})"))
            for bar, high, is_hub in zip(bars, g["ci_high"], g["hub"]):
                if is_hub:  # the model's hub thought: hatched and labelled above its CI
                    bar.set_hatch("//")
                    ax.annotate(f"{model} hub", (bar.get_x() + width / 2, high), ha="center", va="bottom", fontsize=7)
        names = groups[0][1]["position"].tolist()
        ax.set_xticks(np.arange(len(names)) + width * (len(groups) - 1) / 2, names)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(ylabel="accuracy drop (points, 95% CI)", title="Each thought patched (hatched: the model's hub)")
        ax.legend(handles=handles, fontsize=7)
        figures["positions"] = fig
    return Section("Thought patching", tables, figures)


KIND = Kind(
    "position_drop",
    PositionParams,
    measure,
    section,
    "continuous thoughts replaced (noise / zero / mean / resample); drop from baseline",
    baseline_relative=True,
)
