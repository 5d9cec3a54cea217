"""The causal head sweep (metric `head_sweep`): every head alone ablated at every thought, in
both measures, beside a gradient screen's estimate of the same drops (attribution patching or
integrated gradients along the all-heads path) and the attention ranking's composite score.

`test = "attention"`: Spearman's rho between the attention ranking's composite score and the
heads' ablation drops (does the attention ranking find the causal heads?); `test =
"attribution"`: rho between the claim's `screen` and the ablation drops (is that screen a
stand-in for the sweep?), with the overlap of their top 3. CI: percentile bootstrap over
problems (the drops and the estimates recomputed per resample); p: the share of resamples
against the claim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from harness.interventions.specs import Baseline
from harness.judgment.kinds.base import Kind, Measured, Params, Section, by_model, choices
from harness.measures.causal import (
    SCREEN_STEPS,
    SCREENS,
    Component,
    components,
    screen_estimates,
    screened,
    stacked,
    sweep,
)
from harness.measures.runner import ModelRun
from harness.statistics.effects import PairedEffect
from harness.statistics.verdicts import ClaimResult

TESTS = ("attention", "attribution")
RESOLUTIONS = ("head", "head_thought")
MODES = ("zero", "mean")  # the screens estimate these (resample has no fixed target)
SCREEN_NAMES = {"atp": "attribution patching", "ig": "integrated gradients"}
N_RESAMPLES = 1000
TOP_SHOWN = 3  # heads named in the claim's details (top_heads): the sweep's top causal heads


@dataclass(frozen=True)
class SweepParams(Params):
    test: str = choices(*TESTS)  # what is correlated with the heads' ablation drops
    mode: str = choices(*MODES, default="zero")
    screen: str = choices(*SCREENS, default="atp")  # test "attribution": which gradient screen
    steps: int = SCREEN_STEPS  # screen "ig": points on the path from ablated to clean
    resolution: str = choices(*RESOLUTIONS, default="head")  # a head at every thought, or at each thought alone

    def validate(self, given: set[str]) -> None:
        if self.resolution == "head_thought" and self.test == "attention":
            raise ValueError("the attention ranking scores heads, not heads at a thought: resolution 'head_thought' "
                             "takes test 'attribution'")  # fmt: skip
        if self.test == "attention" and {"screen", "steps"} & given:
            raise ValueError("screen and steps apply to test 'attribution'; test 'attention' reads no screen")
        if self.screen == "atp" and "steps" in given:
            raise ValueError("steps applies to screen 'ig'; attribution patching is one pass at the clean model")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    def check_measure(self, measure: str) -> None:
        if self.resolution == "head_thought" and measure != "answer_logprob":
            raise ValueError(f"resolution 'head_thought' is a stacked teacher-forced sweep: measure 'answer_logprob', "
                             f"not {measure!r}")  # fmt: skip

    def unused(self) -> set[str]:
        if self.test == "attention":
            return super().unused() | {"screen", "steps"}
        return super().unused() | ({"steps"} if self.screen == "atp" else set())


def screen_label(screen: str, steps: int) -> str:
    return SCREEN_NAMES[screen] + (f" ({steps} steps)" if screen == "ig" else "")


def sweep_drops(run: ModelRun, mode: str, measure: str, resolution: str = "head") -> tuple[list[Component], np.ndarray]:
    """Every component alone ablated and its drop per problem, [C, N]: at head resolution the
    single-head conditions (either measure); at head x thought the stacked teacher-forced
    ablations (answer log-probability)."""
    parts = components(run, resolution)
    if resolution == "head":
        conditions = sweep(run, mode)
        return parts, run.baseline.values(measure)[None] - np.stack([c.values(measure) for c in conditions])
    return parts, run.answer_logprobs(Baseline())[None] - stacked(run, parts, mode)


def sweep_table(
    run: ModelRun, mode: str, screen: str = "atp", steps: int = SCREEN_STEPS, resolution: str = "head"
) -> pd.DataFrame:
    """One row per component (`head` L0H0 at `position` latent, ...; at head x thought CT0,
    CT1, ...): its ablation drop in accuracy (points; head resolution only) and answer
    log-probability (nats), the screen's estimate of the latter (`attribution`), the attention
    ranking's composite score of its head."""
    parts, drops = sweep_drops(run, mode, "answer_logprob", resolution)
    points = (sweep_drops(run, mode, "accuracy")[1].mean(1) * 100.0) if resolution == "head" else [np.nan] * len(parts)
    estimate = screened(screen_estimates(run, screen, mode, steps), parts).mean(1)  # [C]
    composite = run.ranking.set_index("name")["composite"]
    return pd.DataFrame(
        [
            {
                "head": str(c.head),
                "position": c.position,
                "layer": c.head.layer,
                "head_index": c.head.head,
                "ablation_drop": float(point),
                "ablation_drop_logprob": float(drop),
                "attribution": float(e),
                "composite": float(composite[str(c.head)]),
            }
            for c, point, drop, e in zip(parts, points, drops.mean(1), estimate)
        ]
    )


