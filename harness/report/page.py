"""The report's page: the forest plot of every claim x model, the claims table, the run
configuration and the figures, as the HTML block pytest-html embeds at the top of its page."""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harness.statistics.effects import UNITS
from harness.statistics.verdicts import refuted_beyond, what_ran

COLOURS = {"SUPPORTED": "#1a7f37", "REFUTED": "#c62828", "INCONCLUSIVE": "#b58900", "NOT JUDGED": "#777777"}
_UNIT_LABEL = {"points": "effect (accuracy points)", "nats": "effect (answer log-prob, nats)"}


def forest_plot(df: pd.DataFrame) -> Figure:
    """Every claim x model with an effect: the effect with its 95% CI, coloured by verdict, with
    the claim's threshold (|) and refute line (:); one panel per unit (points and nats differ).
    A row without an effect (not measured, not judged) has no point and no unit to be drawn
    in: the table lists it with its reason, the figure counts it."""
    left_out = int(df.effect.isna().sum())
    df = df[df.effect.notna()]
    if df.empty:
        fig = Figure(figsize=(10, 1.5), layout="constrained")
        fig.text(0.5, 0.5, f"no claim has an effect to plot ({left_out} without one: see the table)", ha="center")
        return fig
    units = df.unit.where(df.unit != "", df.measure.map(UNITS))  # one panel per unit (points, nats, rho, ...)
    measures = list(dict.fromkeys(units))
    heights = [max(1.5, 0.28 * (units == m).sum() + 0.8) for m in measures]
    total = sum(heights) + 0.9  # title and legend
    fig = Figure(figsize=(10, total), layout="constrained")
    axes = fig.subplots(len(measures), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, measure in zip(axes, measures):
        rows = df[units == measure].reset_index(drop=True)
        y = np.arange(len(rows))[::-1]  # first claim at the top
        for yi, r in zip(y, rows.itertuples()):
            colour = COLOURS.get(r.verdict, "grey")
            if not np.isnan(r.ci_low):
                ax.hlines(yi, r.ci_low, r.ci_high, color=colour, lw=2)
            ax.plot(r.effect, yi, "o", color=colour, ms=5)
            ax.vlines(r.threshold, yi - 0.35, yi + 0.35, color="black", lw=1.5)
            if not np.isnan(r.refute_at) and r.refute_at != r.threshold:
                ax.vlines(r.refute_at, yi - 0.35, yi + 0.35, color="black", lw=1, linestyles=":")
        ax.set_yticks(y, [f"{r.id} · {r.model}" for r in rows.itertuples()], fontsize=8)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlabel(_UNIT_LABEL.get(measure, f"effect ({measure})"))
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", lw=2, label=v.lower()) for v, c in COLOURS.items()]
    handles += [
        Line2D([], [], color="black", marker="|", ls="none", ms=10, label="threshold"),
        Line2D([], [], color="black", ls=":", label="refute line"),
    ]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=5)
    title = "Every claim x model: effect and 95% CI, coloured by verdict"
    if left_out:
        title += f"\n({left_out} without an effect, not measured or not judged: in the table, not here)"
    fig.suptitle(title)
    return fig


def _num(x: float, digits: int) -> str:
    return "—" if pd.isna(x) else f"{x:+.{digits}f}"


def _p(x: float) -> str:
    return "—" if pd.isna(x) else f"{x:.3g}"


def _img(name: str, data: bytes, alt: str) -> str:
    return (
        f"<figure><img id='{html.escape(name)}' alt='{html.escape(alt)}' style='max-width:100%'"
        f" src='data:image/png;base64,{base64.b64encode(data).decode()}'/>"
        f"<figcaption>{html.escape(name)} (also as .svg)</figcaption></figure>"
    )


def _point(point_verdict: str) -> str:
    """The seed's criterion on the point estimate alone, named as such (under INCONCLUSIVE a bare
    "supported" read as a second verdict)."""
    return f"<br><small>point estimate alone: {html.escape(str(point_verdict))}</small>" if point_verdict else ""


