"""The latent loop against independent reference computations."""

import copy

import pytest
import torch

from harness.data.problems import synthetic_split
from harness.runtime.loop import encode_questions, generate, norm_matched_noise, position_ids, run_latents
from harness.runtime.positions import PositionError


def _full_recompute(codi, batch):
    """Thoughts and eot logits without a KV cache: every step re-runs the whole sequence."""
    embeds = codi.embed(batch.input_ids)  # [B, T, d]
    mask = batch.attention_mask
    thoughts = []
    for _ in range(codi.n_latent):
        out = codi.step(mask, position_ids(mask), None, inputs_embeds=embeds)
        thought = codi.prj(out.last_hidden_state[:, -1])
        thoughts.append(thought)
        embeds = torch.cat([embeds, thought[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    eot = codi.embed(torch.full((embeds.shape[0], 1), codi.eot_id))
    embeds = torch.cat([embeds, eot], dim=1)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    out = codi.step(mask, position_ids(mask), None, inputs_embeds=embeds)
    return torch.stack(thoughts, 1), codi.logits(out.last_hidden_state[:, -1]), out.last_hidden_state


@torch.no_grad()
def test_kv_cached_latent_loop_equals_full_recompute(random_codi):
    problems = synthetic_split("test")[:6]
    batch = encode_questions(random_codi, [p.question for p in problems])
    state = run_latents(random_codi, batch)
    gen = generate(random_codi, state, max_new_tokens=1)
    ref_thoughts, ref_logits, _ = _full_recompute(random_codi, batch)
    torch.testing.assert_close(state.thoughts, ref_thoughts, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gen.first_logits, ref_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_position_map_matches_the_sequence(random_codi):
    problems = synthetic_split("test")[:5]
    batch = encode_questions(random_codi, [p.question for p in problems])
    pmap = batch.positions(random_codi.n_latent)
    state = run_latents(random_codi, batch)
    _, _, hidden = _full_recompute(random_codi, batch)  # [B, T + K + 1, d] final-normed states
    assert (batch.input_ids[:, pmap.index("bot")] == random_codi.bot_id).all()
    assert hidden.shape[1] == pmap.index("eot") + 1, "eot is the last position fed before decoding"
    for i in range(random_codi.n_latent):
        at = pmap.index(f"CT{i}")
        assert pmap.thought_index(f"CT{i}") == i
        # the input at CT_i is prj of the final hidden state one position earlier
        torch.testing.assert_close(state.thoughts[:, i], random_codi.prj(hidden[:, at - 1]), atol=1e-5, rtol=1e-4)
    for row, p in enumerate(problems):
        q = pmap.question(row)
        ids = random_codi.tokenizer(p.question)["input_ids"]
        assert batch.input_ids[row, q.start : q.stop].tolist() == ids
        assert batch.attention_mask[row, : q.start].sum() == 0
    assert list(pmap.answer(2)) == [pmap.index("eot") + 1, pmap.index("eot") + 2]
    with pytest.raises(PositionError, match="unknown position 'CT9'"):
        pmap.index("CT9")
    with pytest.raises(PositionError, match="not a continuous thought"):
        pmap.thought_index("bot")


@torch.no_grad()
def test_results_do_not_depend_on_the_batch(random_codi):
    """Each problem alone equals the same problem inside a mixed-length batch of 32."""
    problems = synthetic_split("test")[:32]
    lengths = [len(p.question.split()) for p in problems]
    assert max(lengths) - min(lengths) >= 10, "the batch must mix lengths for padding to matter"
    batch = encode_questions(random_codi, [p.question for p in problems])
    gen = generate(random_codi, run_latents(random_codi, batch), max_new_tokens=6)
    for row in (0, 3, 17, 31):
        alone = encode_questions(random_codi, [problems[row].question])
        gen1 = generate(random_codi, run_latents(random_codi, alone), max_new_tokens=6)
        torch.testing.assert_close(gen1.first_logits[0], gen.first_logits[row], atol=1e-4, rtol=1e-4)
        assert gen1.tokens[0].tolist() == gen.tokens[row].tolist()


@torch.no_grad()
def test_noise_is_norm_matched_and_orthogonal_where_thoughts_are_far_from_unit_scale(random_codi):
    """With the prj LayerNorm gain x5 the thoughts' norms are ~5 sqrt(d), so raw unit-variance
    noise (norm ~sqrt(d)) would not pass for norm-matched noise."""
    codi = copy.deepcopy(random_codi)
    codi.prj.ln.weight.mul_(5.0)
    thoughts = run_latents(codi, encode_questions(codi, [p.question for p in synthetic_split("test")[:32]])).thoughts
    for position in range(codi.n_latent):
        ct = thoughts[:, position]  # [N, d]
        noise = norm_matched_noise(ct, torch.Generator().manual_seed(position))
        assert noise.shape == ct.shape and noise.dtype == ct.dtype
        mean_norm = ct.norm(dim=-1).mean()
        assert mean_norm > 3 * ct.shape[1] ** 0.5, "the scaled gain moved the thoughts off unit scale"
        torch.testing.assert_close(noise.norm(dim=-1), mean_norm.expand(len(ct)), rtol=1e-4, atol=0)
        cosine = torch.nn.functional.cosine_similarity(noise, ct, dim=-1)  # [N]
        assert cosine.abs().max() < 0.5 and cosine.abs().mean() < 0.2, "noise is no direction of the thoughts"
