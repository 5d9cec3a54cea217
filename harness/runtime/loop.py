"""Batched CODI inference: question + bot, K continuous thoughts fed back through a KV cache,
then eot and greedy decoding.

Left padding with an attention mask that grows with every latent and decoding step and
explicit position ids (cumsum of the mask - 1), so a problem's result does not depend on the
other problems in its batch.

A model loaded with `reference_batching` runs as the official evaluator (zhenyi4/codi
`test.py`) does instead: the left-padding mask only in the question pass, no position ids (so
padding counts), no mask during the thoughts and decoding (the padding is attended to), and
padding with the tokenizer's pad id where it has one. Its results depend on the batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from harness.runtime.codi import CODIModel
from harness.runtime.positions import PositionMap

# (thought index i, CT_i as computed [B, d]) -> CT_i to feed [B, d]
LatentPatch = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] left-padded question tokens, then bot
    attention_mask: torch.Tensor  # [B, T] 0 on padding
    question_lengths: list[int]  # tokens per question (with the tokenizer's default specials)

    def positions(self, n_latent: int) -> PositionMap:
        return PositionMap(self.input_ids.shape[1], n_latent, tuple(self.question_lengths))


def encode_questions(codi: CODIModel, questions: list[str]) -> Batch:
    """Tokenize (with the tokenizer's default specials), append bot, left-pad."""
    token_lists = [codi.tokenizer(q)["input_ids"] for q in questions]
    width = max(len(t) for t in token_lists) + 1
    pad = codi.tokenizer.pad_token_id if codi.reference_batching else None
    input_ids = torch.full((len(questions), width), codi.pad_id if pad is None else pad, dtype=torch.long)
    mask = torch.zeros((len(questions), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids = tokens + [codi.bot_id]
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return Batch(input_ids.to(codi.device), mask.to(codi.device), [len(t) for t in token_lists])


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: [B, T] mask -> [B, T] ids."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class LatentState:
    """Everything after the K-th thought: the cache and mask to continue from."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T + K]
    next_position: torch.Tensor  # [B] position id of the next token
    thoughts: torch.Tensor  # [B, K, d] CT0..CT{K-1} as fed to the model
    bot_hidden: torch.Tensor  # [B, d] final-normed state at bot (CT0 = prj of it, unpatched)
    hiddens: torch.Tensor  # [B, K + 1, d] final-normed states at bot, CT0..CT{K-1} (before `prj`)


def _ones(mask: torch.Tensor, n: int = 1) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=1)


@dataclass
class Prefix:
    """A batch's question + bot pass: what every latent loop of that batch starts from, as long
    as an intervention acts only from CT0 on (it cannot change the question pass)."""

    cache: DynamicCache
    hidden: torch.Tensor  # [B, d] final-normed state at bot

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def question_pass(codi: CODIModel, batch: Batch) -> Prefix:
    """Question + bot in one pass; the reference's has its mask but no position ids."""
    mask = batch.attention_mask
    cache = DynamicCache(config=codi.lm.config)
    positions = None if codi.reference_batching else position_ids(mask)
    out = codi.step(mask, positions, cache, input_ids=batch.input_ids)
    return Prefix(cache, out.last_hidden_state[:, -1])


def _next_step(codi: CODIModel, mask: torch.Tensor, next_pos: torch.Tensor, cache: DynamicCache, **inputs):
    """One latent or decoding pass (one new position): with its mask [B, past + 1] and
    position ids [B] (next_pos), or, under reference batching, with neither."""
    if codi.reference_batching:
        return codi.step(None, None, cache, **inputs)
    return codi.step(mask, next_pos[:, None], cache, **inputs)


@dataclass
class LoopPoint:
    """The latent loop paused before thought `step`, unpatched so far: a loop resumed here
    (`run_latents(resume=...)`) skips the passes before it, as long as its patch leaves the
    thoughts before `step` alone (a subspace trained at one thought)."""

    step: int
    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T + step]
    next_position: torch.Tensor  # [B]
    hidden: torch.Tensor  # [B, d] final-normed state whose `prj` is thought `step`
    bot_hidden: torch.Tensor  # [B, d]
    thoughts: list[torch.Tensor]  # step x [B, d]
    hiddens: list[torch.Tensor]  # (step + 1) x [B, d]


def _start(codi: CODIModel, batch: Batch, prefix: Prefix | None) -> LoopPoint:
    mask = batch.attention_mask
    pos = position_ids(mask)
    if prefix is None:
        prefix = question_pass(codi, batch)
    else:
        prefix = Prefix(copy.deepcopy(prefix.cache), prefix.hidden)  # the loop extends its cache
    next_pos = torch.full_like(pos[:, -1], mask.shape[1]) if codi.reference_batching else pos[:, -1] + 1  # [B]
    return LoopPoint(0, prefix.cache, mask, next_pos, prefix.hidden, prefix.hidden, [], [prefix.hidden])


def _loop(codi: CODIModel, point: LoopPoint, patch: LatentPatch | None, stop: int) -> LoopPoint:
    """Thoughts `point.step` .. `stop - 1`, each fed back through `prj` (and `patch`); extends
    `point`'s cache in place."""
    mask, next_pos, hidden = point.attention_mask, point.next_position, point.hidden
    thoughts, hiddens = list(point.thoughts), list(point.hiddens)
    for i in range(point.step, stop):
        thought = codi.prj(hidden)  # [B, d]
        if patch is not None:
            thought = patch(i, thought)
        thoughts.append(thought)
        mask = _ones(mask)
        out = _next_step(codi, mask, next_pos, point.cache, inputs_embeds=thought[:, None])
        hidden = out.last_hidden_state[:, -1]
        hiddens.append(hidden)
        next_pos = next_pos + 1
    return LoopPoint(stop, point.cache, mask, next_pos, hidden, point.bot_hidden, thoughts, hiddens)


@torch.no_grad()
def pause_latents(codi: CODIModel, batch: Batch, step: int, prefix: Prefix | None = None) -> LoopPoint:
    """The unpatched loop run up to thought `step` (not included), to resume from many times."""
    return _loop(codi, _start(codi, batch, prefix), None, step)


def run_latents(
    codi: CODIModel,
    batch: Batch,
    patch: LatentPatch | None = None,
    n_thoughts: int | None = None,
    prefix: Prefix | None = None,
    resume: LoopPoint | None = None,
) -> LatentState:
    """Question + bot in one pass (or a copy of `prefix`, that pass done before), then K
    single-position passes over the continuous thoughts.

    `patch` (or, without one, the model's active `ThoughtPatch`) edits each thought before it
    is fed back. `n_thoughts` stops after the first few (e.g. when only CT0 is read). `resume`
    (from `pause_latents`) starts at its thought from a copy of its cache instead.
    """
    patch = patch or codi.thought_patch
    if resume is None:
        point = _start(codi, batch, prefix)
    else:
        point = LoopPoint(**{**vars(resume), "cache": copy.deepcopy(resume.cache)})
    end = _loop(codi, point, patch, codi.n_latent if n_thoughts is None else n_thoughts)
    return LatentState(end.cache, end.attention_mask, end.next_position, torch.stack(end.thoughts, dim=1),
                       end.bot_hidden, torch.stack(end.hiddens, dim=1))  # fmt: skip


class ThoughtPatch:
    """Context manager: edit continuous thoughts in every latent loop run under it."""

    def __init__(self, codi: CODIModel, patch: LatentPatch):
        self.codi, self.patch = codi, patch

    def __enter__(self):
        assert self.codi.thought_patch is None, "thought patches do not nest"
        self.codi.thought_patch = self.patch
        return self

    def __exit__(self, *exc) -> None:
        self.codi.thought_patch = None


def norm_matched_noise(thoughts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise to replace one continuous thought: [N, d] thoughts -> [N, d] noise rows,
    each of the thoughts' mean norm, in random directions (near-orthogonal to the thoughts).
    Drawn on the CPU from `generator` (reproducible on any device), returned on the thoughts'
    device in their dtype."""
    noise = torch.randn(thoughts.shape, generator=generator).to(thoughts.device)  # [N, d]
    scale = thoughts.float().norm(dim=-1).mean()
    return (noise / noise.norm(dim=-1, keepdim=True) * scale).to(thoughts.dtype)


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] greedy tokens after eot (eos included, then eos padding)
    token_probs: torch.Tensor  # [B, N] probability of each greedy token
    lengths: torch.Tensor  # [B] tokens up to and including eos
    first_logits: torch.Tensor  # [B, V+3] logits at eot (predicting the first answer token)


def generate(codi: CODIModel, state: LatentState, max_new_tokens: int = 256) -> Generation:
    """Feed eot, then greedy-decode until every row has produced eos (or the limit, which is
    also capped by the model's context length). As in the reference, the argmax runs over ids
    0 .. V+1: eot is never generated. A token's probability is its share of all V+3 logits."""
    batch_size = state.thoughts.shape[0]
    room = codi.max_positions - int(state.next_position.max()) - 1  # positions left after eot
    max_new_tokens = max(1, min(max_new_tokens, room))
    eot = torch.full((batch_size, 1), codi.eot_id, dtype=torch.long, device=codi.device)
    mask, next_pos, cache = _ones(state.attention_mask), state.next_position.clone(), state.cache
    out = _next_step(codi, mask, next_pos, cache, input_ids=eot)
    logits = codi.logits(out.last_hidden_state[:, -1])  # [B, V+3]
    first_logits = logits
    done = torch.zeros(batch_size, dtype=torch.bool, device=codi.device)
    lengths = torch.full((batch_size,), max_new_tokens, dtype=torch.long, device=codi.device)
    tokens, probs = [], []
    for t in range(max_new_tokens):
        token = logits[:, : codi.eot_id].argmax(-1)  # [B]
        prob = logits.float().softmax(-1).gather(-1, token[:, None])[:, 0]  # [B]
        token = torch.where(done, torch.full_like(token, codi.eos_id), token)
        tokens.append(token)
        probs.append(prob)
        newly_done = ~done & (token == codi.eos_id)
        lengths[newly_done] = t + 1
        done |= newly_done
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask, next_pos = _ones(mask), next_pos + 1
        out = _next_step(codi, mask, next_pos, cache, input_ids=token[:, None])
        logits = codi.logits(out.last_hidden_state[:, -1])
    return Generation(torch.stack(tokens, 1), torch.stack(probs, 1), lengths, first_logits)


def answer_targets(codi: CODIModel, answers: list[str]) -> tuple[list[list[int]], list[int]]:
    """Each gold answer as the model writes it (`codi.answer_prefix` then the number), as ids,
    and how many of its last ids are the number (the scored part; all of them when the prefix
    does not tokenize on its own)."""
    tok = codi.tokenizer
    prefix = tok(codi.answer_prefix, add_special_tokens=False)["input_ids"]
    ids, scored = [], []
    for answer in answers:
        full = tok(f"{codi.answer_prefix} {answer}", add_special_tokens=False)["input_ids"]
        ids.append(full)
        scored.append(
            len(full) - len(prefix) if full[: len(prefix)] == prefix and len(full) > len(prefix) else len(full)
        )
    return ids, scored


def answer_logprobs(codi: CODIModel, state: LatentState, answers: list[str], copy_cache: bool = True) -> torch.Tensor:
    """Log-probability (nats) of each row's gold answer number under teacher forcing: eot and
    the answer's tokens in one pass over a copy of the latent cache: [B]. `copy_cache=False`
    extends the cache itself (needed when it holds a graph to differentiate: a copy cannot).

    Rows are right-padded with eos; a padded token is never a target, and no real token
    attends to a later one, so padding cannot leak."""
    ids, scored = answer_targets(codi, answers)
    batch_size, width = len(ids), 1 + max(len(a) for a in ids)
    tokens = torch.full((batch_size, width), codi.eos_id, dtype=torch.long)
    tokens[:, 0] = codi.eot_id
    for row, a in enumerate(ids):
        tokens[row, 1 : 1 + len(a)] = torch.tensor(a)
    tokens = tokens.to(codi.device)
    mask = _ones(state.attention_mask, width)
    positions = state.next_position[:, None] + torch.arange(width, device=codi.device)  # [B, W]
    cache = copy.deepcopy(state.cache) if copy_cache else state.cache
    if codi.reference_batching:  # as its decoding: no mask, no position ids
        out = codi.step(None, None, cache, input_ids=tokens)
    else:
        out = codi.step(mask, positions, cache, input_ids=tokens)
    logp = codi.logits(out.last_hidden_state[:, :-1]).float().log_softmax(-1)  # [B, W-1, V+3]
    token_logp = logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [B, W-1]: log p of token t+1 at t
    total = torch.zeros(batch_size, dtype=torch.float64)
    for row, (a, k) in enumerate(zip(ids, scored)):
        total[row] = token_logp[row, len(a) - k : len(a)].double().sum().cpu()
    return total


def decode_ids(codi: CODIModel, ids: list[int]) -> str:
    """Text of generated ids, dropping CODI's pad/bot/eot (not in the base tokenizer)."""
    return codi.tokenizer.decode([t for t in ids if t < codi.base_vocab_size], skip_special_tokens=True)


def decode_texts(codi: CODIModel, gen: Generation) -> list[str]:
    return [decode_ids(codi, gen.tokens[row, : gen.lengths[row]].tolist()) for row in range(gen.tokens.shape[0])]
