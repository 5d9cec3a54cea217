"""Learned-subspace interchange (distributed alignment search, Geiger et al. 2024; Wu et al.'s
pyvene is the field's reference implementation) on a continuous thought.

A rank-r subspace of thought CT_t is the span of the first r rows of an orthogonal rotation
(torch's `orthogonal` parametrization of a d x d linear map). Interchanging it takes a base
problem's thought x_b and its counterfactual source's x_s to x_b + B^T B (x_s - x_b), B the r
rows: the source's coordinates in the subspace, the base's elsewhere. The rotation is trained
so that the patched base run gives the answer the source's intermediate values imply (the
gold answer of the source, teacher-forced after eot), on discovery pairs only, with the model
frozen. pyvene wraps HF modules position by position; the thought loop feeds each thought back
through `prj`, so the subspace is applied where `runtime.run_latents` takes its thought patch.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from harness.codi import CODIModel
from harness.data import Problem, format_number
from harness.evaluation import PrefixStore
from harness.interchange import interchange_rows
from harness.interventions import InterventionError
from harness.positions import thought_number
from harness.progress import bar
from harness.runtime import LatentPatch, answer_logprobs, encode_questions, run_latents
from harness.specs import NOISE_SEED_STRIDE, RunContext, Spec, derangement

RANKS = (1, 2, 4, 8, 16)
DAS_STEPS = 60  # optimiser steps per (thought, rank)
DAS_BATCH = 64
DAS_LR = 1e-2
SUBSPACE_MODES = ("zero", "mean", "resample")


def subspace_patch(thought: int, basis: torch.Tensor, sources: torch.Tensor) -> LatentPatch:
    """The thought patch that interchanges `basis`'s subspace of CT_thought with `sources` [B, d]."""
    return lambda i, x: interchange_rows(basis, x, sources.to(x)) if i == thought else x


@contextlib.contextmanager
def frozen(codi: CODIModel) -> Iterator[None]:
    """The model's weights out of the autograd graph while a subspace is trained."""
    flags = [p.requires_grad for p in codi.parameters()]
    for p in codi.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(codi.parameters(), flags):
            p.requires_grad_(flag)


def random_basis(d: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random rank-`rank` subspace: [rank, d] orthonormal rows (QR of a Gaussian)."""
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=generator))
    return q.T.contiguous()


def fit_subspace(
    codi: CODIModel,
    bases: list[Problem],
    sources: list[Problem],
    source_thoughts: torch.Tensor,  # [N, K, d] the sources' clean thoughts
    thought: int,
    rank: int,
    seed: int = 0,
    steps: int = DAS_STEPS,
    progress: bool = False,
    lr: float = DAS_LR,
) -> torch.Tensor:
    """The rank-`rank` subspace of CT_thought whose interchange makes each base run give its
    source's answer (mean teacher-forced log-probability, Adam): [rank, d] orthonormal rows."""
    d = source_thoughts.shape[-1]
    torch.manual_seed(seed)
    rotation = orthogonal(nn.Linear(d, d, bias=False))
    optimiser = torch.optim.Adam(rotation.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    prefixes = PrefixStore()
    batches = [list(range(s, min(s + DAS_BATCH, len(bases)))) for s in range(0, len(bases), DAS_BATCH)]
    encoded = [encode_questions(codi, [bases[i].question for i in rows]) for rows in batches]
    answers = [[format_number(sources[i].answer) for i in rows] for rows in batches]
    with frozen(codi):
        for _ in bar(range(steps), desc=f"DAS CT{thought} rank {rank}", disable=not progress):
            b = int(torch.randint(len(batches), (1,), generator=generator))
            with torch.no_grad():
                prefix = prefixes.get(codi, encoded[b], batches[b])
            basis = rotation.weight[:rank]  # [r, d]
            patch = subspace_patch(thought, basis, source_thoughts[batches[b], thought])
            state = run_latents(codi, encoded[b], patch, prefix=prefix)
            loss = -answer_logprobs(codi, state, answers[b], copy_cache=False).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return rotation.weight[:rank].detach().clone()


@dataclass(frozen=True)
class PatchSubspace(Spec):
    """A thought's coordinates in the row space of `basis` ([r, d] orthonormal rows, e.g. a
    subspace learned by `harness.das`) replaced, the rest of the thought kept: zero (the
    subspace projected out), mean (the discovery split's), resample (another test problem's: a
    derangement, one per draw). The basis enters the cache key by a hash of its values."""

    thought: str
    basis: torch.Tensor = field(compare=False, repr=False)
    mode: str = "resample"
    draw: int = 0
    digest: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if thought_number(self.thought) is None:
            raise InterventionError(f"a subspace patch acts on one thought (CT<i>), not {self.thought!r}")
        if self.mode not in SUBSPACE_MODES:
            raise InterventionError(f"unknown subspace mode {self.mode!r}; choose from {', '.join(SUBSPACE_MODES)}")
        if self.draw and self.mode != "resample":
            raise InterventionError(f"mode {self.mode!r} is not random: it has no draws")
        basis = torch.as_tensor(self.basis, dtype=torch.float32)
        if basis.ndim != 2 or not torch.allclose(basis @ basis.T, torch.eye(len(basis)), atol=1e-4):
            raise InterventionError(f"a subspace basis is [r, d] with orthonormal rows; got shape {tuple(basis.shape)}")
        object.__setattr__(self, "basis", basis)
        object.__setattr__(self, "digest", hashlib.sha256(basis.numpy().tobytes()).hexdigest()[:16])

    def key(self) -> dict:
        return {"spec": "PatchSubspace", "thought": self.thought, "basis": self.digest, "rank": len(self.basis),
                "mode": self.mode, "draw": self.draw}  # fmt: skip

    @property
    def randomised(self) -> bool:  # type: ignore[override]
        return self.mode == "resample"

    def patched_thoughts(self) -> tuple[str, ...]:
        return (self.thought,)

    def label(self) -> str:
        return f"subspace {self.mode} (rank {len(self.basis)})"

    def latent_patch(self, run: RunContext, indices: list[int]) -> LatentPatch:
        t = thought_number(self.thought)
        if t >= run.codi.n_latent:
            raise InterventionError(f"{run.codi.name} has thoughts CT0..CT{run.codi.n_latent - 1}, not {self.thought}")
        thoughts = run.clean_thoughts("test")[:, t]  # [N, d]
        if self.mode == "zero":
            source = torch.zeros_like(thoughts)
        elif self.mode == "mean":
            source = run.clean_thoughts("discovery")[:, t].mean(0, keepdim=True).expand_as(thoughts)
        else:
            donors = torch.Generator().manual_seed(run.seed * 1000 + 900 + self.draw * NOISE_SEED_STRIDE)
            source = thoughts[derangement(len(thoughts), donors)]
        values = source[indices]  # [B, d]
        return lambda i, x: interchange_rows(self.basis, x, values.to(x)) if i == t else x
