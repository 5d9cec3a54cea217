import pytest
import torch

from harness.training import build_tiny


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def random_codi(request):
    """An untrained tiny CODI model of each architecture (fixed seed, eval mode)."""
    torch.manual_seed(0)
    codi = build_tiny(request.param)
    return codi.eval()
