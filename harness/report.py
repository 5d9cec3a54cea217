"""The claim report: claims.json / claims.csv, the seed's CSVs, figures, summary.md, and the
HTML block pytest-html embeds; `reports/latest` points at the newest run."""

from __future__ import annotations

import base64
import html
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.data import PROJECT_ROOT
from harness.discovery import top_heads
from harness.kinds import KINDS, Section
from harness.stats import UNITS, holm
from harness.verdicts import VERDICTS, ClaimResult, what_ran

REPORTS_DIR = PROJECT_ROOT / "reports"
COLUMNS = ["id", "phase", "model", "statement", "metric", "measure", "heads", "positions", "mode", "n", "baseline",
           "effect", "ci_low", "ci_high", "threshold", "direction", "p_value", "p_test", "p_holm",
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


def _note(r) -> str:
    """Why a claim could not be measured (e.g. a second model is needed), if it says."""
    return r.details.get("note", "") if isinstance(r.details, dict) else ""


def _fmt(x: float, digits: int = 1) -> str:
    return "" if pd.isna(x) else f"{x:+.{digits}f}"


def _html(df: pd.DataFrame, figs: dict[str, bytes], flips: list[str]) -> str:
    rows = []
    for r in df.itertuples():
        ctrl = "" if pd.isna(r.control_percentile) else f"{r.control_percentile:.0f}"
        digits = 2 if r.measure == "answer_logprob" else 1
        ran = "; ".join(f"{k}: {html.escape(v)}" for k, v in what_ran(r.heads, r.positions, r.mode))
        rows.append(
            f"<tr class='{r.verdict.lower()}'><td>{html.escape(r.id)}</td><td>{html.escape(r.model)}</td>"
            f"<td>{html.escape(r.statement)}<br><small>{ran}</small><br><i>{html.escape(_note(r))}</i></td>"
            f"<td>{html.escape(r.measure)} ({UNITS.get(r.measure, '')})</td><td>{r.n}</td>"
            f"<td>{_fmt(r.effect, digits)}</td><td>[{_fmt(r.ci_low, digits)}, {_fmt(r.ci_high, digits)}]</td>"
            f"<td>{r.direction} {r.threshold:.{digits}f}</td><td>{r.p_value:.3g} <small>{html.escape(r.p_test)}</small>"
            f"</td><td>{r.p_holm:.3g}</td><td>{ctrl}</td>"
            f"<td><b>{r.verdict}</b> ({html.escape(str(r.point_verdict))})</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "claim",
            "model",
            "statement / what was run",
            "measure",
            "n",
            "effect",
            "95% CI",
            "threshold",
            "p (test)",
            "p (Holm)",
            "control pct",
            "verdict",
        )  # fmt: skip
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
    """One sentence per claim: the statement, what was run, the verdict and the numbers."""
    pct = r.control_percentile
    control = "" if pd.isna(pct) else f"; the effect sits at percentile {pct:.0f} of the control"
    units = UNITS.get(r.measure, "")
    digits = 2 if r.measure == "answer_logprob" else 1
    ran = ", ".join(f"{k} {v}" for k, v in what_ran(r.heads, r.positions, r.mode))
    return (
        f"**{r.id}** {r.verdict.lower()}: {r.statement}. Measured {r.effect:+.{digits}f} {units} of {r.measure} "
        f"(95% CI {r.ci_low:+.{digits}f} to {r.ci_high:+.{digits}f}; n = {r.n}"
        + (f"; {ran}" if ran else "")
        + f") against a threshold of {r.direction} than {r.threshold:.{digits}f}"
        f" ({r.p_test} p = {r.p_value:.2g}, Holm {r.p_holm:.2g}){control}."
        + (f" Not measurable: {_note(r)}." if _note(r) else "")
    )


def _summary_md(df: pd.DataFrame, runs: dict, flips: list[str], sections: dict[str, Section]) -> str:
    lines = ["# Experiment summary", ""]
    for name in dict.fromkeys(df.model):
        run = runs.get(name)
        lines += [f"## {name}", ""]
        if run is not None:
            lines += [
                f"- Problems: {len(run.problems)}; baseline accuracy {run.baseline.accuracy:.1%}.",
                f"- Critical heads ({'named by the user' if run.heads else 'top of the discovery ranking'}): "
                + ", ".join(map(str, run.critical_heads(3)))
                + f"; hub position {run.hub}."
                + (
                    f" The discovery ranking's top 3: {', '.join(map(str, top_heads(run.ranking, 3)))}."
                    if run.heads
                    else ""
                ),
                "",
            ]
        lines += [
            "Verdicts: "
            + ", ".join(f"{(df[df.model == name].verdict == v).sum()} {v.lower()}" for v in VERDICTS)
            + ".",
            "",
            "| claim | measure | what was run | effect | 95% CI | threshold | verdict | seed criterion |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in df[df.model == name].itertuples():
            ci = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
            ran = "; ".join(v for _, v in what_ran(r.heads, r.positions, r.mode))
            lines.append(
                f"| {r.id} | {r.measure} | {ran} | {r.effect:+.2f} | {ci} | {r.direction} {r.threshold:.2f} "
                f"| {r.verdict} | {r.point_verdict} |"
            )
        lines += ["", "What was found:", ""]
        lines += [f"- {_finding(r)}" for r in df[df.model == name].itertuples()]
        lines.append("")
    lines += ["## Experiments", ""]
    for section in sections.values():
        lines += [f"### {section.title}", ""]
        for key, table in section.tables.items():
            lines += [f"`{key}.csv`:", "", table.round(3).to_markdown(index=False), ""]
    lines += ["## Verdicts changed since the previous run", ""]
    lines += [f"- {f}" for f in flips] or ["- none"]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, results: list[ClaimResult], runs: dict) -> Written:
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
    sections: dict[str, Section] = {}
    for metric, kind in KINDS.items():  # each kind's section, from what its claims measured
        measured = [r for r in results if r.metric == metric and r.model in runs]
        if measured:
            sections[metric] = kind.section(measured, runs)
    figs: dict[str, Figure] = {}
    for section in sections.values():
        for key, table in section.tables.items():
            table.to_csv(directory / f"{key}.csv", index=False)
        figs.update(section.figures)
    for name, run in runs.items():
        if "ranking" in vars(run):  # computed (a cached_property) by this run's claims
            run.ranking.to_csv(directory / f"ranked_heads_{name}.csv", index=False)
    images = {}
    for name, fig in figs.items():  # PNG for the page, SVG (vector) for papers and slides
        fig.savefig(directory / f"{name}.svg", bbox_inches="tight")
        fig.savefig(directory / f"{name}.png", dpi=110, bbox_inches="tight")
        images[f"{name}.png"] = (directory / f"{name}.png").read_bytes()
    (directory / "summary.md").write_text(_summary_md(df, runs, flips, sections))
    point_latest(directory)
    lines = []
    for r in df.itertuples():
        d = 2 if r.measure == "answer_logprob" else 1
        lines.append(
            f"{r.verdict:12s} {r.id:32s} {r.model:12s} effect {r.effect:+6.{d}f} "
            f"[{r.ci_low:+.{d}f}, {r.ci_high:+.{d}f}] {UNITS.get(r.measure, '')}"
        )
    lines += [f"  {r.id} on {r.model}: {_note(r)}" for r in df.itertuples() if _note(r)]
    lines += [f"verdict changed: {f}" for f in flips]
    return Written(directory, _html(df, images, flips), lines)