def top_overlap(estimate: np.ndarray, drops: np.ndarray, k: int = TOP_SHOWN) -> float:
    """The share of the sweep's top k (largest drops) that the estimate's top k also holds."""
    return len(set(np.argsort(-estimate, kind="stable")[:k]) & set(np.argsort(-drops, kind="stable")[:k])) / k


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    return float(spearmanr(x, y).statistic)


def measure(p: SweepParams, run: ModelRun, measure: str) -> Measured:
    parts, drops = sweep_drops(run, p.mode, measure, p.resolution)  # [C, N]
    if p.test == "attribution":
        per_problem = screened(screen_estimates(run, p.screen, p.mode, p.steps), parts)  # [C, N]
    else:
        composite = run.ranking.set_index("name")["composite"]
        fixed = np.array([composite[str(h)] for h in run.every_head])
        per_problem = np.repeat(fixed[:, None], drops.shape[1], axis=1)  # chosen on discovery: fixed
    n = drops.shape[1]
    rng = np.random.default_rng(run.seed)
    draws = np.array(
        [
            _rho(per_problem[:, i].mean(1), drops[:, i].mean(1))
            for i in (rng.integers(0, n, n) for _ in range(N_RESAMPLES))
        ]
    )
    rho = _rho(per_problem.mean(1), drops.mean(1))
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    table = sweep_table(run, p.mode, p.screen, p.steps, p.resolution)
    top = table.sort_values("ablation_drop_logprob", ascending=False).head(TOP_SHOWN)
    top_names = [h if pos == "latent" else f"{h}@{pos}" for h, pos in zip(top["head"], top["position"])]
    details = {
        "test": p.test,
        "screen": p.screen if p.test == "attribution" else None,
        "screen_label": screen_label(p.screen, p.steps) if p.test == "attribution" else None,
        "top_overlap": top_overlap(per_problem.mean(1), drops.mean(1)),
        "heads": [],  # every head was ablated, one at a time
        "top_heads": top_names,  # the largest log-prob drops on the test split
        "positions": ["latent"],
        "mode": f"every head alone, {p.mode}" + (" at each thought alone" if p.resolution == "head_thought" else ""),
        "resolution": p.resolution,
        "sweep": table.to_dict(orient="records"),
        "sweep_mode": p.mode,
        "units": "Spearman rho",
    }
    return Measured(PairedEffect(rho, float(low), float(high), float("nan"), n, "bootstrap share"), details,
                    bootstrap=draws)  # fmt: skip


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    """Per model, mode and resolution, L x H heat maps of the sweep's drops and of each
    screen's estimate (at head x thought, one column per thought), and a table of how each
    ranking (attention, every screen) agrees with the sweep."""
    frames: dict[tuple[str, str, str], pd.DataFrame] = {}
    estimates: dict[tuple[str, str, str], dict[str, tuple[pd.Series, str]]] = {}
    rows = []
    for model, group in by_model(results).items():
        for r in group:
            resolution = r.details.get("resolution", "head")
            key, table = (model, r.details["sweep_mode"], resolution), pd.DataFrame(r.details["sweep"])
            frames.setdefault(key, table)
            label = r.details.get("screen_label")
            if label:
                shared = round(r.details["top_overlap"] * TOP_SHOWN)
                agreement = f"rho {r.effect:+.2f}, top {TOP_SHOWN} {shared}/{TOP_SHOWN} with the sweep"
                estimates.setdefault(key, {})[label] = (table["attribution"], agreement)
            rows.append({"model": model, "mode": r.details["sweep_mode"], "resolution": resolution, "claim": r.id,
                         "ranked_by": label or "attention ranking (composite)", "rho": r.effect,
                         "ci_low": r.ci_low, "ci_high": r.ci_high,
                         f"top{TOP_SHOWN}_overlap": r.details.get("top_overlap")})  # fmt: skip
    figures = {}
    for (model, mode, resolution), table in frames.items():
        panels = [(table["ablation_drop_logprob"], "ablation drop (nats)")]
        if resolution == "head":
            panels.insert(0, (table["ablation_drop"], "ablation drop (points)"))
        panels += [(column, f"{label} (nats)\n{agreement}") for label, (column, agreement) in estimates.get(
            (model, mode, resolution), {}).items()]  # fmt: skip
        fig = _heat_maps(panels, runs[model].geometry, runs[model].n_latent if resolution == "head_thought" else 0)
        where = "at each thought alone" if resolution == "head_thought" else "at every thought"
        fig.suptitle(f"{model}: every head alone {mode}-ablated {where}, and the screens' estimates")
        figures[f"sweep_{model}_{mode}" + ("_by_thought" if resolution == "head_thought" else "")] = fig
    table = pd.concat([t.assign(model=m, mode=mode, resolution=res) for (m, mode, res), t in frames.items()],
                      ignore_index=True)  # fmt: skip
    tables = {"sweep": table, "sweep_rankings": pd.DataFrame(rows)}
    return Section("Causal head sweep and the screens", tables, figures)


