"""Model specs: a name -> where its checkpoint is, which base it needs, how many thoughts.

`load(model, base)` accepts a spec name, a directory of ours, a hub-format directory or
`pytorch_model.bin`, or a hub id, and fails with one line naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.codi import (
    DEFAULT_N_LATENT,
    HUB_WEIGHTS,
    OWN_META,
    CODIModel,
    ModelLoadError,
    fetch_hub_weights,
    load_hub_format,
    load_own,
)
from harness.data import PROJECT_ROOT

MODELS_DIR = PROJECT_ROOT / "fixtures" / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    checkpoint: str  # a directory of ours, or a hub id / local copy in the hub format
    base: str | None = None  # base LM (HF id or directory) for hub-format checkpoints
    n_latent: int = DEFAULT_N_LATENT
    default_data: str = "synthetic"


MODEL_SPECS: dict[str, ModelSpec] = {
    "tiny-gpt2": ModelSpec("tiny-gpt2", "gpt2", str(MODELS_DIR / "tiny-gpt2")),
    "tiny-llama": ModelSpec("tiny-llama", "llama", str(MODELS_DIR / "tiny-llama")),
    "codi-gpt2": ModelSpec("codi-gpt2", "gpt2", "zen-E/CODI-gpt2", base="gpt2", default_data="gsm8k"),
    "codi-llama": ModelSpec(
        "codi-llama",
        "llama",
        "zen-E/CODI-llama3.2-1b-Instruct",
        base="meta-llama/Llama-3.2-1B-Instruct",
        default_data="gsm8k",
    ),
}
SHIPPED = ("tiny-gpt2", "tiny-llama")


def load(model: str, base: str | None = None, n_latent: int | None = None) -> CODIModel:
    """Resolve a `--model` value (and optional `--base`) to a loaded, merged CODI model in eval mode."""
    spec = MODEL_SPECS.get(model)
    source = spec.checkpoint if spec else model
    base = base or (spec.base if spec else None)
    k = n_latent or (spec.n_latent if spec else DEFAULT_N_LATENT)
    name = spec.name if spec else Path(model).name
    path = Path(source)
    if path.is_dir() and (path / OWN_META).is_file():
        return load_own(path, name=name)
    if path.is_dir() and (path / HUB_WEIGHTS).is_file():
        path = path / HUB_WEIGHTS
    if path.is_file():
        if base is None:
            raise ModelLoadError(f"{path} is a hub-format checkpoint: pass its base model with --base ID_OR_DIR")
        return load_hub_format(path, base, k, name=name)
    if path.exists():
        raise ModelLoadError(f"{path} is not a CODI checkpoint (no {OWN_META} or {HUB_WEIGHTS})")
    if spec is None and (model.startswith((".", "/")) or model.count("/") != 1):
        known = ", ".join(MODEL_SPECS)
        raise ModelLoadError(f"model {model!r} not found: not a path, a hub id or a known name ({known})")
    if base is None:
        raise ModelLoadError(f"hub id {source!r} needs its base model: pass --base ID_OR_DIR")
    return load_hub_format(fetch_hub_weights(source), base, k, name=name)
