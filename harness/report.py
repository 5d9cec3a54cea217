"""The claim report: claims.json / claims.csv, the seed's CSVs, figures, summary.md, and the
HTML block pytest-html embeds; `reports/latest` points at the newest run."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.claims import VERDICTS
from harness.data import PROJECT_ROOT
from harness.discovery import top_heads
from harness.sections import late_sections
from harness.stats import holm

REPORTS_DIR = PROJECT_ROOT / "reports"
PATTERNS = ("hub", "uniform", "sequential")
COLUMNS = ["id", "model", "statement", "effect", "ci_low", "ci_high", "threshold", "direction", "p_value", "p_holm",
           "control_percentile", "verdict", "point_verdict"]  # fmt: skip


def new_run_dir(root: Path) -> Path:
    """Create and return a new folder for this run, never an earlier run's (even when two
    runs start in the same second: the folder is claimed by an exclusive mkdir)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = root / stamp, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, k = root / f"{stamp}-{k}", k + 1


def point_latest(directory: Path) -> None:
    """Move `<parent>/latest` to `directory` atomically: a new symlink renamed over the old."""
    tmp = directory.parent / f".latest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.symlink_to(directory.name)
    os.replace(tmp, directory.parent / "latest")


@dataclass
class Written:
    directory: Path
    html: str
    lines: list[str]


def _previous_claims(directory: Path) -> list[dict] | None:
    runs = sorted(
        p for p in directory.parent.iterdir() if p.is_dir() and p != directory and (p / "claims.json").exists()
    )
    return json.loads((runs[-1] / "claims.json").read_text()) if runs else None


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _experiment_tables(runs: dict, metrics: dict[str, set[str]]) -> dict[str, pd.DataFrame]:
    """The seed's CSVs from the (cached) results of the experiments the run's claims used."""
    ablation, positions, patterns = {}, {}, {}
    for name, run in runs.items():
        used = metrics.get(name, set())
        base = float(run.baseline.mean()) * 100
        if "ablation_drop" not in used:
            continue
        accs = [base] + [float(run.ablation(run.critical_heads(k)).mean()) * 100 for k in (1, 2, 3)]
        null = [float(run.ablation(s).mean()) * 100 for s in run.random_head_sets(run.critical_heads(3))]
        ablation[f"{name}_acc"] = accs
        ablation[f"{name}_random3_p5"] = [np.nan] * 3 + [np.percentile(null, 5)]
        ablation[f"{name}_random3_p95"] = [np.nan] * 3 + [np.percentile(null, 95)]
    for name, run in runs.items():
        used = metrics.get(name, set())
        base = float(run.baseline.mean()) * 100
        if "position_drop" in used:
            positions[f"{name}_drop"] = [
                base - float(run.position_patch(f"CT{i}").mean()) * 100 for i in range(run.n_latent)
            ]
        if "pattern_drop" in used:
            heads = run.critical_heads(3)
            patterns[f"{name}_acc"] = [base] + [float(run.pattern(p, heads).mean()) * 100 for p in PATTERNS]
    k = max((r.n_latent for r in runs.values()), default=6)
    return {
        "ablation": pd.DataFrame({"n_heads": [0, 1, 2, 3], **ablation}),
        "positions": pd.DataFrame({"position": [f"CT{i}" for i in range(k)], **positions}),
        "patterns": pd.DataFrame({"pattern": ["baseline", *PATTERNS], **patterns}),
    }


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _ablation_figure(t: pd.DataFrame, models: list[str]) -> bytes:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for m in [m for m in models if f"{m}_acc" in t]:
        ax.plot(t["n_heads"], t[f"{m}_acc"], marker="o", label=m)
        lo, hi = t[f"{m}_random3_p5"].iloc[3], t[f"{m}_random3_p95"].iloc[3]
        ax.errorbar([3.08], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], fmt="none", capsize=4, alpha=0.7)
    ax.set(
        xlabel="top-ranked heads zero-ablated",
        ylabel="accuracy (%)",
        title="Head ablation (bar: random 3-head sets, p5-p95)",
    )
    _legend(ax)
    return _png(fig)


