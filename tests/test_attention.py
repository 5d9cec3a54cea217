"""Attention override and recording: normalised, causal, masked, and restored afterwards."""

import pytest
import torch

from harness.data.problems import synthetic_split
from harness.interventions import attention as attention_module
from harness.interventions.attention import AttentionOverride, AttentionRecord, rewritten_thoughts
from harness.interventions.hooks import InterventionError
from harness.runtime.arch import Head
from harness.runtime.loop import encode_questions, generate, question_pass, run_latents

PROBLEMS = synthetic_split("test")[:5]


def _run(codi):
    batch = encode_questions(codi, [p.question for p in PROBLEMS])
    state = run_latents(codi, batch)
    return state.thoughts, generate(codi, state, max_new_tokens=1).first_logits, batch


@pytest.mark.parametrize("pattern", ["hub", "uniform", "sequential", "reroute"])
def test_rewritten_rows_are_normalised_causal_and_masked(random_codi, pattern):
    _, _, batch = _run(random_codi)
    pmap = batch.positions(random_codi.n_latent)
    n_heads = random_codi.geometry.n_heads
    seen, offsets = [], []
    target = "CT2" if pattern == "reroute" else None
    override = AttentionOverride(random_codi, [Head(1, 0), Head(1, 3)], pattern, pmap, hub="CT1", target=target)
    original_apply = override.apply

    def checking_apply(step, layer, probs, visible):
        out = original_apply(step, layer, probs, visible)
        seen.append((probs.clone(), out.clone(), visible.expand(probs.shape[0], 1, -1, -1)[:, 0].clone()))
        offsets.append(step.offset)
        return out

    override.apply = checking_apply
    with override, torch.no_grad():
        _run(random_codi)
    assert seen, "the override ran"
    for before, after, visible in seen:
        torch.testing.assert_close(after.sum(-1), torch.ones_like(after.sum(-1)))
        real = visible.any(-1, keepdim=True)  # padding queries see nothing; their rows are unused
        masked = (~visible & real)[:, None].expand_as(after)
        assert (after.masked_select(masked) == 0).all(), "no mass on masked keys"
        untouched = [h for h in range(n_heads) if h not in (0, 3)]
        assert torch.equal(after[:, untouched], before[:, untouched])
    if pattern == "hub":
        # queries after CT1 put at least 80% on it; CT0 and CT1 themselves keep their pattern
        hub = pmap.index("CT1")
        after_hub = [(out, off) for (_, out, _), off in zip(seen, offsets) if off > hub and off in pmap.latent]
        assert after_hub and all((out[:, [0, 3], 0, hub] >= 0.8).all() for out, _ in after_hub)
        up_to_hub = [(before, out) for (before, out, _), off in zip(seen, offsets) if off <= hub and off in pmap.latent]
        assert up_to_hub and all(torch.equal(b, a) for b, a in up_to_hub), "CT0 and CT1 cannot see the hub"
        assert sorted(override.rewritten) == [2, 3, 4, 5]


@torch.no_grad()
def test_override_changes_outputs_and_is_removed(random_codi):
    thoughts, logits, batch = _run(random_codi)
    pmap = batch.positions(random_codi.n_latent)
    implementation = random_codi.lm.config._attn_implementation
    heads = [Head(layer, h) for layer in range(random_codi.geometry.n_layers) for h in range(4)]
    with AttentionOverride(random_codi, heads, "uniform", pmap):
        t2, _, _ = _run(random_codi)
    assert (t2 - thoughts).abs().max() > 1e-3
    assert random_codi.lm.config._attn_implementation == implementation
    assert not any(hasattr(m, "codi_plans") for m in random_codi.modules())
    t3, l3, _ = _run(random_codi)
    assert torch.equal(t3, thoughts) and torch.equal(l3, logits)


@torch.no_grad()
def test_recording_does_not_change_outputs_and_rows_sum_to_one(random_codi):
    thoughts, logits, batch = _run(random_codi)
    pmap = batch.positions(random_codi.n_latent)
    with AttentionRecord(random_codi, pmap) as rec:
        t2, l2, _ = _run(random_codi)
    torch.testing.assert_close(t2, thoughts, atol=1e-5, rtol=1e-4)  # eager math vs SDPA
    torch.testing.assert_close(l2, logits, atol=1e-4, rtol=1e-4)
    total = rec.latent.sum(-1) + rec.bot + rec.question  # every key a latent query can see
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=1e-5)
    k = random_codi.n_latent
    assert (rec.latent[..., torch.triu_indices(k, k, 1)[0], torch.triu_indices(k, k, 1)[1]] == 0).all()


