from pathlib import Path

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


HYPOTHESES = Path(__file__).resolve().parent.parent / "hypotheses"


def _suite_args(report_dir: Path, cache_dir: Path | None, *args: str) -> list[str]:
    cache = ["--cache-dir", str(cache_dir)] if cache_dir else ["--no-cache"]
    return [str(HYPOTHESES), "-p", "no:cacheprovider", "--report-dir", str(report_dir), *cache, *args]


@pytest.fixture
def suite_args():
    """`suite_args(report_dir, cache_dir or None, *args)`: the arguments of a claims-suite run
    (for pytester) with its own report folder and cache (None: --no-cache)."""
    return _suite_args
