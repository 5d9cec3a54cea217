"""Random-weight CODI checkpoints with the exact shapes of the published ones, and the smoke run
that proves the full-size path: load through the hub format, evaluate, intervene.

`build_checkpoint` writes what the hub provides, with no network: a local base directory
(config, weights, tokenizer) and the one-file `pytorch_model.bin` of the whole CODI module
(`codi.base_model.model.*` with `base_layer` / `lora_A.default` / `lora_B.default`, and
`prj.*`). The tokenizer is a byte-level BPE built here, trained on the shipped GSM8K questions
and filled up to the base model's vocabulary with tokens no text produces; its special tokens
sit at the published ids (GPT-2: `<|endoftext|>` 50256; Llama-3.2-Instruct: `<|begin_of_text|>`
128000 first in every encoding, `<|eot_id|>` 128009 as eos), so it passes the load-time
tokenizer checks of `harness.runtime.codi` as the real ones do. `tiny=True` gives the same layout at
toy sizes (the heads the seed analysis names still exist), for the tests.

`smoke` loads such a checkpoint with `harness.runtime.models.load` and times a baseline, a no-op
intervention, the zero-ablation of the seed's heads, norm-matched noise at the hub thought and
the hub attention pattern on the seed's heads.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from harness.data.problems import Problem, load_gsm8k, load_problems
from harness.interventions.attention import AttentionOverride
from harness.interventions.hooks import HeadAblation, leftover_hooks
from harness.measures.evaluation import EvalResult, Intervene, evaluate
from harness.runtime.arch import parse_heads
from harness.runtime.codi import HUB_WEIGHTS, CODIModel, make_prj, wrap_lora
from harness.runtime.loop import ThoughtPatch, encode_questions, norm_matched_noise, run_latents
from harness.runtime.models import DTYPES, default_batch_size, load
from harness.runtime.positions import PositionMap

LLAMA3_SPECIALS = (  # ids 128000.. of the Llama-3 tokenizers; the rest are reserved tokens
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
TRAINED_MERGES = 4000  # BPE vocabulary learnt from the GSM8K questions; the rest is filler
WEIGHT_STD = 0.02  # std of every random weight (HF's initializer range); LoRA B and prj too
TINY_STD = 0.3  # toy sizes: large enough that every smoke intervention changes some answer
LLAMA_HEADS = "L4H5,L5H30,L5H28"  # the seed analysis's critical heads
GPT2_HEADS = "L0H3,L1H7,L2H11"  # L0H3 (the seed's) and two heads of the next layers


@dataclass(frozen=True)
class Shape:
    """One architecture's checkpoint shape, tokenizer layout and the seed's heads and hub."""

    arch: str
    config: Callable[[], PretrainedConfig]
    n_regular: int  # ordinary tokenizer tokens; the specials follow
    specials: tuple[str, ...]
    bos: str | None  # prepended to every encoding
    eos: str
    seed_heads: str
    hub: str
    std: float  # of every random weight


def _llama_specials(n: int) -> tuple[str, ...]:
    reserved = (f"<|reserved_special_token_{i}|>" for i in range(3, n))
    return (*LLAMA3_SPECIALS, *reserved)[:n]


def _gpt2_config(tiny: bool) -> GPT2Config:
    if tiny:
        return GPT2Config(
            vocab_size=401, n_embd=48, n_layer=3, n_head=12, n_positions=512, bos_token_id=400, eos_token_id=400
        )
    return GPT2Config()  # gpt2: 124M, vocab 50257, 12 x 12 heads, d 768, 1024 positions; bos = eos = 50256


def _llama_config(tiny: bool) -> LlamaConfig:
    """meta-llama/Llama-3.2-1B-Instruct's config (tiny: 6 layers of d 64, still 32 / 8 heads)."""
    vocab, regular = (416, 400) if tiny else (128_256, 128_000)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64 if tiny else 2048,
        intermediate_size=128 if tiny else 8192,
        num_hidden_layers=6 if tiny else 16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=2 if tiny else 64,
        max_position_embeddings=512 if tiny else 131_072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256 if tiny else 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=regular,
        eos_token_id=[regular + 1, regular + 8, regular + 9],
    )


