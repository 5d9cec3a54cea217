"""The CODI module: a causal LM plus the projection `prj` that turns a final hidden state into
the next continuous thought, and the loaders for our own and the published checkpoints.

Special ids follow the reference implementation (zhenyi4/codi): pad = V, bot = V+1, eot = V+2,
with V the base vocabulary size and the embeddings resized to V+3.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from harness.data.problems import ANSWER_PREFIX, load_gsm8k
from harness.runtime.arch import ArchSpec, HeadGeometry, arch_of, backbone, head_geometry

DEFAULT_N_LATENT = 6
LORA_R, LORA_ALPHA = 128, 32
HUB_WEIGHTS = "pytorch_model.bin"
OWN_META = "codi.json"
OWN_WEIGHTS = "model.safetensors"
# non-parameter attention buffers (causal mask, masked-bias constant) in old GPT-2 saves
OLD_GPT2_BUFFERS = re.compile(r"base_model\.model\.transformer\.h\.\d+\.attn\.(bias|masked_bias)")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the path, id or key at fault."""


@dataclass(frozen=True)
class Pass:
    """One backbone pass over new tokens, handed to every hook that runs in it (`CODIModel.
    handing`): where its tokens sit in the sequence, its 2-D mask and position ids (where the
    backbone got None, the mask and positions it then uses)."""

    offset: int  # sequence index of the first new token
    n_new: int  # tokens in this pass
    mask: torch.Tensor  # [B, offset + T]
    positions: torch.Tensor  # [B, T]

    def local(self, indices: list[int]) -> list[tuple[int, int]]:
        """(index among this pass's tokens, index into `indices`) of the sequence `indices` in it."""
        return [(p - self.offset, k) for k, p in enumerate(indices) if self.offset <= p < self.offset + self.n_new]


class PassError(RuntimeError):
    """A pass hook ran outside `CODIModel.step`: it has no pass to act on."""


def make_prj(d_model: int, dropout: float = 0.0) -> nn.Sequential:
    """Dropout -> Linear -> GELU -> Linear -> LayerNorm, keys prj.1.*, prj.3.*, prj.ln.*."""
    prj = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))
    prj.add_module("ln", nn.LayerNorm(d_model))
    return prj


