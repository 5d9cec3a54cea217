"""Where each component lives, per architecture: one table instead of scattered `if gpt2`.

Everything that touches a model's internals (the runtime, interventions, discovery, LoRA
targets) asks this table, in the spirit of pyvene's per-architecture component maps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # HF `config.model_type`
    backbone: str  # attribute of the CausalLM holding the transformer stack
    embed: str  # token embedding, relative to the backbone
    layers: str  # ModuleList of blocks, relative to the backbone
    final_norm: str  # final norm, relative to the backbone
    attn: str  # attention module, relative to a block
    attn_out: str  # attention output projection, relative to the attention module
    lora_targets: tuple[str, ...]  # module names the CODI hub checkpoints put LoRA on


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        model_type="gpt2",
        backbone="transformer",
        embed="wte",
        layers="h",
        final_norm="ln_f",
        attn="attn",
        attn_out="c_proj",
        lora_targets=("c_attn", "c_proj", "c_fc"),
    ),
    "llama": ArchSpec(
        model_type="llama",
        backbone="model",
        embed="embed_tokens",
        layers="layers",
        final_norm="norm",
        attn="self_attn",
        attn_out="o_proj",
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"),
    ),
}


def arch_of(config: PretrainedConfig) -> ArchSpec:
    if config.model_type not in ARCHS:
        raise ValueError(f"unsupported architecture {config.model_type!r}; supported: {sorted(ARCHS)}")
    return ARCHS[config.model_type]


def backbone(lm: PreTrainedModel) -> nn.Module:
    return getattr(lm, arch_of(lm.config).backbone)


def blocks(lm: PreTrainedModel) -> nn.ModuleList:
    return getattr(backbone(lm), arch_of(lm.config).layers)


def attention(lm: PreTrainedModel, layer: int) -> nn.Module:
    return getattr(blocks(lm)[layer], arch_of(lm.config).attn)


def attn_out_proj(lm: PreTrainedModel, layer: int) -> nn.Module:
    """The attention output projection; its *input* is the concatenation of head outputs."""
    return getattr(attention(lm, layer), arch_of(lm.config).attn_out)


@dataclass(frozen=True)
class HeadGeometry:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int


def head_geometry(config: PretrainedConfig) -> HeadGeometry:
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return HeadGeometry(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or d_model // n_heads,
        d_model=d_model,
    )


class SiteError(ValueError):
    """A malformed or out-of-range head; the message names it."""


_HEAD = re.compile(r"L(\d+)H(\d+)")


@dataclass(frozen=True, order=True)
class Head:
    """One attention head, named `L<layer>H<head>` (query heads: for GQA models the KV head it
    reads is `head // (n_heads // n_kv_heads)`)."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, name: str) -> Head:
        """'L4H5' -> Head(4, 5); anything else is a `SiteError`."""
        match = _HEAD.fullmatch(name.strip())
        if not match:
            raise SiteError(f"malformed head {name!r}; write heads as L<layer>H<head>, e.g. L4H5")
        return cls(int(match.group(1)), int(match.group(2)))


def check_heads(heads: list[Head], geo: HeadGeometry, model: str = "the model") -> None:
    """Every head inside the model's geometry, none twice."""
    for i, head in enumerate(heads):
        if head.layer >= geo.n_layers or head.head >= geo.n_heads:
            raise SiteError(f"head {head} out of range for {model}: {geo.n_layers} layers x {geo.n_heads} heads")
        if head in heads[:i]:
            raise SiteError(f"head {head} given twice")


def parse_heads(spec: str, geo: HeadGeometry, model: str = "the model") -> list[Head]:
    """'L4H5,L5H30' -> heads, checked against the model's geometry (range, duplicates)."""
    heads = [Head.parse(item) for item in spec.split(",") if item.strip()]
    if not heads:
        raise SiteError(f"no heads in {spec!r}")
    check_heads(heads, geo, model)
    return heads
