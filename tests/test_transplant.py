"""Cross-model head transplantation: the functional transplant against the model itself, the
least-squares maps against known maps, and cross-architecture runs on the shipped models."""

import pytest
import torch

from harness.data.problems import synthetic_split
from harness.interventions.hooks import HeadAblation, InterventionError, leftover_hooks
from harness.interventions.transplant import HeadTransplant, LinearMap, fit_linear_map, paired_states
from harness.measures.evaluation import evaluate
from harness.runtime.arch import Head
from harness.runtime.loop import encode_questions, generate, run_latents
from harness.runtime.models import load

TEST = synthetic_split("test")
N_DECODE = 5
MAX_ANSWER = 12  # "The answer is : N <eos>" and room to spare, so a broken model stops early
# a head inside a GQA group of the LLaMA (4 query heads per KV head) and a GPT-2 head
SELF_HEADS = {"gpt2": Head(1, 2), "llama": Head(3, 5)}
TOP_HEADS = {"tiny-gpt2": Head(1, 2), "tiny-llama": Head(3, 4)}


def _run(codi, problems, n_decode=N_DECODE):
    """Thoughts [B, K, d], eot logits [B, V+3] and a few greedy steps' tokens and probabilities."""
    batch = encode_questions(codi, [p.question for p in problems])
    state = run_latents(codi, batch)
    gen = generate(codi, state, max_new_tokens=n_decode)
    return state.thoughts, gen.first_logits, gen.tokens, gen.token_probs