def shape_of(arch: str, tiny: bool = False) -> Shape:
    """CODI-GPT2 or CODI-LLaMA-3.2-1B (or their toy versions)."""
    if arch == "gpt2":
        regular, specials = (400 if tiny else 50_256), ("<|endoftext|>",)
        std = TINY_STD if tiny else WEIGHT_STD
        return Shape("gpt2", lambda: _gpt2_config(tiny), regular, specials, None, specials[0], GPT2_HEADS, "CT1", std)
    if arch == "llama":
        regular, specials = (400, _llama_specials(16)) if tiny else (128_000, _llama_specials(256))
        bos, eos = "<|begin_of_text|>", "<|eot_id|>"
        std = TINY_STD if tiny else WEIGHT_STD
        return Shape("llama", lambda: _llama_config(tiny), regular, specials, bos, eos, LLAMA_HEADS, "CT0", std)
    raise ValueError(f"unknown architecture {arch!r}; choose gpt2 or llama")


def build_tokenizer(shape: Shape) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `shape.n_regular` ordinary tokens, then its specials."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(TRAINED_MERGES, shape.n_regular),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([p.question for p in load_gsm8k()], trainer)
    data = json.loads(core.to_str())
    vocab = data["model"]["vocab"]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), shape.n_regular)})  # no merge makes them
    core = Tokenizer.from_str(json.dumps(data))
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in shape.specials])
    if shape.bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{shape.bos} $A", special_tokens=[(shape.bos, core.token_to_id(shape.bos))]
        )
    bos = shape.bos or shape.eos
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=shape.eos)


@dataclass(frozen=True)
class HubFiles:
    checkpoint: Path  # pytorch_model.bin
    base: Path  # config, weights and tokenizer of the base model


def build_checkpoint(arch: str, root: Path, dtype: str = "float32", tiny: bool = False, seed: int = 0) -> HubFiles:
    """Write a random-weight base directory and hub-format checkpoint under `root`, every
    weight drawn from N(0, shape.std^2) in `dtype` (norm gains 1; LoRA B random too, so the
    adapters change the merged weights)."""
    shape = shape_of(arch, tiny)
    files = HubFiles(root / "ckpt" / HUB_WEIGHTS, root / "base")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(shape)
    config = shape.config()
    config.initializer_range = std = shape.std
    assert len(tokenizer) == config.vocab_size, "the tokenizer fills the base vocabulary"
    lm = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])  # HF init: N(0, std^2), norms 1
    lm.save_pretrained(files.base)
    tokenizer.save_pretrained(files.base)
    lm.resize_token_embeddings(config.vocab_size + 3, mean_resizing=False)  # pad, bot, eot
    codi = wrap_lora(lm)
    prj = make_prj(config.hidden_size).to(DTYPES[dtype])
    with torch.no_grad():
        for name, param in codi.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapters would change nothing
                param.normal_(0.0, std)
        for linear in (prj[1], prj[3]):
            linear.weight.normal_(0.0, std)
    state = {f"codi.{k}": v.to(DTYPES[dtype]) for k, v in codi.state_dict().items()}
    state |= {f"prj.{k}": v for k, v in prj.state_dict().items()}
    files.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, files.checkpoint)
    return files


@dataclass(frozen=True)
class Condition:
    """One smoke condition: a name and what to run each batch under (None: nothing)."""

    name: str
    intervene: Intervene | None


def _noop(codi: CODIModel) -> Intervene:
    """An identity thought patch and an ablation of no head: must change nothing."""

    def intervene(pmap: PositionMap, indices: list[int]) -> AbstractContextManager:
        stack = ExitStack()
        stack.enter_context(ThoughtPatch(codi, lambda i, thought: thought))
        stack.enter_context(HeadAblation(codi, [], pmap.latent))
        return stack

    return intervene


