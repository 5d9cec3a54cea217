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
from harness.measures.runner import MAX_NEW_TOKENS

if TYPE_CHECKING:
    from harness.measures.runner import ModelRun

COMPARABLE = ("seed", "device", "dtype", "reference_batching", "registry_hash", "claim_code_hash")  # and per model
MODEL_COMPARABLE = ("fingerprint", "data_hash", "n", "forced_heads", "max_new_tokens")  # weights, data, n, --heads
MODEL_DEFAULTS = {"max_new_tokens": MAX_NEW_TOKENS}  # what a report from before a setting existed ran with


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_hash(paths: list[Path]) -> str:
    """One hash of the Python claim files a run was given (each `.py` under a folder, or the
    file): an edited Python claim is another configuration, like an edited registry."""
    found = (f for p in paths if p.exists() for f in (p.rglob("*.py") if p.is_dir() else [p]))
    files = sorted({f for f in found if f.suffix == ".py"})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_info(
    run_id: str,
    *,
    seed: int,
    device: str,
    dtype: str,
    reference_batching: bool,
    registry: Path,
    claim_files: list[Path],
    data: dict[str, str],
    runs: dict[str, ModelRun],
) -> dict:
    """Everything the verdicts depend on besides the code: seed, versions, device, data,
    registry and Python-claim hashes, and per model its fingerprint, n, baseline, critical
    heads (and those --heads forced) and hub."""
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
        "claim_code_hash": code_hash(claim_files),
        "models": models,
    }


def comparable_key(run: dict) -> dict:
    """The part of a run's configuration two runs must share for their verdicts to be compared."""
    models = {name: {k: m.get(k, MODEL_DEFAULTS.get(k)) for k in MODEL_COMPARABLE}
              for name, m in run.get("models", {}).items()}  # fmt: skip
    return {**{k: run.get(k) for k in COMPARABLE}, "models": models}


def same_configuration(a: dict, b: dict) -> bool:
    """Same seed, device, dtype, batching, registry and Python claims; and every model present
    in both has the same weights, data, n and --heads (a run of one model compares with a run
    of both)."""
    ka, kb = comparable_key(a), comparable_key(b)
    if any(ka[k] != kb[k] for k in COMPARABLE):
        return False
    shared = set(ka["models"]) & set(kb["models"])
    return bool(shared) and all(ka["models"][m] == kb["models"][m] for m in shared)
