"""Mechanistic-interpretability claims about CODI continuous-thought models, as a pytest suite.

The package is split by layer, each importing only the ones before it: `data`, `statistics`,
`runtime`, `interventions`, `measures`, `judgment`, `report`, `plugin`, `commands`. The names a
researcher writes claims with are importable from here, loaded on first use (PEP 562), so
`import harness` (and `python -m harness init`) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_VOCABULARY = {
    "Baseline": "harness.interventions.specs",
    "AblateHeads": "harness.interventions.specs",
    "PatchThoughts": "harness.interventions.specs",
    "AttentionPattern": "harness.interventions.specs",
    "TransplantHead": "harness.interventions.specs",
    "PatchPath": "harness.interventions.paths",
    "PatchSubspace": "harness.interventions.subspace",
    "Head": "harness.runtime.arch",
    "heads_for": "harness.measures.causal",
    "claim_params": "harness.plugin.suite",
}
__all__ = sorted(_VOCABULARY)


def __getattr__(name: str) -> Any:
    if name not in _VOCABULARY:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(_VOCABULARY[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