def hub_noise(codi: CODIModel, problems: list[Problem], hub: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Norm-matched noise for CT_hub of every problem: [N, d] (from their unpatched thoughts)."""
    thoughts = []
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            batch = encode_questions(codi, [p.question for p in problems[start : start + batch_size]])
            thoughts.append(run_latents(codi, batch, n_thoughts=hub + 1).thoughts[:, hub])  # [B, d]
    return norm_matched_noise(torch.cat(thoughts), torch.Generator().manual_seed(seed))


def conditions(codi: CODIModel, shape: Shape, noise: Callable[[], torch.Tensor]) -> list[Condition]:
    """Baseline, no-op, zero-ablation of the seed's heads, noise at the hub thought, hub pattern.
    `noise()` gives the hub thought's replacement per problem [N, d] (computed when first run)."""
    heads = parse_heads(shape.seed_heads, codi.geometry, codi.name)
    hub = int(shape.hub.removeprefix("CT"))

    def patch(pmap: PositionMap, indices: list[int]) -> AbstractContextManager:
        values = noise()[indices]  # [B, d]
        return ThoughtPatch(codi, lambda i, thought: values.to(thought) if i == hub else thought)

    return [
        Condition("baseline", None),
        Condition("noop", _noop(codi)),
        Condition("ablate_seed_heads", lambda pmap, idx: HeadAblation(codi, heads, pmap.latent)),
        Condition(f"noise_{shape.hub}", patch),
        Condition("hub_pattern", lambda pmap, idx: AttentionOverride(codi, heads, "hub", pmap, hub=shape.hub)),
    ]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smoke(
    files: HubFiles,
    arch: str,
    device: str = "cpu",
    dtype: str = "float32",
    n: int = 8,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
    tiny: bool = False,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Load `files` through the hub path and run every condition on the first `n` GSM8K test
    problems; returns the measurements (`on_update` gets them after each stage as well)."""
    shape = shape_of(arch, tiny)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    codi = load(str(files.checkpoint), str(files.base), dtype=dtype, device=device)
    out: dict = {
        "arch": arch,
        "tiny": tiny,
        "device": str(codi.device),
        "dtype": dtype,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "params": sum(p.numel() for p in codi.parameters()),
        "load_seconds": round(time.perf_counter() - start, 2),
        "seed_heads": shape.seed_heads,
        "hub": shape.hub,
    }
    problems = load_problems("gsm8k", n)
    out["batch_size"] = batch_size = batch_size or default_batch_size(codi)
    hub = int(shape.hub.removeprefix("CT"))
    noise: list[torch.Tensor] = []

    def hub_values() -> torch.Tensor:
        if not noise:
            noise.append(hub_noise(codi, problems, hub, batch_size))
        return noise[0]

    results: dict[str, EvalResult] = {}
    out["conditions"] = {}
    for condition in conditions(codi, shape, hub_values):
        started = time.perf_counter()
        result = evaluate(
            codi, problems, batch_size, max_new_tokens=max_new_tokens, progress=False, intervene=condition.intervene
        )
        seconds = time.perf_counter() - started  # the hub noise's thoughts pass included
        results[condition.name] = result
        changed = sum(a.text != b.text for a, b in zip(result.records, results["baseline"].records))
        out["conditions"][condition.name] = {
            "seconds": round(seconds, 2),
            "problems_per_second": round(n / seconds, 3),
            "accuracy": result.accuracy,
            "changed_vs_baseline": changed,
        }
        if condition.name == "baseline":
            out["problems_per_second"] = round(n / seconds, 3)
        if condition.name == "noop":
            out["noop_equals_baseline"] = all(
                (a.text, a.pred, a.confidence) == (b.text, b.pred, b.confidence)
                for a, b in zip(result.records, results["baseline"].records)
            )
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if device.startswith("cuda"):
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if on_update is not None:
            on_update(out)
    out.update(head_condition_seconds(codi, problems, batch_size))
    if on_update is not None:
        on_update(out)
    out["hooks_left"] = leftover_hooks(codi)
    return out


HEADS_TIMED = 4  # single-head conditions timed one at a time, and stacked together


def head_condition_seconds(codi: CODIModel, problems: list[Problem], batch_size: int) -> dict:
    """Seconds of one teacher-forced single-head zero-ablation condition (a sweep's unit) over
    the problems, run alone and stacked with `HEADS_TIMED - 1` others (per condition), and how
    many heads a full sweep has: what a sweep at this size costs."""
    from harness.interventions.specs import installer
    from harness.measures.causal import components, stacked_logprobs
    from harness.measures.evaluation import teacher_forced
    from harness.measures.runner import ModelRun
    from harness.runtime.cache import ResultCache

    run = ModelRun(codi, problems, [], ResultCache(None), batch_size)
    parts = components(run, "head")[:HEADS_TIMED]
    start = time.perf_counter()
    for part in parts:
        teacher_forced(codi, problems, batch_size, installer(part.spec("zero"), run))
    alone = (time.perf_counter() - start) / len(parts)
    start = time.perf_counter()
    stacked_logprobs(run, parts, "zero")
    stacked = (time.perf_counter() - start) / len(parts)
    return {"n_heads": len(run.every_head), "seconds_head_condition": round(alone, 3),
            "seconds_head_condition_stacked": round(stacked, 3)}  # fmt: skip
