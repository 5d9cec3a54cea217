"""Logit lens of the thoughts (metric `logit_lens`): bot and every thought, the hidden state
before `prj` and the thought itself, through the LM head, scored against each solution step's
intermediate result (see `harness.measures.lens`).

`test = "decodes_step"`: the position that best decodes step `step` on the discovery split
(top-1 or top-5 rate above chance) is measured on the test split: the rate minus the chance
rate (another problem's value of the same step), points, paired per problem, bootstrap CI.
`test = "ordered"`: the position where step k is best decoded (test split) comes no earlier
than step k-1's; effect = the number of steps where it comes earlier, bootstrap CI over
problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.judgment.kinds.base import Kind, Measured, Params, Section, choices, nan_effect
from harness.measures.lens import (
    MAX_LENS_STEPS,
    SOURCES,
    chance_targets,
    hits,
    lens_tokens,
    position_names,
    step_tokens,
)
from harness.measures.runner import ModelRun
from harness.statistics.effects import PairedEffect, mean_with_ci
from harness.statistics.verdicts import ClaimResult

TESTS = ("decodes_step", "ordered")
MIN_PROBLEMS = 20  # a step scored by "ordered" needs this many problems that have it
N_RESAMPLES = 1000


@dataclass(frozen=True)
class LensParams(Params):
    test: str = choices(*TESTS)
    source: str = choices(*SOURCES, default="thought")  # the thought as fed in, or the state before prj
    step: int = 1  # decodes_step: which solution step (1 = the first intermediate result)
    top: int = 1  # top-1 or top-5 decode

    def validate(self, given: set[str]) -> None:
        if self.top not in (1, 5):
            raise ValueError(f"top is 1 or 5, got {self.top}")
        if not 1 <= self.step <= MAX_LENS_STEPS:
            raise ValueError(f"step is 1 (the first intermediate result) to {MAX_LENS_STEPS}, got {self.step}")
        if "step" in given and self.test != "decodes_step":
            raise ValueError(f"step applies to test 'decodes_step', not {self.test!r}")


def lens(run: ModelRun, split: str = "test") -> np.ndarray:
    """Logit lens of bot and every thought (hidden state and thought): top-5 tokens,
    [N, 2, K + 1, 5], cached."""

    def compute() -> np.ndarray:
        return lens_tokens(run.codi, run.split(split), run.batch_size, progress=run.progress)

    return run.cached(run.split_key(split, kind="logit_lens"), f"logit lens ({split} split)", compute)


def step_targets(run: ModelRun, split: str = "test", n_steps: int = MAX_LENS_STEPS) -> np.ndarray:
    """Each problem's intermediate results as the model's tokens: [N, n_steps], -1 where a
    problem has fewer steps (cached: a warm run loads no tokenizer)."""
    problems = run.split(split)
    key = run.split_key(split, kind="step_targets", n_steps=n_steps)
    return run.cache.get_or_compute(key, lambda: step_tokens(run.codi, problems, n_steps))


def lens_hits(run: ModelRun, split: str, source: str, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([N, P, steps] decoded, [N, P, steps] decoded against another problem's value, [N, steps]
    which problems have the step) for one source at the bot and every thought."""
    tokens, targets = lens(run, split), step_targets(run, split)
    s = SOURCES.index(source)
    found = hits(tokens, targets, top)[:, s]
    chance = hits(tokens, chance_targets(targets, run.seed), top)[:, s]
    return found, chance, targets >= 0


