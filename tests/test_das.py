"""Learned-subspace interchange (`harness/measures/das.py`, the `das` kind, `PatchSubspace`)."""

import numpy as np
import pytest
import torch

from harness.data.problems import format_number, synthetic_split
from harness.interventions.hooks import InterventionError
from harness.interventions.specs import PatchThoughts
from harness.interventions.subspace import PatchSubspace, interchange_rows
from harness.judgment.claims import ClaimError, parse_claim
from harness.judgment.kinds import das as das_kind
from harness.measures.das import fit_subspaces, random_basis
from harness.measures.evaluation import evaluate
from harness.measures.interchange import clean_thoughts, interchange, interchange_pairs
from harness.measures.runner import MAX_NEW_TOKENS, ModelRun
from harness.runtime.cache import ResultCache
from harness.runtime.loop import answer_logprobs, encode_questions, pause_latents, run_latents
from harness.runtime.positions import thought_number

TEST = synthetic_split("test")[:24]
DISCOVERY = synthetic_split("discovery")[:24]


def _pairs(problems):
    indices, sources = interchange_pairs(problems, 0)
    return [problems[i] for i in indices], sources


def test_the_full_rank_subspace_is_the_whole_thought_interchange(load_model):
    codi = load_model("tiny-gpt2")
    bases, sources = _pairs(TEST)
    q, _ = torch.linalg.qr(torch.randn(codi.lm.config.hidden_size, codi.lm.config.hidden_size))
    whole, _ = interchange(codi, bases, sources, (2,), batch_size=8)
    full, _ = interchange(codi, bases, sources, (2,), batch_size=8, basis=q.T)
    assert [r.correct for r in full.records] == [r.correct for r in whole.records]
    np.testing.assert_allclose([r.answer_logprob for r in full.records], [r.answer_logprob for r in whole.records],
                               atol=1e-4)  # fmt: skip
    half, _ = interchange(codi, bases, sources, (2,), batch_size=8, basis=q.T[:8])
    assert [r.answer_logprob for r in half.records] != pytest.approx([r.answer_logprob for r in whole.records])


@torch.no_grad()
def _counterfactual_logprob(codi, bases, sources, thought, basis) -> float:
    donor = clean_thoughts(codi, sources, 32)[:, thought]
    batch = encode_questions(codi, [b.question for b in bases])
    patch = lambda i, x: x + (donor.to(x) - x) @ basis.T @ basis if i == thought else x  # noqa: E731
    state = run_latents(codi, batch, patch)
    return float(answer_logprobs(codi, state, [str(int(s.answer)) for s in sources]).mean())


def test_a_fitted_subspace_raises_the_counterfactual_above_a_random_one(load_model):
    """The training objective moves: the learned rank-4 subspace gives the sources' answers a
    higher log-probability than a random rank-4 subspace, and its rows are orthonormal."""
    codi = load_model("tiny-llama")
    bases, sources = _pairs(synthetic_split("discovery")[:48])
    donor = clean_thoughts(codi, sources, 32)
    basis = fit_subspaces(codi, bases, sources, donor, thought=1, ranks=(4,), steps=20)[4]
    torch.testing.assert_close(basis @ basis.T, torch.eye(4), atol=1e-5, rtol=0)
    rand = random_basis(basis.shape[1], 4, torch.Generator().manual_seed(0))
    learned = _counterfactual_logprob(codi, bases, sources, 1, basis)
    assert learned > _counterfactual_logprob(codi, bases, sources, 1, rand) + 0.05
    assert all(p.requires_grad for p in codi.parameters()), "the model's weights are handed back unfrozen"


