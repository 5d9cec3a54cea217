import pytest
import torch
from hypothesis import settings

from harness.interventions import leftover_hooks
from harness.training import build_tiny

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
