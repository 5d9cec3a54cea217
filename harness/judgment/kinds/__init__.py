"""The experiment kinds: one module each (typed parameters, measurement, report section), and
the registry claims name them by (`metric = "..."`). A new kind is one new module and one
entry here."""

from harness.judgment.kinds import (
    attention_pattern,
    attribution,
    das,
    head_ablation,
    interchange,
    logit_lens,
    position_patch,
    probes,
    reroute,
    sweep,
    thought_flow,
    tiers,
    transplant,
)
from harness.judgment.kinds.base import ClaimError, Kind, Measured, Params, Section

KINDS: dict[str, Kind] = {
    module.KIND.metric: module.KIND
    for module in (
        head_ablation,
        interchange,
        logit_lens,
        position_patch,
        attention_pattern,
        reroute,
        transplant,
        probes,
        attribution,
        tiers,
        sweep,
        thought_flow,
        das,
    )
}

__all__ = ["KINDS", "ClaimError", "Kind", "Measured", "Params", "Section"]