def test_ranks_fitted_together_are_the_ranks_fitted_alone(load_model):
    """The stacked fit (one block of rows per rank, one pass a step) trains each rank as a fit
    of that rank alone would: same start, same batches, each block's loss reaching only its own
    rotation. A stack is a batch of another size, so another GEMM path may run: the subspaces
    agree to 1e-3 (projectors), not bit for bit; rank 1 and 4 alone differ by far more."""
    codi = load_model("tiny-llama")
    bases, sources = _pairs(synthetic_split("discovery")[:48])
    donor = clean_thoughts(codi, sources, 32)
    together = fit_subspaces(codi, bases, sources, donor, thought=2, ranks=(1, 4), steps=8)
    alone = {r: fit_subspaces(codi, bases, sources, donor, thought=2, ranks=(r,), steps=8)[r] for r in (1, 4)}
    projector = lambda b: b.T @ b  # noqa: E731
    for r in (1, 4):
        assert together[r].shape == alone[r].shape == (r, donor.shape[-1])
        torch.testing.assert_close(projector(together[r]), projector(alone[r]), atol=1e-3, rtol=0)
    assert float((projector(alone[1]) - projector(alone[4][:1])).abs().max()) > 1e-2, "the ranks train apart"


def test_subspaces_are_fitted_on_discovery_pairs_only(load_model, monkeypatch):
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(None), requested_batch_size=8)
    seen = []

    ranks = set()

    def spy(codi, bases, sources, donor, thought, fitted, seed=0, steps=60, progress=False):
        seen.extend(p.id for p in bases)
        ranks.update(fitted)
        return {r: random_basis(donor.shape[-1], r, torch.Generator().manual_seed(r)) for r in fitted}

    monkeypatch.setattr(das_kind, "fit_subspaces", spy)
    monkeypatch.setattr(das_kind, "RANKS", (1, 2, 4))  # 4: above the claim's max_rank, never fitted
    claim = parse_claim({"id": "d", "phase": 3, "statement": "s", "metric": "das", "threshold": 50.0,
                         "direction": "greater", "experiment": {"max_rank": 2, "n_random": 3}}, "t")  # fmt: skip
    measured = das_kind.measure(claim.params, run, "accuracy")
    assert seen and set(seen) <= {p.id for p in DISCOVERY} and not set(seen) & {p.id for p in TEST}
    assert len(measured.null) == 3 and measured.details["rank"] in (1, 2) and ranks == {1, 2}
    assert {(r["thought"], r["rank"]) for r in measured.details["grid"]} == {
        (f"CT{t}", r) for t in range(run.n_latent) for r in (1, 2)
    }


def _das_claim(**experiment):
    return parse_claim({"id": "d", "phase": 3, "statement": "s", "metric": "das", "threshold": 50.0,
                        "direction": "greater", "experiment": experiment}, "t")  # fmt: skip


def test_the_control_subspaces_are_random_draws_not_the_chosen_one(load_model, monkeypatch):
    """Guards against the random-subspace control being drawn as the chosen subspace itself
    (the learned subspace then sits at its own control's 100th percentile and an
    `against_control` claim can never hold): every control basis is an orthonormal [rank, d]
    draw of its own, spanning another subspace than the chosen one, and the control's values
    are what those bases give."""
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(None), requested_batch_size=8)
    calls = []
    original = das_kind.moved

    def spy(split, thought, basis, what):
        out = original(split, thought, basis, what)
        calls.append((split, thought, basis.clone(), what, out))
        return out

    monkeypatch.setattr(das_kind, "moved", spy)
    claim = _das_claim(thought="CT2", max_rank=2, n_random=3, steps=2)
    measured = das_kind.measure(claim.params, run, "accuracy")
    thought, rank = thought_number(measured.details["positions"][0]), measured.details["rank"]
    chosen = das_kind.subspaces(run, thought, das_kind.ranks_upto(2), steps=2)[rank]
    assert any(split is run and torch.equal(basis, chosen) for split, _, basis, _, _ in calls), "the chosen one"
    controls = [(basis, out) for split, t, basis, what, out in calls if what.startswith("random")]
    assert len(controls) == 3 and all(split is run and t == thought for split, t, *_ in calls[-3:])
    assert measured.null == pytest.approx([100 * float(out.mean()) for _, out in controls])
    d = run.codi.lm.config.hidden_size
    projector = lambda b: b.T @ b  # noqa: E731  the subspace itself, whatever its basis
    for i, (basis, _) in enumerate(controls):
        assert basis.shape == (rank, d)
        torch.testing.assert_close(basis @ basis.T, torch.eye(rank), atol=1e-5, rtol=0)
        gap = float(torch.linalg.matrix_norm(projector(basis) - projector(chosen)))
        assert gap > 0.5, f"control draw {i} spans the chosen subspace (projectors {gap:.2g} apart)"
        for other, _ in controls[:i]:
            assert float(torch.linalg.matrix_norm(projector(basis) - projector(other))) > 0.5, "draws differ"


