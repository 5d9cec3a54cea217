"""Attention-pattern override and recording through a registered attention function.

`AttentionOverride` rewrites the probabilities of chosen heads for queries at the latent
positions (eager math, GQA-aware); `AttentionRecord` stores, for every head, where the latent
queries put their mass (the input of head discovery). Layers with no chosen head, and passes
with no latent query, keep SDPA. Rows stay normalised and causal, padding stays masked. A
query that cannot see its target (at or before the hub) keeps its own pattern and is counted
in `kept_own`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from harness.interventions.hooks import InterventionError
from harness.runtime.arch import Head, attention
from harness.runtime.codi import CODIModel, Pass
from harness.runtime.positions import PositionMap

IMPLEMENTATION = "codi_attention"
PATTERNS = ("hub", "uniform", "sequential", "reroute")
HUB_MASS = 0.8


def _visible(mask: torch.Tensor | None, n_query: int, n_key: int, device) -> torch.Tensor:
    """[B or 1, 1, Tq, Tk] bool: which keys each query may attend to."""
    if mask is not None:
        return mask > torch.finfo(mask.dtype).min / 2 if mask.dtype != torch.bool else mask
    q = torch.arange(n_query, device=device)[:, None] + (n_key - n_query)
    return (torch.arange(n_key, device=device)[None] <= q)[None, None]


def _eager_probs(module, query, key, mask, scaling) -> torch.Tensor:
    """Softmax attention probabilities [B, H, Tq, Tk], key heads repeated for GQA."""
    groups = query.shape[1] // key.shape[1]
    scores = torch.matmul(query, key.repeat_interleave(groups, dim=1).transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=torch.float32).to(query.dtype)


def _codi_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plans = [plan for plan in getattr(module, "codi_plans", []) if plan.acts_in(plan.codi.current_pass())]
    if not plans:  # no latent query in this pass (the question pass): SDPA, as without a plan
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    probs = _eager_probs(module, query, key, attention_mask, scaling)
    visible = _visible(attention_mask, query.shape[2], key.shape[2], query.device)
    for plan in plans:  # each handed the pass it acts on
        probs = plan.apply(plan.codi.current_pass(), module.layer_idx, probs, visible)
    groups = query.shape[1] // value.shape[1]
    out = torch.matmul(probs, value.repeat_interleave(groups, dim=1))  # [B, H, Tq, hd]
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(IMPLEMENTATION, _codi_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


class _AttentionPlan(ABC):
    """Installs itself on the touched attention modules and switches the implementation."""

    def __init__(self, codi: CODIModel, layers: Sequence[int], pmap: PositionMap):
        self.codi, self.layers, self.pmap = codi, sorted(set(layers)), pmap
        self._previous = None

    def __enter__(self):
        for layer in self.layers:
            module = attention(self.codi.lm, layer)
            module.codi_plans = [*getattr(module, "codi_plans", []), self]
        self._previous = self.codi.lm.config._attn_implementation
        self.codi.lm.set_attn_implementation(IMPLEMENTATION)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            module = attention(self.codi.lm, layer)
            module.codi_plans = [p for p in getattr(module, "codi_plans", []) if p is not self]
            if not module.codi_plans:
                del module.codi_plans
        self.codi.lm.set_attn_implementation(self._previous)

    def _latent_queries(self, step: Pass) -> list[tuple[int, int]]:
        """(local query index, thought index) for the latent queries in pass `step`."""
        return step.local(list(self.pmap.latent))

    def acts_in(self, step: Pass) -> bool:
        """Whether pass `step` has a query this plan reads or rewrites (a latent one): the
        others run SDPA, and the question pass never builds its [B, H, T, T] probabilities."""
        return bool(self._latent_queries(step))

    @abstractmethod
    def apply(self, step: Pass, layer: int, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, H, Tq, Tk] of `layer` in pass `step` -> the ones to use."""


def _order(name: str, n_latent: int) -> int:
    """Where a fixed position sits relative to the thoughts: bot -1, CT<i> i, eot K."""
    return PositionMap(width=1, n_latent=n_latent, question_lengths=()).index(name) - 1


