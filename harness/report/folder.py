"""The claim report: claims.json (`{"run": ..., "claims": [...]}`), claims.csv, each kind's CSVs
and figures (PNG and SVG), the error analysis, summary.md, and the HTML block pytest-html
embeds; `reports/latest` points at the newest run, older run folders are pruned."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.data.problems import WORK_ROOT
from harness.judgment import error_analysis
from harness.judgment.kinds import KINDS, Section
from harness.judgment.kinds.base import claims_figure
from harness.report.page import forest_plot, page
from harness.report.runinfo import COMPARABLE, MODEL_COMPARABLE, same_configuration
from harness.statistics.effects import UNITS, holm
from harness.statistics.verdicts import NOT_JUDGED_VERDICT, VERDICTS, ClaimResult, criterion, what_ran

REPORTS_DIR = WORK_ROOT / "reports"
KEEP_REPORTS = 20
COLUMNS = ["id", "phase", "model", "statement", "metric", "measure", "heads", "positions", "mode", "n", "baseline",
           "effect", "ci_low", "ci_high", "threshold", "refute_at", "direction", "p_value", "p_test", "p_holm",
           "control_percentile", "verdict", "point_verdict", "note"]  # fmt: skip


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


def prune_reports(root: Path, keep: int, current: Path) -> list[Path]:
    """Delete all but the newest `keep` run folders under `root` (never `current`): a nightly
    job's reports do not pile up. Only folders a run made (named by its start time) go."""
    runs = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name[:8].isdigit())
    old = [p for p in runs if p != current][: max(0, len(runs) - max(keep, 1))]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def read_claims(directory: Path) -> dict:
    """A report's claims.json as `{"run": ..., "claims": [...]}` (reports from before the run
    block held the list alone: their `run` is empty)."""
    data = json.loads((Path(directory) / "claims.json").read_text())
    return {"run": {}, "claims": data} if isinstance(data, list) else data


def _earlier_runs(directory: Path) -> list[Path]:
    """Run folders beside `directory` holding a report, newest first."""
    parent = directory.parent
    runs = [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink() and p != directory]
    runs = [p for p in runs if (p / "claims.json").exists()]
    return sorted(runs, key=lambda p: (p / "claims.json").stat().st_mtime, reverse=True)


def compare(df: pd.DataFrame, run: dict, directory: Path, compare_to: Path | None) -> tuple[list[str], str, list[str]]:
    """Verdicts that changed, a sentence saying what they were compared with, and the runs used.

    By default each claim x model is compared with the newest earlier run of the same
    configuration (model fingerprints, data hash, n, seed, device, dtype, registry hash) that
    measured it, so neither an ad-hoc run nor a `-k` subset in between hides or fakes a flip;
    `compare_to` names one run instead."""
    # a row that was not judged, now or then, has no verdict to flip (its model failed the floor)
    rows = {(r.id, r.model): r.verdict for r in df.itertuples() if r.verdict != NOT_JUDGED_VERDICT}
    before: dict[tuple[str, str], tuple[str, str]] = {}  # claim -> (verdict, run id)
    if compare_to is not None:
        earlier = read_claims(compare_to)
        candidates = [(compare_to, earlier)]
        if earlier["run"] and not same_configuration(run, earlier["run"]):
            note = f" (its configuration differs: {', '.join(_differences(run, earlier['run']))})"
        else:
            note = ""
        said = f"Compared with {compare_to}{note}, as --compare-to asked."
    else:
        candidates = []
        for path in _earlier_runs(directory):
            try:
                earlier = read_claims(path)
            except (json.JSONDecodeError, OSError):
                continue
            if earlier["run"] and same_configuration(run, earlier["run"]):
                candidates.append((path, earlier))
        said = ""
    for path, earlier in candidates:
        for c in earlier["claims"]:
            key = (c["id"], c["model"])
            if key in rows and key not in before and c["verdict"] != NOT_JUDGED_VERDICT:
                before[key] = (c["verdict"], path.name)
    used = list(dict.fromkeys(name for _, name in before.values()))
    if not said:
        said = (
            "Compared with the newest earlier run of the same configuration that measured each claim: "
            + ", ".join(used)
            + "."
            if used
            else "No earlier run of the same configuration measured these claims: nothing to compare with."
        )
    flips = [f"{i} on {m}: {before[(i, m)][0]} -> {v} (vs {before[(i, m)][1]})"
             for (i, m), v in rows.items() if (i, m) in before and before[(i, m)][0] != v]  # fmt: skip
    return flips, said, used


def _differences(a: dict, b: dict) -> list[str]:
    out = [k for k in COMPARABLE if a.get(k) != b.get(k)]
    for name, m in a.get("models", {}).items():
        other = b.get("models", {}).get(name)
        if other is None:
            out.append(f"{name} absent")
        else:
            out += [f"{name} {k}" for k in MODEL_COMPARABLE if m.get(k) != other.get(k)]
    return out or ["models"]