def measure(p: LensParams, run: ModelRun, measure: str) -> Measured:
    names = position_names(run.n_latent)
    details = {"source": p.source, "top": p.top, "heads": [], "mode": f"logit lens ({p.source}, top-{p.top})"}
    if p.test == "decodes_step":
        k = p.step - 1
        found, chance, have = lens_hits(run, "discovery", p.source, p.top)
        if k >= have.shape[1] or have[:, k].sum() < 2:
            return Measured(nan_effect(0), {**details, "positions": [], "note": f"no problems with step {p.step}"})
        excess = found[have[:, k], :, k].mean(0) - chance[have[:, k], :, k].mean(0)  # [P]
        best = int(np.argmax(excess))
        found, chance, have = lens_hits(run, "test", p.source, p.top)
        rows = have[:, k]
        values = 100.0 * (found[rows, best, k].astype(float) - chance[rows, best, k])  # [n] points
        details.update(positions=[names[best]], step=p.step, rate=float(100 * found[rows, best, k].mean()),
                       chance=float(100 * chance[rows, best, k].mean()))  # fmt: skip
        details["units"] = "points over chance"
        return Measured(mean_with_ci(values, seed=run.seed), details)
    found, _, have = lens_hits(run, "test", p.source, p.top)
    steps = [k for k in range(have.shape[1]) if have[:, k].sum() >= MIN_PROBLEMS]
    if len(steps) < 2:
        note = f"fewer than two solution steps with {MIN_PROBLEMS} problems each: no order to test"
        return Measured(nan_effect(len(found)), {**details, "positions": [], "note": note})

    def best_positions(rows: np.ndarray) -> np.ndarray:
        rates = np.stack([found[rows][have[rows, k], :, k].mean(0) for k in steps], -1)  # [P, steps]
        return rates.argmax(0)

    def violations(rows: np.ndarray) -> int:
        best = best_positions(rows)
        return int((np.diff(best) < 0).sum())

    n = len(found)
    rng = np.random.default_rng(run.seed)
    draws = np.array([violations(rng.integers(0, n, n)) for _ in range(N_RESAMPLES)])
    best = best_positions(np.arange(n))
    details.update(units="order violations", positions=[names[b] for b in best])
    details.update(best_by_step={str(k + 1): names[b] for k, b in zip(steps, best)})
    low, high = np.percentile(draws, [2.5, 97.5])
    effect = PairedEffect(float(violations(np.arange(n))), float(low), float(high), float("nan"), n, "bootstrap share")
    return Measured(effect, details, bootstrap=draws)


def lens_table(run: ModelRun) -> pd.DataFrame:
    """Per source, position and step: problems, top-1 / top-5 rates and their chance rates (%)."""
    names = position_names(run.n_latent)
    rows = []
    for source in SOURCES:
        (f1, c1, have), (f5, c5, _) = (lens_hits(run, "test", source, top) for top in (1, 5))
        for k in range(have.shape[1]):
            keep = have[:, k]
            if not keep.any():
                continue
            for j, name in enumerate(names):
                if source == "thought" and name == "bot":
                    continue
                rates = {"top1": f1, "top5": f5, "chance_top1": c1, "chance_top5": c5}
                rows.append({"source": source, "position": name, "step": k + 1, "n": int(keep.sum()),
                             **{key: 100 * value[keep, j, k].mean() for key, value in rates.items()}})  # fmt: skip
    return pd.DataFrame(rows)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    """Per model, a heat map of each source's decode rate by position and step, at the `top`
    its claims are judged on (one row of panels per top-k the model's claims use)."""
    models = list(dict.fromkeys(r.model for r in results))
    tables = {m: lens_table(runs[m]) for m in models}
    figures = {}
    for model, table in tables.items():
        tops = sorted({r.details["top"] for r in results if r.model == model})
        fig = Figure(figsize=(9, 3.4 * len(tops)), layout="constrained")
        axes = fig.subplots(len(tops), len(SOURCES), squeeze=False)
        for row, top in zip(axes, tops):
            for ax, source in zip(row, SOURCES):
                part = table[table.source == source]
                grid = part.pivot(index="position", columns="step", values=f"top{top}").reindex(
                    [p for p in position_names(runs[model].n_latent) if p in set(part.position)]
                )
                image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
                ax.set_xticks(range(grid.shape[1]), [f"step {s}" for s in grid.columns])
                ax.set_yticks(range(grid.shape[0]), grid.index)
                for (i, j), value in np.ndenumerate(grid.to_numpy()):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white")
                ax.set_title(f"{source}: top-{top} decode of each step's result (%)")
                fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"{model}: logit lens of bot and the thoughts (test split; top-k as the claims judge it)")
        figures[f"lens_{model}"] = fig
    table = pd.concat([t.assign(model=m) for m, t in tables.items()], ignore_index=True)
    return Section("Logit lens of the thoughts", {"lens": table}, figures)


KIND = Kind(
    "logit_lens",
    LensParams,
    measure,
    section,
    "bot and every thought through the LM head: how often each solution step's result is decoded",
    measures=("accuracy",),
    effect_unit="a decoding rate above chance (or order violations)",
)
