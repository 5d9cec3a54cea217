"""Causal head discovery: every head alone ablated at every thought (the sweep), the gradient
screens' estimates of the same drops, and the causal ranking claims take their
heads from with `ranking = "causal"` (the sweep on the discovery split).

Each is a computation of a `ModelRun`, cached by it under a content key; the run itself knows
none of them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from harness.data.problems import data_hash, format_number
from harness.interventions.hooks import InterventionError
from harness.interventions.specs import AblateHeads, Baseline
from harness.measures.attribution import path_attributions
from harness.measures.discovery import top_heads
from harness.measures.evaluation import PrefixStore
from harness.runtime.arch import Head, attn_out_proj
from harness.runtime.codi import CODIModel, Pass
from harness.runtime.loop import Batch, Prefix, answer_logprobs, encode_questions, run_latents
from harness.runtime.positions import PositionMap, thought_number
from harness.runtime.progress import bar

if TYPE_CHECKING:
    from harness.measures.runner import Condition, ModelRun

RANKINGS = ("attention", "causal")  # where a claim's top heads come from (`heads_for`)


def sweep(run: ModelRun, mode: str = "zero") -> list[Condition]:
    """Every head alone ablated at every thought: the `AblateHeads((head,), ("latent",),
    mode)` conditions a single-head claim measures (the same cache entries), in
    `run.every_head` order."""
    heads = bar(run.every_head, desc=f"head sweep {run.name} ({mode})", disable=not run.progress)
    return [run.measure(AblateHeads((head,), ("latent",), mode)) for head in heads]


def head_means(run: ModelRun) -> torch.Tensor:
    """Every head's mean output at each thought over the discovery split (mean ablation's
    values): [L, H, K, hd]."""
    outputs = run.head_outputs(tuple(run.every_head), ("latent",), "discovery")
    geo = run.geometry
    means = torch.stack([outputs[h].mean(0) for h in run.every_head])  # [L * H, K, hd]
    return means.view(geo.n_layers, geo.n_heads, *means.shape[1:])


SCREENS = ("atp", "ig")  # attribution patching; integrated gradients along the all-heads path (EAP-IG)
SCREEN_STEPS = 16  # integrated gradients' steps (midpoints of equal steps from ablated to clean)


def screen_estimates(run: ModelRun, screen: str, mode: str = "zero", steps: int = SCREEN_STEPS) -> np.ndarray:
    """A gradient screen's estimate of every head's ablation drop in answer log-probability at
    each thought, per problem: [N, L, H, K] nats (a head at every thought: the sum over K),
    cached. `atp`: attribution patching (first order at the clean model; `steps` unused);
    `ig`: integrated gradients over `steps` points of the path from every head ablated to clean."""
    if screen not in SCREENS:
        raise InterventionError(f"unknown screen {screen!r}; choose from {', '.join(SCREENS)}")
    if mode not in ("zero", "mean"):
        raise InterventionError(f"a screen estimates zero or mean ablation, not {mode!r}")
    if steps < 1:
        raise InterventionError(f"a screen takes at least 1 step, not {steps}")
    alphas = (1.0,) if screen == "atp" else tuple((j + 0.5) / steps for j in range(steps))

    def compute() -> np.ndarray:
        targets = head_means(run) if mode == "mean" else None
        return path_attributions(run.codi, run.problems, targets, alphas, run.batch_size, run.progress)

    reads = {"means": data_hash(run.discovery)} if mode == "mean" else {}
    key = run.key(kind="head_screen", screen=screen, mode=mode, steps=len(alphas), **reads)
    what = "attribution patching" if screen == "atp" else f"integrated gradients ({steps} steps)"
    return run.cached(key, f"{what} of every head ({mode})", compute)


def screened(estimates: np.ndarray, parts: list[Component]) -> np.ndarray:
    """A screen's per-problem estimate [N, L, H, K] of each component: [C, N]."""
    per_thought = [estimates[:, c.head.layer, c.head.head] for c in parts]  # [N, K] each
    return np.stack([e.sum(-1) if c.thought is None else e[:, c.thought] for c, e in zip(parts, per_thought)])


