"""Head discovery: rank heads by how they move information among the continuous thoughts.

On the discovery split (disjoint from the test split) the attention of every latent query is
recorded and averaged into A[layer, head, i, j] (query CT_i -> key CT_j). Per head:

- flow: mass on earlier thoughts, mean over queries CT1..CT{K-1} of sum_{j<i} A[i, j];
- hub: concentration of the mass later thoughts send to earlier ones on a single thought,
  max_j r_j / sum_j r_j with r_j = sum_{i>j} A[i, j]; the argmax is the head's hub position;
- skip: mass the last thought puts on the first half of the thoughts.

composite = 0.4 flow + 0.4 hub + 0.2 skip, each min-max normalised over all heads. The model's
hub position is the thought receiving the most such mass summed over every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from harness.data.problems import Problem
from harness.interventions.attention import AttentionRecord
from harness.runtime.arch import Head
from harness.runtime.codi import CODIModel
from harness.runtime.loop import encode_questions, run_latents
from harness.runtime.progress import bar

WEIGHTS = {"flow": 0.4, "hub": 0.4, "skip": 0.2}


@dataclass
class LatentAttention:
    latent: np.ndarray  # [L, H, K, K] mean attention, query CT_i -> key CT_j
    bot: np.ndarray  # [L, H, K] mean mass on bot
    question: np.ndarray  # [L, H, K] mean mass on the question tokens
    n_problems: int

    def packed(self) -> np.ndarray:
        """One array [L, H, K, K + 2] (latent | bot | question), the form the disk cache holds."""
        return np.concatenate([self.latent, self.bot[..., None], self.question[..., None]], axis=-1)

    @classmethod
    def unpack(cls, packed: np.ndarray, n_problems: int) -> LatentAttention:
        k = packed.shape[-1] - 2
        return cls(packed[..., :k], packed[..., k], packed[..., k + 1], n_problems)


@torch.no_grad()
def record_latent_attention(
    codi: CODIModel, problems: list[Problem], batch_size: int = 128, progress: bool = True
) -> LatentAttention:
    sums = None
    for start in bar(range(0, len(problems), batch_size), desc=f"attention {codi.name}", disable=not progress):
        batch = encode_questions(codi, [p.question for p in problems[start : start + batch_size]])
        with AttentionRecord(codi, batch.positions(codi.n_latent)) as rec:
            run_latents(codi, batch)
        parts = [rec.latent.sum(0), rec.bot.sum(0), rec.question.sum(0)]
        sums = parts if sums is None else [a + b for a, b in zip(sums, parts)]
    n = len(problems)
    return LatentAttention(*(s.numpy() / n for s in sums), n_problems=n)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def head_metrics(att: LatentAttention) -> pd.DataFrame:
    """One row per (layer, head), sorted by composite score (best first), with its rank."""
    a = att.latent  # [L, H, K, K]
    n_layers, n_heads, k, _ = a.shape
    earlier = np.tril(np.ones((k, k)), -1)  # [i, j] = 1 where j < i
    flow = (a * earlier).sum(-1)[..., 1:].mean(-1)  # [L, H]
    received = (a * earlier).sum(-2)  # [L, H, K]: r_j from later queries
    total = received.sum(-1)
    hub = np.divide(received.max(-1), total, out=np.zeros_like(total), where=total > 0)
    skip = a[..., k - 1, : max(1, k // 2)].sum(-1)
    composite = sum(w * _minmax(m) for w, m in zip(WEIGHTS.values(), (flow, hub, skip)))
    rows = [
        {
            "layer": layer,
            "head": head,
            "name": str(Head(layer, head)),
            "flow": flow[layer, head],
            "hub": hub[layer, head],
            "skip": skip[layer, head],
            "composite": composite[layer, head],
            "hub_position": f"CT{int(received[layer, head].argmax())}",
            "to_bot": att.bot[layer, head].mean(),
            "to_question": att.question[layer, head].mean(),
        }
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    df = pd.DataFrame(rows).sort_values(["composite", "layer", "head"], ascending=[False, True, True])
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def model_hub_thought(att: LatentAttention) -> int:
    """Index of the thought that later thoughts attend to most, summed over every head."""
    k = att.latent.shape[-1]
    received = (att.latent * np.tril(np.ones((k, k)), -1)).sum(-2).sum((0, 1))  # [K]
    return int(received.argmax())


def model_hub_position(att: LatentAttention) -> str:
    return f"CT{model_hub_thought(att)}"


def top_heads(ranked: pd.DataFrame, n: int) -> list[Head]:
    return [Head(int(r.layer), int(r.head)) for r in ranked.head(n).itertuples()]
