"""Cross-model head transplantation (metric `transplant_drop`): the other model's top head
replaces this model's top head through linear maps between the residual spaces (fitted by
least squares on the discovery split); control: random donor heads of the same model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.data.problems import data_hash
from harness.interventions.specs import TransplantHead
from harness.interventions.transplant import DEFAULT_RIDGE, fitted_maps
from harness.judgment.kinds.base import (
    Kind,
    Measured,
    Params,
    Section,
    baseline_value,
    mean_drop,
    nan_effect,
    wilson_err,
)
from harness.measures.causal import heads_for
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head
from harness.statistics.verdicts import ClaimResult

R2 = ("in", "in_heldout", "out", "out_heldout")


@dataclass(frozen=True)
class TransplantParams(Params):
    n_random: int = 3  # random donor heads (the control)

    def validate(self, given: set[str]) -> None:
        if self.n_random < 0:
            raise ValueError("n_random must be at least 0")


def transplant_spec(run: ModelRun, donor: ModelRun, donor_head: Head, head: Head) -> TransplantHead:
    """`donor_head` of `donor` transplanted into `run`'s `head` (every position); `donor`
    becomes one of the run's peers, where the spec's hook finds it."""
    run.peers.setdefault(donor.name, donor)
    return TransplantHead(donor.fingerprint, donor_head, head, DEFAULT_RIDGE, data_hash(run.discovery))


def measure(p: TransplantParams, run: ModelRun, measure: str) -> Measured:
    if not run.peers:
        return Measured(nan_effect(len(run.problems)), {"note": "needs a second model in the run", "heads": []})
    peer_name, peer = next(iter(run.peers.items()))
    donor_head, head = heads_for(peer, (), 1)[0][0], heads_for(run, (), 1)[0][0]
    spec = transplant_spec(run, peer, donor_head, head)
    condition = run.measure(spec)
    geo = peer.geometry
    others = [
        Head(layer, h) for layer in range(geo.n_layers) for h in range(geo.n_heads) if Head(layer, h) != donor_head
    ]
    rng = np.random.default_rng(run.seed)
    picks = sorted(rng.choice(len(others), size=min(p.n_random, len(others)), replace=False))
    reference = run.baseline.values(measure)
    null = [
        mean_drop(reference, run.measure(transplant_spec(run, peer, others[i], head)).values(measure), measure)
        for i in picks
    ]
    details = {
        "donor": f"{peer_name} {donor_head}",
        "heads": [str(head)],
        "heads_from": "ranking" if not run.heads else "--heads",
        "positions": ["every position"],
        "mode": f"transplant from {peer_name} {donor_head}",
        "accuracy": 100.0 * condition.accuracy,
        "baseline_accuracy": baseline_value(run, "accuracy"),
        "r2": dict(zip(R2, map(float, transplant_fit(run, spec)))),
        "random_donors": [str(others[i]) for i in picks],
    }
    return Measured(run.effect(spec, measure), details, null or None)


def section(results: list[ClaimResult], runs: dict[str, ModelRun]) -> Section:
    rows = [
        {
            "recipient": r.model,
            "recipient_head": r.details["heads"][0],
            "donor": r.details["donor"],
            "baseline_accuracy": r.details["baseline_accuracy"],
            "accuracy": r.details["accuracy"],
            "n": r.n,
            **{f"r2_{k}": v for k, v in r.details["r2"].items()},
        }  # fmt: skip
        for r in results
        if "donor" in r.details
    ]
    table = pd.DataFrame(rows).drop_duplicates()
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if len(table):
        x = np.arange(len(table))
        err = {k: wilson_err(table[k], table.n) for k in ("baseline_accuracy", "accuracy")}
        ax.bar(x - 0.2, table.baseline_accuracy, 0.4, yerr=err["baseline_accuracy"], capsize=3, label="baseline")
        ax.bar(x + 0.2, table.accuracy, 0.4, yerr=err["accuracy"], capsize=3, label="donor head transplanted")
        ax.set_xticks(x, [f"{r.recipient} {r.recipient_head}\n<- {r.donor}" for r in table.itertuples()], fontsize=7)
        ax.legend(fontsize=7)
    ax.set(ylabel="accuracy (%, 95% Wilson CI)", title="Cross-model head transplantation")
    return Section("Cross-model head transplantation (2.1)", {"transplant": table}, {"transplant": fig})


KIND = Kind(
    "transplant_drop",
    TransplantParams,
    measure,
    section,
    "the other model's top head transplanted into this model's top head; drop from baseline",
    baseline_relative=True,
)


def transplant_fit(run: ModelRun, spec: TransplantHead) -> np.ndarray:
    """The maps' fit [R^2 in, held-out R^2 in, R^2 out, held-out R^2 out], cached."""
    donor = run.peer(spec.donor)

    def fit() -> np.ndarray:
        maps = fitted_maps(run, donor, spec.head.layer, spec.donor_head.layer)
        return np.array([v for m in maps for v in (m.r2, np.nan if m.r2_heldout is None else m.r2_heldout)])

    return run.cached(run.key(**spec.key(), part="fit"), f"transplant maps {spec.describe()}", fit)
