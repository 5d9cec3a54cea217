"""The causal head sweep (metric `head_sweep`): every head alone ablated at every thought, in
both measures, beside attribution patching's first-order estimate of the same drops and the
attention ranking's composite score.

`test = "attention"`: Spearman's rho between the attention ranking's composite score and the
heads' ablation drops (does the attention ranking find the causal heads?); `test =
"attribution"`: rho between attribution patching's estimate and the ablation drops (is the
fast screen a stand-in for the sweep?). CI: percentile bootstrap over problems (the drops and
the estimates recomputed per resample); p: the share of resamples against the claim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from harness.causal import attribution_patching, sweep
from harness.experiments import ModelRun
from harness.kinds.base import Kind, Measured, Params, Section, by_model, choices
from harness.stats import PairedEffect
from harness.verdicts import ClaimResult

TESTS = ("attention", "attribution")
MODES = ("zero", "mean")  # attribution patching estimates these (resample has no fixed target)
N_RESAMPLES = 1000
TOP_SHOWN = 3  # heads named in the claim's details (top_heads): the sweep's top causal heads


@dataclass(frozen=True)
class SweepParams(Params):
    test: str = choices(*TESTS)  # what is correlated with the heads' ablation drops
    mode: str = choices(*MODES, default="zero")


def sweep_table(run: ModelRun, mode: str) -> pd.DataFrame:
    """One row per head (L0H0, L0H1, ...): its ablation drop in accuracy (points) and answer
    log-probability (nats), attribution patching's estimate of the latter, the attention
    ranking's composite score."""
    conditions = sweep(run, mode)
    base = run.baseline
    estimate = attribution_patching(run)[MODES.index(mode)].mean(0)  # [L, H]
    composite = run.ranking.set_index("name")["composite"]
    return pd.DataFrame(
        [
            {
                "head": str(h),
                "layer": h.layer,
                "head_index": h.head,
                "ablation_drop": 100.0 * float(np.mean(base.correct - c.correct)),
                "ablation_drop_logprob": float(np.mean(base.answer_logprob - c.answer_logprob)),
                "attribution": float(estimate[h.layer, h.head]),
                "composite": float(composite[str(h)]),
            }
            for h, c in zip(run.every_head, conditions)
        ]
    )


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    return float(spearmanr(x, y).statistic)


def measure(p: SweepParams, run: ModelRun, measure: str) -> Measured:
    conditions = sweep(run, p.mode)
    drops = run.baseline.values(measure)[None] - np.stack([c.values(measure) for c in conditions])  # [heads, N]
    if p.test == "attribution":
        scores = attribution_patching(run)[MODES.index(p.mode)]  # [N, L, H]
        per_problem = scores.reshape(len(scores), -1).T  # [heads, N], every_head order
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
    table = sweep_table(run, p.mode)
    top = table.sort_values("ablation_drop_logprob", ascending=False).head(TOP_SHOWN)
    details = {
        "test": p.test,
        "heads": [],  # every head was ablated, one at a time
        "top_heads": list(top["head"]),  # the largest log-prob drops on the test split
        "positions": ["latent"],
        "mode": f"every head alone, {p.mode}",
        "sweep": table.to_dict(orient="records"),
        "sweep_mode": p.mode,
        "units": "Spearman rho",
    }
    return Measured(PairedEffect(rho, float(low), float(high), float("nan"), n, "bootstrap share"), details,
                    bootstrap=draws)  # fmt: skip


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    frames, figures = {}, {}
    for model, group in by_model(results).items():
        for r in group:
            frames.setdefault((model, r.details["sweep_mode"]), pd.DataFrame(r.details["sweep"]))
    for (model, mode), table in frames.items():
        geo = runs[model].geometry
        fig = Figure(figsize=(11, 3.2), layout="constrained")
        panels = (("ablation_drop", "ablation drop (points)"), ("ablation_drop_logprob", "ablation drop (nats)"),
                  ("attribution", "attribution patching (nats)"))  # fmt: skip
        for ax, (column, title) in zip(fig.subplots(1, len(panels)), panels):
            grid = table[column].to_numpy().reshape(geo.n_layers, geo.n_heads)
            bound = float(np.nanmax(np.abs(grid))) or 1.0
            image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            ax.set(xlabel="head", ylabel="layer", title=title)
            ax.set_xticks(range(geo.n_heads))
            ax.set_yticks(range(geo.n_layers))
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"{model}: every head alone {mode}-ablated at every thought")
        figures[f"sweep_{model}_{mode}"] = fig
    table = pd.concat([t.assign(model=m, mode=mode) for (m, mode), t in frames.items()], ignore_index=True)
    return Section("Causal head sweep and attribution patching", {"sweep": table}, figures)


KIND = Kind(
    "head_sweep",
    SweepParams,
    measure,
    section,
    "every head alone ablated at the thoughts; Spearman of the attention ranking or attribution patching with it",
    effect_unit="a Spearman rank correlation",
    error_analysis=False,  # every head alone: no single intervention of the claim's own
)