def _figures(tables: dict[str, pd.DataFrame], models: list[str]) -> dict[str, bytes]:
    figs = {}
    if "ablation" in tables:
        figs["ablation.png"] = _ablation_figure(tables["ablation"], models)
    for key, ylabel, x in (
        ("positions", "accuracy drop (points)", "position"),
        ("patterns", "accuracy (%)", "pattern"),
    ):
        if key not in tables:
            continue
        t = tables[key]
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        width = 0.8 / max(1, len(models))
        cols = [(m, f"{m}_drop" if key == "positions" else f"{m}_acc") for m in models]
        for j, (m, col) in enumerate([c for c in cols if c[1] in t]):
            ax.bar(np.arange(len(t)) + j * width, t[col], width, label=m)
        ax.set_xticks(np.arange(len(t)) + width * (len(models) - 1) / 2, t[x])
        ax.set(
            ylabel=ylabel,
            title="Noise at each thought" if key == "positions" else "Attention pattern of the top-3 heads",
        )
        _legend(ax)
        figs[f"{key}.png"] = _png(fig)
    return figs


def _note(r) -> str:
    """Why a claim could not be measured (e.g. a second model is needed), if it says."""
    return r.details.get("note", "") if isinstance(r.details, dict) else ""


def _html(df: pd.DataFrame, figs: dict[str, bytes], flips: list[str]) -> str:
    rows = []
    for r in df.itertuples():
        ctrl = "" if pd.isna(r.control_percentile) else f"{r.control_percentile:.0f}"
        rows.append(
            f"<tr class='{r.verdict.lower()}'><td>{html.escape(r.id)}</td><td>{html.escape(r.model)}</td>"
            f"<td>{html.escape(r.statement)}<br><i>{html.escape(_note(r))}</i></td><td>{r.effect:+.1f}</td>"
            f"<td>[{r.ci_low:+.1f}, {r.ci_high:+.1f}]</td>"
            f"<td>{r.direction} {r.threshold:.1f}</td><td>{r.p_value:.3g}</td><td>{r.p_holm:.3g}</td><td>{ctrl}</td>"
            f"<td><b>{r.verdict}</b> ({html.escape(str(r.point_verdict))})</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "claim",
            "model",
            "statement",
            "effect (pts)",
            "95% CI",
            "threshold",
            "p",
            "p (Holm)",
            "control pct",
            "verdict",
        )
    )
    images = "".join(
        f"<img alt='{n}' src='data:image/png;base64,{base64.b64encode(b).decode()}'/>" for n, b in figs.items()
    )
    flipped = "".join(f"<li>{html.escape(f)}</li>" for f in flips) or "<li>none</li>"
    style = (
        "<style>.supported td{background:#e6f4e6}.refuted td{background:#f8e0e0}"
        ".inconclusive td{background:#f6f3df}</style>"
    )
    return (
        f"{style}<h2>Claims</h2><table><tr>{head}</tr>{''.join(rows)}</table>"
        f"<h3>Verdicts changed since the previous run</h3><ul>{flipped}</ul><h2>Figures</h2>{images}"
    )


def _finding(r) -> str:
    """One sentence per claim: the statement, the verdict and the numbers behind it."""
    pct = r.control_percentile
    control = "" if pd.isna(pct) else f"; the effect sits at percentile {pct:.0f} of the control"
    return (
        f"**{r.id}** {r.verdict.lower()}: {r.statement}. Measured {r.effect:+.1f} points "
        f"(95% CI {r.ci_low:+.1f} to {r.ci_high:+.1f}) against a threshold of {r.direction} than {r.threshold:.1f}"
        f" (p = {r.p_value:.2g}, Holm {r.p_holm:.2g}){control}." + (f" Not measurable: {_note(r)}." if _note(r) else "")
    )