def test_bad_patterns_are_rejected(random_codi):
    _, _, batch = _run(random_codi)
    pmap = batch.positions(random_codi.n_latent)
    with pytest.raises(InterventionError, match="unknown attention pattern"):
        AttentionOverride(random_codi, [Head(0, 0)], "diagonal", pmap)
    with pytest.raises(InterventionError, match="exactly for pattern 'reroute'"):
        AttentionOverride(random_codi, [Head(0, 0)], "reroute", pmap)
    with pytest.raises(InterventionError, match="exactly for pattern 'reroute'"):
        AttentionOverride(random_codi, [Head(0, 0)], "hub", pmap, hub="CT1", target="CT2")


@torch.no_grad()
def test_two_overrides_on_one_layer_both_apply(random_codi):
    """A composed condition installs one plan per part: two plans on the same layer must both
    act (the second once silently replaced the first)."""
    _, _, batch = _run(random_codi)
    pmap = batch.positions(random_codi.n_latent)
    first, second = [Head(1, 0)], [Head(1, 3)]
    uniform = lambda heads: AttentionOverride(random_codi, heads, "uniform", pmap)  # noqa: E731
    with uniform(first + second):
        together, _, _ = _run(random_codi)
    with uniform(first), uniform(second):
        stacked, _, _ = _run(random_codi)
    with uniform(second):
        second_only, _, _ = _run(random_codi)
    torch.testing.assert_close(stacked, together)
    assert (stacked - second_only).abs().max() > 1e-4, "the first plan must not be dropped"
    assert not any(hasattr(m, "codi_plans") for m in random_codi.modules())


@pytest.mark.parametrize(
    ("pattern", "hub", "target", "rewritten"),
    [("hub", "CT1", None, [2, 3, 4, 5]), ("hub", "CT5", None, []), ("hub", "bot", None, [0, 1, 2, 3, 4, 5]),
     ("reroute", "CT1", "CT3", [4, 5]), ("reroute", "CT4", "CT5", []), ("uniform", "CT5", None, [0, 1, 2, 3, 4, 5]),
     ("sequential", "CT2", None, [0, 1, 2, 3, 4, 5])],
)  # fmt: skip
def test_the_rewritten_queries_are_those_after_the_hub_and_target(pattern, hub, target, rewritten):
    assert rewritten_thoughts(pattern, hub, target, n_latent=6) == rewritten


@torch.no_grad()
def test_the_question_pass_runs_sdpa_under_a_plan(random_codi, monkeypatch):
    """A plan reads or rewrites latent queries only: the question pass (no latent query) runs
    SDPA, as without a plan, so its [B, H, T, T] probabilities are never built (on GSM8K's long
    questions that pass dominated head discovery) and its cache is the baseline's at every real
    (unpadded) position; the latent passes still run the eager math. Within 1e-6, not bit for
    bit: under a plan the mask comes in the eager form (additive), which SDPA may serve with
    another kernel on another CPU (equal here)."""
    batch = encode_questions(random_codi, [p.question for p in PROBLEMS])
    plain = question_pass(random_codi, batch)
    eager = []
    original = attention_module._eager_probs
    monkeypatch.setattr(attention_module, "_eager_probs", lambda *a, **k: eager.append(1) or original(*a, **k))
    heads = [Head(layer, 0) for layer in range(random_codi.geometry.n_layers)]
    for plan in (AttentionRecord(random_codi, batch.positions(random_codi.n_latent)),
                 AttentionOverride(random_codi, heads, "uniform", batch.positions(random_codi.n_latent))):  # fmt: skip
        with plan:
            under = question_pass(random_codi, batch)
            assert not eager, "the question pass built eager probabilities"
            run_latents(random_codi, batch)
        assert len(eager) == random_codi.n_latent * random_codi.geometry.n_layers
        eager.clear()
        torch.testing.assert_close(under.hidden, plain.hidden, atol=1e-6, rtol=0)
        real = batch.attention_mask.bool()  # [B, T]: padding rows differ by mask form, and no query sees them
        for mine, theirs in zip(under.cache.layers, plain.cache.layers):  # keys, values [B, H, T, hd]
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-6, rtol=0)
