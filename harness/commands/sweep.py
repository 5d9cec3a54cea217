"""`python -m harness sweep`: every head (or head x thought) alone ablated, in full or raced,
with a gradient screen's estimate beside it; timings and conditions per second."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from harness.commands import USAGE_ERROR

if TYPE_CHECKING:
    from harness.measures.runner import ModelRun


def sweep(args: argparse.Namespace) -> int:
    """`python -m harness sweep`: refuse what the chosen sweep would not read, then run it."""
    import torch

    from harness.data.problems import held_out_splits
    from harness.measures.causal import SCREEN_STEPS
    from harness.measures.runner import ModelRun
    from harness.runtime.cache import ResultCache
    from harness.runtime.models import resolve

    on_discovery = args.racing or args.resolution != "head"
    ignored = {"--n-problems": "the discovery split is fixed"} if on_discovery and args.n_problems is not None else {}
    if args.steps is not None and args.screen != "ig":
        ignored["--steps"] = "it is integrated gradients' (--screen ig)"
    if ignored:  # a setting the chosen sweep would not read
        option, why = next(iter(ignored.items()))
        print(f"error: {option} does not apply to this sweep ({why}); drop it", file=sys.stderr)
        return USAGE_ERROR
    args.steps = args.steps or SCREEN_STEPS
    if not on_discovery:
        args.screen = args.screen or "atp"  # the plain sweep always shows a screen beside it
    if args.threads:
        torch.set_num_threads(args.threads)
    problems, discovery = held_out_splits(args.data, None if on_discovery else args.n_problems or 1000)
    cache = ResultCache(None if args.no_cache else args.cache_dir)  # --no-cache: in memory, computed once
    model = resolve(args.model, args.base, args.n_latent, device=args.device, cache=cache)
    run = ModelRun(model, problems, discovery, cache, args.batch_size, progress=not args.json)
    if on_discovery:
        return _report_components(run.on_discovery(), args)
    return _report_sweep(run, args)


def _conditions_per_second(run: ModelRun, mode: str, sample: int = 4) -> tuple[float, float]:
    """Teacher-forced single-head conditions per second on the run's problems: stacked (every
    head) and one at a time (the first `sample` heads), neither read from the cache."""
    import time

    from harness.interventions.specs import installer
    from harness.measures.causal import components, stacked_logprobs
    from harness.measures.evaluation import teacher_forced

    parts = components(run, "head")
    start = time.perf_counter()
    stacked_logprobs(run, parts, mode)
    stacked = len(parts) / (time.perf_counter() - start)
    start = time.perf_counter()
    for part in parts[:sample]:
        teacher_forced(run.codi, run.problems, run.batch_size, installer(part.spec(mode), run))
    return stacked, sample / (time.perf_counter() - start)


def _report_components(run: ModelRun, args: argparse.Namespace) -> int:
    """The discovery split's sweep at `--resolution`, all of it or raced (`--racing`): each
    component's drop in answer log-probability, teacher-forced, stacked."""
    import time

    import pandas as pd
    from scipy.stats import spearmanr

    from harness.interventions.specs import Baseline
    from harness.judgment.kinds.sweep import screen_label
    from harness.measures.causal import components, race, screen_estimates, screened, stacked

    parts, n_top = components(run, args.resolution), args.n_top or 3
    start = time.perf_counter()
    if args.racing:
        result = race(run, parts, n_top, args.mode)
        table, top, separated = result.table, result.top, result.separated
    else:
        drops = run.answer_logprobs(Baseline())[None] - stacked(run, parts, args.mode)  # [C, N]
        table = pd.DataFrame({"component": [str(c) for c in parts], "head": [str(c.head) for c in parts],
                              "position": [c.position for c in parts], "drop_logprob": drops.mean(1),
                              "problems": drops.shape[1]})  # fmt: skip
        table = table.sort_values("drop_logprob", ascending=False, kind="stable").reset_index(drop=True)
        by_name = {str(c): c for c in parts}
        top, separated = [by_name[c] for c in table.component[:n_top]], None
    seconds = time.perf_counter() - start
    rows = [
        {"head": r.head, "position": r.position, "ablation_drop_logprob": r.drop_logprob, "problems": int(r.problems)}
        for r in table.itertuples()
    ]
    out = {"model": run.name, "split": "discovery", "n_problems": len(run.problems), "mode": args.mode,
           "resolution": args.resolution, "racing": args.racing, "rows": rows, "top": [str(c) for c in top],
           "separated": separated, "problem_conditions": int(table.problems.sum()),
           "seconds": round(seconds, 2)}  # fmt: skip
    if args.screen:  # its estimate of every component on every discovery problem, beside the sweep's
        start = time.perf_counter()
        by_name = dict(zip(map(str, parts), screened(screen_estimates(run, args.screen, args.mode, args.steps),
                                                     parts).mean(1)))  # fmt: skip
        table["screen_estimate"] = table.component.map(by_name)
        for row, estimate in zip(rows, table.screen_estimate):
            row["screen_estimate"] = float(estimate)
        screen_top = sorted(by_name, key=lambda c: -by_name[c])[:n_top]
        out["screen"] = {"screen": args.screen, "steps": args.steps if args.screen == "ig" else None,
                         "spearman": float(spearmanr(table.screen_estimate, table.drop_logprob).statistic),
                         "top": screen_top, "top_k_overlap": len(set(screen_top) & set(out["top"])) / n_top,
                         "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    if args.json:
        print(json.dumps(out))
        return 0
    kind = "racing" if args.racing else "full"
    print(f"model {run.name}: {len(parts)} components ({args.resolution}, {args.mode}), {kind} sweep on "
          f"{len(run.problems)} discovery problems: {out['problem_conditions']} problem-conditions, "
          f"{seconds:.1f} s")  # fmt: skip
    print(table.head(args.top).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"top {n_top}: {', '.join(out['top'])}" + ("" if separated is None else f" (separated: {separated})"))
    if args.screen:
        said = out["screen"]
        print(f"{screen_label(args.screen, args.steps)}: Spearman {said['spearman']:.3f} with the sweep's drops; "
              f"its top {n_top} {', '.join(said['top'])} ({said['top_k_overlap']:.0%} shared), "
              f"{said['seconds']:.1f} s")  # fmt: skip
    return 0


def _report_sweep(run: ModelRun, args: argparse.Namespace) -> int:
    """Time the ablation sweep and attribution patching on the same problems, then print them."""
    import time

    from scipy.stats import spearmanr

    from harness.judgment.kinds.sweep import screen_label, sweep_table, top_overlap
    from harness.measures.causal import screen_estimates, sweep

    baseline_accuracy = run.baseline.mean("accuracy")  # shared by both: not timed
    before = len(run._computed)
    start = time.perf_counter()
    sweep(run, args.mode)
    seconds_ablation = time.perf_counter() - start
    start = time.perf_counter()
    screen_estimates(run, args.screen, args.mode, args.steps)
    seconds_attribution = time.perf_counter() - start
    computed = len(run._computed) - before  # results computed while timed (0: the timings are cache reads)
    table = sweep_table(run, args.mode, args.screen, args.steps)
    rho = float(spearmanr(table.attribution, table.ablation_drop_logprob).statistic)
    overlap = top_overlap(table.attribution.to_numpy(), table.ablation_drop_logprob.to_numpy(), args.n_top or 3)
    stacked_cps, unstacked_cps = _conditions_per_second(run, args.mode)
    if args.json:
        heads = table[["head", "ablation_drop", "ablation_drop_logprob", "attribution"]].to_dict(orient="records")
        print(json.dumps({"model": run.name, "n_problems": len(run.problems), "mode": args.mode,
                          "baseline_accuracy": baseline_accuracy, "heads": heads,
                          "screen": args.screen, "steps": args.steps if args.screen == "ig" else None,
                          "spearman": rho, "top_k_overlap": overlap, "seconds_ablation": round(seconds_ablation, 2),
                          "seconds_attribution": round(seconds_attribution, 2), "computed": computed,
                          "conditions_per_second": round(stacked_cps, 2),
                          "conditions_per_second_unstacked": round(unstacked_cps, 2)}))  # fmt: skip
        return 0
    print(f"model {run.name}: {len(run.problems)} problems (baseline accuracy {baseline_accuracy:.1f}%), "
          f"every head alone {args.mode}-ablated at every thought")  # fmt: skip
    top = table.sort_values("ablation_drop_logprob", ascending=False).head(args.top)
    columns = ["head", "ablation_drop", "ablation_drop_logprob", "attribution", "composite"]
    print(top[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    ratio = seconds_ablation / max(seconds_attribution, 1e-9)
    label = screen_label(args.screen, args.steps)
    print(f"Spearman ({label} vs ablation log-prob drop, {len(table)} heads): {rho:.3f}; "
          f"top {args.n_top or 3} shared: {overlap:.0%}")  # fmt: skip
    print(f"ablation sweep {seconds_ablation:.1f} s, {label} {seconds_attribution:.1f} s ({ratio:.0f}x)")
    print(f"teacher-forced single-head conditions per second: {stacked_cps:.1f} stacked, "
          f"{unstacked_cps:.1f} one at a time")  # fmt: skip
    if computed == 0:
        print("(every result came from the cache: the timings are reads; --no-cache times the computation)")
    return 0
