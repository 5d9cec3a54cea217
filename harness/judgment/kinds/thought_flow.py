"""Path patching through the thought loop (metric `thought_flow`): a thought's patched value
seen only by named readers (`specs.PatchPath`), every other position reading the clean one.

Tests: `cell`, the drop when `readers` alone read the patched `source`; `via_thoughts`, the
source's drop when every later thought reads it minus its drop when only the answer tokens
read it (> 0: it reaches the answer mainly through the loop); `via_eot`, the drop when only eot
reads every patched thought minus `fraction` times the drop when everything reads them (> 0:
what reaches the answer passes through eot). Every claim also measures its model's flow matrix
(each thought x each reader, one condition a cell), drawn as a heat map and written to flow.csv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.interventions.paths import PatchPath
from harness.interventions.specs import PATCH_MODES, PatchThoughts, Spec
from harness.judgment.kinds.base import Kind, Measured, Params, Section, choices, nan_effect
from harness.judgment.kinds.interchange import NO_VALID_PAIR, no_pairs_note, pairs, pairs_used, valid_pairs
from harness.measures.runner import Condition, ModelRun
from harness.runtime.positions import thought_number
from harness.statistics.effects import MEASURES, difference_of_draws, mean_with_ci
from harness.statistics.verdicts import ClaimResult

TESTS = ("cell", "via_thoughts", "via_eot")
SPANS = ("latent", "eot", "answer", "all")  # flow-matrix columns after the single thoughts ("all": the ordinary patch)


@dataclass(frozen=True)
class FlowParams(Params):
    test: str = choices(*TESTS)
    source: str = "hub"  # CT<i>, hub (the model's hub thought) or latent (every thought; test cell, via_eot)
    readers: tuple[str, ...] = ()  # test cell: later thoughts (CT<j>, latent), eot, answer
    mode: str = choices(*PATCH_MODES, default="mean")  # interchange: the counterfactual source's thought
    n_draws: int = 5  # independent draws (modes noise, resample)
    fraction: float = 0.5  # via_eot: the share of the full drop eot must carry

    def validate(self, given: set[str]) -> None:
        if self.source not in ("hub", "latent") and thought_number(self.source) is None:
            raise ValueError(f"source is a thought (CT<i>), hub or latent, not {self.source!r}")
        if self.test == "cell":
            if not self.readers:
                raise ValueError("test 'cell' needs readers (later thoughts, latent, eot, answer)")
            PatchPath("CT0" if self.source == "hub" else self.source, self.readers, self.mode)  # readers' rules
        elif "readers" in given:
            raise ValueError(f"readers apply to test 'cell'; test {self.test!r} names its own")
        if self.test == "via_thoughts" and self.source == "latent":
            raise ValueError(
                "via_thoughts compares a thought's later thoughts with the answer: name one thought or hub"
            )
        if self.test == "via_eot" and "source" in given:
            raise ValueError("via_eot patches every thought: it takes no source")
        if "fraction" in given and self.test != "via_eot":
            raise ValueError(f"fraction applies to test 'via_eot', not {self.test!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction is in (0, 1], got {self.fraction}")
        if self.n_draws < 1:
            raise ValueError("n_draws must be at least 1")
        if self.mode == "interchange" and self.test != "cell":
            raise ValueError(
                f"mode 'interchange' measures test 'cell' (the share of pairs that move), not {self.test!r}"
            )
        if "n_draws" in given and self.mode not in ("noise", "resample"):
            raise ValueError(f"n_draws applies to modes 'noise' and 'resample'; mode {self.mode!r} is deterministic")

    def unused(self) -> set[str]:
        out = super().unused()
        if self.test != "cell":
            out.add("readers")
        if self.test != "via_eot":
            out.add("fraction")
        else:
            out.add("source")
        return out

    def check_measure(self, measure: str) -> None:
        if self.mode == "interchange" and measure != "accuracy":
            raise ValueError("mode 'interchange' measures the share of pairs whose answer moves: measure accuracy")

    def check_model(self, geo, n_latent: int, model: str) -> None:
        names = [self.source, *self.readers]
        late = [n for n in names if (thought_number(n) if thought_number(n) is not None else -1) >= n_latent]
        if late:
            raise ValueError(f"{model} has thoughts CT0..CT{n_latent - 1}, not {', '.join(late)}")


def cell_spec(source: str, column: str, mode: str) -> Spec:
    """The condition of one flow-matrix cell: `source` read by `column` alone (all: the
    ordinary patch, which every reader together equals)."""
    if column == "all":
        return PatchThoughts((source,), mode)
    return PatchPath(source, (column,), mode)


def columns(n_latent: int) -> list[str]:
    return [f"CT{j}" for j in range(1, n_latent)] + list(SPANS)


def readable(source: str, column: str, n_latent: int) -> bool:
    """Whether `column` can read `source` (a reader comes after it); every thought patched is
    read by `latent` (each thought reads those before it), eot, answer, all."""
    if source == "latent":
        return column in SPANS
    i = thought_number(source)
    if column == "latent":
        return i < n_latent - 1
    j = thought_number(column)
    return j is None or j > i


def moved(run: ModelRun, spec: Spec) -> np.ndarray:
    """Per pair answered right on both sides unpatched: whether `spec` (mode interchange) moves
    the base's answer to its counterfactual source's: [n_valid] bool."""
    return run.counterfactual_run().measure(spec).correct[valid_pairs(run)] == 1


def flow_matrix(run: ModelRun, mode: str, n_draws: int) -> list[dict]:
    """Every (source, reader) cell's drop in both measures with its paired 95% CI; with mode
    interchange, the share of valid pairs whose answer moves to the counterfactual's (%)."""
    sources = [f"CT{i}" for i in range(run.n_latent)] + ["latent"]
    rows = []
    for source in sources:
        for column in columns(run.n_latent):
            if not readable(source, column, run.n_latent):
                continue
            if mode == "interchange":
                share = mean_with_ci(100.0 * moved(run, cell_spec(source, column, mode)).astype(float), seed=run.seed)
                rows.append({"source": source, "reader": column, "measure": "counterfactual", "drop": share.effect,
                             "ci_low": share.ci_low, "ci_high": share.ci_high})  # fmt: skip
                continue
            draws = run.measure_draws(cell_spec(source, column, mode), n_draws)
            for measure in MEASURES:
                e = run.effect(draws, measure)
                rows.append({"source": source, "reader": column, "measure": measure, "drop": e.effect,
                             "ci_low": e.ci_low, "ci_high": e.ci_high})  # fmt: skip
    return rows


