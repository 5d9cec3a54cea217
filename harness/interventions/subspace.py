"""A learned (or any) subspace of one continuous thought, interchanged: the intervention that
distributed alignment search (`harness.measures.das`) trains and the `das` kind judges."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from harness.interventions.context import RunContext
from harness.interventions.hooks import InterventionError
from harness.interventions.specs import NOISE_SEED_STRIDE, Spec, derangement
from harness.runtime.loop import LatentPatch
from harness.runtime.positions import thought_number

SUBSPACE_MODES = ("zero", "mean", "resample")


def interchange_rows(basis: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Base thoughts with their coordinates in the row space of `basis` [r, d] (orthonormal
    rows) taken from the sources: [B, d] -> [B, d]."""
    return base + (source - base) @ basis.T.to(base) @ basis.to(base)


@dataclass(frozen=True)
class PatchSubspace(Spec):
    """A thought's coordinates in the row space of `basis` ([r, d] orthonormal rows, e.g. a
    subspace learned by `harness.measures.das`) replaced, the rest of the thought kept: zero (the
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