def _heat_maps(panels: list[tuple[pd.Series, str]], geo, n_thoughts: int) -> Figure:
    """L x H heat maps: one per panel side by side (`n_thoughts` 0), or one row per panel with
    a column per thought (the values in layer, head, thought order)."""
    columns = max(n_thoughts, 1)
    if n_thoughts:
        fig = Figure(figsize=(2.3 * columns + 1.0, 2.6 * len(panels)), layout="constrained")
        axes = fig.subplots(len(panels), columns, squeeze=False)
    else:
        fig = Figure(figsize=(3.7 * len(panels), 3.2), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False).T
    for row, (values, title) in zip(axes, panels):
        grids = values.to_numpy().reshape(geo.n_layers, geo.n_heads, columns)  # [L, H, K]
        bound = float(np.nanmax(np.abs(grids))) or 1.0
        for k, ax in enumerate(row):
            image = ax.imshow(grids[:, :, k], cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            if n_thoughts:  # the panel's name once, beside its row
                ax.set(xlabel="head", ylabel=f"{title}\nlayer" if k == 0 else "layer", title=f"CT{k}")
            else:
                ax.set(xlabel="head", ylabel="layer", title=title)
            ax.set_xticks(range(geo.n_heads))
            ax.set_yticks(range(geo.n_layers))
        fig.colorbar(image, ax=list(row), shrink=0.8)
    return fig


KIND = Kind(
    "head_sweep",
    SweepParams,
    measure,
    section,
    "every head alone ablated at the thoughts; Spearman of the attention ranking or a gradient screen with it",
    effect_unit="a Spearman rank correlation",
    error_analysis=False,  # every head alone: no single intervention of the claim's own
)