def _values(draws: list[Condition], measure: str) -> np.ndarray:
    return np.stack([d.values(measure) for d in draws])  # [D, N]


def measure(p: FlowParams, run: ModelRun, measure: str) -> Measured:
    source = run.hub if p.source == "hub" else p.source
    draws = lambda spec: run.measure_draws(spec, p.n_draws)  # noqa: E731
    paired = p.mode != "interchange" or bool(pairs(run)[0])
    details = {"mode": f"path patch ({p.mode})", "patch_mode": p.mode, "heads": [], "test": p.test,
               "flow": flow_matrix(run, p.mode, p.n_draws) if paired else [], "hub": run.hub}  # fmt: skip
    if p.mode == "interchange":
        if not pairs(run)[0]:
            return Measured(nan_effect(0), {**details, "positions": [source], "note": no_pairs_note(run)})
        spec = PatchPath(source, p.readers, p.mode)
        values = moved(run, spec)
        details.update(positions=[source], readers=list(spec.readers), units="% of pairs",
                       mode=f"path interchange on {pairs_used(run, len(values))}")  # fmt: skip
        if not len(values):
            return Measured(nan_effect(0), {**details, "note": NO_VALID_PAIR})
        return Measured(mean_with_ci(100.0 * values.astype(float), seed=run.seed), details)
    if p.test == "cell":
        spec = PatchPath(source, p.readers, p.mode)
        cell = draws(spec)
        details.update(positions=[source], readers=list(spec.readers))
        return Measured(run.effect(cell, measure), details, main=spec)
    if p.test == "via_thoughts":
        loop, direct = draws(PatchPath(source, ("latent",), p.mode)), draws(PatchPath(source, ("answer",), p.mode))
        details.update(positions=[source], readers=["latent", "answer"])
        effect = difference_of_draws(_values(direct, measure), _values(loop, measure), measure, seed=run.seed)
        return Measured(effect, details, main=PatchPath(source, ("latent",), p.mode))
    via_eot, everything = draws(PatchPath("latent", ("eot",), p.mode)), draws(PatchThoughts(("latent",), p.mode))
    base = run.baseline.values(measure)[None]  # [1, N]
    # (base - eot) - f (base - all) = ((1 - f) base + f all) - eot, paired draw by draw
    reference = (1 - p.fraction) * base + p.fraction * _values(everything, measure)
    details.update(positions=["latent"], readers=["eot"], fraction=p.fraction)
    effect = difference_of_draws(reference, _values(via_eot, measure), measure, seed=run.seed)
    return Measured(effect, details, main=PatchPath("latent", ("eot",), p.mode))


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    frames = {}
    for r in results:
        if r.details.get("flow"):
            frames.setdefault((r.model, r.details["patch_mode"]), pd.DataFrame(r.details["flow"]))
    table = pd.concat([f.assign(model=m, mode=mode) for (m, mode), f in frames.items()], ignore_index=True)
    figures = {}
    for (model, mode), flow in frames.items():
        n_latent, hub = runs[model].n_latent, runs[model].hub
        sources = [f"CT{i}" for i in range(n_latent)] + ["latent"]
        cols = columns(n_latent)
        shown = ["counterfactual"] if mode == "interchange" else list(MEASURES)
        fig = Figure(figsize=(5.5 * len(shown), 4), layout="constrained")
        for ax, measure in zip(np.atleast_1d(fig.subplots(1, len(shown))), shown):
            cells = flow[flow.measure == measure].set_index(["source", "reader"])["drop"]
            grid = np.array([[cells.get((s, c), np.nan) for c in cols] for s in sources])
            bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
            image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            for (y, x), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    ax.text(x, y, f"{value:.2f}" if measure == "answer_logprob" else f"{value:.1f}", ha="center",
                            va="center", fontsize=6)  # fmt: skip
            ax.set_xticks(range(len(cols)), cols, fontsize=7)
            ax.set_yticks(range(len(sources)), [f"{s} (hub)" if s == hub else s for s in sources], fontsize=7)
            title = {"accuracy": "drop (points)", "answer_logprob": "drop (nats)",
                     "counterfactual": "answer moves to the counterfactual's (% of pairs)"}[measure]  # fmt: skip
            ax.set(xlabel="reader (all: the ordinary patch)", ylabel="patched thought", title=title)
            fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"{model}: each thought {mode}-patched, read by one reader alone")
        figures[f"flow_{model}_{mode}"] = fig
    return Section("Path patching through the thought loop", {"flow": table}, figures)


KIND = Kind(
    "thought_flow",
    FlowParams,
    measure,
    section,
    "a thought's patched value read by named later positions alone (path patching); drop from baseline",
)
