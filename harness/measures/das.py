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
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from harness.data.problems import Problem, format_number
from harness.interventions.subspace import interchange_rows
from harness.runtime.codi import CODIModel
from harness.runtime.loop import answer_logprobs, encode_questions, pause_latents, run_latents
from harness.runtime.progress import bar

RANKS = (1, 2, 4, 8, 16)
DAS_STEPS = 60  # optimiser steps per (thought, rank)
DAS_BATCH = 64
DAS_LR = 1e-2


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


def fit_subspaces(
    codi: CODIModel,
    bases: list[Problem],
    sources: list[Problem],
    source_thoughts: torch.Tensor,  # [N, K, d] the sources' clean thoughts
    thought: int,
    ranks: tuple[int, ...],
    seed: int = 0,
    steps: int = DAS_STEPS,
    progress: bool = False,
    lr: float = DAS_LR,
) -> dict[int, torch.Tensor]:
    """Per rank r, the rank-r subspace of CT_thought whose interchange makes each base run give
    its source's answer (mean teacher-forced log-probability, Adam): [r, d] orthonormal rows.

    Each rank has its own rotation, all from the same start (the seed) and trained on the same
    batches, so a fit does not depend on which other ranks share it; they are stacked in one
    batch (a block of rows per rank, each block's loss reaching only its own rotation): one
    pass per step for all ranks instead of one per rank."""
    assert ranks and len(set(ranks)) == len(ranks), f"distinct ranks expected, got {ranks}"
    d = source_thoughts.shape[-1]
    rotations = []
    for _ in ranks:
        torch.manual_seed(seed)
        rotations.append(orthogonal(nn.Linear(d, d, bias=False)))
    optimiser = torch.optim.Adam([w for r in rotations for w in r.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    paused = {}
    batches = [list(range(s, min(s + DAS_BATCH, len(bases)))) for s in range(0, len(bases), DAS_BATCH)]
    encoded = [encode_questions(codi, [bases[i].question for i in rows] * len(ranks)) for rows in batches]
    answers = [[format_number(sources[i].answer) for i in rows] * len(ranks) for rows in batches]
    label = f"DAS CT{thought} rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    with frozen(codi):
        for _ in bar(range(steps), desc=label, disable=not progress):
            b = int(torch.randint(len(batches), (1,), generator=generator))
            if b not in paused:  # the thoughts before the trained one never change: run them once
                with torch.no_grad():
                    paused[b] = pause_latents(codi, encoded[b], thought)
            donor = source_thoughts[batches[b], thought]  # [B, d]

            def patch(i: int, x: torch.Tensor, donor: torch.Tensor = donor) -> torch.Tensor:
                if i != thought:
                    return x
                blocks = x.view(len(ranks), -1, x.shape[-1])  # [R, B, d]: one block per rank
                return torch.cat([interchange_rows(rotation.weight[:rank], block, donor.to(x))
                                  for rotation, rank, block in zip(rotations, ranks, blocks)])  # fmt: skip

            state = run_latents(codi, encoded[b], patch, resume=paused[b])
            logprobs = answer_logprobs(codi, state, answers[b], copy_cache=False)  # [R * B]
            loss = -logprobs.view(len(ranks), -1).mean(1).sum()  # each rank's mean reaches its rotation only
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return {rank: rotation.weight[:rank].detach().clone() for rotation, rank in zip(rotations, ranks)}