def test_das_counts_only_pairs_right_on_both_sides(load_model, monkeypatch):
    """Guards against DAS counting a pair where either side, not both, is answered right
    unpatched: `valid_pairs` and the claim's n are the pairs whose base (the run's baseline)
    and source (evaluated here, independently) are both right; the problems include pairs
    right on one side only."""
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(None), requested_batch_size=8)
    indices, sources = interchange_pairs(TEST, run.seed)
    base_right = run.baseline.correct[indices] == 1
    source_right = np.array([r.correct for r in evaluate(run.codi, sources, 8, max_new_tokens=MAX_NEW_TOKENS).records])
    both = base_right & (source_right == 1)
    assert (base_right != (source_right == 1)).sum() >= 2, "pairs right on one side only"
    assert both.sum() >= 2
    np.testing.assert_array_equal(das_kind.valid_pairs(run), both)

    def random_fit(codi, bases, sources, donor, thought, ranks, *args, **kwargs):
        return {r: random_basis(donor.shape[-1], r, torch.Generator().manual_seed(r)) for r in ranks}

    monkeypatch.setattr(das_kind, "fit_subspaces", random_fit)
    measured = das_kind.measure(_das_claim(thought="CT2", max_rank=1, n_random=0).params, run, "accuracy")
    assert measured.effect.n == both.sum()
    assert f"{both.sum()} of {len(indices)} pairs right on both sides" in measured.details["mode"]