def _summary_md(df: pd.DataFrame, runs: dict, tables: dict, flips: list[str], late: dict) -> str:
    lines = ["# Experiment summary", ""]
    for name, run in runs.items():
        lines += [
            f"## {name}",
            "",
            f"- Problems: {len(run.problems)}; baseline accuracy {run.baseline.mean():.1%}.",
            f"- Critical heads ({'named by the user' if run.heads else 'top of the discovery ranking'}): "
            + ", ".join(map(str, run.critical_heads(3)))
            + f"; hub position {run.hub}."
            + (
                f" The discovery ranking's top 3: {', '.join(map(str, top_heads(run.ranking, 3)))}."
                if run.heads
                else ""
            ),
            "",
            "Verdicts: "
            + ", ".join(f"{(df[df.model == name].verdict == v).sum()} {v.lower()}" for v in VERDICTS)
            + ".",
            "",
            "| claim | effect (points) | 95% CI | threshold | verdict | seed criterion |",
            "|---|---|---|---|---|---|",
        ]
        for r in df[df.model == name].itertuples():
            ci = f"[{r.ci_low:+.1f}, {r.ci_high:+.1f}]"
            threshold = f"{r.direction} {r.threshold:.1f}"
            lines.append(f"| {r.id} | {r.effect:+.1f} | {ci} | {threshold} | {r.verdict} | {r.point_verdict} |")
        lines += ["", "What was found:", ""]
        lines += [f"- {_finding(r)}" for r in df[df.model == name].itertuples()]
        lines.append("")
    sections = [
        ("Head ablation (accuracy, %)", "ablation"),
        ("Noise at each thought (drop, points)", "positions"),
        ("Attention patterns of the top-3 heads (accuracy, %)", "patterns"),
    ]
    lines += ["## Experiments", ""]
    for title, key in sections:
        if key in tables:
            lines += [f"### {title}", "", tables[key].round(1).to_markdown(index=False), ""]
    for key, section in late.items():
        lines += [f"### {section.title}", "", f"`{key}.csv`:", "", section.table.round(3).to_markdown(index=False), ""]
    lines += ["## Verdicts changed since the previous run", ""]
    lines += [f"- {f}" for f in flips] or ["- none"]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, results: list, runs: dict) -> Written:
    directory.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([r.as_row() for r in results]).sort_values(["model", "phase", "id"], kind="stable")
    df = df.reset_index(drop=True)
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["model", "phase"]).groups.items():
        df.loc[idx, "p_holm"] = holm(df.loc[idx, "p_value"].tolist())
    records = json.loads(df.to_json(orient="records"))
    (directory / "claims.json").write_text(json.dumps(records, indent=2) + "\n")
    df[COLUMNS].to_csv(directory / "claims.csv", index=False)
    flips = []
    previous = _previous_claims(directory)
    if previous:
        before = {(c["id"], c["model"]): c["verdict"] for c in previous}
        flips = [f"{r.id} on {r.model}: {before[(r.id, r.model)]} -> {r.verdict}" for r in df.itertuples()
                 if (r.id, r.model) in before and before[(r.id, r.model)] != r.verdict]  # fmt: skip
    runs = {name: run for name, run in runs.items() if name in set(df.model)}
    metrics = {name: set(df[df.model == name].metric) for name in runs}
    tables = {k: v for k, v in _experiment_tables(runs, metrics).items() if v.shape[1] > 1}  # phase 1's, if run
    for key, table in tables.items():
        table.to_csv(directory / f"{key}.csv", index=False)
    for name, run in runs.items():
        if "ranking" in vars(run):  # computed (a cached_property) by this run's claims
            run.ranking.to_csv(directory / f"ranked_heads_{name}.csv", index=False)
    figs = _figures(tables, list(runs)) if tables else {}
    late = late_sections(runs, metrics)
    for key, section in late.items():
        section.table.to_csv(directory / f"{key}.csv", index=False)
        figs.update(section.figures)
    for name, data in figs.items():
        (directory / name).write_bytes(data)
    (directory / "summary.md").write_text(_summary_md(df, runs, tables, flips, late))
    point_latest(directory)
    lines = [
        f"{r.verdict:12s} {r.id:32s} {r.model:12s} effect {r.effect:+6.1f} [{r.ci_low:+.1f}, {r.ci_high:+.1f}]"
        for r in df.itertuples()
    ]
    lines += [f"  {r.id} on {r.model}: {_note(r)}" for r in df.itertuples() if _note(r)]
    lines += [f"verdict changed: {f}" for f in flips]
    return Written(directory, _html(df, figs, flips), lines)