def _mixed_lengths(problems, n):
    """n problems of distinct question lengths, so a batch of them is left-padded."""
    by_length = {len(p.question.split()): p for p in problems}
    return [by_length[k] for k in sorted(by_length)[:: max(1, len(by_length) // n)]][:n]


def _identity_transplant(codi):
    d, head = codi.geometry.d_model, SELF_HEADS[codi.arch.model_type]
    return HeadTransplant(codi, head, codi, head, LinearMap.identity(d), LinearMap.identity(d))


@torch.no_grad()
def test_self_transplant_with_identity_maps_changes_nothing(random_codi):
    problems = _mixed_lengths(TEST, 6)
    thoughts, logits, tokens, probs = _run(random_codi, problems)
    with _identity_transplant(random_codi):
        t2, l2, tok2, p2 = _run(random_codi, problems)
    torch.testing.assert_close(t2, thoughts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l2, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tok2, tokens)
    torch.testing.assert_close(p2, probs, atol=1e-5, rtol=1e-4)
    assert not leftover_hooks(random_codi)


@torch.no_grad()
def test_self_transplant_of_every_head_of_a_layer_changes_nothing(random_codi):
    """Every query head, so every GQA group: a wrong query -> KV head map (h % n_kv instead of
    h // (n_heads / n_kv)) reads another group's KV head for most of them."""
    problems = _mixed_lengths(TEST, 4)
    thoughts, logits, _, _ = _run(random_codi, problems, n_decode=2)
    geo, layer = random_codi.geometry, SELF_HEADS[random_codi.arch.model_type].layer
    identity = LinearMap.identity(geo.d_model)
    for h in range(geo.n_heads):
        with HeadTransplant(random_codi, Head(layer, h), random_codi, Head(layer, h), identity, identity):
            t2, l2, _, _ = _run(random_codi, problems, n_decode=2)
        torch.testing.assert_close(t2, thoughts, atol=1e-4, rtol=1e-4, msg=f"head {h}")
        torch.testing.assert_close(l2, logits, atol=1e-4, rtol=1e-4, msg=f"head {h}")


def test_self_transplant_keeps_every_greedy_answer(random_codi):
    problems = TEST[:20]
    base = evaluate(random_codi, problems, max_new_tokens=8, progress=False)
    moved = evaluate(
        random_codi,
        problems,
        max_new_tokens=8,
        progress=False,
        intervene=lambda pm, i: _identity_transplant(random_codi),
    )
    assert [r.text for r in moved.records] == [r.text for r in base.records]
    # the teacher-forced answer pass branches from the latent cache before decoding continues
    # from it: the donor head's own cache follows the branch
    logprobs = [(a.answer_logprob, b.answer_logprob) for a, b in zip(moved.records, base.records)]
    assert all(abs(a - b) < 1e-3 for a, b in logprobs), logprobs


@torch.no_grad()
def test_a_zero_output_map_is_a_zero_ablation_at_every_position(random_codi):
    """The donor path is what keeps the self-transplant unchanged: without it, the transplant
    is the head's zero ablation."""
    problems = _mixed_lengths(TEST, 4)
    d, head = random_codi.geometry.d_model, SELF_HEADS[random_codi.arch.model_type]
    silent = LinearMap(torch.zeros(d, d), torch.zeros(d))
    with HeadTransplant(random_codi, head, random_codi, head, LinearMap.identity(d), silent):
        transplanted = _run(random_codi, problems)
    with HeadAblation(random_codi, [head], range(10_000)):
        ablated = _run(random_codi, problems)
    baseline = _run(random_codi, problems)
    assert (ablated[0] - baseline[0]).abs().max() > 1e-4, "the ablation must change something"
    for got, want in zip(transplanted, ablated):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_fit_linear_map_recovers_a_known_map_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=gen) * torch.linspace(0.1, 10, 12)  # uneven scales
    w, b = torch.randn(12, 7, generator=gen), torch.randn(7, generator=gen)
    y = x @ w + b + 1e-3 * torch.randn(2000, 7, generator=gen)
    fit = fit_linear_map(x, y, ridge=1e-6)
    torch.testing.assert_close(fit.W, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fit.b, b, atol=1e-3, rtol=1e-3)
    assert fit.r2 > 0.999 and fit.r2_heldout > 0.999
    torch.testing.assert_close(fit(x), y, atol=1e-2, rtol=1e-2)
    noise = fit_linear_map(x, torch.randn(2000, 7, generator=gen))
    assert noise.r2 < 0.05 and noise.r2_heldout < 0.05
    with pytest.raises(ValueError, match="pair rows"):
        fit_linear_map(x, y[:-1])


@pytest.fixture(scope="module")
def shipped():
    """Both shipped models and the maps of their top heads' layers, fitted both ways on 30
    discovery problems: {(recipient, donor): (recipient model, donor model, map_in, map_out)}."""
    models = {name: load(name) for name in TOP_HEADS}
    discovery = synthetic_split("discovery")[:30]
    pairs = {}
    for r_name, d_name in [("tiny-gpt2", "tiny-llama"), ("tiny-llama", "tiny-gpt2")]:
        r, d = models[r_name], models[d_name]
        states = paired_states(r, d, discovery, TOP_HEADS[r_name].layer, TOP_HEADS[d_name].layer, batch_size=16)
        assert states.recipient_in.shape == (30 * 7, r.geometry.d_model)
        assert states.donor_out.shape == (30 * 7, d.geometry.d_model)
        pairs[r_name, d_name] = (r, d, *states.maps())
    yield pairs
    for codi in models.values():
        assert not leftover_hooks(codi), f"left behind on {codi.name}: {leftover_hooks(codi)}"


def _cross(shipped, pair, positions=None):
    r, d, map_in, map_out = shipped[pair]
    return HeadTransplant(r, TOP_HEADS[r.name], d, TOP_HEADS[d.name], map_in, map_out, positions)


@pytest.mark.parametrize("pair", [("tiny-gpt2", "tiny-llama"), ("tiny-llama", "tiny-gpt2")])
def test_cross_architecture_transplant_runs_and_changes_the_outputs(shipped, pair):
    recipient, _, map_in, map_out = shipped[pair]
    assert 0.0 < map_in.r2 <= 1.0 and 0.0 < map_out.r2 <= 1.0
    problems = TEST[:20]
    base = evaluate(recipient, problems, max_new_tokens=MAX_ANSWER, progress=False)
    moved = evaluate(
        recipient, problems, max_new_tokens=MAX_ANSWER, progress=False, intervene=lambda pm, i: _cross(shipped, pair)
    )
    assert not leftover_hooks(recipient)
    assert sum(a.text != b.text for a, b in zip(base.records, moved.records)) >= 2
    with torch.no_grad():
        thoughts = _run(recipient, problems[:4])[0]
        with _cross(shipped, pair):
            moved_thoughts = _run(recipient, problems[:4])[0]
    assert (moved_thoughts - thoughts).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("pair", [("tiny-gpt2", "tiny-llama"), ("tiny-llama", "tiny-gpt2")])
def test_transplanted_results_do_not_depend_on_the_batch(shipped, pair):
    problems = _mixed_lengths(TEST, 4)
    recipient = shipped[pair][0]
    with _cross(shipped, pair):
        batched = _run(recipient, problems)
        alone = [_run(recipient, [p]) for p in problems]
    for row, (thoughts, logits, tokens, probs) in enumerate(alone):
        n = tokens.shape[1]  # a batch decodes until its last row is done; alone, a row stops at eos
        torch.testing.assert_close(batched[0][row], thoughts[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched[1][row], logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(batched[2][row, :n], tokens[0])
        torch.testing.assert_close(batched[3][row, :n], probs[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_transplant_at_the_thoughts_leaves_the_question_pass_alone(shipped):
    pair = ("tiny-gpt2", "tiny-llama")
    recipient = shipped[pair][0]
    batch = encode_questions(recipient, [p.question for p in TEST[:4]])
    pmap = batch.positions(recipient.n_latent)
    base = run_latents(recipient, batch)
    with _cross(shipped, pair, positions=[]):
        untouched = run_latents(recipient, batch)
    with _cross(shipped, pair, positions=pmap.latent):
        moved = run_latents(recipient, batch)
    assert torch.equal(untouched.thoughts, base.thoughts)
    assert torch.equal(moved.bot_hidden, base.bot_hidden) and torch.equal(moved.thoughts[:, 0], base.thoughts[:, 0])
    assert (moved.thoughts[:, 1:] - base.thoughts[:, 1:]).abs().max() > 1e-3


def test_mismatched_maps_and_heads_are_refused_and_errors_leave_no_hooks(shipped):
    recipient, donor, map_in, map_out = shipped["tiny-gpt2", "tiny-llama"]
    head, donor_head = TOP_HEADS["tiny-gpt2"], TOP_HEADS["tiny-llama"]
    with pytest.raises(InterventionError, match="maps must be 128->160"):
        HeadTransplant(recipient, head, donor, donor_head, map_out, map_in)
    with pytest.raises(InterventionError, match="out of range"):
        HeadTransplant(recipient, head, donor, Head(4, 0), map_in, map_out)
    with pytest.raises(RuntimeError, match="inside"), _cross(shipped, ("tiny-gpt2", "tiny-llama")):
        raise RuntimeError("inside")
    assert not leftover_hooks(recipient)