def test_a_subspace_spec_is_keyed_by_its_basis_and_acts_on_its_thought_only(load_model):
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(None), requested_batch_size=8)
    d = run.codi.lm.config.hidden_size
    a, b = (random_basis(d, 4, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert PatchSubspace("CT2", a, "zero").key() != PatchSubspace("CT2", b, "zero").key()
    assert PatchSubspace("CT2", a.clone(), "zero") == PatchSubspace("CT2", a, "zero")
    full = torch.eye(d)
    zero_all = run.measure(PatchSubspace("CT2", full, "zero")).answer_logprob
    np.testing.assert_allclose(zero_all, run.measure(PatchThoughts(("CT2",), "zero")).answer_logprob, atol=1e-4)
    assert np.abs(run.measure(PatchSubspace("CT2", a, "mean")).answer_logprob - run.baseline.answer_logprob).max() > 0
    with pytest.raises(InterventionError, match="orthonormal rows"):
        PatchSubspace("CT2", torch.ones(2, d))
    with pytest.raises(InterventionError, match="both patch CT2"):
        PatchSubspace("CT2", a) + PatchThoughts(("CT2",), "zero")


@pytest.mark.parametrize(
    ("experiment", "message"),
    [({"max_rank": 3}, "max_rank is one of 1, 2, 4, 8, 16"), ({"thought": "eot"}, "thought is CT<i> or best"),
     ({"against_control": True, "n_random": 1}, "at least 2 with against_control")],
)  # fmt: skip
def test_das_claims_are_checked_at_load(experiment, message):
    entry = {"id": "d", "phase": 3, "statement": "s", "metric": "das", "threshold": 50.0, "direction": "greater",
             "experiment": experiment}  # fmt: skip
    with pytest.raises(ClaimError, match=message):
        parse_claim(entry, "t")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("thought", [0, 3, 5])
def test_a_loop_resumed_at_the_trained_thought_is_the_full_loop(load_model, name, thought):
    """What DAS trains with: the thoughts before the trained one run once (`pause_latents`),
    every step resumes there. Same passes on the same shapes: bit for bit."""
    codi = load_model(name)
    problems = synthetic_split("test")[:12]
    batch = encode_questions(codi, [p.question for p in problems])
    d = codi.lm.config.hidden_size
    basis, donor = random_basis(d, 4, torch.Generator().manual_seed(0)), torch.randn(12, d)
    patch = lambda i, x: interchange_rows(basis, x, donor.to(x)) if i == thought else x  # noqa: E731
    answers = [format_number(p.answer) for p in problems]
    with torch.no_grad():
        full = run_latents(codi, batch, patch)
        resumed = run_latents(codi, batch, patch, resume=pause_latents(codi, batch, thought))
        assert torch.equal(full.thoughts, resumed.thoughts) and torch.equal(full.hiddens, resumed.hiddens)
        assert torch.equal(answer_logprobs(codi, full, answers), answer_logprobs(codi, resumed, answers))
        unpatched = run_latents(codi, batch)
    assert not torch.equal(unpatched.thoughts[:, thought], full.thoughts[:, thought]), "the patch acts"


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_counted_pairs_alone_give_what_every_pair_gives_kept_to_them(load_model, name):
    """Interchange runs only the pairs it counts (right on both sides): the same per-pair
    outcomes as interchanging every pair and keeping the counted ones, for whole thoughts and a
    subspace. Other batches, other padding: log-probs within 1e-4 nats (another GEMM path may
    run), and equal answers (a greedy token flips only on a near-tie within that difference)."""
    from harness.judgment.kinds import interchange as interchange_kind

    run = ModelRun(load_model(name), TEST, DISCOVERY, ResultCache(None), requested_batch_size=8)
    indices, sources = interchange_kind.pairs(run)
    valid = interchange_kind.valid_pairs(run)
    assert 2 <= valid.sum() < len(valid), "some pairs are left out"
    bases = [run.problems[i] for i in indices]
    every, stays = interchange(run.codi, bases, sources, (2,), batch_size=8)
    counted = interchange_kind.interchanged(run, (2,))
    np.testing.assert_array_equal(counted[0], np.array([r.correct for r in every.records])[valid])
    np.testing.assert_array_equal(counted[1], np.asarray(stays)[valid])
    np.testing.assert_allclose(counted[2], np.array([r.answer_logprob for r in every.records])[valid], atol=1e-4)
    basis = random_basis(run.codi.lm.config.hidden_size, 4, torch.Generator().manual_seed(0))
    donor = clean_thoughts(run.codi, sources, 8)
    every, _ = interchange(run.codi, bases, sources, (2,), 8, basis=basis, donor=donor)
    np.testing.assert_array_equal(
        das_kind.moved(run, 2, basis, "x"), np.array([r.correct for r in every.records])[valid] == 1
    )


def test_interchange_decodes_at_most_the_runs_max_new_tokens(load_model, monkeypatch):
    """--max-new-tokens reaches the interchange evaluations (whole thoughts and subspaces), as
    it reaches every other: one token answers nothing; the kinds pass the run's own value."""
    from harness.judgment.kinds import interchange as interchange_kind

    codi = load_model("tiny-gpt2")
    bases, sources = _pairs(TEST)
    every = tuple(range(codi.n_latent))  # all thoughts: many answers follow the source
    short, _ = interchange(codi, bases, sources, every, 8, max_new_tokens=1)
    full, _ = interchange(codi, bases, sources, every, 8)
    assert not any(r.correct for r in short.records) and any(r.correct for r in full.records)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["max_new_tokens"])
        return interchange(*args, **kwargs)

    monkeypatch.setattr(interchange_kind, "interchange", spy)
    monkeypatch.setattr(das_kind, "interchange", spy)
    run = ModelRun(codi, TEST, DISCOVERY, ResultCache(None), requested_batch_size=8, max_new_tokens=64)
    interchange_kind.interchanged(run, (2,))
    das_kind.moved(run, 2, random_basis(codi.lm.config.hidden_size, 4, torch.Generator().manual_seed(0)), "x")
    assert seen == [64, 64]
