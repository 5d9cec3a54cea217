"""Training the shipped tiny CODI models with the CODI objective.

Loss (Shen et al., CODI; reference zhenyi4/codi): teacher cross-entropy on the explicit CoT and
answer + student cross-entropy on the answer after K continuous thoughts + distillation of the
hidden states (every layer) at the token before the answer (the ':' of 'answer is :'), teacher
side detached, smooth-L1 normalised by the teacher's std. The schedule that makes it learn on a
CPU: a teacher-only warm-up on explicit CoT, then the joint CODI objective.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from harness.data.problems import (
    ANSWER_PREFIX,
    Problem,
    is_correct,
    parse_answer,
    synthetic_split,
    synthetic_training_stream,
)
from harness.data.tokenizer import build_word_tokenizer
from harness.runtime.codi import CODIModel, load_own, save_codi
from harness.runtime.loop import decode_ids, encode_questions, position_ids, run_latents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    arch: str  # "gpt2" or "llama"
    out: str
    seed: int = 0
    data_seed: int = 0
    teacher_steps: int = 1500  # explicit-CoT warm-up
    codi_steps: int = 3000  # joint CODI objective
    batch_size: int = 64
    lr: float = 2e-3
    distill_weight: float = 20.0
    n_latent: int = 6
    eval_every: int = 250
    threads: int = 1
    init_from: str | None = None  # continue from a checkpoint of ours (its card is kept)


TINY_ARCHS = {
    # GPT-2 style: absolute positions, LayerNorm, fused c_attn, 8 heads of 16
    "gpt2": lambda vocab, eos: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=256,
            n_embd=128,
            n_layer=4,
            n_head=8,
            n_inner=512,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ),
    # LLaMA style: RoPE, RMSNorm, grouped-query attention (8 query heads share 2 KV heads), d=160
    "llama": lambda vocab, eos: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=160,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=True,
        )
    ),
}


def build_tiny(arch: str, n_latent: int = 6, name: str = "") -> CODIModel:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(TINY_ARCHS)}")
    tokenizer = build_word_tokenizer()
    base_vocab = len(tokenizer)
    lm = TINY_ARCHS[arch](base_vocab + 3, tokenizer.eos_token_id)
    return CODIModel(lm, tokenizer, base_vocab, n_latent, name=name or f"tiny-{arch}")


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids, mask


@dataclass
class Losses:
    teacher: torch.Tensor
    student: torch.Tensor
    distill: torch.Tensor


def codi_losses(codi: CODIModel, problems: list[Problem], with_student: bool = True) -> Losses:
    """The three CODI losses on one batch (student and distillation only when asked)."""
    tok = codi.tokenizer
    prefix_len = len(tok(ANSWER_PREFIX)["input_ids"])
    questions = [tok(p.question)["input_ids"] for p in problems]
    answers = [tok(p.answer_text)["input_ids"] + [codi.eos_id] for p in problems]
    cots = [tok(p.cot)["input_ids"] for p in problems]

    # teacher: question + CoT + answer, loss on CoT and answer
    seqs = [q + c + a for q, c, a in zip(questions, cots, answers)]
    ids, mask = _left_pad(seqs, codi.pad_id)
    labels = ids.clone()
    for row, (q, s) in enumerate(zip(questions, seqs)):
        labels[row, : ids.shape[1] - len(s) + len(q)] = -100
    out = codi.step(mask, position_ids(mask), None, input_ids=ids, output_hidden_states=with_student)
    logits = codi.logits(out.last_hidden_state)  # [B, T, V+3]
    teacher = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    zero = teacher.new_zeros(())
    if not with_student:
        return Losses(teacher, zero, zero)
    # index of ':' (the token before the answer) in each teacher row
    t_idx = torch.tensor([ids.shape[1] - len(a) + prefix_len - 1 for a in answers])

    # student: question + bot, K thoughts, then eot + answer
    batch = encode_questions(codi, [p.question for p in problems])
    state = run_latents(codi, batch)
    ans_ids, _ = _left_pad([list(reversed(a)) for a in answers], codi.pad_id)
    ans_ids = ans_ids.flip(1)  # right-padded answers
    seg = torch.cat([torch.full((len(problems), 1), codi.eot_id), ans_ids], dim=1)  # [B, 1 + A]
    seg_mask = torch.cat([state.attention_mask, torch.ones_like(seg)], dim=1)
    seg_pos = state.next_position[:, None] + torch.arange(seg.shape[1])[None]
    s_out = codi.step(seg_mask, seg_pos, state.cache, input_ids=seg, output_hidden_states=True)
    s_logits = codi.logits(s_out.last_hidden_state[:, :-1])  # [B, A, V+3]
    s_labels = ans_ids.masked_fill(ans_ids == codi.pad_id, -100)
    student = F.cross_entropy(s_logits.flatten(0, 1), s_labels.flatten())

    rows = torch.arange(len(problems))
    distill = zero
    # hidden_states = (embedding output, block 1, ..., block L). The embedding entry is left
    # out of the sum: for RoPE models it is identical in teacher and student (zero loss), and
    # for absolute positions it only differs by position embeddings, which distillation would
    # pull together (the reference trains LoRA only, so they stay frozen there). The mean is
    # still over all L + 1 entries, as in the reference.
    entries = list(zip(s_out.hidden_states, out.hidden_states))
    for s_h, t_h in entries[1:]:
        s_vec, t_vec = s_h[:, prefix_len], t_h[rows, t_idx].detach()  # [B, d]
        distill = distill + F.smooth_l1_loss(s_vec, t_vec) / t_vec.std()
    return Losses(teacher, student, distill / len(entries))


@torch.no_grad()
def teacher_accuracy(codi: CODIModel, problems: list[Problem], batch_size: int = 256) -> float:
    """Explicit-CoT mode: the model writes its CoT and answer after the question."""
    was_training = codi.training
    codi.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        ids, mask = _left_pad([codi.tokenizer(p.question)["input_ids"] for p in chunk], codi.pad_id)
        out = codi.lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=48,
            do_sample=False,
            pad_token_id=codi.pad_id,
            eos_token_id=codi.eos_id,
        )
        texts = [decode_ids(codi, row.tolist()) for row in out[:, ids.shape[1] :]]
        correct += sum(is_correct(parse_answer(t), p.answer) for t, p in zip(texts, chunk))
    codi.train(was_training)
    return correct / len(problems)


def train(cfg: TrainConfig, command: str = "") -> CODIModel:
    """Train one tiny model and save it (with a card) to `cfg.out`."""
    from harness.measures.evaluation import evaluate

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    previous = None
    if cfg.init_from:
        previous = json.loads((Path(cfg.init_from) / "card.json").read_text())
        codi = load_own(Path(cfg.init_from), name=Path(cfg.out).name)
        assert codi.arch.model_type == cfg.arch, f"{cfg.init_from} is not a {cfg.arch} model"
    else:
        codi = build_tiny(cfg.arch, cfg.n_latent, name=Path(cfg.out).name)
    codi.train()
    stream = synthetic_training_stream(cfg.seed, cfg.data_seed)
    validation = list(itertools.islice(synthetic_training_stream(cfg.seed + 7919, cfg.data_seed), 256))
    total = cfg.teacher_steps + cfg.codi_steps
    opt = torch.optim.AdamW(codi.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(200, total // 10), num_training_steps=total)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = []
    start = time.time()
    for step in tqdm(range(total), desc=f"train {codi.name}", mininterval=10):
        batch = list(itertools.islice(stream, cfg.batch_size))
        with_student = step >= cfg.teacher_steps
        losses = codi_losses(codi, batch, with_student=with_student)
        loss = losses.teacher + losses.student + cfg.distill_weight * losses.distill
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codi.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
            row = {
                "step": step + 1,
                "phase": "codi" if with_student else "teacher",
                "elapsed_s": round(time.time() - start, 1),
                "teacher_loss": round(losses.teacher.item(), 4),
                "student_loss": round(losses.student.item(), 4),
                "distill_loss": round(losses.distill.item(), 5),
                "val_teacher_acc": teacher_accuracy(codi, validation),
            }
            if with_student:
                codi.eval()
                row["val_latent_acc"] = evaluate(codi, validation, progress=False).accuracy
                codi.train()
            history.append(row)
            log.info(json.dumps(row))
            with (out_dir / "train_log.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    wall = time.time() - start
    codi.eval()
    card = {
        "name": codi.name,
        "architecture": cfg.arch,
        "config": codi.lm.config.to_diff_dict(),
        "n_latent": cfg.n_latent,
        "train_config": asdict(cfg),
        "data_seed": cfg.data_seed,
        "command": command,
        "wall_time_s": round(wall, 1),
        "parameters": sum(p.numel() for p in codi.parameters()),
        "final_losses": history[-1] if history else {},
        "accuracy": measure_accuracies(codi, synthetic_split("test", cfg.data_seed)),
    }
    if previous is not None:
        card["continued_from"] = {k: previous[k] for k in ("command", "train_config", "wall_time_s", "accuracy")}
        card["total_wall_time_s"] = round(wall + previous.get("total_wall_time_s", previous["wall_time_s"]), 1)
    save_codi(codi, out_dir, card)
    return codi


def measure_accuracies(codi: CODIModel, problems: list[Problem]) -> dict:
    """The card's numbers: latent mode, every thought mean-patched, and explicit-CoT teacher."""
    from harness.measures.evaluation import evaluate, mean_patch, thought_means

    latent = evaluate(codi, problems, progress=False)
    patched = evaluate(codi, problems, patch=mean_patch(thought_means(codi, problems)), progress=False)
    return {
        "split": f"synthetic test ({len(problems)} problems)",
        "latent": latent.accuracy,
        "latent_by_steps": {str(k): v for k, v in latent.accuracy_by_steps().items()},
        "latent_mean_patched": patched.accuracy,
        "latent_mean_patched_by_steps": {str(k): v for k, v in patched.accuracy_by_steps().items()},
        "teacher_cot": teacher_accuracy(codi, problems),
    }
