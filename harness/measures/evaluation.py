"""Evaluation: per-problem records (prediction, correctness, confidence) from batched inference."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

from harness.data.problems import Problem, format_number, is_correct, parse_answer
from harness.runtime.codi import CODIModel
from harness.runtime.loop import (
    Batch,
    LatentPatch,
    Prefix,
    answer_logprobs,
    decode_ids,
    decode_texts,
    encode_questions,
    generate,
    question_pass,
    run_latents,
)
from harness.runtime.positions import PositionMap
from harness.runtime.progress import bar as progress_bar

DEFAULT_BATCH_SIZE = 128
REFERENCE_BATCH_SIZE = 128  # the official evaluator's `--batch_size` (scripts/test_*.sh)
# (position map of a batch, indices of its problems) -> context manager installing hooks
Intervene = Callable[[PositionMap, list[int]], AbstractContextManager]
_LAST_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?!.*\d)", re.S)


@dataclass(frozen=True)
class Record:
    id: str
    gold: float
    text: str
    pred: float | None
    correct: bool
    confidence: float  # probability of the first token of the predicted number
    n_steps: int
    answer_logprob: float  # log p of the gold number, teacher-forced after eot (nats)


@dataclass
class EvalResult:
    records: list[Record]
    seconds: float

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.records) / max(1, self.n)

    @property
    def problems_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def accuracy_by_steps(self) -> dict[int, float]:
        groups: dict[int, list[bool]] = defaultdict(list)
        for r in self.records:
            groups[r.n_steps].append(r.correct)
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    def summary(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_by_steps": {str(k): v for k, v in self.accuracy_by_steps().items()},
            "seconds": round(self.seconds, 3),
            "problems_per_second": round(self.problems_per_second, 2),
        }

    def as_rows(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def answer_token_index(codi: CODIModel, ids: list[int]) -> int | None:
    """Index in `ids` of the token where the last number of the decoded text starts."""
    text = decode_ids(codi, ids)
    match = _LAST_NUMBER.search(text)
    if match is None:
        return None
    lo, hi = 0, len(ids) - 1  # smallest j with len(decode(ids[: j + 1])) > match.start()
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode_ids(codi, ids[: mid + 1])) > match.start():
            hi = mid
        else:
            lo = mid + 1
    return lo


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PrefixStore:
    """Question passes by batch (the problems' indices), up to `budget` bytes of KV cache."""

    def __init__(self, budget: int = 2 * 2**30):
        self.budget, self.used = budget, 0
        self.prefixes: dict[tuple[int, ...], Prefix] = {}

    def get(self, codi: CODIModel, batch: Batch, indices: list[int]) -> Prefix | None:
        key = tuple(indices)
        if key not in self.prefixes:
            prefix = question_pass(codi, batch)
            if self.used + prefix.nbytes > self.budget:
                return prefix
            self.prefixes[key] = prefix
            self.used += prefix.nbytes
        return self.prefixes[key]


def _work_order(codi: CODIModel, problems: list[Problem], batch_size: int) -> tuple[list[int], int]:
    """The problems' order of work and the batch size: by question length (batches of similar
    length waste less compute on padding; results do not depend on the batch, tested), or under
    `reference_batching` the official evaluator's batches, whose results do."""
    if codi.reference_batching:
        return list(range(len(problems))), REFERENCE_BATCH_SIZE
    return sorted(range(len(problems)), key=lambda i: len(problems[i].question)), batch_size


@torch.no_grad()
def evaluate(
    codi: CODIModel,
    problems: list[Problem],
    batch_size: int = DEFAULT_BATCH_SIZE,
    patch: LatentPatch | None = None,
    max_new_tokens: int = 256,
    progress: bool = True,
    intervene: Intervene | None = None,
    prefixes: PrefixStore | None = None,
) -> EvalResult:
    """Latent-mode greedy evaluation, `batch_size` problems per batched pass.

    `intervene(positions, indices)` gives the context manager (hooks) to run each batch under:
    named positions resolve to indices per batch, `indices` are the batch's problems.
    `prefixes` keeps each batch's question pass for the next evaluation of the same problems:
    only for interventions that act from CT0 on (the question pass is 60% of the work).
    A model with `reference_batching` runs the official evaluator's batches instead:
    `REFERENCE_BATCH_SIZE` problems in data set order (`batch_size` is ignored).
    """
    start = time.perf_counter()
    order, batch_size = _work_order(codi, problems, batch_size)
    records: list[Record | None] = [None] * len(problems)
    bar = progress_bar(total=len(problems), desc=f"evaluate {codi.name}", unit="problem", disable=not progress)
    for indices in _batches(order, batch_size):
        chunk = [problems[i] for i in indices]
        batch = encode_questions(codi, [p.question for p in chunk])
        prefix = prefixes.get(codi, batch, indices) if prefixes is not None else None  # before any hook
        with intervene(batch.positions(codi.n_latent), indices) if intervene else nullcontext():
            state = run_latents(codi, batch, patch, prefix=prefix)
            logprobs = answer_logprobs(codi, state, [format_number(p.answer) for p in chunk]).tolist()
            gen = generate(codi, state, max_new_tokens)
        for row, (i, p, text) in enumerate(zip(indices, chunk, decode_texts(codi, gen))):
            pred = parse_answer(text)
            j = answer_token_index(codi, gen.tokens[row, : gen.lengths[row]].tolist())
            confidence = float(gen.token_probs[row, j]) if j is not None else 0.0
            correct = is_correct(pred, p.answer)
            records[i] = Record(p.id, p.answer, text, pred, correct, confidence, p.n_steps, logprobs[row])
        bar.update(len(chunk))
    bar.close()
    return EvalResult(records, time.perf_counter() - start)


@torch.no_grad()
def teacher_forced(
    codi: CODIModel,
    problems: list[Problem],
    batch_size: int = DEFAULT_BATCH_SIZE,
    intervene: Intervene | None = None,
    prefixes: PrefixStore | None = None,
) -> np.ndarray:
    """The gold answers' teacher-forced log-probabilities alone (no decoding): [N] nats, the
    same numbers `evaluate` records (the same batches, in the same order: under
    `reference_batching`, the official evaluator's), for a fraction of its time when an
    intervention keeps the model from ending its answer."""
    order, batch_size = _work_order(codi, problems, batch_size)
    out = np.zeros(len(problems))
    for indices in _batches(order, batch_size):
        chunk = [problems[i] for i in indices]
        batch = encode_questions(codi, [p.question for p in chunk])
        prefix = prefixes.get(codi, batch, indices) if prefixes is not None else None
        with intervene(batch.positions(codi.n_latent), indices) if intervene else nullcontext():
            state = run_latents(codi, batch, prefix=prefix)
            out[indices] = answer_logprobs(codi, state, [format_number(p.answer) for p in chunk]).numpy()
    return out


@torch.no_grad()
def thought_means(codi: CODIModel, problems: list[Problem], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Mean of each continuous thought over `problems`: [K, d]."""
    total = None
    for chunk in _batches(problems, batch_size):
        thoughts = run_latents(codi, encode_questions(codi, [p.question for p in chunk])).thoughts  # [B, K, d]
        total = thoughts.sum(0) if total is None else total + thoughts.sum(0)
    return total / len(problems)


def mean_patch(means: torch.Tensor) -> LatentPatch:
    """Replace CT_i by its mean over a reference set (the first causal check of the latents)."""
    return lambda i, thought: means[i].to(thought.dtype).expand_as(thought)
