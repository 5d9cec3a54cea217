"""Head interventions against independent reference computations."""

import copy

import pytest
import torch

from conftest import zeroed_attention
from harness.data.problems import synthetic_split
from harness.interventions.hooks import ActivationCapture, HeadAblation, HeadCapture, InterventionError, residual_sites
from harness.runtime.arch import Head, SiteError, blocks, parse_heads
from harness.runtime.loop import encode_questions, generate, position_ids, run_latents

PROBLEMS = synthetic_split("test")[:6]


def _run(codi):
    batch = encode_questions(codi, [p.question for p in PROBLEMS])
    state = run_latents(codi, batch)
    return state.thoughts, generate(codi, state, max_new_tokens=1).first_logits, batch.positions(codi.n_latent)


def _hooks(codi) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in codi.modules())


@torch.no_grad()
def test_no_op_ablation_reproduces_the_baseline_bit_for_bit(random_codi):
    thoughts, logits, pmap = _run(random_codi)
    for heads, positions in [([Head(0, 1)], []), ([Head(1, 2)], [10_000])]:
        with HeadAblation(random_codi, heads, positions):
            t2, l2, _ = _run(random_codi)
        assert torch.equal(t2, thoughts) and torch.equal(l2, logits)
    with HeadCapture(random_codi, [Head(1, 3)], pmap.latent) as cap:
        _run(random_codi)
    own = cap.values
    with HeadAblation(random_codi, [Head(1, 3)], pmap.latent, mode="resample", values=own):
        t3, l3, _ = _run(random_codi)
    assert torch.equal(t3, thoughts) and torch.equal(l3, logits)


@torch.no_grad()
def test_zero_ablation_equals_zeroing_the_heads_attention_weights(random_codi):
    heads = [Head(1, 2), Head(2, 5), Head(2, 0)]
    _, _, pmap = _run(random_codi)
    with HeadAblation(random_codi, heads, pmap.latent):
        thoughts, logits, _ = _run(random_codi)
    with zeroed_attention(random_codi, heads, pmap.latent):
        ref_thoughts, ref_logits, _ = _run(random_codi)
    baseline, _, _ = _run(random_codi)
    assert (ref_thoughts - baseline).abs().max() > 1e-4, "the ablation must change something"
    torch.testing.assert_close(thoughts, ref_thoughts, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_ablation_changes_nothing_before_the_chosen_positions(random_codi):
    baseline, _, pmap = _run(random_codi)
    with HeadAblation(random_codi, [Head(0, 0), Head(3, 4)], [pmap.index("CT3")]):
        thoughts, _, _ = _run(random_codi)
    # CT0..CT3 are computed before the pass at CT3: untouched; CT4 reads the edited state
    assert torch.equal(thoughts[:, :4], baseline[:, :4])
    assert (thoughts[:, 4:] - baseline[:, 4:]).abs().max() > 0


def test_hooks_are_removed_even_on_error(random_codi):
    before = _hooks(random_codi)
    with pytest.raises(RuntimeError, match="boom"):
        with HeadAblation(random_codi, [Head(0, 0), Head(1, 1)], [5]):
            assert _hooks(random_codi) == before + 2
            raise RuntimeError("boom")
    assert _hooks(random_codi) == before


def test_parse_heads_validates(random_codi):
    assert parse_heads("L1H2, L0H7", random_codi.geometry) == [Head(1, 2), Head(0, 7)]
    for spec, message in [
        ("L99H0", "out of range"),
        ("L1H1,L1H1", "given twice"),
        ("layer1", "malformed"),
        ("", "no heads"),
    ]:
        with pytest.raises(SiteError, match=message):
            parse_heads(spec, random_codi.geometry)
    with pytest.raises(InterventionError, match="needs values"):
        HeadAblation(random_codi, [Head(0, 0)], [1], mode="mean")


@torch.no_grad()
def test_activation_capture_equals_a_full_recompute_of_the_hidden_states(random_codi):
    """Sites read through the KV-cached latent loop against HF's own hidden states of one pass
    over the whole sequence (question, bot, the thoughts fed back)."""
    batch = encode_questions(random_codi, [p.question for p in PROBLEMS])
    pmap = batch.positions(random_codi.n_latent)
    positions = [pmap.index("bot"), pmap.latent[2]]
    n_layers = random_codi.geometry.n_layers
    sites = [*residual_sites(n_layers), ("attn_in", 1)]
    with ActivationCapture(random_codi, sites, positions) as capture:
        thoughts = run_latents(random_codi, batch).thoughts  # [B, K, d]
    embeds = torch.cat([random_codi.embed(batch.input_ids), thoughts[:, :-1]], dim=1)  # CT_{K-1} is never fed
    mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(PROBLEMS), thoughts.shape[1] - 1)], 1)
    plain = copy.deepcopy(random_codi)  # transformers records hidden states with hooks it keeps on the model
    out = plain.step(mask, position_ids(mask), None, inputs_embeds=embeds, output_hidden_states=True)
    reference = out.hidden_states  # L + 1 states, the last one final-normed
    for i, site in enumerate(sites[:-2]):  # block inputs and every block output but the last
        torch.testing.assert_close(capture.stacked(site), reference[i][:, positions], atol=1e-5, rtol=1e-4)
    block = blocks(random_codi.lm)[1]
    first_norm = next(m for m in block.children() if "norm" in type(m).__name__.lower())  # ln_1 / input_layernorm
    torch.testing.assert_close(
        capture.stacked(("attn_in", 1)), first_norm(reference[1][:, positions]), atol=1e-5, rtol=1e-4
    )
    assert capture.stacked(("resid_post", n_layers - 1)).shape == (len(PROBLEMS), 2, random_codi.geometry.d_model)
    with pytest.raises(InterventionError, match="unknown site"):
        ActivationCapture(random_codi, [("resid_mid", 0)], positions)


@torch.no_grad()
def test_hooks_are_handed_their_own_pass_and_none_outside_a_step(random_codi):
    """Each hook gets the pass it runs in (question + bot at 0, then one thought per pass), and a
    forward that bypasses `CODIModel.step` is refused instead of reading an earlier pass's offset."""
    from harness.runtime.codi import PassError

    seen = []
    handle = blocks(random_codi.lm)[0].register_forward_pre_hook(
        random_codi.handing(lambda step, module, args: seen.append((step.offset, step.n_new, step.mask.shape[1])))
    )
    try:
        batch = encode_questions(random_codi, [p.question for p in PROBLEMS])
        run_latents(random_codi, batch)
        width = batch.input_ids.shape[1]
        assert seen == [(0, width, width)] + [(width + i, 1, width + i + 1) for i in range(random_codi.n_latent)]
        with pytest.raises(PassError, match="outside CODIModel.step"):
            random_codi.current_pass()
        with HeadAblation(random_codi, [Head(0, 1)], [3]), pytest.raises(PassError):
            random_codi.lm(batch.input_ids)  # no step: no pass to map position 3 onto
    finally:
        handle.remove()
