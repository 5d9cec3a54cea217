"""Report sections of the phase 2-4 experiments: each a CSV, figures and a summary table, built
from the (cached) results of the claims a run judged, so whichever process writes the report
(the session, or the xdist controller) reads the same numbers.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.attribution import CATEGORIES
from harness.experiments import ModelRun
from harness.metrics import reroute_target, tiers
from harness.tiers import TIERS

HEATMAP_PROBLEMS = 3


@dataclass
class SectionOutput:
    title: str
    table: pd.DataFrame
    figures: dict[str, bytes]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def transplant(runs: dict[str, ModelRun]) -> SectionOutput:
    rows = []
    for name, run in runs.items():
        if not run.peers:
            continue
        peer_name, peer = next(iter(run.peers.items()))
        donor_head, head = peer.critical_heads(1)[0], run.critical_heads(1)[0]
        flags, r2 = run.transplant(peer, donor_head, head)
        rows.append({"recipient": name, "recipient_head": str(head), "donor": peer_name, "donor_head": str(donor_head),
                     "baseline_accuracy": 100 * float(run.baseline.mean()), "accuracy": 100 * float(flags.mean()),
                     "r2_in": r2[0], "r2_in_heldout": r2[1], "r2_out": r2[2], "r2_out_heldout": r2[3]})  # fmt: skip
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    if len(table):
        x = np.arange(len(table))
        ax.bar(x - 0.2, table.baseline_accuracy, 0.4, label="baseline")
        ax.bar(x + 0.2, table.accuracy, 0.4, label="donor head transplanted")
        ax.set_xticks(x, [f"{r.recipient} {r.recipient_head}\n<- {r.donor} {r.donor_head}" for r in table.itertuples()])
        ax.legend()
    ax.set(ylabel="accuracy (%)", title="Cross-model head transplantation")
    return SectionOutput("Cross-model head transplantation (2.1)", table, {"transplant.png": _png(fig)})


def rerouting(runs: dict[str, ModelRun]) -> SectionOutput:
    rows = []
    for name, run in runs.items():
        heads = run.critical_heads(3)
        base = 100 * float(run.baseline.mean())
        for kind in ("other_hub", "neighbour"):
            target = reroute_target(run, kind)
            if target is None:
                continue
            acc = base if target == run.hub else 100 * float(run.pattern("reroute", heads, target=target).mean())
            rows.append({"model": name, "reroute_to": kind, "hub": run.hub, "target": target, "accuracy": acc,
                         "baseline_accuracy": base, "kept_fraction": acc / base if base else np.nan})  # fmt: skip
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for i, (name, group) in enumerate(table.groupby("model", sort=False) if len(table) else []):
        ax.bar(np.arange(len(group)) + 0.4 * i, group["accuracy"], 0.4, label=name)
        ax.set_xticks(np.arange(len(group)) + 0.2, [f"{k}\n({t})" for k, t in zip(group.reroute_to, group.target)])
    ax.set(ylabel="accuracy (%)", title="Top-3 heads' hub attention rerouted")
    if len(table):
        ax.legend()
    return SectionOutput("Hub rerouting (2.2)", table, {"rerouting.png": _png(fig)})


def probes(runs: dict[str, ModelRun]) -> SectionOutput:
    frames = [run.probes.table().assign(model=name, hub=run.hub) for name, run in runs.items()]
    table = pd.concat(frames, ignore_index=True)[
        ["model", "hub", "target", "layer", "accuracy", "control_accuracy", "selectivity", "chance"]
    ]
    figures = {}
    for target, group in table.groupby("target", sort=False):
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        for name, g in group.groupby("model", sort=False):
            line = ax.plot(g.layer, g.accuracy, marker="o", label=f"{name} probe")[0]
            ax.plot(g.layer, g.control_accuracy, ls="--", color=line.get_color(), label=f"{name} control")
            ax.axhline(g.chance.iloc[0], color=line.get_color(), ls=":", lw=1)
        ax.set(xlabel="layer (0 = the thought as fed in)", ylabel="probe accuracy (%)", title=f"{target} at the hub")
        ax.legend(fontsize=7)
        figures[f"probes_{target}.png"] = _png(fig)
    return SectionOutput("Layer-wise probes at the hub thought (3.1)", table, figures)


def attribution(runs: dict[str, ModelRun]) -> SectionOutput:
    rows, figures = [], {}
    for name, run in runs.items():
        heads = run.critical_heads(3)
        ig = run.attributions(heads)
        attr, tokens = ig.shares()  # [N, H, C], [N, C]
        for j, head in enumerate(heads):
            for c, category in enumerate(CATEGORIES):
                rows.append({"model": name, "head": str(head), "category": category,
                             "attribution_share": 100 * attr[:, j, c].mean(), "token_share": 100 * tokens[:, c].mean(),
                             "mean_abs_delta": float(np.abs(ig.deltas[:, j]).mean()),
                             "mean_abs_output_gap": float(np.abs(ig.outputs[:, j]).mean())})  # fmt: skip
        fig = Figure(figsize=(9, 2.4 * HEATMAP_PROBLEMS), layout="constrained")
        axes = fig.subplots(HEATMAP_PROBLEMS, 1, squeeze=False)[:, 0]
        for ax, i in zip(axes, range(min(HEATMAP_PROBLEMS, len(ig.tokens)))):
            toks = ig.tokens[i]
            scores = ig.scores[i][:, -len(toks) :]  # [H, T_i]
            bound = float(np.nanmax(np.abs(scores))) or 1.0
            ax.imshow(scores, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
            ax.set_xticks(range(len(toks)), toks, rotation=90, fontsize=7)
            ax.set_yticks(range(len(heads)), [str(h) for h in heads], fontsize=7)
        fig.suptitle(f"{name}: integrated gradients of the critical heads at {run.hub}")
        figures[f"attribution_{name}.png"] = _png(fig)
    return SectionOutput("Integrated gradients of the critical heads (3.2)", pd.DataFrame(rows), figures)


def difficulty(runs: dict[str, ModelRun]) -> SectionOutput:
    rows = []
    for name, run in runs.items():
        groups = tiers(run)
        ablated = run.ablation(run.critical_heads(3))
        for tier in TIERS:
            mask = groups == tier
            base = 100 * float(run.baseline[mask].mean()) if mask.any() else np.nan
            acc = 100 * float(ablated[mask].mean()) if mask.any() else np.nan
            rows.append({"model": name, "tier": tier, "n": int(mask.sum()), "baseline_accuracy": base,
                         "ablated_accuracy": acc, "drop": base - acc})  # fmt: skip
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for i, (name, g) in enumerate(table.groupby("model", sort=False)):
        ax.bar(np.arange(len(TIERS)) + 0.4 * i, g["drop"], 0.4, label=f"{name} (n = {'/'.join(map(str, g.n))})")
    ax.set_xticks(np.arange(len(TIERS)) + 0.2, TIERS)
    ax.set(ylabel="accuracy drop (points)", title="Top-3 head ablation by difficulty tier")
    ax.legend(fontsize=7)
    return SectionOutput("Difficulty tiers (4.1)", table, {"tiers.png": _png(fig)})


# metric of the claims that use a section -> (CSV name, builder)
SECTIONS: dict[str, tuple[str, Callable[[dict[str, ModelRun]], SectionOutput]]] = {
    "transplant_drop": ("transplant", transplant),
    "reroute_drop": ("rerouting", rerouting),
    "probe_layer": ("probes", probes),
    "attribution_share": ("attribution", attribution),
    "tier_drop": ("tiers", difficulty),
}


def late_sections(runs: dict[str, ModelRun], metrics: dict[str, set[str]]) -> dict[str, SectionOutput]:
    """The sections whose metrics this run's claims used, over the models that used them."""
    out = {}
    for metric, (key, build) in SECTIONS.items():
        used = {name: run for name, run in runs.items() if metric in metrics.get(name, set())}
        if used:
            out[key] = build(used)
    return out
