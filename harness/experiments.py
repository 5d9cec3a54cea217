"""Experiments on one model and data set: cached per-problem correctness under interventions.

Every result is an array of correctness flags over the same problems (so effects are paired),
cached on disk under a content key of the model, data, decoding config and intervention spec.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from harness.arch import HeadGeometry
from harness.attention import AttentionOverride
from harness.attribution import Attributions, integrated_gradients, question_tokens
from harness.cache import ResultCache, content_key
from harness.codi import CODIModel
from harness.data import Problem
from harness.discovery import LatentAttention, head_metrics, model_hub_thought, record_latent_attention, top_heads
from harness.evaluation import PrefixStore, evaluate
from harness.interventions import Head, HeadAblation, InterventionError
from harness.models import LazyModel, default_batch_size
from harness.probes import ProbeResults, run_probes, thought_states
from harness.runtime import ThoughtPatch, encode_questions, run_latents
from harness.transplant import DEFAULT_RIDGE, HeadTransplant, LinearMap, paired_states

MAX_NEW_TOKENS = 256
POSITION_MODES = ("noise", "zero", "mean", "resample")
IG_PROBLEMS = 100  # problems attributed by integrated gradients (3.2)
IG_STEPS = 32


def data_hash(problems: list[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\t{p.question}\t{p.answer}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class ModelRun:
    """One model's experiments on one data set. `model` may be a loaded `CODIModel` or a
    `LazyModel`, loaded only when a result is not in the cache."""

    model: LazyModel | CODIModel
    problems: list[Problem]  # the test split: every effect is paired over these
    discovery: list[Problem]  # disjoint split for head ranking
    cache: ResultCache
    requested_batch_size: int | None = None  # else `default_batch_size` of the loaded model
    seed: int = 0
    heads: list[Head] | None = None  # user-named critical heads (else the ranking)
    progress: bool = False
    _computed: list[str] = field(default_factory=list)
    drops: dict = field(default_factory=dict)  # memo of paired statistics (see metrics._drop)
    peers: dict[str, ModelRun] = field(default_factory=dict)  # the session's other models (phase 2)
    _maps: dict = field(default_factory=dict)  # (donor, layers) -> transplant maps
    _prefixes: PrefixStore = field(default_factory=PrefixStore)  # question passes, shared by interventions

    def __post_init__(self) -> None:
        if isinstance(self.model, CODIModel):
            self.model = LazyModel.of(self.model)

    @property
    def codi(self) -> CODIModel:
        return self.model.codi

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def n_latent(self) -> int:
        return self.model.facts.n_latent

    @property
    def geometry(self) -> HeadGeometry:
        return self.model.facts.geometry

    @property
    def fingerprint(self) -> str:
        return self.model.facts.fingerprint

    @cached_property
    def batch_size(self) -> int:
        return self.requested_batch_size or default_batch_size(self.codi)

    @property
    def decoding(self) -> dict:
        """What besides weights and data decides a result: decoding settings, and the device
        type (CPU and GPU kernels round differently, which can flip a close answer)."""
        return {
            "greedy": True,
            "max_new_tokens": MAX_NEW_TOKENS,
            "n_latent": self.n_latent,
            "device": self.model.device_type,
        }

    def key(self, **spec) -> str:
        return content_key(
            model=self.fingerprint,
            data=data_hash(self.problems),
            decoding=self.decoding,
            spec=spec,
        )

    def flags(self, spec: dict, intervene=None, latent_only: bool = True) -> np.ndarray:
        """Correctness per problem under `intervene` (see `evaluation.evaluate`), cached.
        `latent_only`: the intervention acts from CT0 on, so the question passes are shared."""

        def compute() -> np.ndarray:
            self._computed.append(str(spec))
            result = evaluate(
                self.codi,
                self.problems,
                self.batch_size,
                max_new_tokens=MAX_NEW_TOKENS,
                progress=self.progress,
                intervene=intervene,
                prefixes=self._prefixes if latent_only else None,
            )
            return np.array([r.correct for r in result.records], dtype=bool)

        return self.cache.get_or_compute(self.key(**spec), compute)

    # --- baselines and discovery ---------------------------------------------------------

    @cached_property
    def baseline(self) -> np.ndarray:
        return self.flags({"kind": "baseline"})

    @cached_property
    def baseline_confidence(self) -> np.ndarray:
        """Probability of the first answer token per problem (difficulty tiers), cached."""

        def compute() -> np.ndarray:
            self._computed.append("baseline_confidence")
            result = evaluate(
                self.codi, self.problems, self.batch_size, max_new_tokens=MAX_NEW_TOKENS, progress=self.progress
            )
            return np.array([r.confidence for r in result.records], dtype=np.float64)

        return self.cache.get_or_compute(self.key(kind="baseline_confidence"), compute)

    @cached_property
    def _attention(self) -> LatentAttention:
        key = content_key(
            model=self.fingerprint,
            data=data_hash(self.discovery),
            decoding=self.decoding,
            spec={"kind": "latent_attention"},
        )

        def compute() -> np.ndarray:
            self._computed.append("latent_attention")
            return record_latent_attention(self.codi, self.discovery, self.batch_size, progress=self.progress).packed()

        return LatentAttention.unpack(self.cache.get_or_compute(key, compute), len(self.discovery))

    @cached_property
    def ranking(self) -> pd.DataFrame:
        return head_metrics(self._attention)

    @cached_property
    def hub_thought(self) -> int:
        return model_hub_thought(self._attention)

    @property
    def hub(self) -> str:
        return f"CT{self.hub_thought}"

    @cached_property
    def probes(self) -> ProbeResults:
        """3.1: layer-wise probes at the hub thought over the test problems, cached."""

        def compute() -> np.ndarray:
            self._computed.append("probes")
            states = thought_states(self.codi, self.problems, self.hub_thought, self.batch_size, self.progress)
            return run_probes(states, self.problems, self.seed, self.progress).packed()

        packed = self.cache.get_or_compute(self.key(kind="probes", thought=self.hub, seed=self.seed), compute)
        return ProbeResults.unpack(packed, self.problems)

    def attributions(self, heads: list[Head], n_problems: int = IG_PROBLEMS, n_steps: int = IG_STEPS) -> Attributions:
        """3.2: integrated gradients of each head's output at the hub thought, cached."""
        problems = self.problems[:n_problems]
        thought = self.hub_thought

        def compute() -> np.ndarray:
            self._computed.append("integrated_gradients")
            ig = integrated_gradients(self.codi, problems, heads, thought, n_steps, progress=self.progress)
            return ig.packed()

        spec = {"kind": "integrated_gradients", "heads": list(map(str, heads)), "thought": thought, "n": n_problems}
        packed = self.cache.get_or_compute(self.key(**spec, n_steps=n_steps), compute)
        tokens = self.cache.get_or_compute(  # as the tokenizer spells them, kept: a warm run loads no model
            self.key(kind="question_tokens", n=n_problems),
            lambda: np.asarray(json.dumps(question_tokens(self.codi, problems))),
        )
        return Attributions.unpack(packed, json.loads(str(tokens)))

    def transplant_maps(self, donor: ModelRun, recipient_layer: int, donor_layer: int) -> tuple[LinearMap, LinearMap]:
        """2.1: (map_in, map_out) between this model and `donor` at those layers, fitted by
        least squares on paired states of the discovery problems (memoised)."""
        key = (donor.name, recipient_layer, donor_layer)
        if key not in self._maps:
            states = paired_states(self.codi, donor.codi, self.discovery, recipient_layer, donor_layer, self.batch_size)
            self._maps[key] = states.maps()
        return self._maps[key]

    def transplant(self, donor: ModelRun, donor_head: Head, head: Head) -> tuple[np.ndarray, np.ndarray]:
        """2.1: correctness with `donor_head` of `donor` transplanted into this model's `head`
        (every position), and the maps' fit [R^2 in, held-out R^2 in, R^2 out, held-out R^2 out]."""
        spec = {"kind": "transplant", "donor": donor.fingerprint, "donor_head": str(donor_head), "head": str(head),
                "ridge": DEFAULT_RIDGE, "discovery": data_hash(self.discovery)}  # fmt: skip

        def fit() -> np.ndarray:
            maps = self.transplant_maps(donor, head.layer, donor_head.layer)
            return np.array([v for m in maps for v in (m.r2, np.nan if m.r2_heldout is None else m.r2_heldout)])

        def intervene(pmap, indices):
            map_in, map_out = self.transplant_maps(donor, head.layer, donor_head.layer)
            return HeadTransplant(self.codi, head, donor.codi, donor_head, map_in, map_out)

        r2 = self.cache.get_or_compute(self.key(**spec, part="fit"), fit)
        return self.flags(spec, intervene, latent_only=False), r2  # the head acts at every position

    def critical_heads(self, n: int) -> list[Head]:
        return (self.heads or top_heads(self.ranking, n))[:n]

    def scoped_heads(self, scope: str = "top", n_heads: int = 3, layer: int | None = None) -> list[Head]:
        """The heads an intervention acts on: the top `n_heads` critical heads, every head of
        one `layer`, or every head of the model."""
        geo = self.geometry
        if scope == "top":
            return self.critical_heads(n_heads)
        if scope == "layer":
            if layer is None or not 0 <= layer < geo.n_layers:
                raise InterventionError(f"scope 'layer' needs a layer in 0..{geo.n_layers - 1}, got {layer!r}")
            return [Head(layer, h) for h in range(geo.n_heads)]
        if scope == "all":
            return [Head(layer, h) for layer in range(geo.n_layers) for h in range(geo.n_heads)]
        raise InterventionError(f"unknown head scope {scope!r}; choose from top, layer, all")

    # --- head ablation ----------------------------------------------------------------

    def ablation(self, heads: list[Head], mode: str = "zero") -> np.ndarray:
        spec = {"kind": "head_ablation", "heads": sorted(map(str, heads)), "mode": mode, "positions": "latent"}
        return self.flags(spec, lambda pmap, idx: HeadAblation(self.codi, heads, pmap.latent, mode))

    def random_head_sets(self, like: list[Head], n_sets: int = 20) -> list[list[Head]]:
        """Random head sets matched by layer to `like`, never containing its heads."""
        rng = random.Random(self.seed)
        n_heads = self.geometry.n_heads
        sets = []
        for _ in range(n_sets):
            chosen: list[Head] = []
            for h in like:
                options = [Head(h.layer, k) for k in range(n_heads) if Head(h.layer, k) not in like + chosen]
                chosen.append(rng.choice(options))
            sets.append(chosen)
        return sets

    # --- position patching ------------------------------------------------------------

    @cached_property
    def thoughts(self) -> torch.Tensor:
        """Unpatched thoughts of every problem: [N, K, d]."""
        out = []
        with torch.no_grad():
            for start in range(0, len(self.problems), self.batch_size):
                chunk = self.problems[start : start + self.batch_size]
                out.append(run_latents(self.codi, encode_questions(self.codi, [p.question for p in chunk])).thoughts)
        return torch.cat(out)

    def replacement(self, position: int, mode: str) -> torch.Tensor:
        """What CT_position becomes for every problem: [N, d]."""
        thoughts = self.thoughts[:, position]  # [N, d]
        if mode == "zero":
            return torch.zeros_like(thoughts)
        if mode == "mean":
            return thoughts.mean(0, keepdim=True).expand_as(thoughts)
        g = torch.Generator().manual_seed(self.seed * 1000 + position)
        if mode == "resample":  # another problem's thought (a derangement)
            n = len(thoughts)
            return thoughts[(torch.randperm(n - 1, generator=g) + 1 + torch.arange(n)) % n]
        noise = torch.randn(thoughts.shape, generator=g).to(thoughts.device)  # generated on the CPU: reproducible
        scale = thoughts.float().norm(dim=-1).mean()
        return (noise / noise.norm(dim=-1, keepdim=True) * scale).to(thoughts.dtype)

    def position_patch(self, name: str, mode: str = "noise") -> np.ndarray:
        if mode not in POSITION_MODES:
            raise ValueError(f"unknown position-patch mode {mode!r}; choose from {', '.join(POSITION_MODES)}")
        position = int(name.removeprefix("CT"))
        spec = {"kind": "position_patch", "position": name, "mode": mode, "seed": self.seed}

        def intervene(pmap, indices):
            pmap.thought_index(name)  # validates the name
            values = self.replacement(position, mode)[indices]
            return ThoughtPatch(self.codi, lambda i, t: values.to(t) if i == position else t)

        return self.flags(spec, intervene)

    # --- attention patterns -----------------------------------------------------------

    def pattern(self, pattern: str, heads: list[Head], target: str | None = None) -> np.ndarray:
        spec = {"kind": "attention_pattern", "pattern": pattern, "heads": sorted(map(str, heads)), "hub": self.hub}
        if target:
            spec["target"] = target
        return self.flags(spec, lambda pmap, idx: AttentionOverride(self.codi, heads, pattern, pmap, self.hub, target))
