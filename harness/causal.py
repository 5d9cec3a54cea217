"""Causal head discovery: every head alone ablated at every thought (the sweep), attribution
patching's first-order estimate of the same drops, and the causal ranking claims take their
heads from with `ranking = "causal"` (the sweep on the discovery split).

Each is a computation of a `ModelRun`, cached by it under a content key; the run itself knows
none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from harness.attribution import attribution_patching as estimate_drops
from harness.data import data_hash
from harness.progress import bar
from harness.specs import AblateHeads, Baseline

if TYPE_CHECKING:
    from harness.experiments import Condition, ModelRun


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


def attribution_patching(run: ModelRun) -> np.ndarray:
    """Attribution patching's estimate of every head's ablation drop in answer
    log-probability, per problem: [2 (zero, mean), N, L, H] nats, cached."""

    def compute() -> np.ndarray:
        return estimate_drops(run.codi, run.problems, head_means(run), run.batch_size, run.progress)

    key = run.key(kind="attribution_patching", means=data_hash(run.discovery))
    return run.cached(key, "attribution patching (every head)", compute)


def causal_ranking(run: ModelRun) -> pd.DataFrame:
    """Heads by their zero-ablation drop in answer log-probability at every thought on the
    discovery split (the sweep's causal ranking, teacher-forced only), best first, with
    `rank`, `layer`, `head`, `name`, `drop_logprob` (memoised)."""

    def compute() -> pd.DataFrame:
        on = run.on_discovery()
        base = on.answer_logprobs(Baseline())
        heads = bar(on.every_head, desc=f"causal ranking {run.name}", disable=not run.progress)
        rows = [
            {"layer": h.layer, "head": h.head, "name": str(h),
             "drop_logprob": float(np.mean(base - on.answer_logprobs(AblateHeads((h,), ("latent",), "zero"))))}
            for h in heads
        ]  # fmt: skip
        df = pd.DataFrame(rows).sort_values(["drop_logprob", "layer", "head"], ascending=[False, True, True])
        df.insert(0, "rank", range(1, len(df) + 1))
        return df.reset_index(drop=True)

    return run.remember("causal_ranking", compute)
