"""Interchange patching of continuous thoughts (the causal-abstraction "interchange
intervention"): a base problem runs with some of its thoughts replaced by those of a source
problem that has the same operations but another start value; does the answer become the one
the source's intermediate values imply (the counterfactual), stay the base answer, or neither?

Pairs come from the solution annotations of any data set that has them (synthetic, GSM8K): the
source is the base question with one number of the annotated chain changed and the chain
recomputed (`harness.data.counterfactuals`).
"""

from __future__ import annotations

import dataclasses

import torch

from harness.data.counterfactuals import counterfactuals
from harness.data.problems import Problem, is_correct
from harness.interventions.subspace import interchange_rows
from harness.measures.evaluation import EvalResult, evaluate
from harness.runtime.codi import CODIModel
from harness.runtime.loop import ThoughtPatch, encode_questions, run_latents
from harness.runtime.positions import PositionMap


def interchange_pairs(problems: list[Problem], seed: int) -> tuple[list[int], list[Problem]]:
    """(indices of the base problems that have a counterfactual, their sources), from the
    solution annotations (`harness.data.counterfactuals`)."""
    made = counterfactuals(problems, seed)
    index = {p.id: i for i, p in enumerate(problems)}
    return [index[pair.base.id] for pair in made.pairs], [pair.source for pair in made.pairs]


@torch.no_grad()
def clean_thoughts(codi: CODIModel, problems: list[Problem], batch_size: int) -> torch.Tensor:
    """Unpatched thoughts: [N, K, d]."""
    out = []
    for start in range(0, len(problems), batch_size):
        batch = encode_questions(codi, [p.question for p in problems[start : start + batch_size]])
        out.append(run_latents(codi, batch).thoughts)
    return torch.cat(out)


def interchange(
    codi: CODIModel,
    bases: list[Problem],
    sources: list[Problem],
    thoughts: tuple[int, ...],
    batch_size: int = 128,
    progress: bool = False,
    basis: torch.Tensor | None = None,
    donor: torch.Tensor | None = None,
    max_new_tokens: int = 256,
) -> tuple[EvalResult, list[bool]]:
    """Each base run with its thoughts `thoughts` (indices) taken from its source (with a
    `basis` [r, d] of orthonormal rows: only the thoughts' coordinates in its row space, the
    learned-subspace interchange of `harness.measures.das`): records scored against the *source's*
    answer (correct = counterfactual; answer_logprob = the counterfactual answer's), and
    whether each prediction is the base answer. `donor`: the sources' clean thoughts [N, K, d],
    when they are already computed. `max_new_tokens`: answer tokens decoded at most."""
    donor = clean_thoughts(codi, sources, batch_size) if donor is None else donor  # [N, K, d]

    def swap(rows: torch.Tensor, i: int, thought: torch.Tensor) -> torch.Tensor:
        source = rows[:, i].to(thought)  # [B, d]
        return source if basis is None else interchange_rows(basis, thought, source)

    def intervene(pmap: PositionMap, indices: list[int]) -> ThoughtPatch:
        rows = donor[indices]  # [B, K, d]: the sources of this batch's bases, in its order
        return ThoughtPatch(codi, lambda i, thought: swap(rows, i, thought) if i in thoughts else thought)

    relabelled = [dataclasses.replace(b, answer=s.answer) for b, s in zip(bases, sources)]
    result = evaluate(
        codi, relabelled, batch_size, max_new_tokens=max_new_tokens, progress=progress, intervene=intervene
    )
    stays = [is_correct(r.pred, b.answer) for r, b in zip(result.records, bases)]
    return result, stays