def causal_ranking(run: ModelRun, n_top: int = 3, thought: int | None = None) -> pd.DataFrame:
    """Heads by their zero-ablation drop in answer log-probability on the discovery split,
    ablated at every thought (`thought` None) or at that thought alone, from a race (`race`) for
    the top `n_top`: those first, in the race's order (the full sweep's top `n_top`, tested),
    then the rest by their drop on the problems they were measured on. Columns `rank`,
    `layer`, `head`, `name`, `drop_logprob`, `problems` (memoised)."""

    def compute() -> pd.DataFrame:
        parts = [Component(head, thought) for head in run.every_head]
        n = min(n_top, len(parts) - 1)
        result = race(run.on_discovery(), parts, n, "zero")
        table = result.table.set_index("component")
        order = [str(c) for c in result.top] + [c for c in table.index if c not in {str(t) for t in result.top}]
        heads = [Head.parse(name.split("@")[0]) for name in order]
        df = pd.DataFrame([{"layer": head.layer, "head": head.head, "name": str(head),
                            "drop_logprob": table.drop_logprob[name], "problems": int(table.problems[name])}
                           for head, name in zip(heads, order)])  # fmt: skip
        df.insert(0, "rank", range(1, len(df) + 1))
        return df

    return run.remember(("causal_ranking", n_top, thought), compute)


def ranking_thought(positions: Sequence[str]) -> int | None:
    """The thought a causal ranking ablates its heads at for a claim acting at `positions`:
    None (every thought) for `latent`, i for `CT<i>` alone; anything else is a ValueError (the
    sweep ablates a head at every thought or at one)."""
    if tuple(positions) == ("latent",):
        return None
    if len(positions) == 1 and (number := thought_number(positions[0])) is not None:
        return number
    raise ValueError(
        f"ranking 'causal' ranks heads ablated at every thought (positions ['latent']) or at one (['CT<i>']), "
        f"not at {list(positions)}: name the heads, or use the attention ranking"
    )


# --- stacked conditions: many single-component ablations in one batched pass ---------------

MAX_STACKED_ROWS = 512  # problems x components per stacked pass


@dataclass(frozen=True, order=True)
class Component:
    """What a sweep ablates alone: one head at every thought (`thought` None) or at one."""

    head: Head
    thought: int | None = None

    def __str__(self) -> str:
        return str(self.head) if self.thought is None else f"{self.head}@CT{self.thought}"

    @property
    def position(self) -> str:
        return "latent" if self.thought is None else f"CT{self.thought}"

    def spec(self, mode: str) -> AblateHeads:
        """The ordinary condition this component's stacked slice equals."""
        return AblateHeads((self.head,), (self.position,), mode)


def components(run: ModelRun, resolution: str) -> list[Component]:
    """Every head (`head`: ablated at every thought) or every head at every thought
    (`head_thought`), in layer, head (, thought) order."""
    if resolution == "head":
        return [Component(h) for h in run.every_head]
    if resolution == "head_thought":
        return [Component(h, t) for h in run.every_head for t in range(run.n_latent)]
    raise InterventionError(f"unknown resolution {resolution!r}; choose from head, head_thought")


class StackedAblation:
    """Context manager over a stacked batch (row r: problem r // C, component r % C): each
    row's own component's head output replaced at its thoughts (zero, or `values[c]` [K, hd],
    the component's mean output at each thought), through the pre-hook `HeadAblation` uses,
    handed its pass."""

    def __init__(
        self,
        codi: CODIModel,
        parts: list[Component],
        n_rows: int,
        pmap: PositionMap,
        values: list[torch.Tensor] | None = None,
    ):
        self.codi, self.pmap, self.mean = codi, pmap, values is not None
        geo, n = codi.geometry, len(parts)
        self.n_heads, self.head_dim = geo.n_heads, geo.head_dim
        self.targets: dict[int, dict[int, tuple]] = {}  # layer -> thought -> (rows, heads, values [rows, hd])
        for layer in sorted({c.head.layer for c in parts}):
            for k in range(pmap.n_latent):
                chosen = [i for i, c in enumerate(parts) if c.head.layer == layer and c.thought in (None, k)]
                rows = [r for i in chosen for r in range(i, n_rows, n)]
                if rows:
                    heads = torch.tensor([parts[i].head.head for i in chosen for _ in range(i, n_rows, n)])
                    vals = torch.stack([values[i][k] for i in chosen for _ in range(i, n_rows, n)]) if values else None
                    self.targets.setdefault(layer, {})[k] = (torch.tensor(rows), heads, vals)
        self._handles: list = []

    def __enter__(self) -> StackedAblation:
        for layer in self.targets:
            hook = self.codi.handing(self._hook(layer))
            self._handles.append(attn_out_proj(self.codi.lm, layer).register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(step: Pass, module, args):
            at = [(local, k) for local, k in step.local(self.pmap.latent) if k in self.targets[layer]]
            if not at:
                return None
            x = args[0].clone()  # [B * C, T, H * hd]
            view = x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim)
            for local, k in at:
                rows, heads, vals = self.targets[layer][k]
                rows, heads = rows.to(x.device), heads.to(x.device)
                view[rows, local, heads] = 0.0 if vals is None else vals.to(x)
            return (x, *args[1:])

        return hook


