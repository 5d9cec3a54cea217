import itertools

import torch

from harness.commands.training import build_tiny, codi_losses
from harness.data.problems import synthetic_training_stream


def test_a_short_codi_run_lowers_each_loss():
    torch.manual_seed(0)
    codi = build_tiny("gpt2").train()
    batch = list(itertools.islice(synthetic_training_stream(seed=3), 16))
    opt = torch.optim.AdamW(codi.parameters(), lr=3e-3)
    before = codi_losses(codi, batch)
    for _ in range(15):
        losses = codi_losses(codi, batch)
        opt.zero_grad()
        (losses.teacher + losses.student + 20 * losses.distill).backward()
        opt.step()
    after = codi_losses(codi, batch)
    assert after.teacher < 0.8 * before.teacher
    assert after.student < 0.8 * before.student
    assert after.distill < before.distill
    assert before.distill > 0


def test_distillation_reaches_the_latent_path():
    """The student and distillation losses send gradient into prj (through every thought)."""
    codi = build_tiny("llama").train()
    batch = list(itertools.islice(synthetic_training_stream(seed=4), 8))
    losses = codi_losses(codi, batch)
    (losses.student + losses.distill).backward()
    assert codi.prj[1].weight.grad is not None and codi.prj[1].weight.grad.abs().sum() > 0
    codi.zero_grad()
    codi_losses(codi, batch, with_student=False).teacher.backward()
    assert codi.prj[1].weight.grad is None or codi.prj[1].weight.grad.abs().sum() == 0
