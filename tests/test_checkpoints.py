"""Hub-format checkpoints: built here in the exact published layout, loaded by the real loader."""

import copy
import os
import shutil
from dataclasses import replace

import pytest
import torch
from tokenizers import processors
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from harness.commands.cli import USAGE_ERROR, main
from harness.commands.fullsize import build_tokenizer, shape_of
from harness.data.problems import synthetic_split
from harness.data.tokenizer import build_word_tokenizer
from harness.runtime import models
from harness.runtime.cache import ResultCache
from harness.runtime.codi import CODIModel, ModelLoadError, check_tokenizer, load_base, make_prj, save_codi, wrap_lora
from harness.runtime.loop import encode_questions, generate, run_latents

BASES = {
    "gpt2": lambda v: GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "llama": lambda v: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=v,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    ),
}


class HubCODI(nn.Module):
    """The module whose state dict the published checkpoints are: `codi` (peft) and `prj`."""

    def __init__(self, base_dir):
        super().__init__()
        lm, _ = load_base(str(base_dir))
        self.codi = wrap_lora(lm)
        self.prj = make_prj(lm.config.hidden_size)


def _randomize_lora(module: nn.Module) -> None:
    """peft initialises lora_B to zero (a no-op); make the adapters matter."""
    g = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if "lora_" in name or name.startswith("prj."):
            p.data = torch.randn(p.shape, generator=g) * 0.05


@pytest.fixture(scope="module", params=sorted(BASES))
def hub_checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = build_tokenizer(shape_of(request.param, tiny=True))  # byte-level BPE, the published specials
    base = BASES[request.param](len(tokenizer))
    base.config.bos_token_id, base.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    ref = HubCODI(root / "base")
    _randomize_lora(ref)
    (root / "ckpt").mkdir()
    torch.save(ref.state_dict(), root / "ckpt" / "pytorch_model.bin")
    return root, ref.eval(), tokenizer


def test_checkpoint_uses_the_published_key_layout(hub_checkpoint):
    root, _, _ = hub_checkpoint
    keys = torch.load(root / "ckpt" / "pytorch_model.bin", weights_only=True).keys()
    assert all(k.startswith(("codi.base_model.model.", "prj.")) for k in keys)
    assert any(k.endswith(".base_layer.weight") for k in keys)
    assert any(".lora_A.default." in k for k in keys) and any(".lora_B.default." in k for k in keys)
    assert {"prj.1.weight", "prj.3.weight", "prj.ln.weight"} <= set(keys)


@torch.no_grad()
def test_merged_load_equals_the_unmerged_module(hub_checkpoint):
    root, ref, tokenizer = hub_checkpoint
    loaded = models.load(str(root / "ckpt"), base=str(root / "base"))
    assert not any("lora" in name for name, _ in loaded.named_parameters()), "LoRA is merged at load"
    assert loaded.base_vocab_size == len(tokenizer) and loaded.bot_id == len(tokenizer) + 1
    unmerged = CODIModel(ref.codi.base_model.model, tokenizer, len(tokenizer))
    unmerged.prj.load_state_dict(ref.prj.state_dict())
    problems = synthetic_split("test")[:8]
    states, gens = [], []
    for codi in (unmerged.eval(), loaded):
        batch = encode_questions(codi, [p.question for p in problems])
        states.append(run_latents(codi, batch))
        gens.append(generate(codi, states[-1], max_new_tokens=1))
    torch.testing.assert_close(states[1].thoughts, states[0].thoughts, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gens[1].first_logits, gens[0].first_logits, atol=1e-4, rtol=1e-4)
    # the equality is not trivial: without the adapters the same base gives other logits
    base_lm, _ = load_base(str(root / "base"))
    bare = CODIModel(base_lm, tokenizer, len(tokenizer)).eval()
    bare.prj.load_state_dict(ref.prj.state_dict())
    bare_gen = generate(bare, run_latents(bare, encode_questions(bare, [p.question for p in problems])), 1)
    assert (bare_gen.first_logits - gens[0].first_logits).abs().max() > 1e-2


def test_loader_names_the_first_mismatching_key(hub_checkpoint, tmp_path):
    root, ref, _ = hub_checkpoint
    state = ref.state_dict()
    key = next(k for k in sorted(state) if k.endswith("lora_A.default.weight"))
    state[key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=f"key '{key}' has shape"):
        models.load(str(tmp_path), base=str(root / "base"))
    state = ref.state_dict()
    del state[key]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=f"key '{key}' is missing"):
        models.load(str(tmp_path), base=str(root / "base"))


