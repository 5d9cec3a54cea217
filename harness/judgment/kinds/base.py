"""What every experiment kind is made of: typed parameters validated at load, a measurement,
and a report section.

A kind's parameters are a frozen dataclass whose fields and defaults are written once. A
claim's `experiment` table is checked against them before any model loads: an unknown key
(with a did-you-mean hint), a wrong type, a value outside its choices, a setting that would be
ignored (e.g. `layer` without `scope = "layer"`) is a `ClaimError` naming the claim and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from statsmodels.stats.proportion import proportion_confint

from harness.runtime.arch import Head, HeadGeometry, SiteError, check_heads
from harness.runtime.positions import PositionError, check_position
from harness.statistics.effects import MEASURES, PairedEffect
from harness.statistics.verdicts import ClaimResult, what_ran

if TYPE_CHECKING:
    from harness.interventions.specs import Spec
    from harness.measures.runner import ModelRun


RANDOM_MODES = ("noise", "resample")  # modes measured over independent draws


class ClaimError(ValueError):
    """A malformed claim (registry entry or Python claim); the message names claim and key."""


def choices(*values: str, default: Any = dataclasses.MISSING) -> Any:
    """A field that takes one of `values`."""
    return field(default=default, metadata={"choices": values})


def close_hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` read from TOML as type `hint` (int, float, bool, str, tuple[str, ...],
    fixed-length tuples, and `X | None`), else a `ClaimError`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ClaimError(f"{where} must be a list, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ClaimError(f"{where} must be a list of {len(args)} items, got {value!r}")
        inner = args[0]
        return tuple(coerce(v, inner, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ClaimError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClaimError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClaimError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ClaimError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported parameter type {hint!r}")


@dataclass(frozen=True)
class Params:
    """Base of every kind's parameters. Fields named `heads` hold head names (`L2H3`), fields
    named `positions` hold position names; both are checked against each model at session
    start (`check_model`)."""

    @classmethod
    def from_table(cls, table: dict, where: str) -> Params:
        names = [f.name for f in dataclasses.fields(cls)]
        hints = typing.get_type_hints(cls)
        for key in table:
            if key not in names:
                takes = ", ".join(names) or "no keys"
                raise ClaimError(
                    f"{where}: unknown experiment key {key!r}{close_hint(key, names)}; this kind takes {takes}"
                )
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in table:
                if f.default is dataclasses.MISSING:
                    raise ClaimError(f"{where}: experiment key {f.name!r} is required")
                continue
            value = coerce(table[f.name], hints[f.name], f"{where}: experiment key {f.name!r}")
            allowed = f.metadata.get("choices")
            items = value if isinstance(value, tuple) else (value,)
            bad = [v for v in items if allowed and v is not None and v not in allowed]
            if bad:
                raise ClaimError(
                    f"{where}: experiment key {f.name!r} is {bad[0]!r}{close_hint(str(bad[0]), list(allowed))}; "
                    f"choose from {', '.join(allowed)}"
                )
            values[f.name] = value
        params = cls(**values)
        try:
            if "heads" in values:
                for name in values["heads"]:
                    Head.parse(name)
            for name in values.get("positions", ()):
                check_position(name, n_latent=10**6)  # CT<i> against the model in `check_model`
            params.validate(set(table))
        except (SiteError, PositionError, ValueError) as e:
            raise ClaimError(f"{where}: {e}") from None
        return params

    def validate(self, given: set[str]) -> None:
        """Cross-field rules (raise ValueError); `given` are the keys the claim wrote."""

    def check_direction(self, direction: str) -> None:
        """Refuse (ValueError) a claim direction these parameters cannot judge."""

    def check_measure(self, measure: str) -> None:
        """Refuse (ValueError) a measure these parameters cannot take (the kind's own list is
        checked before)."""

    def check_model(self, geo: HeadGeometry, n_latent: int, model: str) -> None:
        """Named heads and positions exist in `model` (raise ValueError)."""
        heads = [Head.parse(h) for h in getattr(self, "heads", ())]
        check_heads(heads, geo, model)
        for name in getattr(self, "positions", ()):
            check_position(name, n_latent)

    def unused(self) -> set[str]:
        """Parameters that do not act given the others (named heads make the ranking moot; a
        deterministic mode has no draws): left out of `describe`, so a listing shows what runs."""
        out = set()
        if getattr(self, "heads", ()):
            out |= {"n_heads", "ranking"}
        if hasattr(self, "n_draws") and getattr(self, "mode", None) not in RANDOM_MODES:
            out.add("n_draws")
        return out

    def describe(self) -> dict:
        """Every parameter that acts, defaults filled in (for --list-claims and the report)."""
        unused = self.unused()
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if k not in unused
        }


def forbid_together(given: set[str], *groups: tuple[str, ...]) -> None:
    """At most one of each group of keys given (a second would be ignored)."""
    for group in groups:
        both = [k for k in group if k in given]
        if len(both) > 1:
            raise ValueError(f"give {' or '.join(repr(k) for k in group)}, not both: one would be ignored")


@dataclass
class Measured:
    """A kind's measurement: the effect, what was run and the numbers its section draws
    (`details`: `heads`, `positions`, `mode` are shown in every claim row), and the control
    distribution where the claim has one."""

    effect: PairedEffect
    details: dict
    null: list[float] | None = None
    bootstrap: np.ndarray | None = None  # resampled effects: p is then the share against the claim
    main: Spec | None = None  # the claim's own intervention (error analysis); None: the first measured


@dataclass
class Section:
    """A kind's part of the report: CSVs, figures, a title for summary.md. The report writes
    each figure as `<name>.png` and `<name>.svg`."""

    title: str
    tables: dict[str, pd.DataFrame]  # CSV name (no extension) -> table
    figures: dict[str, Figure] = field(default_factory=dict)  # file name (no extension) -> figure


@dataclass(frozen=True)
class Kind:
    """One experiment kind: `measure(params, run, measure)` and `section(results, runs)`."""

    metric: str  # the name claims use (`metric = "..."`)
    params: type[Params]
    measure: Callable[[Any, ModelRun, str], Measured]
    section: Callable[[list[ClaimResult], dict[str, ModelRun]], Section | None]
    summary: str  # one line: what it measures
    measures: tuple[str, ...] = MEASURES
    baseline_relative: bool = False  # the effect is a drop from baseline accuracy (threshold_of_baseline)
    error_analysis: bool = True  # a claim has one intervention of its own, broken down by problem type
    effect_unit: str = "a drop from baseline"  # what the effect is, when it is not such a drop


def nan_effect(n: int, test: str = "") -> PairedEffect:
    nan = float("nan")
    return PairedEffect(nan, nan, nan, nan, n, test)


def by_model(results: list[ClaimResult]) -> dict[str, list[ClaimResult]]:
    out: dict[str, list[ClaimResult]] = {}
    for r in results:
        out.setdefault(r.model, []).append(r)
    return out


def mean_drop(reference: np.ndarray, treated: np.ndarray, measure: str) -> float:
    """The drop alone (points or nats), for control distributions that need no CI."""
    scale = 100.0 if measure == "accuracy" else 1.0
    return scale * float(np.mean(reference) - np.mean(treated))


def wilson_err(accuracy, n) -> np.ndarray:
    """Error bars [2, K] of accuracies (%) over `n` problems each: the 95% Wilson interval."""
    acc = np.asarray(accuracy, dtype=float)
    low, high = proportion_confint(np.round(acc * np.asarray(n) / 100), np.asarray(n), method="wilson")
    return np.maximum(np.stack([acc - 100 * low, 100 * high - acc]), 0.0)  # [2, K]; an accuracy off the 1/n grid


def baseline_value(run: ModelRun, measure: str) -> float:
    """Baseline accuracy (%) or mean answer log-probability (nats)."""
    return run.baseline.mean(measure)


def claims_figure(results: list[ClaimResult], title: str) -> Figure:
    """Every claim of a kind: its effect with the 95% CI and its threshold (dashed), one panel
    per measure, each bar labelled with the claim and what it ran (heads, positions, mode),
    coloured by model: the figure every kind has, custom scopes and named heads included."""
    measures = list(dict.fromkeys(r.units for r in results))  # one panel per unit
    width = max(6.0, 1.6 * max(sum(r.units == m for r in results) for m in measures))
    fig = Figure(figsize=(min(width, 12.0), 3.4 * len(measures)), layout="constrained")
    axes = fig.subplots(len(measures), 1, squeeze=False)[:, 0]
    models = list(dict.fromkeys(r.model for r in results))
    for ax, measure in zip(axes, measures):
        rows = [r for r in results if r.units == measure]
        for i, r in enumerate(rows):
            first = r.model not in ax.get_legend_handles_labels()[1]
            ax.bar(i, r.effect, 0.7, color=f"C{models.index(r.model)}", label=r.model if first else None)
            if np.isfinite(r.ci_low):
                ax.errorbar(i, r.effect, yerr=[[r.effect - r.ci_low], [r.ci_high - r.effect]], color="black", capsize=3)
            ax.hlines(r.threshold, i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1)
        labels = ["\n".join([r.id, *(f"{k} {v}" for k, v in what_ran(r.heads, r.positions, r.mode))]) for r in rows]
        ax.set_xticks(np.arange(len(rows)), labels, fontsize=6)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(ylabel=f"effect ({measure})", title=f"{title} (95% CI; dashed: threshold)")
        ax.legend(fontsize=7)
    return fig
