"""Claim metrics: (claim, run) -> the measured effect with its CI, details for the report,
and the control distribution where the claim has one.

Each metric reads what it needs from `ModelRun` (cached on disk), so the same numbers are
available to the report in whichever process writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from harness.attribution import CATEGORIES
from harness.experiments import ModelRun
from harness.interventions import Head
from harness.probes import chance, critical_layer
from harness.stats import (
    PairedEffect,
    accuracy_above,
    accuracy_drop,
    difference_of_drops,
    mean_drop,
    mean_with_ci,
)
from harness.tiers import assign_tiers, tier_sizes

if TYPE_CHECKING:
    from harness.claims import Claim

Measured = tuple[PairedEffect, dict, list[float] | None]


def _drop(run: ModelRun, treated: np.ndarray, reference: np.ndarray | None = None) -> PairedEffect:
    """Paired drop from `reference` (default: the baseline), memoised per run: several claims
    share the same comparisons and the bootstrap is the slow part of a warm run."""
    reference = run.baseline if reference is None else reference
    key = (reference.tobytes(), treated.tobytes())
    if key not in run.drops:
        run.drops[key] = accuracy_drop(reference, treated, seed=run.seed)
    return run.drops[key]


def ablation_drop(claim: Claim, run: ModelRun) -> Measured:
    n = claim.experiment.get("n_heads", 3)
    heads = run.critical_heads(n)
    effect = _drop(run, run.ablation(heads))
    null = [
        mean_drop(run.baseline, run.ablation(s))
        for s in run.random_head_sets(heads, claim.experiment.get("n_random", 20))
    ]
    incremental = {f"top{k}_acc": float(run.ablation(run.critical_heads(k)).mean()) for k in range(1, n + 1)}
    return effect, {"heads": [str(h) for h in heads], "baseline_acc": float(run.baseline.mean()), **incremental}, null


def position_drop(claim: Claim, run: ModelRun) -> Measured:
    mode = claim.experiment.get("mode", "noise")
    drops = {f"CT{i}": _drop(run, run.position_patch(f"CT{i}", mode)) for i in range(run.n_latent)}
    details = {"hub": run.hub, "drops": {k: v.effect for k, v in drops.items()}}
    which = claim.experiment.get("which", "hub")
    if which == "hub":
        return drops[run.hub], details, None
    others = {k: v for k, v in drops.items() if k != run.hub}
    if which == "max_non_hub":  # "each non-hub drop < t": judged on the largest
        worst = max(others, key=lambda k: others[k].effect)
        return others[worst], {**details, "worst": worst}, None
    # "hub drop larger than every non-hub drop": the smallest paired difference
    hub_flags = run.position_patch(run.hub, mode)
    diffs = {k: _drop(run, hub_flags, reference=run.position_patch(k, mode)) for k in others}
    worst = min(diffs, key=lambda k: diffs[k].effect)
    return diffs[worst], {**details, "closest": worst}, None


def pattern_drop(claim: Claim, run: ModelRun) -> Measured:
    pattern = claim.experiment["pattern"]
    x = claim.experiment
    heads = run.scoped_heads(x.get("scope", "top"), x.get("n_heads", 3), x.get("layer"))
    flags = run.pattern(pattern, heads)
    details = {"pattern": pattern, "hub": run.hub, "heads": [str(h) for h in heads], "acc": float(flags.mean())}
    return _drop(run, flags), {**details, "baseline_acc": float(run.baseline.mean())}, None


def _nan_effect(n: int) -> PairedEffect:
    nan = float("nan")
    return PairedEffect(nan, nan, nan, nan, n)


def transplant_drop(claim: Claim, run: ModelRun) -> Measured:
    """2.1: the other model's top head transplanted into this model's top head (linear maps
    between the residual spaces); control: random donor heads of the same model."""
    if not run.peers:
        return _nan_effect(len(run.problems)), {"note": "needs a second model in the run"}, None
    peer_name, peer = next(iter(run.peers.items()))
    donor_head, head = peer.critical_heads(1)[0], run.critical_heads(1)[0]
    flags, r2 = run.transplant(peer, donor_head, head)
    geo = peer.geometry
    others = [
        Head(layer, h) for layer in range(geo.n_layers) for h in range(geo.n_heads) if Head(layer, h) != donor_head
    ]
    rng = np.random.default_rng(run.seed)
    picks = rng.choice(len(others), size=claim.experiment.get("n_random", 5), replace=False)
    null = [mean_drop(run.baseline, run.transplant(peer, others[i], head)[0]) for i in sorted(picks)]
    details = {
        "donor": f"{peer_name} {donor_head}",
        "recipient_head": str(head),
        "acc": float(flags.mean()),
        "baseline_acc": float(run.baseline.mean()),
        "r2": dict(zip(("in", "in_heldout", "out", "out_heldout"), map(float, r2))),
        "random_donors": [str(others[i]) for i in sorted(picks)],
    }
    return _drop(run, flags), details, null


def reroute_target(run: ModelRun, kind: str) -> str | None:
    """Where 2.2 moves the hub's mass: the other model's hub position (None without another
    model) or the thought next to this model's hub."""
    if kind == "other_hub":
        return next(iter(run.peers.values())).hub if run.peers else None
    hub = run.hub_thought
    return f"CT{hub + 1 if hub + 1 < run.n_latent else hub - 1}"


