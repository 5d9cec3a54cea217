"""Learned-subspace interchange (metric `das`, distributed alignment search; `harness/measures/das.py`).

For every thought and rank (1, 2, 4, 8, 16, up to the claim's `max_rank`) a subspace is trained on the discovery split's
interchange pairs (the base problem with a source that has another start value: same
operations, other intermediate values) so that swapping it in from the source gives the
source's answer. The claim's subspace is the thought and rank (at most `max_rank`) with the
best interchange-intervention accuracy on the discovery pairs; the effect is its accuracy on
the test pairs (the share of valid pairs whose answer becomes the source's, %), beside the
whole thought's interchange and `n_random` random subspaces of the same rank (the control).
Pairs count where the model answers both problems right unpatched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from harness.data.problems import data_hash
from harness.judgment.kinds.base import Kind, Measured, Params, Section, nan_effect
from harness.judgment.kinds.interchange import (
    NO_VALID_PAIR,
    counted_pairs,
    interchanged,
    no_pairs_note,
    pairs,
    pairs_used,
    valid_pairs,
)
from harness.measures.das import DAS_STEPS, RANKS, fit_subspaces, random_basis
from harness.measures.interchange import clean_thoughts, interchange
from harness.measures.runner import ModelRun
from harness.runtime.positions import thought_number
from harness.statistics.effects import mean_with_ci
from harness.statistics.verdicts import ClaimResult


@dataclass(frozen=True)
class DasParams(Params):
    thought: str = "best"  # CT<i>, or best: the thought with the best discovery accuracy
    max_rank: int = 8  # the subspace's rank is chosen among 1, 2, 4, 8, 16 up to this
    n_random: int = 20  # random subspaces of the same rank at the same thought (the control)
    against_control: bool = False  # threshold: a margin above the control's 95th percentile
    steps: int = DAS_STEPS  # optimiser steps per subspace (64 discovery pairs each)

    def validate(self, given: set[str]) -> None:
        if self.thought != "best" and thought_number(self.thought) is None:
            raise ValueError(f"thought is CT<i> or best, not {self.thought!r}")
        if self.max_rank not in RANKS:
            raise ValueError(f"max_rank is one of {', '.join(map(str, RANKS))}, got {self.max_rank}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.n_random < 0 or (self.against_control and self.n_random < 2):
            raise ValueError("n_random must be at least 0 (at least 2 with against_control)")

    def check_model(self, geo, n_latent: int, model: str) -> None:
        if self.thought != "best" and thought_number(self.thought) >= n_latent:
            raise ValueError(f"{model} has thoughts CT0..CT{n_latent - 1}, not {self.thought}")


def _discovery(run: ModelRun) -> ModelRun:
    return run.remember("discovery_run", run.on_discovery)


def ranks_upto(max_rank: int) -> tuple[int, ...]:
    """The ranks a claim with this `max_rank` chooses among (no other is fitted)."""
    return tuple(r for r in RANKS if r <= max_rank)


def subspaces(run: ModelRun, thought: int, ranks: tuple[int, ...], steps: int = DAS_STEPS) -> dict[int, torch.Tensor]:
    """The learned subspaces of CT_thought at each of `ranks`, fitted together on the discovery
    pairs (`fit_subspaces`): rank -> [rank, d], cached as one [R, max rank, d] array."""
    disc = _discovery(run)

    def compute() -> np.ndarray:
        indices, sources = pairs(disc)
        bases = [disc.problems[i] for i in indices]
        donor = clean_thoughts(run.codi, sources, run.batch_size)
        fitted = fit_subspaces(run.codi, bases, sources, donor, thought, ranks, run.seed, steps, run.progress)
        packed = np.zeros((len(ranks), max(ranks), donor.shape[-1]), dtype=np.float32)
        for j, rank in enumerate(ranks):
            packed[j, :rank] = fitted[rank].numpy()
        return packed

    key = disc.key(kind="das_subspaces", thought=thought, ranks=list(ranks), steps=steps, seed=run.seed)
    what = f"DAS subspaces CT{thought} ranks {', '.join(map(str, ranks))}"
    packed = run.remember(("das_subspaces", key), lambda: disc.cached(key, what, compute))
    return {rank: torch.from_numpy(packed[j, :rank].copy()) for j, rank in enumerate(ranks)}


def moved(run: ModelRun, thought: int, basis: torch.Tensor, what: str) -> np.ndarray:
    """Per valid pair of `run`'s problems: whether interchanging `basis`'s subspace of
    CT_thought from the source gives the source's answer: [n_valid] bool, cached (keyed by the
    basis itself). Only the valid pairs run (`counted_pairs`)."""
    bases, kept = counted_pairs(run)
    if not kept:
        return np.zeros(0, dtype=bool)

    def compute() -> np.ndarray:
        sources = pairs(run)[1]  # every pair's: the donor is shared by every subspace and draw
        donor = run.remember(("source_thoughts", data_hash(sources)),
                             lambda: clean_thoughts(run.codi, sources, run.batch_size))  # fmt: skip
        mask = torch.from_numpy(valid_pairs(run))
        result, _ = interchange(run.codi, bases, kept, (thought,), run.batch_size, run.progress, basis, donor[mask],
                                max_new_tokens=run.max_new_tokens)  # fmt: skip
        return np.array([r.correct for r in result.records])

    digest = hashlib.sha256(basis.numpy().astype(np.float32).tobytes()).hexdigest()[:16]
    key = run.key(kind="das_interchange", thought=thought, basis=digest, sources=data_hash(kept))
    return run.cached(key, f"subspace interchange CT{thought} ({what})", compute) == 1


def grid(run: ModelRun, thoughts: list[int], steps: int = DAS_STEPS, max_rank: int = RANKS[-1]) -> list[dict]:
    """Each thought and rank up to `max_rank` (no subspace the claim could not choose is
    fitted): accuracy (%) on the discovery pairs, where the subspace was fitted (and where the
    claim's thought and rank are chosen)."""
    disc, ranks = _discovery(run), ranks_upto(max_rank)
    return [{"thought": f"CT{t}", "rank": rank, "discovery": 100 * float(moved(disc, t, basis, f"rank {rank}").mean())}
            for t in thoughts for rank, basis in subspaces(run, t, ranks, steps).items()]  # fmt: skip


def measure(p: DasParams, run: ModelRun, measure: str) -> Measured:
    details = {"heads": [], "mode": "learned-subspace interchange", "max_rank": p.max_rank}
    for split in (run, _discovery(run)):
        if not pairs(split)[0]:
            note = no_pairs_note(split) + (" of the discovery split" if split is not run else "")
            return Measured(nan_effect(0), {**details, "positions": [], "note": note})
    details["mode"] += f" on {pairs_used(run, int(valid_pairs(run).sum()))}"
    if not valid_pairs(run).any():
        return Measured(nan_effect(0), {**details, "positions": [], "note": NO_VALID_PAIR})
    thoughts = list(range(run.n_latent)) if p.thought == "best" else [thought_number(p.thought)]
    rows = grid(run, thoughts, p.steps, p.max_rank)
    best = max(rows, key=lambda r: (r["discovery"], -r["rank"]))
    t, rank = thought_number(best["thought"]), best["rank"]
    whole = 100 * float(interchanged(run, (t,))[0].mean())
    fitted = subspaces(run, t, ranks_upto(p.max_rank), p.steps)
    for row in rows:  # the chosen thought on the test pairs, every rank
        if row["thought"] == best["thought"]:
            basis = fitted[row["rank"]]
            row.update(test=100 * float(moved(run, t, basis, f"rank {row['rank']}").mean()),
                       whole_thought=whole)  # fmt: skip
    chosen = fitted[rank]
    values = moved(run, t, chosen, f"rank {rank}")
    generator = torch.Generator().manual_seed(run.seed)
    d = chosen.shape[1]
    null = [
        100 * float(moved(run, t, random_basis(d, rank, generator), f"random rank {rank}, draw {i}").mean())
        for i in range(p.n_random)
    ]
    details.update(positions=[best["thought"]], rank=rank, grid=rows, discovery_accuracy=best["discovery"],
                   whole_thought=whole, units="% of pairs")  # fmt: skip
    return Measured(mean_with_ci(100.0 * values.astype(float), seed=run.seed), details, null or None)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    frames = {}
    for r in results:
        if "grid" in r.details:
            frames.setdefault(r.model, pd.DataFrame(r.details["grid"]))
    if not frames:
        return Section("Learned-subspace interchange (DAS)", {})
    fig = Figure(figsize=(5.5 * len(frames), 3.8), layout="constrained")
    for ax, (model, table) in zip(np.atleast_1d(fig.subplots(1, len(frames))), frames.items()):
        for j, (thought, g) in enumerate(table.groupby("thought", sort=False)):
            ax.plot(g["rank"], g["discovery"], color=f"C{j}", lw=1, alpha=0.6, label=f"{thought} (discovery)")
        chosen = table.dropna(subset=["test"]) if "test" in table else table.iloc[:0]
        if len(chosen):
            name = chosen.thought.iloc[0]
            ax.plot(chosen["rank"], chosen["test"], "ko-", lw=2, label=f"{name} (test pairs)")
            ax.axhline(chosen["whole_thought"].iloc[0], color="black", ls=":", lw=1, label=f"{name} whole thought")
        ax.set_xscale("log", base=2)
        ranks = sorted(table["rank"].unique())
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="subspace rank", ylabel="answer becomes the source's (% of pairs)", ylim=(0, None),
               title=f"{model}: learned-subspace interchange")  # fmt: skip
        ax.legend(fontsize=7, ncols=2)
    table = pd.concat([t.assign(model=m) for m, t in frames.items()], ignore_index=True)
    return Section("Learned-subspace interchange (DAS)", {"das": table}, {"das": fig})


KIND = Kind(
    "das",
    DasParams,
    measure,
    section,
    "a learned low-rank subspace of a thought interchanged from a counterfactual source: share of answers that follow",
    measures=("accuracy",),
    effect_unit="a share of pairs",
    error_analysis=False,
)