def rewritten_thoughts(pattern: str, hub: str, target: str | None, n_latent: int) -> list[int]:
    """The thoughts CT<i> whose queries a pattern rewrites. Uniform and sequential rewrite
    every thought; hub and reroute only the queries that come after the hub (and the target):
    a query cannot attend to a later position, and the hub attending to itself is not the
    hub pattern."""
    if pattern in ("uniform", "sequential"):
        return list(range(n_latent))
    after = max(_order(hub, n_latent), _order(target, n_latent) if pattern == "reroute" else -1)
    return [i for i in range(n_latent) if i > after]


class AttentionOverride(_AttentionPlan):
    """Rewrite chosen heads' patterns at latent queries: hub, uniform, sequential or reroute.
    Queries that cannot see the hub or target (`rewritten_thoughts`) keep their own."""

    def __init__(
        self,
        codi: CODIModel,
        heads: Sequence[Head],
        pattern: str,
        pmap: PositionMap,
        hub: str = "CT0",
        target: str | None = None,
    ):
        if pattern not in PATTERNS:
            raise InterventionError(f"unknown attention pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
        if (pattern == "reroute") != (target is not None):
            raise InterventionError("a target is given exactly for pattern 'reroute'")
        super().__init__(codi, [h.layer for h in heads], pmap)
        self.heads, self.pattern = list(heads), pattern
        self.hub = pmap.index(hub)
        self.target = pmap.index(target) if target is not None else None
        self.rewritten = set(rewritten_thoughts(pattern, hub, target, pmap.n_latent))

    def apply(self, step: Pass, layer: int, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        queries = [(q, i) for q, i in self._latent_queries(step) if i in self.rewritten]
        heads = [h.head for h in self.heads if h.layer == layer]
        if not queries or not heads:
            return probs
        probs = probs.clone()
        for q, _ in queries:
            absolute = step.offset + q
            vis = visible[:, 0, q].to(probs.dtype).expand(probs.shape[0], -1)  # [B, Tk]
            for h in heads:
                row = probs[:, h, q]  # [B, Tk]
                probs[:, h, q] = self._rewrite(row, vis, absolute)
        return probs

    def _rewrite(self, row: torch.Tensor, vis: torch.Tensor, query: int) -> torch.Tensor:
        if self.pattern == "uniform":
            return vis / vis.sum(-1, keepdim=True)
        if self.pattern == "sequential":
            new = torch.zeros_like(row)
            new[:, query - 1] = 1.0
            return new
        if self.pattern == "hub":
            new = (1 - HUB_MASS) * row
            new[:, self.hub] += HUB_MASS
            return new
        new = row.clone()  # reroute: the hub's mass moves to the target
        new[:, self.target] += new[:, self.hub]
        new[:, self.hub] = 0.0
        return new


class AttentionRecord(_AttentionPlan):
    """Where latent queries look, per head: `.latent` [B, L, H, K, K] (query CT_i -> key CT_j),
    `.bot` and `.question` [B, L, H, K] (mass on bot and on the question tokens)."""

    def __init__(self, codi: CODIModel, pmap: PositionMap):
        geo = codi.geometry
        super().__init__(codi, range(geo.n_layers), pmap)
        k = pmap.n_latent
        shape = (len(pmap.question_lengths), geo.n_layers, geo.n_heads)
        self.latent = torch.zeros(*shape, k, k)
        self.bot = torch.zeros(*shape, k)
        self.question = torch.zeros(*shape, k)

    def apply(self, step: Pass, layer: int, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        bot, first = self.pmap.index("bot"), self.pmap.latent[0]
        for q, i in self._latent_queries(step):
            row = probs[:, :, q].detach().float().cpu()  # [B, H, Tk]
            self.latent[:, layer, :, i, : i + 1] = row[:, :, first : first + i + 1]
            self.bot[:, layer, :, i] = row[:, :, bot]
            self.question[:, layer, :, i] = row[:, :, :bot].sum(-1)
        return probs
