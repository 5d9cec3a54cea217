"""Integrated gradients of the critical heads' output at the hub thought back to the question
tokens (metric `attribution_share`): a token category's share of the attribution minus its
share of the question's tokens, per problem (mean over heads); CI by bootstrap over problems,
p by a two-sided Wilcoxon signed-rank test."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.judgment.kinds.base import Kind, Measured, Params, Section, choices, forbid_together
from harness.measures.attribution import CATEGORIES, Attributions, integrated_gradients, question_tokens
from harness.measures.causal import RANKINGS, heads_for
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head
from harness.statistics.effects import mean_with_ci
from harness.statistics.verdicts import ClaimResult

IG_PROBLEMS = 100  # problems attributed by integrated gradients (3.2)
IG_STEPS = 32

HEATMAP_PROBLEMS = 3


@dataclass(frozen=True)
class AttributionParams(Params):
    category: str = choices(*CATEGORIES, default="number")
    heads: tuple[str, ...] = ()
    n_heads: int = 3
    ranking: str = choices(*RANKINGS, default="attention")  # the top heads of which ranking

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("heads", "n_heads"), ("heads", "ranking"))
        if self.n_heads < 1:
            raise ValueError("n_heads must be at least 1")


def attributions(
    run: ModelRun, heads: list[Head], n_problems: int = IG_PROBLEMS, n_steps: int = IG_STEPS
) -> Attributions:
    """Integrated gradients of each head's output at the hub thought, cached."""
    problems, thought = run.problems[:n_problems], run.hub_thought

    def compute() -> np.ndarray:
        return integrated_gradients(run.codi, problems, heads, thought, n_steps, progress=run.progress).packed()

    spec = {"kind": "integrated_gradients", "heads": list(map(str, heads)), "thought": thought, "n": n_problems}
    packed = run.cached(run.key(**spec, n_steps=n_steps), f"integrated gradients {' '.join(spec['heads'])}", compute)
    tokens = run.cache.get_or_compute(  # as the tokenizer spells them, kept: a warm run loads no model
        run.key(kind="question_tokens", n=n_problems),
        lambda: np.asarray(json.dumps(question_tokens(run.codi, problems))),
    )
    return Attributions.unpack(packed, json.loads(str(tokens)))


def measure(p: AttributionParams, run: ModelRun, measure: str) -> Measured:
    heads, source = heads_for(run, p.heads, p.n_heads, p.ranking)
    ig = attributions(run, heads)
    attr, tokens = ig.shares()  # [N, H, C], [N, C]
    c = CATEGORIES.index(p.category)
    excess = 100.0 * (attr[:, :, c].mean(1) - tokens[:, c])  # [N] points
    gaps = np.abs(ig.outputs)
    details = {
        "category": p.category,
        "heads": [str(h) for h in heads],
        "heads_from": source,
        "positions": [run.hub],
        "mode": "integrated gradients",
        "attribution_share": float(100 * attr[:, :, c].mean()),
        "token_share": float(100 * tokens[:, c].mean()),
        "mean_abs_delta": float(np.abs(ig.deltas).mean()),
        "relative_delta": float(np.abs(ig.deltas).mean() / max(gaps.mean(), 1e-12)),
    }
    return Measured(mean_with_ci(excess, seed=run.seed), {**details, "units": "share points"})


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    rows, figures, seen = [], {}, set()
    for r in results:
        heads = tuple(r.details["heads"])
        if (r.model, heads) in seen:
            continue
        seen.add((r.model, heads))
        run = runs[r.model]
        ig = attributions(run, heads_for(run, heads, len(heads))[0])
        attr, tokens = ig.shares()  # [N, H, C], [N, C]
        for j, head in enumerate(heads):
            for c, category in enumerate(CATEGORIES):
                rows.append({"model": r.model, "head": head, "category": category,
                             "attribution_share": 100 * attr[:, j, c].mean(), "token_share": 100 * tokens[:, c].mean(),
                             "mean_abs_delta": float(np.abs(ig.deltas[:, j]).mean()),
                             "mean_abs_output_gap": float(np.abs(ig.outputs[:, j]).mean())})  # fmt: skip
        fig = Figure(figsize=(9, 2.4 * HEATMAP_PROBLEMS), layout="constrained")
        axes = fig.subplots(HEATMAP_PROBLEMS, 1, squeeze=False)[:, 0]
        for ax, i in zip(axes, range(min(HEATMAP_PROBLEMS, len(ig.tokens)))):
            toks = ig.tokens[i]
            scores = ig.scores[i][:, -len(toks) :]  # [H, T_i]
            bound = float(np.nanmax(np.abs(scores))) or 1.0
            ax.imshow(scores, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            ax.set_xticks(range(len(toks)), toks, rotation=90, fontsize=7)
            ax.set_yticks(range(len(heads)), heads, fontsize=7)
        fig.suptitle(f"{r.model}: integrated gradients of {', '.join(heads)} at {run.hub}")
        sets = sum(model == r.model for model, _ in seen)  # a model's second head set gets its own figure
        figures[f"attribution_{r.model}" + (f"_{sets}" if sets > 1 else "")] = fig
    return Section("Integrated gradients of the critical heads (3.2)", {"attribution": pd.DataFrame(rows)}, figures)


KIND = Kind(
    "attribution_share",
    AttributionParams,
    measure,
    section,
    "integrated gradients of heads at the hub thought: a token category's excess share of attribution",
    measures=("accuracy",),
    effect_unit="a share of attribution",
)