def claims_table(df: pd.DataFrame) -> str:
    """One row per claim x model; numbers never wrap, the statement is a second line."""
    head = ["claim", "model", "verdict", "effect", "95% CI", "threshold", "p (test)", "p (Holm)", "n"]
    rows = []
    for r in df.itertuples():
        d = 2 if r.measure == "answer_logprob" else 1
        ran = "; ".join(f"{k}: {v}" for k, v in what_ran(r.heads, r.positions, r.mode))
        note = r.details.get("note", "") if isinstance(r.details, dict) else ""
        unit = r.unit or UNITS.get(r.measure, "")
        beyond = refuted_beyond(r.direction, r.threshold, r.refute_at, d)
        beyond = f"<br><small>{beyond}</small>" if beyond else ""
        rows.append(
            f"<tr class='{r.verdict.lower()}' title='{html.escape(r.statement)}'>"
            f"<td class='nw'><b>{html.escape(r.id)}</b></td><td class='nw'>{html.escape(r.model)}</td>"
            f"<td class='nw'><b>{r.verdict}</b>{_point(r.point_verdict)}</td>"
            f"<td class='nw num'>{_num(r.effect, d)} <small>{unit}</small></td>"
            f"<td class='nw num'>[{_num(r.ci_low, d)}, {_num(r.ci_high, d)}]</td>"
            f"<td class='nw num'>{r.direction} {r.threshold:.{d}f}{beyond}</td>"
            f"<td class='nw num'>{_p(r.p_value)}<br><small>{html.escape(r.p_test)}</small></td>"
            f"<td class='nw num'>{_p(r.p_holm)}</td><td class='nw num'>{r.n}</td></tr>"
            f"<tr class='{r.verdict.lower()} statement'><td colspan='{len(head)}'><small>{html.escape(r.statement)}"
            + (f" <b>Ran:</b> {html.escape(ran)}." if ran else "")
            + (f" <i>Not measurable: {html.escape(note)}</i>" if note else "")
            + "</small></td></tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return f"<table class='codi-claims'><tr>{header}</tr>{''.join(rows)}</table>"


def run_block(run: dict) -> str:
    """The run configuration as a definition list (the same block as claims.json's `run`)."""
    items = [
        ("run", run["id"]),
        ("seed", run["seed"]),
        ("device / dtype", f"{run['device']} / {run['dtype']}" + (" (reference batching)" * run["reference_batching"])),
        ("versions", ", ".join(f"{k} {v}" for k, v in run["versions"].items())),
        ("data", "; ".join(run["data"])),
        ("registry", f"{run['registry']} ({run['registry_hash']})"),
        ("Python claims", run.get("claim_code_hash")),
    ]  # fmt: skip
    for name, m in run["models"].items():
        baseline = "not measured" if m["baseline_accuracy"] is None else f"{m['baseline_accuracy']:.1f}%"
        heads = ", ".join(m["heads"]) + f" ({m['heads_from']})" if m["heads"] else "not computed by this run"
        items.append(
            (
                name,
                f"fingerprint {m['fingerprint']}, n = {m['n']}, baseline accuracy {baseline}, "
                f"critical heads {heads}, hub {m['hub'] or 'not computed by this run'}",
            )
        )
    return (
        "<dl class='codi-run'>"
        + "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
        + "</dl>"
    )


STYLE = """<style>
body{display:flex;flex-direction:column;color:#111}
body>h1{order:-3} body>p{order:-2} body>.summary{order:-1}
.codi{color:#111;font-size:13px} .codi h2{margin-top:1.2em}
.codi-claims{border-collapse:collapse}
.codi-claims td,.codi-claims th{padding:2px 6px;vertical-align:top;text-align:left}
.codi-claims .nw{white-space:nowrap} .codi-claims .num{font-variant-numeric:tabular-nums}
.codi-claims tr.statement td{border-bottom:1px solid #ccc;padding-bottom:4px}
.codi-claims .supported td{background:#e6f4e6} .codi-claims .refuted td{background:#f8e0e0}
.codi-claims .inconclusive td{background:#f6f3df}
.codi-run dt{font-weight:bold;float:left;clear:left;width:11em} .codi-run dd{margin-left:12em}
span.inconclusive{color:#b58900}
</style>"""


def page(df: pd.DataFrame, run: dict, images: dict[str, bytes], flips: list[str], compared: str) -> str:
    """The block at the top of the page: forest plot, claims table, comparison, run, figures."""
    forest = images.get("forest.png")
    others = {name: data for name, data in images.items() if name != "forest.png"}
    figures = "".join(_img(name, data, name.removesuffix(".png")) for name, data in others.items())
    flipped = "".join(f"<li>{html.escape(f)}</li>" for f in flips) or "<li>none</li>"
    return (
        f"{STYLE}<div class='codi'>"
        + (_img("forest.png", forest, "forest plot: every claim's effect with its 95% CI") if forest else "")
        + f"<h2>Claims</h2>{claims_table(df)}"
        f"<h2>Verdicts changed</h2><p>{html.escape(compared)}</p><ul>{flipped}</ul>"
        f"<h2>Run configuration</h2>{run_block(run)}"
        f"<h2>Figures</h2>{figures}</div>"
    )
