"""The run configuration: what a report's numbers depend on, written at the top of claims.json
(`run`), the HTML page and summary.md, and the key that decides which earlier run a nightly
compares verdicts with."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

import harness

if TYPE_CHECKING:
    from harness.experiments import ModelRun

COMPARABLE = ("seed", "device", "dtype", "reference_batching", "registry_hash")  # and each model's identity


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_info(
    run_id: str,
    *,
    seed: int,
    device: str,
    dtype: str,
    reference_batching: bool,
    registry: Path,
    data: dict[str, str],
    runs: dict[str, ModelRun],
) -> dict:
    """Everything the verdicts depend on besides the code: seed, versions, device, data and
    registry hashes, and per model its fingerprint, n, baseline, critical heads and hub."""
    models = {}
    for name, run in runs.items():
        models[name] = {"data": data.get(name, ""), **run.describe()}
    return {
        "id": run_id,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "reference_batching": reference_batching,
        "versions": {
            "harness": harness.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "data": sorted({f"{m['data']} ({m['data_hash']}, n={m['n']})" for m in models.values()}),
        "registry": str(registry),
        "registry_hash": file_hash(registry),
        "models": models,
    }


def comparable_key(run: dict) -> dict:
    """The part of a run's configuration two runs must share for their verdicts to be compared."""
    models = {
        name: {k: m.get(k) for k in ("fingerprint", "data_hash", "n")} for name, m in run.get("models", {}).items()
    }
    return {**{k: run.get(k) for k in COMPARABLE}, "models": models}


def same_configuration(a: dict, b: dict) -> bool:
    """Same seed, device, dtype, batching and registry; and every model present in both has
    the same weights, data and n (a run of one model compares with a run of both)."""
    ka, kb = comparable_key(a), comparable_key(b)
    if any(ka[k] != kb[k] for k in COMPARABLE):
        return False
    shared = set(ka["models"]) & set(kb["models"])
    return bool(shared) and all(ka["models"][m] == kb["models"][m] for m in shared)
