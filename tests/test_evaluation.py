from unittest import mock

import torch

from harness.data.problems import synthetic_split
from harness.interventions.hooks import HeadAblation
from harness.measures.evaluation import PrefixStore, answer_token_index, evaluate, mean_patch, thought_means
from harness.runtime.arch import Head
from harness.runtime.loop import encode_questions, run_latents


def test_answer_token_index_finds_where_the_last_number_starts(random_codi):
    tok = random_codi.tokenizer
    ids = tok("answer is : 14")["input_ids"] + [random_codi.eos_id]
    assert answer_token_index(random_codi, ids) == 3
    ids = tok("<< 3 + 4 = 7 >> answer is : 7")["input_ids"]
    assert answer_token_index(random_codi, ids) == len(ids) - 1
    assert answer_token_index(random_codi, tok("answer is :")["input_ids"]) is None


@torch.no_grad()
def test_mean_patch_feeds_the_mean_thoughts(random_codi):
    problems = synthetic_split("test")[:12]
    means = thought_means(random_codi, problems, batch_size=5)  # [K, d]
    batch = encode_questions(random_codi, [p.question for p in problems])
    plain = run_latents(random_codi, batch).thoughts  # [B, K, d]
    torch.testing.assert_close(means, plain.mean(0), atol=1e-5, rtol=1e-5)
    patched = run_latents(random_codi, batch, mean_patch(means)).thoughts
    assert torch.equal(patched, means.expand_as(patched))


def test_records_carry_what_the_claims_need(random_codi):
    problems = synthetic_split("test")[:8]
    result = evaluate(random_codi, problems, batch_size=3, max_new_tokens=5, progress=False)
    assert [r.id for r in result.records] == [p.id for p in problems]
    assert [r.n_steps for r in result.records] == [p.n_steps for p in problems]
    assert all(0.0 <= r.confidence <= 1.0 for r in result.records)
    assert result.accuracy == sum(r.correct for r in result.records) / 8


def test_shared_question_passes_give_the_same_results_and_are_reused(random_codi):
    problems = synthetic_split("test")[:12]
    heads = [Head(1, 2), Head(0, 0)]

    def ablate(pmap, indices):
        return HeadAblation(random_codi, heads, pmap.latent, "zero")

    plain = [evaluate(random_codi, problems, 5, max_new_tokens=6, progress=False, intervene=i) for i in (None, ablate)]
    store = PrefixStore()
    calls = []
    step = random_codi.step
    with mock.patch.object(random_codi, "step", side_effect=lambda *a, **k: calls.append(k) or step(*a, **k)):
        shared = [
            evaluate(random_codi, problems, 5, max_new_tokens=6, progress=False, intervene=i, prefixes=store)
            for i in (None, ablate)
        ]
    assert [r.records for r in shared] == [r.records for r in plain]
    assert len(store.prefixes) == 3  # 12 problems in batches of 5
    question_passes = [
        k for k in calls if k.get("input_ids") is not None and k["input_ids"][0, -1] == random_codi.bot_id
    ]
    assert len(question_passes) == 3  # once a batch
    assert PrefixStore(budget=0).get(random_codi, encode_questions(random_codi, ["a b"]), [0]) is not None
