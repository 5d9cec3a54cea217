"""Interchange patching of continuous thoughts (the causal-abstraction "interchange
intervention"): a base problem runs with some of its thoughts replaced by those of a source
problem that has the same operations but another start value; does the answer become the one
the source's intermediate values imply (the counterfactual), stay the base answer, or neither?

Pairs come from the synthetic generator: the source is the base question with its start value
changed (same names, wording, operations and operands) to one that keeps every step valid and
changes the answer. GSM8K problems carry no such structure: they make no pairs (see
docs/claims.md).
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from harness.codi import CODIModel
from harness.data import MAX_START, MAX_VALUE, Problem, is_correct
from harness.evaluation import EvalResult, evaluate
from harness.positions import PositionMap
from harness.runtime import ThoughtPatch, encode_questions, run_latents

_STEP = re.compile(r"<<\s*(-?\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*>>")


def _apply(x: int, op: str, k: int) -> int | None:
    """One synthetic operation, or None where the generator would not have chosen it."""
    if op == "+":
        return x + k if x + k <= MAX_VALUE else None
    if op == "-":
        return x - k if x - k >= 0 else None
    if op == "*":
        return x * k if x > 1 and x * k <= MAX_VALUE else None
    return x // 2 if x % 2 == 0 and x > 0 else None  # "/": halving


def counterfactual(problem: Problem, rng: random.Random) -> Problem | None:
    """`problem` with another start value (same wording and operations), every step still
    valid and a different answer; None when no such value exists or the problem is not one of
    the synthetic generator's."""
    steps = _STEP.findall(problem.cot)
    opening, sep, rest = problem.question.partition(" . ")
    if not steps or not sep or opening.count(f" {steps[0][0]} ") != 1:
        return None
    start = int(steps[0][0])
    for value in rng.sample(range(2, MAX_START + 1), MAX_START - 1):
        chain, x = [], value
        for _, op, k, _ in steps:
            y = _apply(x, op, int(k))
            if y is None:
                break
            chain.append(f"<< {x} {op} {k} = {y} >>")
            x = y
        if value != start and len(chain) == len(steps) and x != problem.answer:
            question = opening.replace(f" {start} ", f" {value} ") + sep + rest
            return dataclasses.replace(
                problem, id=f"{problem.id}-cf", question=question, cot=" ".join(chain), answer=float(x)
            )
    return None


def interchange_pairs(problems: list[Problem], seed: int) -> tuple[list[int], list[Problem]]:
    """(indices of the base problems that have a counterfactual, their sources)."""
    rng = random.Random(seed)
    bases, sources = [], []
    for i, p in enumerate(problems):
        source = counterfactual(p, rng)
        if source is not None:
            bases.append(i)
            sources.append(source)
    return bases, sources


def interchange_rows(basis: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Base thoughts with their coordinates in the row space of `basis` [r, d] (orthonormal
    rows) taken from the sources: [B, d] -> [B, d]."""
    return base + (source - base) @ basis.T.to(base) @ basis.to(base)


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
) -> tuple[EvalResult, list[bool]]:
    """Each base run with its thoughts `thoughts` (indices) taken from its source (with a
    `basis` [r, d] of orthonormal rows: only the thoughts' coordinates in its row space, the
    learned-subspace interchange of `harness.das`): records scored against the *source's*
    answer (correct = counterfactual; answer_logprob = the counterfactual answer's), and
    whether each prediction is the base answer. `donor`: the sources' clean thoughts [N, K, d],
    when they are already computed."""
    donor = clean_thoughts(codi, sources, batch_size) if donor is None else donor  # [N, K, d]

    def swap(rows: torch.Tensor, i: int, thought: torch.Tensor) -> torch.Tensor:
        source = rows[:, i].to(thought)  # [B, d]
        return source if basis is None else interchange_rows(basis, thought, source)

    def intervene(pmap: PositionMap, indices: list[int]) -> ThoughtPatch:
        rows = donor[indices]  # [B, K, d]: the sources of this batch's bases, in its order
        return ThoughtPatch(codi, lambda i, thought: swap(rows, i, thought) if i in thoughts else thought)

    relabelled = [dataclasses.replace(b, answer=s.answer) for b, s in zip(bases, sources)]
    result = evaluate(codi, relabelled, batch_size, progress=progress, intervene=intervene)
    stays = [is_correct(r.pred, b.answer) for r, b in zip(result.records, bases)]
    return result, stays
