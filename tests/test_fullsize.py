"""The full-size smoke path (scripts/fullsize_smoke.py): the published shapes checked on meta
tensors, the tokenizers at the published ids, and the whole run at toy sizes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.commands.fullsize import build_tokenizer, shape_of
from harness.runtime.codi import check_tokenizer, wrap_lora

ROOT = Path(__file__).resolve().parent.parent
# parameters of gpt2 and of Llama-3.2-1B (tied embeddings), before CODI's 3 extra rows
PUBLISHED_PARAMS = {"gpt2": 124_439_808, "llama": 1_235_814_400}
# LoRA r=128 on the published targets: per layer, 128 * (in + out) per target module
LORA_PARAMS = {
    "gpt2": 12 * 128 * ((768 + 3 * 768) + (768 + 768) + (768 + 3072) + (3072 + 768)),
    "llama": 16 * 128 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 3 * (2048 + 8192)),
}


def _script():
    spec = importlib.util.spec_from_file_location("fullsize_smoke", ROOT / "scripts" / "fullsize_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_full_shapes_are_the_published_ones(arch):
    shape = shape_of(arch)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(shape.config())
        assert sum(p.numel() for p in lm.parameters()) == PUBLISHED_PARAMS[arch]
        lm.resize_token_embeddings(lm.config.vocab_size + 3, mean_resizing=False)
        codi = wrap_lora(lm)
    lora = {k: v for k, v in codi.named_parameters() if "lora_" in k}
    assert sum(v.numel() for v in lora.values()) == LORA_PARAMS[arch]
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in lora)
    if arch == "llama":
        config = lm.config
        assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (16, 2048, 8192)
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
        assert config.vocab_size == 128_256 + 3 and config.tie_word_embeddings
        assert lora["base_model.model.model.layers.0.self_attn.k_proj.lora_B.default.weight"].shape == (512, 128)


@pytest.mark.parametrize(("arch", "bos", "eos"), [("gpt2", None, 50256), ("llama", 128000, 128009)])
def test_the_full_size_tokenizers_sit_at_the_published_ids(arch, bos, eos):
    shape = shape_of(arch)
    tokenizer = build_tokenizer(shape)
    config = shape.config()
    assert len(tokenizer) == config.vocab_size and tokenizer.eos_token_id == eos
    ids = tokenizer("Janet has 16 eggs.")["input_ids"]
    assert (ids[0] == bos) if bos is not None else bos not in ids
    check_tokenizer(tokenizer, config, config.vocab_size, "built")  # what the real ones pass


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_smoke_run_at_toy_sizes(arch, tmp_path, monkeypatch, capsys):
    script = _script()
    out = tmp_path / "out.json"
    argv = ["fullsize_smoke.py", "--arch", arch, "--tiny", "--n", "4", "--max-new-tokens", "6", "--batch-size", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--workdir", str(tmp_path / "w"), "--json-out", str(out), "--json"])
    assert script.main() == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    keys = torch.load(result["checkpoint"], weights_only=True).keys()
    assert any(".base_layer." in k for k in keys) and any(".lora_A.default." in k for k in keys)
    assert {"prj.1.weight", "prj.3.weight", "prj.ln.weight"} <= set(keys)
    assert result["noop_equals_baseline"] and result["hooks_left"] == [] and result["batch_size"] == 3
    assert result["params"] > 0 and result["load_seconds"] > 0 and result["peak_rss_mb"] > 0
    assert (
        result["n_heads"] > 0 and result["seconds_head_condition"] > 0 and result["seconds_head_condition_stacked"] > 0
    )
    conditions = result["conditions"]
    assert list(conditions) == ["baseline", "noop", "ablate_seed_heads", f"noise_{result['hub']}", "hub_pattern"]
    assert conditions["noop"]["changed_vs_baseline"] == 0
    for name in list(conditions)[2:]:  # every intervention reaches the outputs
        assert conditions[name]["changed_vs_baseline"] > 0, name
        assert conditions[name]["seconds"] > 0
    # a second run reuses the built checkpoint
    assert script.ensure_checkpoint(arch, tmp_path / "w", "float32", True)[1] is None