def reroute_drop(claim: Claim, run: ModelRun) -> Measured:
    """2.2: the critical heads' hub mass moved to another thought: the other model's hub
    position, or the thought next to this model's hub."""
    heads = run.critical_heads(claim.experiment.get("n_heads", 3))
    details = {"hub": run.hub, "heads": [str(h) for h in heads], "baseline_acc": float(run.baseline.mean())}
    target = reroute_target(run, claim.experiment["target"])
    if target is None:
        return _nan_effect(len(run.problems)), {**details, "note": "needs a second model in the run"}, None
    if run.peers and claim.experiment["target"] == "other_hub":
        details["other_model"] = next(iter(run.peers))
    details["target"] = target
    if target == run.hub:
        details["note"] = "the other model's hub is this model's hub: rerouting is the identity"
        return _drop(run, run.baseline), details, None
    flags = run.pattern("reroute", heads, target=target)
    return _drop(run, flags), {**details, "acc": float(flags.mean())}, None


def tiers(run: ModelRun) -> np.ndarray:
    return assign_tiers(np.array([p.n_steps for p in run.problems]), run.baseline_confidence)


def tier_drop(claim: Claim, run: ModelRun) -> Measured:
    """4.1: top-3 head ablation within difficulty tiers; one tier's drop, or the difference of
    two tiers' drops (`compare = [a, b]`: a's drop minus b's)."""
    heads = run.critical_heads(claim.experiment.get("n_heads", 3))
    groups = tiers(run)
    ablated = run.ablation(heads)
    details = {"heads": [str(h) for h in heads], "tier_sizes": tier_sizes(groups)}
    if "compare" in claim.experiment:
        a, b = (groups == name for name in claim.experiment["compare"])
        effect = difference_of_drops(run.baseline[a], ablated[a], run.baseline[b], ablated[b], seed=run.seed)
        return effect, details, None
    in_tier = groups == claim.experiment["tier"]
    if in_tier.sum() < 2:
        return _nan_effect(int(in_tier.sum())), {**details, "note": "tier has fewer than 2 problems"}, None
    return accuracy_drop(run.baseline[in_tier], ablated[in_tier], seed=run.seed), details, None


N_LAYER_DRAWS = 1000


def probe_layer(claim: Claim, run: ModelRun) -> Measured:
    """3.1: `test = "critical_layer"`: distance (layers) from the probe's critical layer to the
    nearest critical head's layer, CI by resampling problems; `test = "final_above_chance"`:
    the final layer's probe accuracy minus chance (points)."""
    target = claim.experiment.get("target", "answer_last_digit")
    probes = run.probes
    task, control = probes.task[target], probes.control[target]  # [L + 1, n]
    head_layers = sorted({h.layer for h in run.critical_heads(claim.experiment.get("n_heads", 3))})
    details = {"target": target, "head_layers": head_layers, "critical_layer": critical_layer(task, control)}
    if claim.experiment["test"] == "final_above_chance":
        ch = chance(probes.labels[target])
        return accuracy_above(task[-1], ch, seed=run.seed), {**details, "chance": 100 * ch}, None

    selectivity = task.mean(-1) - control.mean(-1)  # [L + 1]
    details["selectivity"] = [float(100 * s) for s in selectivity]
    if selectivity[details["critical_layer"] + 1] <= 0:
        note = "the probe never beats its control task after the critical layer: no layer to locate"
        return _nan_effect(task.shape[1]), {**details, "note": note}, None

    def distance(columns: np.ndarray) -> int:
        crit = critical_layer(task[:, columns], control[:, columns])
        return min(abs(crit - layer) for layer in head_layers)

    n = task.shape[1]
    rng = np.random.default_rng(run.seed)
    draws = np.array([distance(rng.integers(0, n, n)) for _ in range(N_LAYER_DRAWS)])
    low, high = np.percentile(draws, [2.5, 97.5])
    p = float(np.mean(draws > claim.threshold))  # bootstrap share of draws against the claim
    effect = PairedEffect(float(distance(np.arange(n))), float(low), float(high), p, n)
    return effect, details, None


def attribution_share(claim: Claim, run: ModelRun) -> Measured:
    """3.2: a token category's share of the critical heads' attribution minus its share of the
    question's tokens, per problem (mean over heads); CI by bootstrap over problems, p by a
    one-sided Wilcoxon signed-rank test."""
    category = claim.experiment.get("category", "number")
    heads = run.critical_heads(claim.experiment.get("n_heads", 3))
    ig = run.attributions(heads)
    attr, tokens = ig.shares()  # [N, H, C], [N, C]
    c = CATEGORIES.index(category)
    excess = 100.0 * (attr[:, :, c].mean(1) - tokens[:, c])  # [N] points
    effect = mean_with_ci(excess, seed=run.seed)
    gaps = np.abs(ig.outputs)
    details = {
        "category": category,
        "heads": [str(h) for h in heads],
        "attribution_share": float(100 * attr[:, :, c].mean()),
        "token_share": float(100 * tokens[:, c].mean()),
        "mean_abs_delta": float(np.abs(ig.deltas).mean()),
        "relative_delta": float(np.abs(ig.deltas).mean() / max(gaps.mean(), 1e-12)),
    }
    return effect, details, None


METRICS: dict[str, Callable[[Claim, ModelRun], Measured]] = {
    "ablation_drop": ablation_drop,
    "position_drop": position_drop,
    "pattern_drop": pattern_drop,
    "transplant_drop": transplant_drop,
    "reroute_drop": reroute_drop,
    "tier_drop": tier_drop,
    "probe_layer": probe_layer,
    "attribution_share": attribution_share,
}
