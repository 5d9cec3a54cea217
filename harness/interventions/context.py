"""What an intervention may read from the run it is measured in (its clean thoughts, head
outputs, peer models, memo), as a protocol: the runner (`harness.measures.runner.ModelRun`)
implements it, and this layer never imports the runner."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from harness.data.problems import Problem
from harness.runtime.arch import Head
from harness.runtime.codi import CODIModel


class RunContext(Protocol):
    """What a spec reads from the run it is measured in (implemented by `ModelRun`)."""

    codi: CODIModel
    seed: int
    name: str
    discovery: list[Problem]  # the split maps and means are fitted on
    batch_size: int

    def clean_thoughts(self, split: str) -> torch.Tensor:
        """Unpatched thoughts of the `test` or `discovery` problems: [N, K, d]."""

    def counterfactual_thoughts(self) -> torch.Tensor:
        """Each test problem's counterfactual source's unpatched thoughts: [N, K, d]."""

    def head_outputs(self, heads: tuple[Head, ...], positions: tuple[str, ...], split: str) -> dict[Head, torch.Tensor]:
        """Each head's clean output at the named fixed positions: {head: [N, P, hd]}."""

    def peer(self, fingerprint: str) -> RunContext:
        """The session's other model with these weights (a transplant's donor)."""

    def remember(self, name: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` once per run under `name` (a transplant's fitted maps)."""
