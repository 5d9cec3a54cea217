"""Logit lens of the continuous thoughts: what each latent state says through the LM head.

At the bot position and every thought CT_i, two states are decoded: the final-normed hidden
state (`hidden`: what `prj` turns into the next thought) and the thought itself as fed in
(`thought`: the CODI paper decodes each latent through the LM head, top-5 tokens). A state
"decodes" a solution step when the step's intermediate result (the synthetic chain of
thought's `<< 12 + 5 = 17 >>`, GSM8K's `<<48/2=24>>`) is its top-1 / among its top-5 tokens
(the number's first token, as the model writes it after the answer prefix). Chance: the same
rate against the step's value of another problem (a derangement), so a state that always says
"2" is not credited for problems whose value is 2.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from harness.data.problems import Problem, format_number
from harness.interventions.specs import derangement
from harness.runtime.codi import CODIModel
from harness.runtime.loop import LatentPatch, encode_questions, run_latents
from harness.runtime.progress import bar

SOURCES = ("hidden", "thought")
MAX_LENS_STEPS = 8  # solution steps scored by the logit lens (GSM8K has a few longer ones)
TOP = 5
_RESULT = re.compile(r"=\s*(-?[\d,]*\.?\d+)\s*>>")


def step_results(problem: Problem) -> list[float]:
    """Every intermediate result of the gold chain of thought, in order (the last is usually
    the answer)."""
    return [float(m.replace(",", "")) for m in _RESULT.findall(problem.cot)]


def position_names(n_latent: int) -> list[str]:
    """The lens's positions: bot, then every thought."""
    return ["bot", *(f"CT{i}" for i in range(n_latent))]


def number_token(codi: CODIModel, value: float) -> int:
    """The first token of `value` as the model writes it after its answer prefix."""
    return codi.tokenizer(f" {format_number(value)}", add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def lens_tokens(
    codi: CODIModel,
    problems: list[Problem],
    batch_size: int = 128,
    patch: LatentPatch | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Top-5 tokens (base vocabulary) of each state through the LM head: [N, 2 (hidden,
    thought), K + 1 (bot, CT0..), 5]; -1 where there is no state (the thought at bot).
    `patch` edits the thoughts as they are fed back (a planted signal, in tests)."""
    k = codi.n_latent
    out = np.full((len(problems), len(SOURCES), k + 1, TOP), -1, dtype=np.int64)
    for start in bar(range(0, len(problems), batch_size), desc=f"logit lens {codi.name}", disable=not progress):
        chunk = problems[start : start + batch_size]
        state = run_latents(codi, encode_questions(codi, [p.question for p in chunk]), patch)
        for s, states in enumerate((state.hiddens, state.thoughts)):  # [B, K + 1, d], [B, K, d]
            logits = codi.logits(states)[..., : codi.base_vocab_size]  # [B, P, V]
            top = logits.topk(TOP, dim=-1).indices.cpu().numpy()  # [B, P, 5]
            out[start : start + len(chunk), s, k + 1 - top.shape[1] :] = top  # the thoughts start at CT0
    return out


def step_tokens(codi: CODIModel, problems: list[Problem], n_steps: int) -> np.ndarray:
    """Each problem's step results as tokens: [N, n_steps], -1 where it has fewer steps."""
    out = np.full((len(problems), n_steps), -1, dtype=np.int64)
    for i, p in enumerate(problems):
        for j, value in enumerate(step_results(p)[:n_steps]):
            out[i, j] = number_token(codi, value)
    return out


def hits(tokens: np.ndarray, targets: np.ndarray, top: int) -> np.ndarray:
    """Whether each state's top-`top` tokens hold the target: [N, S, P, 5] x [N, steps] ->
    [N, S, P, steps] bool (False where a problem has no such step)."""
    found = (tokens[:, :, :, None, :top] == targets[:, None, None, :, None]).any(-1)  # [N, S, P, steps]
    return found & (targets >= 0)[:, None, None, :]


def chance_targets(targets: np.ndarray, seed: int) -> np.ndarray:
    """Each problem's step values replaced by another problem's (a derangement among the
    problems that have the step): [N, steps], -1 where a problem has no such step."""
    out = np.full_like(targets, -1)
    generator = torch.Generator().manual_seed(seed)
    for j in range(targets.shape[1]):
        have = np.flatnonzero(targets[:, j] >= 0)
        if len(have) >= 2:
            out[have, j] = targets[have[derangement(len(have), generator).numpy()], j]
    return out