class CODIModel(nn.Module):
    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        base_vocab_size: int,
        n_latent: int = DEFAULT_N_LATENT,
        name: str = "",
        prj_dropout: float = 0.0,
        answer_prefix: str = ANSWER_PREFIX,
    ):
        super().__init__()
        assert lm.get_input_embeddings().num_embeddings == base_vocab_size + 3, (
            "the embeddings must hold the base vocabulary plus pad, bot and eot"
        )
        self.lm = lm
        self.prj = make_prj(lm.config.hidden_size, prj_dropout)
        self.tokenizer = tokenizer
        self.base_vocab_size = base_vocab_size
        self.n_latent = n_latent
        self.name = name
        self.eos_id = tokenizer.eos_token_id
        self.answer_prefix = answer_prefix  # what the model writes before the number (teacher forcing)
        self._pass: Pass | None = None  # the pass `step` is running, for `handing` (None between passes)
        # the official evaluator's batching (`runtime`): set at load, results then depend on the batch
        self.reference_batching = False
        self.thought_patch = None  # set by `runtime.ThoughtPatch` while it is active

    pad_id = property(lambda self: self.base_vocab_size)
    bot_id = property(lambda self: self.base_vocab_size + 1)
    eot_id = property(lambda self: self.base_vocab_size + 2)

    @property
    def arch(self) -> ArchSpec:
        return arch_of(self.lm.config)

    @property
    def geometry(self) -> HeadGeometry:
        return head_geometry(self.lm.config)

    @property
    def max_positions(self) -> int:
        config = self.lm.config
        return getattr(config, "n_positions", None) or config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> CODIModel:
        """Cast the weights to `dtype`; buffers (RoPE's inverse frequencies) stay float32, as
        HF's own low-precision loading keeps them (bfloat16 rotary angles are off by up to ~1
        radian at position 500)."""
        for param in self.parameters():
            param.data = param.data.to(dtype)
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)  # [B, T] -> [B, T, d]

    def step(
        self,
        attention_mask: torch.Tensor | None,  # [B, past + T]; None: every past token is visible
        position_ids: torch.Tensor | None,  # [B, T]; None: past + 0, 1, ... (padding counted)
        cache,
        input_ids: torch.Tensor | None = None,  # [B, T]
        inputs_embeds: torch.Tensor | None = None,  # [B, T, d]
        output_hidden_states: bool = False,
    ):
        """One pass of the backbone over new tokens; returns its output (final-normed states).
        Hooks wrapped by `handing` are handed this pass (`Pass`) while it runs, and only then. A
        hook may run a pass of its own through `step` (path patching re-runs a pass): that one
        is handed its own `Pass`, and the outer pass is handed back when it ends."""
        offset = cache.get_seq_length() if cache is not None else 0
        new = input_ids if input_ids is not None else inputs_embeds
        batch_size, n_new = new.shape[0], new.shape[1]
        if attention_mask is None:
            mask = torch.ones(batch_size, offset + n_new, dtype=torch.long, device=new.device)
        else:
            mask = attention_mask  # [B, past + T]
        if position_ids is None:
            positions = torch.arange(offset, offset + n_new, device=new.device).expand(batch_size, -1)
        else:
            positions = position_ids  # [B, T]
        outer, self._pass = self._pass, Pass(offset, n_new, mask, positions)
        try:
            return backbone(self.lm)(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                output_hidden_states=output_hidden_states,
            )
        finally:
            self._pass = outer

    def current_pass(self) -> Pass:
        """The pass `step` is running; a `PassError` between passes (a hook would act on none)."""
        if self._pass is None:
            raise PassError(f"{self.name or 'model'}: a pass hook ran outside CODIModel.step")
        return self._pass

    def handing(self, hook: Callable[..., object]) -> Callable[..., object]:
        """A module hook that calls `hook(pass, *args)`: the hook is handed the pass it acts on,
        never state left from an earlier one."""
        return lambda *args, **kwargs: hook(self.current_pass(), *args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden)  # [..., d] -> [..., V+3]

    def fingerprint(self) -> str:
        """Hash of every weight: the model part of a cache key."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


# --- our own checkpoint format ------------------------------------------------------------


def save_codi(codi: CODIModel, directory: str | Path, card: dict | None = None) -> Path:
    """A directory with model.safetensors (`lm.*`, `prj.*`), config, tokenizer and card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(codi, str(directory / OWN_WEIGHTS))
    codi.lm.config.save_pretrained(directory)
    codi.tokenizer.save_pretrained(directory)
    meta = {"base_vocab_size": codi.base_vocab_size, "n_latent": codi.n_latent, "model_type": codi.arch.model_type}
    (directory / OWN_META).write_text(json.dumps(meta, indent=2) + "\n")
    if card is not None:
        (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return directory


def load_own(directory: Path, name: str = "") -> CODIModel:
    meta = json.loads((directory / OWN_META).read_text())
    config = AutoConfig.from_pretrained(directory)
    lm = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    codi = CODIModel(lm, tokenizer, meta["base_vocab_size"], meta["n_latent"], name=name or directory.name)
    missing, unexpected = load_model(codi, str(directory / OWN_WEIGHTS), strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{directory}: checkpoint does not fit its config (first: {(missing or unexpected)[0]})")
    return codi.eval()


# --- the published hub format -------------------------------------------------------------


HUB_ANSWER_PREFIX = "The answer is:"  # how the published CODI models write their answers


@dataclass(frozen=True)
class HubLayout:
    """How the published checkpoints store the CODI module (`codi.` + peft keys, `prj.`)."""

    lm_prefix: str = "codi."
    prj_prefix: str = "prj."


def wrap_lora(lm: PreTrainedModel) -> nn.Module:
    """The peft wrapper the hub checkpoints were trained with (r=128, alpha=32)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(arch_of(lm.config).lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


def load_base(base: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A base LM and its tokenizer from an HF id or a local directory, resized to V+3."""
    try:
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load base model {base!r} ({str(e).splitlines()[0]}); with no network, pass a local "
            "directory with --base"
        ) from None
    lm.resize_token_embeddings(lm.config.vocab_size + 3, mean_resizing=False)  # the checkpoint holds the new rows
    return lm, tokenizer


def load_hub_format(weights: Path, base: str, n_latent: int = DEFAULT_N_LATENT, name: str = "") -> CODIModel:
    """Load a hub-format `pytorch_model.bin` onto `base` and merge the LoRA into the weights."""
    layout = HubLayout()
    lm, tokenizer = load_base(base)
    base_vocab = lm.config.vocab_size - 3
    check_tokenizer(tokenizer, lm.config, base_vocab, base)
    peft_lm = wrap_lora(lm)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    lm_state = {k[len(layout.lm_prefix) :]: v for k, v in state.items() if k.startswith(layout.lm_prefix)}
    prj_state = {k[len(layout.prj_prefix) :]: v for k, v in state.items() if k.startswith(layout.prj_prefix)}
    other = sorted(set(state) - {layout.lm_prefix + k for k in lm_state} - {layout.prj_prefix + k for k in prj_state})
    if other:
        raise ModelLoadError(f"{weights}: unexpected key {other[0]!r} (not under 'codi.' or 'prj.')")
    expected = peft_lm.state_dict()
    lm_state = {k: v for k, v in lm_state.items() if k in expected or not OLD_GPT2_BUFFERS.fullmatch(k)}
    _check_fits(weights, expected, lm_state, layout.lm_prefix)
    peft_lm.load_state_dict(lm_state, strict=False)
    merged = peft_lm.merge_and_unload()
    codi = CODIModel(
        merged, tokenizer, base_vocab, n_latent, name=name or weights.parent.name, answer_prefix=HUB_ANSWER_PREFIX
    )
    _check_fits(weights, codi.prj.state_dict(), prj_state, layout.prj_prefix)
    codi.prj.load_state_dict(prj_state)
    return codi.eval()


@dataclass(frozen=True)
class TokenizerExpectation:
    """What a checkpoint needs of its tokenizer."""

    bos_first: int | None  # the id every encoding starts with (None: no check)
    eos: tuple[int, ...]  # the eos id the model was trained to emit (any of these)


# the published checkpoints' bases, by (model type, base vocabulary): GPT-2 adds no BOS and ends
# with <|endoftext|>; CODI-LLaMA was trained on Llama-3.2-1B-Instruct, whose tokenizer starts
# with <|begin_of_text|> and whose eos is <|eot_id|> (the base Llama-3.2-1B's is <|end_of_text|>)
PUBLISHED_TOKENIZERS = {
    ("gpt2", 50257): TokenizerExpectation(None, (50256,)),
    ("llama", 128256): TokenizerExpectation(128000, (128009,)),
}


def expected_tokenizer(config, base_vocab: int) -> TokenizerExpectation:
    """The published base's expectation, else the base config's own: its BOS first for a LLaMA,
    an eos among its `eos_token_id`s."""
    known = PUBLISHED_TOKENIZERS.get((config.model_type, base_vocab))
    if known is not None:
        return known
    eos = config.eos_token_id
    eos = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
    eos = tuple(i for i in eos if 0 <= i < base_vocab)  # ids outside the vocabulary say nothing
    return TokenizerExpectation(config.bos_token_id if config.model_type == "llama" else None, eos)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config, base_vocab: int, base: str) -> None:
    """A hub-format checkpoint's tokenizer must fit it: ids below the base vocabulary (CODI's
    pad/bot/eot follow it), the eos the model was trained to emit, BOS first where the model
    expects one, and a GSM8K question that survives encode + decode. One ModelLoadError if not."""
    where = f"tokenizer of base {base!r}"
    if len(tokenizer) > base_vocab:
        raise ModelLoadError(
            f"{where}: {len(tokenizer)} tokens, more than the base model's vocabulary of {base_vocab} "
            "(ids from there on are CODI's pad, bot and eot)"
        )
    expected = expected_tokenizer(config, base_vocab)
    eos = tokenizer.eos_token_id
    if expected.eos and eos not in expected.eos:
        want = " or ".join(f"{i} ({tokenizer.convert_ids_to_tokens(i)!r})" for i in expected.eos)
        hint = "; use the Instruct one (meta-llama/Llama-3.2-1B-Instruct)" if config.model_type == "llama" else ""
        raise ModelLoadError(
            f"{where}: eos is {eos} ({tokenizer.eos_token!r}) but the checkpoint was trained to emit {want}{hint}"
        )
    question = load_gsm8k()[0].question
    ids = tokenizer(question)["input_ids"]
    if expected.bos_first is not None and ids[:1] != [expected.bos_first]:
        raise ModelLoadError(
            f"{where}: encodings must start with BOS {expected.bos_first} "
            f"({tokenizer.convert_ids_to_tokens(expected.bos_first)!r}); got {ids[:1]}"
        )
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if text != question:
        raise ModelLoadError(f"{where}: a GSM8K question does not survive encode + decode ({text[:40]!r}...)")