def _plain(value):
    """JSON-ready: numpy scalars as Python numbers at full precision, NaN as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rounded(x: float) -> float:
    """3 significant digits, and never finer than needed at 0.1 above 100 (60.099999 -> 60.1)."""
    if x is None or not isinstance(x, float) or not math.isfinite(x) or x == 0:
        return x
    return round(x, 1) if abs(x) >= 100 else float(f"{x:.3g}")


def round_table(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].map(rounded)
    return out


@dataclass
class Written:
    directory: Path
    html: str
    lines: list[str]
    flips: list[str]  # verdicts changed against the baseline (`--fail-on-flip` reads them)


def _note(r) -> str:
    """Why a claim could not be measured (e.g. a second model is needed), if it says."""
    return r.details.get("note", "") if isinstance(r.details, dict) else ""


def _finding(r) -> str:
    """One sentence per claim: the statement, what was run, the verdict and the numbers."""
    pct = r.control_percentile
    control = "" if pd.isna(pct) else f"; the effect sits at percentile {pct:.0f} of the control"
    units = r.unit or UNITS.get(r.measure, "")
    digits = 2 if r.measure == "answer_logprob" else 1
    ran = ", ".join(f"{k} {v}" for k, v in what_ran(r.heads, r.positions, r.mode))
    if math.isnan(r.effect):
        return f"**{r.id}** {r.verdict.lower()}: {r.statement}. Not measured: {_note(r) or 'no effect'}."
    return (
        f"**{r.id}** {r.verdict.lower()}: {r.statement}. Measured {r.effect:+.{digits}f} {units}"
        + ("" if r.unit else f" of {r.measure}")
        + f" (95% CI {r.ci_low:+.{digits}f} to {r.ci_high:+.{digits}f}; n = {r.n}"
        + (f"; {ran}" if ran else "")
        + f") against a threshold of {criterion(r.direction, r.threshold, r.refute_at, digits)}"
        f" ({r.p_test} p = {r.p_value:.2g}, Holm {r.p_holm:.2g}){control}."
        + (f" Not measurable: {_note(r)}." if _note(r) else "")
    )


def _affected_sentence(by_type: pd.DataFrame, model: str) -> str:
    """The problem type the claims' interventions hurt most on `model`, with its drop and CI."""
    if not len(by_type):
        return "Error analysis: no condition had problem types with enough problems to break down."
    rows = by_type[(by_type.model == model) & (by_type.measure == "accuracy") & by_type.main]  # claims' own conditions
    top = error_analysis.most_affected(rows.to_dict("records"))
    if top is None:
        return "Error analysis: under no claim's intervention does a problem type drop with a CI excluding zero."
    return (
        f"Error analysis: of the claims' interventions, the problem type hurt most is {top['dimension']} = "
        f"{top['type']} under {top['condition']} (claim {top['claim']}): "
        f"accuracy {top['baseline']:.1f}% -> {top['treated']:.1f}%, a drop of "
        f"{top['drop']:+.1f} points (95% CI {top['ci_low']:+.1f} to {top['ci_high']:+.1f}; n = {top['n']})."
    )


def _summary_md(df, run: dict, flips: list[str], said: str, sections: dict[str, Section], by_type) -> str:
    lines = [f"# CODI claims — {run['id']}", "", "## Run configuration", ""]
    lines += [f"- seed {run['seed']}; device {run['device']}; dtype {run['dtype']}"
              + ("; reference batching" if run["reference_batching"] else ""),
              f"- versions: {', '.join(f'{k} {v}' for k, v in run['versions'].items())}",
              f"- data: {'; '.join(run['data'])}",
              f"- registry: {run['registry']} ({run['registry_hash']}); Python claims {run.get('claim_code_hash')}",
              ""]  # fmt: skip
    for name in dict.fromkeys(df.model):
        m = run["models"].get(name, {})
        lines += [f"## {name}", ""]
        if m:
            heads = ", ".join(m["heads"]) + f" ({m['heads_from']})" if m.get("heads") else "not computed by this run"
            base = "not measured" if m.get("baseline_accuracy") is None else f"{m['baseline_accuracy']:.1f}%"
            lines += [
                f"- fingerprint {m['fingerprint']}; n = {m['n']}; baseline accuracy {base}; critical heads "
                f"{heads}; hub {m.get('hub') or 'not computed by this run'}.",
                "",
            ]
        lines += [
            "Verdicts: "
            + ", ".join(f"{(df[df.model == name].verdict == v).sum()} {v.lower()}" for v in VERDICTS)
            + ".",
            "",
            "| claim | measure | what was run | effect | 95% CI | threshold | verdict | point estimate alone |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in df[df.model == name].itertuples():
            measured = not math.isnan(r.effect)
            effect = f"{r.effect:+.2f}" if measured else f"not measured: {_note(r) or 'no effect'}"
            ci = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]" if measured else "—"
            ran = "; ".join(v for _, v in what_ran(r.heads, r.positions, r.mode))
            needs = criterion(r.direction, r.threshold, r.refute_at)
            lines.append(
                f"| {r.id} | {r.measure} | {ran} | {effect} | {ci} | {needs} | {r.verdict} | {r.point_verdict} |"
            )
        lines += ["", "What was found:", ""]
        lines += [f"- {_finding(r)}" for r in df[df.model == name].itertuples()]
        lines += ["", _affected_sentence(by_type, name), ""]
    lines += ["## Experiments", ""]
    for section in sections.values():
        lines += [f"### {section.title}", ""]
        for key, table in section.tables.items():
            lines += [f"`{key}.csv`:", "", round_table(table).to_markdown(index=False), ""]
    lines += ["## Verdicts changed", "", said, ""]
    lines += [f"- {f}" for f in flips] or ["- none"]
    return "\n".join(lines) + "\n"


