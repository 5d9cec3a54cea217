"""Gradient attributions: the causal sweep's screens (attribution patching and integrated
gradients of every head along the path from ablated to clean), and integrated gradients from
a critical head's output at the hub thought back to the question tokens (experiment 3.2), with
captum's LayerIntegratedGradients on the token embeddings.

Attribution patching (Nanda 2023; Syed et al. 2023) estimates each head's ablation effect on
the gold answer's teacher-forced log-probability to first order: grad . (clean - ablated) of
the head's output at each thought; one forward and one backward pass per batch give every head
at once. Integrated gradients (EAP-IG, Hanna et al. 2024) averages that gradient over k points
of the straight path on which every head moves from ablated to clean together.

The attributed scalar is the head's output at the hub CT (its slice of the output-projection
input) projected on that head's mean output direction over the attributed problems: a linear
read-out, so attributions add up to f(question) - f(baseline) up to captum's reported
convergence delta. The baseline replaces every question token by the pad token (bot stays).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness.data.problems import NAMES, Problem, format_number
from harness.interventions.hooks import HeadCapture, HeadInterpolation
from harness.runtime.arch import Head
from harness.runtime.codi import CODIModel
from harness.runtime.loop import Batch, answer_logprobs, encode_questions, question_pass, run_latents
from harness.runtime.progress import bar

CATEGORIES = ("number", "operator", "entity", "other")
# arithmetic symbols and the words that name an operation or a relation between quantities
OPERATOR_WORDS = frozenset(
    "+ - * / = x % more less fewer times twice double doubles half triple triples each per every total "
    "sum difference left remaining away gives gave loses lost uses used buys bought finds found gets got "
    "keeps kept spends spent sells sold adds removes than as many much".split()
)
_NUMBER = re.compile(r"^[$]?\d[\d,.]*%?$")
_TOKEN_MARKS = "Ġ▁ "


def token_category(token: str) -> str:
    """Category of one (sub)word token: number, operator / relational word, entity name, other."""
    word = token.strip(_TOKEN_MARKS)
    if _NUMBER.match(word):
        return "number"
    if word.lower() in OPERATOR_WORDS:
        return "operator"
    if word in NAMES or (word[:1].isupper() and word[1:].islower() and len(word) > 1):
        return "entity"
    return "other"


@dataclass
class Attributions:
    """Per problem and head: attribution of every question token, and captum's delta."""

    scores: np.ndarray  # [N, n_heads, T] attribution per token, NaN on padding
    deltas: np.ndarray  # [N, n_heads] convergence delta
    outputs: np.ndarray  # [N, n_heads] f(question) - f(baseline)
    categories: np.ndarray  # [N, T] index into CATEGORIES, -1 on padding
    tokens: list[list[str]]  # question tokens per problem

    def packed(self) -> np.ndarray:
        """[N, n_heads + 1, T + 2]: scores | delta | output, then a row of category codes."""
        n, h, t = self.scores.shape
        out = np.full((n, h + 1, t + 2), np.nan)
        out[:, :h, :t] = self.scores
        out[:, :h, t] = self.deltas
        out[:, :h, t + 1] = self.outputs
        out[:, h, :t] = self.categories
        return out

    @classmethod
    def unpack(cls, packed: np.ndarray, tokens: list[list[str]]) -> Attributions:
        t = packed.shape[2] - 2
        return cls(packed[:, :-1, :t], packed[:, :-1, t], packed[:, :-1, t + 1], packed[:, -1, :t].astype(int), tokens)

    def shares(self) -> tuple[np.ndarray, np.ndarray]:
        """([N, n_heads, C] share of |attribution| per category, [N, C] share of tokens)."""
        size = np.abs(np.nan_to_num(self.scores))  # [N, H, T]
        attr = np.stack([(size * (self.categories == c)[:, None]).sum(-1) for c in range(len(CATEGORIES))], -1)
        attr = attr / np.maximum(attr.sum(-1, keepdims=True), 1e-12)
        counts = np.stack([(self.categories == c).sum(-1) for c in range(len(CATEGORIES))], -1).astype(float)
        return attr, counts / counts.sum(-1, keepdims=True)


def question_tokens(codi: CODIModel, problems: list[Problem]) -> list[list[str]]:
    """The question tokens of each problem, as the tokenizer spells them."""
    return [codi.tokenizer.convert_ids_to_tokens(codi.tokenizer(p.question)["input_ids"]) for p in problems]


def _question_tokens(codi: CODIModel, batch: Batch) -> list[list[str]]:
    width = batch.input_ids.shape[1] - 1  # without bot
    return [
        codi.tokenizer.convert_ids_to_tokens(batch.input_ids[row, width - n : width].tolist())
        for row, n in enumerate(batch.question_lengths)
    ]


