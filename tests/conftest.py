import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from harness.commands.training import build_tiny
from harness.interventions.hooks import leftover_hooks
from harness.runtime.arch import Head

_MODELS = []

# property tests: the same examples every run, so CI is never red by chance
settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def random_codi(request):
    """An untrained tiny CODI model of each architecture (fixed seed, eval mode)."""
    torch.manual_seed(0)
    codi = build_tiny(request.param).eval()
    _MODELS.append(codi)
    return codi


@pytest.fixture(autouse=True)
def no_hook_outlives_a_test(request):
    yield
    for codi in _MODELS + list(getattr(request.config, "_loaded_models", [])):
        assert not leftover_hooks(codi), f"left behind on {codi.name}: {leftover_hooks(codi)}"


@pytest.fixture(autouse=True)
def heap_unfrozen_after_an_inner_run(request):
    """Claims-suite runs mostly run inside this process (pytester in-process: no second torch
    import, about 5 s a run). The plugin freezes the heap it finds at the start of a run (a
    fast exit for a real run); unfreeze it after, so that what an inner run left is collectable."""
    yield
    if "pytester" in request.fixturenames:
        gc.unfreeze()


HYPOTHESES = Path(__file__).resolve().parent.parent / "hypotheses"


def _suite_args(report_dir: Path, cache_dir: Path | None, *args: str) -> list[str]:
    cache = ["--cache-dir", str(cache_dir)] if cache_dir else ["--no-cache"]
    return [str(HYPOTHESES), "-p", "no:cacheprovider", "--report-dir", str(report_dir), *cache, *args]


@pytest.fixture
def suite_args():
    """`suite_args(report_dir, cache_dir or None, *args)`: the arguments of a claims-suite run
    (for pytester) with its own report folder and cache (None: --no-cache)."""
    return _suite_args


_ZEROED: dict = {}


def _zeroing_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with the chosen heads' probabilities zeroed at the chosen queries."""
    heads, positions, codi = _ZEROED["heads"], _ZEROED["positions"], _ZEROED["codi"]
    module.num_key_value_groups = getattr(module, "num_key_value_groups", 1)
    out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout)
    probs = weights.clone()
    local = [t for t, _ in codi.current_pass().local(positions)]
    for h in heads:
        if h.layer == module.layer_idx and local:
            probs[:, h.head, local] = 0.0
    v = value.repeat_interleave(module.num_key_value_groups, dim=1)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("zero_heads_reference", _zeroing_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("zero_heads_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextmanager
def zeroed_attention(codi, heads: list[Head], positions: list[int]) -> Iterator[None]:
    """An independent reference for zero-ablation: the heads' attention probabilities zeroed
    at the query positions (eager attention), not their output slice."""
    _ZEROED.update(heads=heads, positions=positions, codi=codi)
    previous = codi.lm.config._attn_implementation
    codi.lm.set_attn_implementation("zero_heads_reference")
    try:
        yield
    finally:
        codi.lm.set_attn_implementation(previous)