def _by_type_table(results: list[ClaimResult]) -> pd.DataFrame:
    rows = [{"model": r.model, "claim": r.id, "main": row["condition"] == r.details.get("condition"), **row}
            for r in results for row in r.details.get("by_type", [])]  # fmt: skip
    table = pd.DataFrame(rows)
    if len(table):  # a condition shared by several claims is one set of rows
        table = table.sort_values("main", ascending=False, kind="stable")  # a claim's own condition first
        table = table.drop_duplicates(subset=["model", "condition", "measure", "dimension", "type"]).sort_index()
    return table


def write_report(
    directory: Path, results: list[ClaimResult], runs: dict, run: dict, compare_to: Path | None = None
) -> Written:
    """Every file of the report for `results`, measured by `runs` under configuration `run`."""
    directory.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([r.as_row() for r in results]).sort_values(["model", "phase", "id"], kind="stable")
    df = df.reset_index(drop=True)
    df["p_holm"] = np.nan
    df["note"] = [_note(r) for r in df.itertuples()]  # why a row has no effect (claims.csv)
    for _, idx in df.groupby(["model", "phase"]).groups.items():
        df.loc[idx, "p_holm"] = holm(df.loc[idx, "p_value"].tolist())
    flips, said, used = compare(df, run, directory, compare_to)
    run = {**run, "compared_with": [str(compare_to)] if compare_to else used}
    records = [_plain(record) for record in df.to_dict("records")]
    for record in records:  # per-type rows live in by_type.csv
        record["details"].pop("by_type", None)
    (directory / "claims.json").write_text(json.dumps({"run": run, "claims": records}, indent=2) + "\n")
    round_table(df[COLUMNS]).to_csv(directory / "claims.csv", index=False)
    runs = {name: r for name, r in runs.items() if name in set(df.model)}
    sections: dict[str, Section] = {}
    for metric, kind in KINDS.items():  # each kind's section, from what its claims measured
        measured = [r for r in results if r.metric == metric and r.model in runs and r.verdict != NOT_JUDGED_VERDICT]
        if measured:
            sections[metric] = kind.section(measured, runs)
            sections[metric].figures[f"claims_{metric}"] = claims_figure(measured, sections[metric].title)
    figs: dict[str, Figure] = {"forest": forest_plot(df)}
    for section in sections.values():
        for key, table in section.tables.items():
            round_table(table).to_csv(directory / f"{key}.csv", index=False)
        figs.update(section.figures)
    by_type = _by_type_table(results)
    if len(by_type):
        round_table(by_type).to_csv(directory / "by_type.csv", index=False)
        figure = error_analysis.figure(results)
        if figure is not None:
            figs["by_type"] = figure
    for name, r in runs.items():
        if "ranking" in vars(r):  # computed (a cached_property) by this run's claims
            round_table(r.ranking).to_csv(directory / f"ranked_heads_{name}.csv", index=False)
    images = {}
    for name, fig in figs.items():  # PNG for the page, SVG (vector) for papers and slides
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: editable, 3x smaller
            fig.savefig(directory / f"{name}.svg", bbox_inches="tight")
        fig.savefig(directory / f"{name}.png", dpi=100, bbox_inches="tight")
        images[f"{name}.png"] = (directory / f"{name}.png").read_bytes()
    (directory / "summary.md").write_text(_summary_md(df, run, flips, said, sections, by_type))
    point_latest(directory)
    lines = []
    for r in df.itertuples():
        d = 2 if r.measure == "answer_logprob" else 1
        if math.isnan(r.effect):  # not measured (or not judged): the reason, never "+nan"
            what = "not judged" if r.verdict == NOT_JUDGED_VERDICT else "not measured"
            lines.append(f"{r.verdict:12s} {r.id:32s} {r.model:12s} {what}: {_note(r) or 'no effect'}")
            continue
        lines.append(
            f"{r.verdict:12s} {r.id:32s} {r.model:12s} effect {r.effect:+6.{d}f} "
            f"[{r.ci_low:+.{d}f}, {r.ci_high:+.{d}f}] {r.unit or UNITS.get(r.measure, '')}"
        )
    lines += [f"  {r.id} on {r.model}: {_note(r)}" for r in df.itertuples() if _note(r) and not math.isnan(r.effect)]
    lines.append(said)
    lines += [f"verdict changed: {f}" for f in flips]
    return Written(directory, page(df, run, images, flips, said), lines, flips)
