"""What the thoughts hold: the logit lens finds a planted number at the thought it was planted
in (and only there), interchange patching patches each base with its own source's thoughts
(and with source = base changes no answer), counterfactual pairs keep the operations, and the
step probes find a planted step result at its thought and layer."""

import numpy as np
import torch

from harness.data.problems import synthetic_split
from harness.judgment.claims import evaluate_claim, parse_claim
from harness.judgment.kinds import logit_lens
from harness.measures.evaluation import evaluate
from harness.measures.interchange import clean_thoughts, interchange, interchange_pairs
from harness.measures.lens import SOURCES, chance_targets, hits, lens_tokens, step_results, step_tokens
from harness.measures.probes import chance, step_probes
from harness.measures.runner import ModelRun
from harness.runtime.cache import ResultCache
from harness.runtime.loop import ThoughtPatch

PROBLEMS = synthetic_split("test")[:8]


def test_a_thought_overwritten_with_a_numbers_embedding_decodes_to_it(load_model):
    codi = load_model("tiny-llama")
    targets = step_tokens(codi, PROBLEMS, 2)  # [N, 2]
    planted = codi.embed(torch.tensor(targets[:, 0]))  # each problem's step-1 result, as a token embedding
    tokens = lens_tokens(codi, PROBLEMS, batch_size=len(PROBLEMS), patch=lambda i, t: planted.to(t) if i == 3 else t)
    thought = SOURCES.index("thought")
    assert (tokens[:, thought, 1 + 3, 0] == targets[:, 0]).all()  # position 0 is bot, CT3 is 1 + 3
    found = hits(tokens, targets, top=1)[:, thought]  # [N, P, steps]
    assert found[:, 1 + 3, 0].all()
    assert found[:, [1 + 2, 1 + 4], 0].mean() < 0.5, "only the planted thought decodes it"
    assert (tokens[:, thought, 0] == -1).all(), "bot has no thought to decode"
    chance_found = hits(tokens, chance_targets(targets, seed=0), top=1)[:, thought, 1 + 3, 0]
    assert chance_found.mean() < 0.5, "against another problem's value the plant is not credited"
    unpatched = lens_tokens(codi, PROBLEMS, batch_size=len(PROBLEMS))
    assert not (unpatched[:, thought, 1 + 3, 0] == targets[:, 0]).all()


def test_step_results_and_tokens_from_both_cot_formats(load_model):
    problem = PROBLEMS[7]
    assert step_results(problem)[-1] == problem.answer and len(step_results(problem)) == problem.n_steps
    gsm = problem.__class__("g", "q", "<<48/2=24>> <<48+24=72>>", 72.0, 2)
    assert step_results(gsm) == [24.0, 72.0]
    codi = load_model("tiny-gpt2")
    tokens = step_tokens(codi, [problem, gsm], 4)
    assert tokens[1, 2] == -1 and codi.tokenizer.decode([tokens[1, 0]]).strip() == "24"


def test_interchange_with_source_equal_to_base_changes_no_answer(load_model):
    codi = load_model("tiny-gpt2")
    result, stays = interchange(codi, PROBLEMS, PROBLEMS, tuple(range(codi.n_latent)), batch_size=5)
    baseline = evaluate(codi, PROBLEMS, batch_size=5, progress=False)
    assert [r.pred for r in result.records] == [r.pred for r in baseline.records]
    assert stays == [r.correct for r in baseline.records]
    np.testing.assert_allclose([r.answer_logprob for r in result.records], [r.answer_logprob for r in baseline.records],
                               atol=1e-4)  # fmt: skip


def test_interchange_patches_each_base_with_its_own_source(load_model):
    codi = load_model("tiny-gpt2")
    bases, sources = interchange_pairs(PROBLEMS, seed=1)
    bases = [PROBLEMS[i] for i in bases]
    result, _ = interchange(codi, bases, sources, (2,), batch_size=3)  # batches sorted by length
    donor = clean_thoughts(codi, sources, batch_size=len(sources))
    moved = []
    for j, base in enumerate(bases):  # one pair at a time: nothing to misalign
        patch = ThoughtPatch(codi, lambda i, t, j=j: donor[j : j + 1, i].to(t) if i == 2 else t)
        with_source = base.__class__(base.id, base.question, base.cot, sources[j].answer, base.n_steps)
        moved.append(evaluate(codi, [with_source], intervene=lambda pmap, idx, p=patch: p, progress=False).records[0])
    assert [r.pred for r in result.records] == [r.pred for r in moved]
    np.testing.assert_allclose([r.answer_logprob for r in result.records], [r.answer_logprob for r in moved], atol=1e-4)


def test_step_probes_find_a_planted_step_result_at_its_thought_and_layer():
    problems = synthetic_split("test")[:400]
    rng = np.random.default_rng(0)
    states = rng.normal(size=(len(problems), 3, 2, 24)).astype(np.float32)  # [N, K, L + 1, d]
    digit = np.array([int(step_results(p)[0]) % 10 for p in problems])
    states[:, 2, 1, :10] += 4 * np.eye(10)[digit]  # step 1's last digit at CT2, layer 1
    out = step_probes(states, problems, n_steps=2, seed=0)  # [steps, 2, K, L + 1, N]
    task, control = out[0, 0], out[0, 1]
    assert task[2, 1].mean() > 0.9 and control[2, 1].mean() < chance(digit) + 0.15
    assert task[1, 1].mean() < chance(digit) + 0.1 and task[2, 0].mean() < chance(digit) + 0.1
    has_two = np.array([p.n_steps >= 2 for p in problems])
    assert (out[1, 0, 0, 0][~has_two] == -1).all() and (out[1, 0, 0, 0][has_two] >= 0).all()


def test_the_lens_heat_map_is_drawn_at_the_top_k_its_claim_is_judged_on(load_model, tmp_path):
    """A claim judged on top-5 decoding gets a top-5 heat map (it showed top-1 rates beside a
    top-5 verdict)."""
    run = ModelRun(load_model("tiny-gpt2"), synthetic_split("test")[:40], synthetic_split("discovery")[:40],
                   ResultCache(tmp_path))  # fmt: skip
    experiment = {"test": "decodes_step", "step": 1, "top": 5}
    claim = parse_claim({"id": "c", "phase": 3, "statement": "s", "metric": "logit_lens", "threshold": 10.0,
                         "direction": "greater", "experiment": experiment}, "t")  # fmt: skip
    section = logit_lens.section([evaluate_claim(claim, run)], {"tiny-gpt2": run})
    (fig,) = section.figures.values()
    table = section.tables["lens"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2
    for ax in panels:
        source = ax.get_title().split(":")[0]
        assert "top-5" in ax.get_title()
        part = table[table.source == source]
        shown = np.asarray(ax.get_images()[0].get_array())
        assert np.isclose(np.nansum(shown), part.top5.sum()) and not np.isclose(part.top5.sum(), part.top1.sum())