def _check_fits(source: Path, expected: dict, found: dict, prefix: str) -> None:
    """Name the first key that is missing, unexpected or of the wrong shape."""
    tied = {"base_model.model.lm_head.weight", "lm_head.weight"}
    for key in sorted(found):
        if key not in expected:
            raise ModelLoadError(f"{source}: key {prefix + key!r} does not exist in the base model")
        if tuple(found[key].shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"{source}: key {prefix + key!r} has shape {tuple(found[key].shape)}, "
                f"the base model expects {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(found) - tied)
    if missing:
        raise ModelLoadError(f"{source}: key {prefix + missing[0]!r} is missing from the checkpoint")


def fetch_hub_weights(repo_id: str) -> Path:
    """The hub checkpoint's `pytorch_model.bin` (from the local hub cache when there is one)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, HUB_WEIGHTS))
    except LocalEntryNotFoundError:  # not cached, and the hub cannot be reached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network; HF_HUB_OFFLINE=1 skips the retries"
        raise ModelLoadError(
            f"{repo_id!r} is not in the local hub cache and the hub cannot be reached ({why}); download "
            f"it where there is a network and pass its local directory with --model PATH"
        ) from None
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one usage line
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the hub ({type(e).__name__}); with no network, download "
            f"it elsewhere and pass the local directory with --model PATH"
        ) from None
