"""Interchange patching (metric `interchange`): thoughts of a source problem (the base question
with one number of its annotated chain changed: `harness.data.counterfactuals`) patched into its
base problem; the share of pairs whose answer becomes
the counterfactual one (interchange intervention accuracy), stays the base answer, or neither.

Pairs count where the model answers both the base and the source right unpatched (so each
answer is the one its intermediate values imply). The thoughts patched: named (`positions`),
or the thought that best decodes solution step `lens_step` by the logit lens on the discovery
split. Effect: the outcome's share (points), bootstrap CI over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.data.counterfactuals import Counterfactuals, counterfactuals
from harness.data.problems import Problem, data_hash
from harness.interventions.specs import check_thought_positions
from harness.judgment.kinds.base import Kind, Measured, Params, Section, choices, forbid_together, nan_effect
from harness.judgment.kinds.logit_lens import lens_hits
from harness.measures.evaluation import evaluate
from harness.measures.interchange import interchange
from harness.measures.lens import MAX_LENS_STEPS, position_names
from harness.measures.runner import ModelRun
from harness.runtime.positions import thought_number
from harness.statistics.effects import mean_with_ci
from harness.statistics.verdicts import ClaimResult

OUTCOMES = ("counterfactual", "base", "neither")
NO_VALID_PAIR = "no pair answered right on both sides"  # the note where no pair can be measured


@dataclass(frozen=True)
class InterchangeParams(Params):
    positions: tuple[str, ...] = ("latent",)  # the thoughts patched: CT<i> or latent (all)
    lens_step: int | None = None  # instead: the thought that best decodes this step (logit lens, discovery)
    outcome: str = choices(*OUTCOMES, default="counterfactual")

    def validate(self, given: set[str]) -> None:
        forbid_together(given, ("positions", "lens_step"))
        check_thought_positions(self.positions)
        if self.lens_step is not None and not 1 <= self.lens_step <= MAX_LENS_STEPS:
            raise ValueError(
                f"lens_step is 1 (the first intermediate result) to {MAX_LENS_STEPS}, got {self.lens_step}"
            )


def made(run: ModelRun) -> Counterfactuals:
    """The counterfactual pairs of the run's problems and the reasons for the rest (memoised)."""
    return run.remember("counterfactuals", lambda: counterfactuals(run.problems, run.seed))


def pairs(run: ModelRun) -> tuple[list[int], list[Problem]]:
    """Interchange pairs: (indices of the base test problems, their counterfactual sources)."""
    index = {p.id: i for i, p in enumerate(run.problems)}
    return [index[pair.base.id] for pair in made(run).pairs], [pair.source for pair in made(run).pairs]


def no_pairs_note(run: ModelRun) -> str:
    """Why a run has no pair: its problems' rejections, most frequent first."""
    reasons = sorted(made(run).reasons().items(), key=lambda kv: -kv[1])
    why = "; ".join(f"{n} {reason}" for reason, n in reasons[:3])
    return f"no counterfactual pair among the {len(run.problems)} problems ({why})"


def pairs_used(run: ModelRun, valid: int) -> str:
    """What a row ran on: e.g. "35 of 55 pairs right on both sides (55 of 60 problems paired)"."""
    n = len(made(run).pairs)
    return f"{valid} of {n} pairs right on both sides ({n} of {len(run.problems)} problems paired)"


def valid_pairs(run: ModelRun) -> np.ndarray:
    """[n_pairs] whether the model answers the base and its source right, unpatched: the pairs
    an interchange is counted on."""
    return (run.baseline.correct[pairs(run)[0]] == 1) & (sources_correct(run) == 1)


def counted_pairs(run: ModelRun) -> tuple[list[Problem], list[Problem]]:
    """The valid pairs alone, (their bases, their sources) in pair order: what an interchange
    runs (the runtime is batch-invariant: the same answers as running every pair and keeping
    the valid ones)."""
    indices, sources = pairs(run)
    valid = valid_pairs(run)
    return [run.problems[i] for i, v in zip(indices, valid) if v], [s for s, v in zip(sources, valid) if v]


def interchanged(run: ModelRun, thoughts: tuple[int, ...]) -> np.ndarray:
    """Each valid pair's base run with thoughts `thoughts` from its source: [3, n_valid] (answer
    is the counterfactual, answer is the base's, log-prob of the counterfactual), cached."""
    bases, kept = counted_pairs(run)
    if not kept:
        return np.zeros((3, 0))

    def compute() -> np.ndarray:
        result, stays = interchange(
            run.codi, bases, kept, thoughts, run.batch_size, run.progress, max_new_tokens=run.max_new_tokens
        )
        return np.array([[r.correct for r in result.records], stays, [r.answer_logprob for r in result.records]])

    key = run.key(kind="interchange", thoughts=sorted(thoughts), sources=data_hash(kept))
    return run.cached(key, f"interchange of thoughts {', '.join(f'CT{t}' for t in sorted(thoughts))}", compute)