def test_loader_errors_are_one_line(hub_checkpoint, tmp_path):
    root, _, _ = hub_checkpoint
    cases = [
        (lambda: models.load(str(tmp_path / "nope")), "not found"),
        (lambda: models.load(str(tmp_path)), "not a CODI checkpoint"),
        (lambda: models.load(str(root / "ckpt")), "pass its base model with --base"),
    ]
    for call, message in cases:
        with pytest.raises(ModelLoadError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


@torch.no_grad()
def test_own_format_round_trip(random_codi, tmp_path):
    save_codi(random_codi, tmp_path / "m", card={"name": "x"})
    loaded = models.load(str(tmp_path / "m"))
    problems = synthetic_split("test")[:4]
    a = run_latents(random_codi, encode_questions(random_codi, [p.question for p in problems])).thoughts
    b = run_latents(loaded, encode_questions(loaded, [p.question for p in problems])).thoughts
    assert torch.equal(a, b)
    assert loaded.fingerprint() == random_codi.fingerprint()


def test_model_facts_come_from_the_cache_while_the_files_are_unchanged(random_codi, tmp_path):
    save_codi(random_codi, tmp_path / "m")
    cache = ResultCache(tmp_path / "cache")
    cold = models.resolve(str(tmp_path / "m"), cache=cache)
    assert not cold.loaded, "resolving checks the checkpoint without loading it"
    assert cold.facts == replace(models.ModelFacts.of(random_codi), name="m") and cold.loaded
    warm = models.resolve(str(tmp_path / "m"), cache=cache)
    assert warm.facts == cold.facts and not warm.loaded
    elsewhere = models.resolve(str(tmp_path / "m"), cache=ResultCache(tmp_path / "other"), keep=False)
    assert elsewhere.facts == cold.facts and not elsewhere.loaded, "read from a freed copy (xdist)"
    in_bf16 = models.resolve(str(tmp_path / "m"), dtype="bfloat16", cache=cache)
    assert in_bf16.facts.fingerprint != cold.facts.fingerprint
    changed = copy.deepcopy(random_codi)
    with torch.no_grad():
        next(changed.prj.parameters()).view(-1)[0] += 1e-3
    save_codi(changed, tmp_path / "m")
    again = models.resolve(str(tmp_path / "m"), cache=cache)
    assert again.facts.fingerprint == changed.fingerprint() != cold.facts.fingerprint and again.loaded


def test_hub_format_facts_follow_the_base_files_too(hub_checkpoint, tmp_path):
    root, _, _ = hub_checkpoint
    cache = ResultCache(tmp_path / "cache")
    first = models.resolve(str(root / "ckpt"), base=str(root / "base"), cache=cache)
    assert first.source.files()[0] == (root / "ckpt" / "pytorch_model.bin").resolve()
    assert (root / "base" / "config.json").resolve() in first.source.files()
    facts = first.facts
    assert not models.resolve(str(root / "ckpt"), base=str(root / "base"), cache=cache).loaded
    config = root / "base" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # a base file changed
    touched = models.resolve(str(root / "ckpt"), base=str(root / "base"), cache=cache)
    assert touched.facts == facts and touched.loaded, "recomputed by loading, to the same weights"


@torch.no_grad()
def test_old_gpt2_attention_buffers_are_ignored_and_nothing_else(hub_checkpoint, tmp_path):
    """Old GPT-2 saves carry the non-parameter buffers attn.bias / attn.masked_bias; exactly
    those are tolerated, any other unknown key still fails the load."""
    root, ref, _ = hub_checkpoint
    gpt2 = ref.codi.base_model.model.config.model_type == "gpt2"
    prefix = "codi.base_model.model." + ("transformer.h.0.attn." if gpt2 else "model.layers.0.self_attn.")
    state = ref.state_dict() | {
        prefix + "bias": torch.ones(1, 1, 256, 256).tril(),
        prefix + "masked_bias": torch.tensor(-1e4),
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    if not gpt2:
        with pytest.raises(ModelLoadError, match="self_attn.bias' does not exist"):
            models.load(str(tmp_path), base=str(root / "base"))
        return
    old = models.load(str(tmp_path), base=str(root / "base"))
    assert old.fingerprint() == models.load(str(root / "ckpt"), base=str(root / "base")).fingerprint()
    torch.save(ref.state_dict() | {prefix + "bias_extra": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="attn.bias_extra' does not exist"):
        models.load(str(tmp_path), base=str(root / "base"))


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """A tokenizer at the Llama-3.2-1B-Instruct ids (128,256 tokens, BOS 128000, eos 128009)."""
    return build_tokenizer(shape_of("llama"))


def _llama3_config():
    return shape_of("llama").config()


def test_the_published_llama_needs_the_instruct_eos(llama3_tokenizer):
    check_tokenizer(llama3_tokenizer, _llama3_config(), 128_256, "instruct")
    base_tokenizer = copy.deepcopy(llama3_tokenizer)
    base_tokenizer.eos_token = "<|end_of_text|>"  # what meta-llama/Llama-3.2-1B (not Instruct) ends with
    with pytest.raises(ModelLoadError, match=r"eos is 128001 .* trained to emit 128009 \('<\|eot_id\|>'\).*Instruct"):
        check_tokenizer(base_tokenizer, _llama3_config(), 128_256, "base")


def test_the_published_llama_needs_bos_first(llama3_tokenizer):
    no_bos = copy.deepcopy(llama3_tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    with pytest.raises(ModelLoadError, match=r"must start with BOS 128000 \('<\|begin_of_text\|>'\)"):
        check_tokenizer(no_bos, _llama3_config(), 128_256, "no-bos")


def test_a_tokenizer_must_round_trip_a_gsm8k_question_and_fit_the_vocabulary(hub_checkpoint):
    _, ref, tokenizer = hub_checkpoint
    config = ref.codi.base_model.model.config
    words = build_word_tokenizer()  # knows the synthetic words only: GSM8K text becomes <unk>
    config_for_words = copy.deepcopy(config)
    config_for_words.eos_token_id, config_for_words.bos_token_id = words.eos_token_id, None
    with pytest.raises(ModelLoadError, match="does not survive encode"):
        check_tokenizer(words, config_for_words, len(words), "words")
    with pytest.raises(ModelLoadError, match="more than the base model's vocabulary"):
        check_tokenizer(tokenizer, config, len(tokenizer) - 1, "short")


def test_a_tokenizer_mismatch_is_a_one_line_usage_error(hub_checkpoint, tmp_path, capsys):
    root, _, tokenizer = hub_checkpoint
    shutil.copytree(root / "base", tmp_path / "base")
    wrong = copy.deepcopy(tokenizer)
    wrong.eos_token = wrong.convert_ids_to_tokens(5)  # an ordinary token
    wrong.save_pretrained(tmp_path / "base")
    status = main(["evaluate", "--model", str(root / "ckpt"), "--base", str(tmp_path / "base"), "--n", "2"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]  # not transformers' bars
    assert status == USAGE_ERROR and "Traceback" not in captured.err
    assert len(errors) == 1 and errors[0].startswith("error: ") and "eos is 5" in errors[0], captured.err


def test_a_hub_checkpoint_runs_with_the_thoughts_it_is_given(hub_checkpoint, tmp_path):
    """The hub format does not record K: --n-latent sets it (and is part of the facts' key);
    a checkpoint of ours that records another K refuses it with one line."""
    root, _, _ = hub_checkpoint
    cache = ResultCache(tmp_path)
    four = models.resolve(str(root / "ckpt"), base=str(root / "base"), n_latent=4, cache=cache)
    assert four.facts.n_latent == 4 and four.codi.n_latent == 4
    batch = encode_questions(four.codi, [p.question for p in synthetic_split("test")[:2]])
    assert run_latents(four.codi, batch).thoughts.shape[1] == 4
    assert models.resolve(str(root / "ckpt"), base=str(root / "base"), cache=cache).facts.n_latent == 6
    with pytest.raises(ModelLoadError, match=r"tiny-gpt2 was trained with 6 thoughts .*--n-latent 4 contradicts it"):
        models.resolve("tiny-gpt2", n_latent=4)
    assert models.resolve("tiny-gpt2", n_latent=6).name == "tiny-gpt2"
    assert main(["evaluate", "--model", "tiny-gpt2", "--n-latent", "4", "--n", "2"]) == USAGE_ERROR