def integrated_gradients(
    codi: CODIModel,
    problems: list[Problem],
    heads: list[Head],
    thought: int,
    n_steps: int = 32,
    batch_size: int = 25,
    progress: bool = False,
) -> Attributions:
    """IG of each head's output at CT_thought with respect to the question token embeddings."""
    from captum.attr import LayerIntegratedGradients  # here: a warm (cached) run never attributes

    batches = [
        encode_questions(codi, [p.question for p in problems[s : s + batch_size]])
        for s in range(0, len(problems), batch_size)
    ]
    width = max(b.input_ids.shape[1] for b in batches) - 1
    scores = np.full((len(problems), len(heads), width), np.nan)
    deltas, outputs = np.zeros((len(problems), len(heads))), np.zeros((len(problems), len(heads)))
    categories = np.full((len(problems), width), -1)
    tokens: list[list[str]] = []
    directions = _mean_directions(codi, batches, heads, thought)
    row = 0
    for batch in bar(batches, desc=f"integrated gradients {codi.name}", disable=not progress):
        b, t = batch.input_ids.shape
        pmap = batch.positions(codi.n_latent)
        baseline = torch.where(batch.attention_mask.bool(), codi.pad_id, batch.input_ids)
        baseline[:, -1] = codi.bot_id
        tokens += _question_tokens(codi, batch)
        for j, head in enumerate(heads):
            forward = _readout(codi, head, thought, pmap.latent[thought], directions[j], batch.question_lengths)
            lig = LayerIntegratedGradients(forward, codi.lm.get_input_embeddings())
            attr, delta = lig.attribute(
                batch.input_ids,
                baselines=baseline,
                additional_forward_args=(batch.attention_mask,),
                n_steps=n_steps,
                return_convergence_delta=True,
            )
            per_token = attr.sum(-1).detach()[:, : t - 1]  # [B, T - 1] without bot
            with torch.no_grad():
                gap = forward(batch.input_ids, batch.attention_mask) - forward(baseline, batch.attention_mask)
            scores[row : row + b, j, width - (t - 1) :] = per_token.float().cpu().numpy()
            deltas[row : row + b, j] = delta.detach().float().cpu().numpy()
            outputs[row : row + b, j] = gap.float().cpu().numpy()
        row += b
    for i, toks in enumerate(tokens):
        categories[i, width - len(toks) :] = [CATEGORIES.index(token_category(tok)) for tok in toks]
        scores[i, :, : width - len(toks)] = np.nan  # padding
    return Attributions(scores, deltas, outputs, categories, tokens)


def _readout(
    codi: CODIModel, head: Head, thought: int, position: int, direction: torch.Tensor, question_lengths: list[int]
):
    """f(input_ids, attention_mask) -> [B'] the head's output at `position` projected on
    `direction`; captum calls it on the batch repeated once per integration step."""

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        repeats = len(input_ids) // len(question_lengths)
        with HeadCapture(codi, [head], [position], keep_graph=True) as cap:
            run_latents(codi, Batch(input_ids, attention_mask, question_lengths * repeats), n_thoughts=thought + 1)
        return cap.values[head][:, 0] @ direction.to(cap.values[head])

    return forward


@torch.no_grad()
def _mean_directions(codi: CODIModel, batches: list[Batch], heads: list[Head], thought: int) -> list[torch.Tensor]:
    """Unit mean output direction of each head at CT_thought over the problems."""
    sums = [torch.zeros(codi.geometry.head_dim) for _ in heads]
    for batch in batches:
        with HeadCapture(codi, heads, [batch.positions(codi.n_latent).latent[thought]]) as cap:
            run_latents(codi, batch, n_thoughts=thought + 1)
        for j, head in enumerate(heads):
            sums[j] += cap.values[head][:, 0].float().sum(0).cpu()
    return [s / s.norm().clamp_min(1e-12) for s in sums]


def path_attributions(
    codi: CODIModel,
    problems: list[Problem],
    targets: torch.Tensor | None,
    alphas: Sequence[float],
    batch_size: int = 128,
    progress: bool = False,
) -> np.ndarray:
    """Each head's estimated drop in answer log-probability (nats) when ablated at each thought,
    per problem: [N, L, H, K], the mean over `alphas` of d(log p)/d(alpha) on the path where every
    head's output at every thought is t + alpha (x - t) (`HeadInterpolation`; t zero, or
    `targets` [L, H, K, hd], the heads' mean outputs).

    `alphas = (1.0,)` is attribution patching: the first-order term at the clean model, one
    forward and backward pass. The midpoints of k equal steps are integrated gradients along
    the path from every head ablated to clean (EAP-IG): k passes, and the estimates of all
    heads at all thoughts add up to the drop when all are ablated at once (completeness, up to
    the Riemann sum's error). A head's drop at every thought is the sum over K.
    """
    geo = codi.geometry
    out = np.zeros((len(problems), geo.n_layers, geo.n_heads, codi.n_latent))
    progress_bar = bar(total=len(problems) * len(alphas), desc=f"path attributions {codi.name}", disable=not progress)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        batch = encode_questions(codi, [p.question for p in chunk])
        answers = [format_number(p.answer) for p in chunk]
        with torch.no_grad():  # the question pass precedes every thought: no gradient needed there
            prefix = question_pass(codi, batch)
        for alpha in alphas:
            positions = batch.positions(codi.n_latent).latent
            with torch.enable_grad(), HeadInterpolation(codi, positions, alpha, targets) as path:
                state = run_latents(codi, batch, prefix=prefix)
                logprob = answer_logprobs(codi, state, answers, copy_cache=False)
                layers = sorted(path.alphas)
                grads = torch.autograd.grad(logprob.sum(), [path.alphas[layer] for layer in layers], allow_unused=True)
            for layer, grad in zip(layers, grads):  # [B, K, H]; None: a layer the answer does not read
                if grad is not None:
                    out[start : start + len(chunk), layer] += grad.transpose(1, 2).double().cpu().numpy() / len(alphas)
            progress_bar.update(len(chunk))
    progress_bar.close()
    return out