def sources_correct(run: ModelRun) -> np.ndarray:
    """Whether the model answers each pair's source right, unpatched: [n_pairs], cached."""
    sources = pairs(run)[1]

    def compute() -> np.ndarray:
        result = evaluate(run.codi, sources, run.batch_size, max_new_tokens=run.max_new_tokens, progress=run.progress)
        return np.array([r.correct for r in result.records])

    return run.cached(run.key(kind="interchange_sources", sources=data_hash(sources)),
                      "interchange sources (unpatched)", compute)  # fmt: skip


def thoughts_for(p: InterchangeParams, run: ModelRun) -> tuple[int, ...]:
    """Indices of the thoughts a claim patches (none: no discovery problem has `lens_step`)."""
    if p.lens_step is not None:
        k = p.lens_step - 1
        found, chance, have = lens_hits(run, "discovery", "thought", 1)
        if k >= have.shape[1] or have[:, k].sum() < 2:
            return ()
        excess = found[have[:, k], 1:, k].mean(0) - chance[have[:, k], 1:, k].mean(0)  # [K]: CT0.. (not bot)
        return (int(np.argmax(excess)),)
    if "latent" in p.positions:
        return tuple(range(run.n_latent))
    return tuple(sorted(thought_number(name) for name in p.positions))


def outcomes(run: ModelRun, thoughts: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per valid pair (both answered right unpatched), whether the patched answer is each
    outcome: {outcome: [n] bool}."""
    moved, stayed, _ = interchanged(run, thoughts).astype(float)
    moved, stayed = moved == 1, stayed == 1
    return {"counterfactual": moved, "base": stayed, "neither": ~moved & ~stayed}


def measure(p: InterchangeParams, run: ModelRun, measure: str) -> Measured:
    thoughts = thoughts_for(p, run)
    names = [f"CT{i}" for i in thoughts]
    details = {"heads": [], "positions": names, "mode": f"interchange ({p.outcome})", "outcome": p.outcome,
               "n_pairs": len(pairs(run)[0])}  # fmt: skip
    if not thoughts:
        return Measured(nan_effect(0), {**details, "note": f"no discovery problems with step {p.lens_step}"})
    if not pairs(run)[0]:
        return Measured(nan_effect(0), {**details, "note": no_pairs_note(run)})
    shares = outcomes(run, thoughts)
    details["mode"] += f" on {pairs_used(run, len(shares[p.outcome]))}"
    if not len(shares[p.outcome]):
        return Measured(nan_effect(0), {**details, "note": NO_VALID_PAIR})
    details.update({f"{o}_share": float(100 * v.mean()) for o, v in shares.items()})
    effect = mean_with_ci(100.0 * shares[p.outcome].astype(float), seed=run.seed)
    return Measured(effect, {**details, "units": "% of pairs"})


def interchange_table(run: ModelRun) -> pd.DataFrame:
    """Every thought alone, and all thoughts: the share of valid pairs per outcome (%)."""
    conditions = [(name, (i,)) for i, name in enumerate(position_names(run.n_latent)[1:])]
    rows = []
    for name, thoughts in [*conditions, ("all thoughts", tuple(range(run.n_latent)))]:
        shares = outcomes(run, thoughts)
        n = len(shares["base"])
        rows.append({"patched": name, "n_pairs": n, **{o: 100 * v.mean() if n else np.nan for o, v in shares.items()}})
    return pd.DataFrame(rows)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    models = [m for m in dict.fromkeys(r.model for r in results) if pairs(runs[m])[0]]
    tables = {m: interchange_table(runs[m]) for m in models}
    figures = {}
    if tables:
        fig = Figure(figsize=(5 * len(tables), 3.6), layout="constrained")
        for ax, (model, table) in zip(np.atleast_1d(fig.subplots(1, len(tables))), tables.items()):
            bottom = np.zeros(len(table))
            for outcome, color in zip(OUTCOMES, ("C2", "C0", "C7")):
                ax.bar(table.patched, table[outcome], bottom=bottom, color=color, label=outcome)
                bottom += table[outcome].to_numpy()
            ax.set(ylabel="pairs (%)", title=f"{model}: answer after patching the source's thoughts", ylim=(0, 100))
            ax.tick_params(axis="x", labelsize=7, rotation=30)
            ax.legend(fontsize=7)
        figures["interchange"] = fig
    frames = [t.assign(model=m) for m, t in tables.items()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Section("Interchange patching of the thoughts", {"interchange": table}, figures)


KIND = Kind(
    "interchange",
    InterchangeParams,
    measure,
    section,
    "a source problem's thoughts (one number of the question changed) patched into the base: share of answers "
    "that follow them",
    measures=("accuracy",),
    effect_unit="a share of pairs",
)