def mean_values(run: ModelRun, part: Component) -> torch.Tensor:
    """A component's mean output at each thought over the discovery split, [K, hd], reduced
    exactly as its own mean-mode condition reduces it (rows of other thoughts unused)."""
    outputs = run.head_outputs(tuple(run.every_head), ("latent",), "discovery")[part.head]  # [N, K, hd]
    if part.thought is None:
        return outputs.mean(0)
    k = part.thought
    return outputs[:, k : k + 1].contiguous().mean(0).expand(run.n_latent, -1)


def _stack(batch: Batch, prefix: Prefix, n: int) -> tuple[Batch, Prefix]:
    """Each row of a batch and its question pass repeated `n` times in place (row-major)."""
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(n)
    lengths = [q for q in batch.question_lengths for _ in range(n)]
    stacked = Batch(batch.input_ids.repeat_interleave(n, 0), batch.attention_mask.repeat_interleave(n, 0), lengths)
    return stacked, Prefix(cache, prefix.hidden.repeat_interleave(n, 0))


@torch.no_grad()
def stacked_logprobs(run: ModelRun, parts: list[Component], mode: str = "zero") -> np.ndarray:
    """Each component's ablation alone, teacher-forced over the run's problems: [C, N] gold-answer
    log-probabilities, as `run.answer_logprobs(part.spec(mode))` gives them (the same batches;
    equal per problem to within 1e-5 nats, tested). Several components share one pass: the
    question pass is run once per batch and repeated for them."""
    if mode not in ("zero", "mean"):
        raise InterventionError(f"stacked ablations are zero or mean, not {mode!r}")
    codi, problems, size = run.codi, run.problems, run.batch_size
    values = [mean_values(run, part) for part in parts] if mode == "mean" else None
    order = sorted(range(len(problems)), key=lambda i: len(problems[i].question))
    out = np.zeros((len(parts), len(problems)))
    per_stack = max(1, MAX_STACKED_ROWS // size)
    prefixes = PrefixStore()
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        chunk = [problems[i] for i in indices]
        batch = encode_questions(codi, [p.question for p in chunk])
        prefix = prefixes.get(codi, batch, indices)
        answers = [format_number(p.answer) for p in chunk]
        for first in range(0, len(parts), per_stack):
            group = parts[first : first + per_stack]
            stacked, stacked_prefix = _stack(batch, prefix, len(group))
            pmap = stacked.positions(codi.n_latent)
            group_values = values[first : first + len(group)] if values else None
            with StackedAblation(codi, group, len(stacked.question_lengths), pmap, group_values):
                state = run_latents(codi, stacked, prefix=stacked_prefix)
                logprobs = answer_logprobs(codi, state, [a for a in answers for _ in group])  # [B * C]
            out[first : first + len(group), indices] = logprobs.view(len(chunk), len(group)).T.numpy()
    return out


def stacked(run: ModelRun, parts: list[Component], mode: str = "zero") -> np.ndarray:
    """`stacked_logprobs` through the run's cache: [C, N], one entry per component. Not the
    entry of the component's own condition: a stacked pass equals it to within about 1e-6
    nats, bit for bit only at some batch shapes (matrix products round by batch size)."""
    keys = [run.spec_key(part.spec(mode), part="answer_logprob_stacked") for part in parts]
    missing = [part for part, key in zip(parts, keys) if key not in run.cache]
    computed = dict(zip(missing, stacked_logprobs(run, missing, mode))) if missing else {}
    what = f"{len(missing)} stacked ablations ({mode})"
    rows = [run.cached(key, what, lambda part=part: computed[part]) for part, key in zip(parts, keys)]
    return np.stack(rows)


# --- racing: the sweep's top components at a fraction of its problem-conditions --------------

RACE_FIRST = 30  # problems every component is measured on before any leaves
RACE_GROWTH = 1.5  # each round measures the remaining components on this many times the problems so far
RACE_Z = 3.0  # half-width of a component's interval, in standard errors of its mean drop


@dataclass
class Race:
    """A racing sweep's outcome: every component's mean drop in answer log-probability on the
    problems it was measured on (its interval, how many), the top components, whether they
    were separated from the rest before the problems ran out, and the problem-conditions spent."""

    table: pd.DataFrame  # component, head, position, drop_logprob, ci_low, ci_high, problems (best first)
    top: list[Component]
    separated: bool

    @property
    def problem_conditions(self) -> int:
        return int(self.table.problems.sum())


def race(run: ModelRun, parts: list[Component], n_top: int = 3, mode: str = "zero", first: int = RACE_FIRST) -> Race:
    """Successive halving over `run.problems` (call it on `run.on_discovery()`): every component
    on the first `first` problems, then RACE_GROWTH times as many each round for those still in the race
    (all of them on the same problems). A component leaves when its drop is below the
    `n_top`-th best's by more than RACE_Z standard errors of their paired per-problem
    difference (so one leaves only far from the cut); the race ends when every component left
    outside the top `n_top` is so (`separated`) or the problems run out (`separated` False:
    the top is then the order of the means)."""
    if not 1 <= n_top < len(parts):
        raise InterventionError(f"a race needs more components ({len(parts)}) than places ({n_top})")
    drops: dict[Component, list[np.ndarray]] = {part: [] for part in parts}
    alive, done, size = list(parts), 0, first
    while True:
        chunk = run.problems[done:size]
        sub = type(run)(run.model, chunk, run.discovery, run.cache, run.requested_batch_size, run.seed,
                        progress=False, on_measured=run.on_measured)  # fmt: skip
        base = sub.answer_logprobs(Baseline())
        for part, values in zip(alive, stacked(sub, alive, mode)):
            drops[part].append(base - values)
        done = min(size, len(run.problems))
        so_far = {part: np.concatenate(drops[part]) for part in alive}
        ranked = sorted(alive, key=lambda part: -so_far[part].mean())
        top, cut = ranked[:n_top], so_far[ranked[n_top - 1]]
        behind = {part: _paired_upper(so_far[part] - cut) < 0 for part in ranked[n_top:]}  # can no longer reach it
        alive = top + [part for part in ranked[n_top:] if not behind[part]]
        separated = all(behind.values())
        if separated or done >= len(run.problems):
            break
        size = min(int(RACE_GROWTH * size), len(run.problems))
    rows = []
    for part in parts:
        values = np.concatenate(drops[part])
        mean, low, high = _interval(values)
        rows.append({"component": str(part), "head": str(part.head), "position": part.position,
                     "drop_logprob": mean, "ci_low": low, "ci_high": high, "problems": len(values)})  # fmt: skip
    table = pd.DataFrame(rows).sort_values(["problems", "drop_logprob"], ascending=False, kind="stable")
    return Race(table.reset_index(drop=True), top, separated)


def _paired_upper(difference: np.ndarray) -> float:
    """The upper end of a paired per-problem difference's interval: mean + RACE_Z standard errors."""
    if len(difference) < 2:
        return np.inf
    return float(difference.mean() + RACE_Z * difference.std(ddof=1) / np.sqrt(len(difference)))


def _interval(x: np.ndarray) -> tuple[float, float, float]:
    """A component's mean drop and its interval (mean +- RACE_Z standard errors)."""
    half = RACE_Z * float(x.std(ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else np.inf
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def heads_for(
    run: ModelRun,
    named: Sequence[str],
    n_heads: int,
    ranking: str = "attention",
    positions: Sequence[str] = ("latent",),
) -> tuple[list[Head], str]:
    """The heads a claim acts on and where they come from: the claim's own `heads`, else
    the session's `--heads` (fewer than `n_heads` are used as they are and the source says
    so, e.g. the seed's one GPT-2 head), else the top `n_heads` of the discovery split's
    attention ranking or (`ranking="causal"`) of its causal sweep, the heads ablated where
    the claim ablates them (`positions`: every thought, or one `CT<i>`)."""
    if named:
        return [Head.parse(h) for h in named], "claim"
    if run.heads:
        short = f" ({len(run.heads)} of the {n_heads} asked)" if len(run.heads) < n_heads else ""
        return run.heads[:n_heads], f"--heads{short}"
    if ranking == "causal":
        thought = ranking_thought(positions)
        where = "" if thought is None else f" at CT{thought}"
        return top_heads(causal_ranking(run, n_heads, thought), n_heads), f"causal ranking{where}"
    return top_heads(run.ranking, n_heads), "ranking"
