"""The official evaluator's decoding (zhenyi4/codi test.py): greedy never picks eot, and
`reference_batching` reproduces its batching token for token on a checkpoint in the published
format (against a line-by-line transcription of its loop)."""

import copy
import json
import math

import pytest
import torch
from test_checkpoints import hub_checkpoint  # noqa: F401 - the published-format checkpoint fixture
from test_scale import _script

from harness.commands.cli import USAGE_ERROR, main
from harness.data.problems import synthetic_split
from harness.measures.evaluation import REFERENCE_BATCH_SIZE, evaluate, teacher_forced
from harness.runtime import models
from harness.runtime.loop import decode_ids, encode_questions, generate, run_latents

MAX_NEW_TOKENS = 6


@torch.no_grad()
def official_loop(codi, questions: list[str], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """test.py's `evaluation()` with the published settings (remove_eos, greedy, use_prj,
    inf_latent_iterations = K), transcribed statement by statement; `codi.lm` stands for
    `model.codi`, `codi.prj` for `model.prj`. transformers 5 calls `past_key_values` `cache`."""
    tokenizer = copy.deepcopy(codi.tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        tokenizer.pad_token_id = codi.pad_id
    embed = codi.lm.get_input_embeddings()
    eval_step = math.ceil(len(questions) / batch_size)
    question_data = []
    for i in range(eval_step):
        chunk = questions[i * batch_size : (i + 1) * batch_size] if i < eval_step - 1 else questions[i * batch_size :]
        batch = tokenizer(chunk, return_tensors="pt", padding="longest")
        bot_tensor = torch.tensor([codi.bot_id], dtype=torch.long).expand(batch["input_ids"].size(0), 1)
        batch["input_ids"] = torch.cat((batch["input_ids"], bot_tensor), dim=1)
        batch["attention_mask"] = torch.cat((batch["attention_mask"], torch.ones_like(bot_tensor)), dim=1)
        question_data.append(batch)
    pred_list = []
    for batch in question_data:
        batch_size_now = batch["input_ids"].size(0)
        outputs = codi.lm(
            input_ids=batch["input_ids"],
            use_cache=True,
            output_hidden_states=True,
            cache=None,
            attention_mask=batch["attention_mask"],
        )
        past_key_values = outputs.cache
        latent_embd = outputs.hidden_states[-1][:, -1, :].unsqueeze(1)
        latent_embd = codi.prj(latent_embd)
        for _ in range(codi.n_latent):
            outputs = codi.lm(
                inputs_embeds=latent_embd, use_cache=True, output_hidden_states=True, cache=past_key_values
            )
            past_key_values = outputs.cache
            latent_embd = outputs.hidden_states[-1][:, -1, :].unsqueeze(1)
            latent_embd = codi.prj(latent_embd)
        eot_emb = embed(torch.tensor([codi.eot_id], dtype=torch.long)).unsqueeze(0)
        eot_emb = eot_emb.expand(batch["input_ids"].size(0), -1, -1)
        output = eot_emb
        finished = torch.zeros(batch_size_now, dtype=torch.bool)
        pred_tokens = [[] for _ in range(batch_size_now)]
        for _ in range(max_new_tokens):
            out = codi.lm(
                inputs_embeds=output,
                output_hidden_states=False,
                attention_mask=None,
                use_cache=True,
                cache=past_key_values,
            )
            past_key_values = out.cache
            logits = out.logits[:, -1, : codi.lm.config.vocab_size - 1]
            next_token_ids = torch.argmax(logits, dim=-1).squeeze(-1)
            for b in range(batch_size_now):
                if not finished[b]:
                    pred_tokens[b].append(next_token_ids[b].item())
                    if next_token_ids[b] == tokenizer.eos_token_id:
                        finished[b] = True
            if finished.all():
                break
            output = embed(next_token_ids).unsqueeze(1)
        pred_list += pred_tokens
    return pred_list


def _ours(codi, questions: list[str]) -> list[list[int]]:
    """Our runtime's tokens (up to eos) in the reference's batches: data set order, 128 a batch."""
    tokens = []
    for start in range(0, len(questions), REFERENCE_BATCH_SIZE):
        batch = encode_questions(codi, questions[start : start + REFERENCE_BATCH_SIZE])
        gen = generate(codi, run_latents(codi, batch), MAX_NEW_TOKENS)
        tokens += [gen.tokens[row, : gen.lengths[row]].tolist() for row in range(len(gen.tokens))]
    return tokens


@torch.no_grad()
def test_reference_batching_reproduces_the_official_loop_token_for_token(hub_checkpoint):  # noqa: F811
    root, _, _ = hub_checkpoint
    reference = models.load(str(root / "ckpt"), base=str(root / "base"), reference_batching=True)
    problems = synthetic_split("test")[: REFERENCE_BATCH_SIZE + 2]  # two batches, the second of 2
    questions = [p.question for p in problems]
    official = official_loop(reference, questions, REFERENCE_BATCH_SIZE, MAX_NEW_TOKENS)
    assert _ours(reference, questions) == official
    result = evaluate(reference, problems, batch_size=7, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert [r.text for r in result.records] == [decode_ids(reference, t) for t in official]
    forced = teacher_forced(reference, problems, batch_size=7)  # the same official batches, not sorted ones
    assert forced.tolist() == [r.answer_logprob for r in result.records]
    # not trivially so: the batch-invariant default reads other tokens for padded rows
    invariant = models.load(str(root / "ckpt"), base=str(root / "base"))
    assert sum(a != b for a, b in zip(_ours(invariant, questions), official)) > 0


@torch.no_grad()
def test_reference_batching_is_a_setting_of_the_loaded_model(hub_checkpoint):  # noqa: F811
    root, _, _ = hub_checkpoint
    lazy = models.resolve(str(root / "ckpt"), base=str(root / "base"), reference_batching=True)
    assert lazy.codi.reference_batching and models.LazyModel.of(lazy.codi).reference_batching
    assert not models.load(str(root / "ckpt"), base=str(root / "base")).reference_batching


@pytest.mark.parametrize("reference", [False, True])
@torch.no_grad()
def test_greedy_decoding_never_picks_eot(random_codi, reference):
    """Even where eot has by far the largest logit (as the reference, argmax over 0 .. V+1)."""
    codi, eot = random_codi, random_codi.eot_id

    def favour_eot(module, args, logits):
        logits = logits.clone()
        logits[..., eot] += 1e4
        return logits

    handle = codi.lm.get_output_embeddings().register_forward_hook(favour_eot)
    codi.reference_batching = reference
    try:
        batch = encode_questions(codi, [p.question for p in synthetic_split("test")[:5]])
        gen = generate(codi, run_latents(codi, batch), max_new_tokens=4)
    finally:
        handle.remove()
        codi.reference_batching = False
    assert int(gen.first_logits.argmax(-1)[0]) == eot, "eot is the argmax of the full logits"
    assert not (gen.tokens == eot).any()
    assert (gen.token_probs < 1e-3).all(), "each token's probability is its share of all V+3 logits"


def test_the_cli_and_the_reproduction_script_offer_reference_batching(hub_checkpoint, capsys):  # noqa: F811
    root, _, _ = hub_checkpoint
    ckpt, base = str(root / "ckpt"), str(root / "base")
    args = ["evaluate", "--model", ckpt, "--base", base, "--data", "synthetic", "--n", "5", "--max-new-tokens", "4"]
    assert main([*args, "--reference-batching", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reference_batching"] and summary["batch_size"] == REFERENCE_BATCH_SIZE
    reference = models.load(ckpt, base=base, reference_batching=True)
    direct = evaluate(reference, synthetic_split("test")[:5], max_new_tokens=4, progress=False)
    assert summary["accuracy"] == direct.accuracy
    assert main([*args, "--reference-batching", "--batch-size", "3"]) == USAGE_ERROR
    assert "drop --batch-size" in capsys.readouterr().err
    script = _script("reproduce_published")
    row = script.reproduce(ckpt, base, 0.5, "synthetic", 5, "cpu", "float32", None, 4, reference_batching=True)
    assert row["reference_batching"] and row["batch_size"] == REFERENCE_BATCH_SIZE
    assert row["accuracy"] == round(direct.accuracy, 4)
    assert "--reference-batching" in script.phase1_command(ckpt, base, "gsm8k", "cpu", "float32", root, True)
