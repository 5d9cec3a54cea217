"""The exact sweep made cheap: racing against the full sweep at head-by-thought resolution, and
stacked conditions against one at a time, on both shipped models (discovery split, 300
problems, teacher-forced answer log-probability). One JSON object to stdout.

python benchmarks/sweep_racing.py --json

Per model and mode: the full sweep's top 3 (every component on every problem, stacked) and the
race's; the race's problem-conditions as a share of the full sweep's; seconds of each. Then, per
model, teacher-forced single-head conditions per second, stacked (every head) and one at a time
(`--sample` heads). Nothing is read from a cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness.data.problems import held_out_splits
from harness.interventions.specs import Baseline, installer
from harness.measures.causal import components, race, stacked, stacked_logprobs
from harness.measures.evaluation import teacher_forced
from harness.measures.runner import ModelRun
from harness.runtime.cache import ResultCache
from harness.runtime.models import SHIPPED, load


def measure(name: str, sample: int) -> dict:
    problems, discovery = held_out_splits("synthetic", 1000)
    run = ModelRun(load(name), problems, discovery, ResultCache(None)).on_discovery()
    parts = components(run, "head_thought")
    out = {"model": name, "n_problems": len(run.problems), "components": len(parts), "modes": {}}
    base = run.answer_logprobs(Baseline())
    for mode in ("zero", "mean"):
        start = time.perf_counter()
        drops = (base[None] - stacked(run, parts, mode)).mean(1)  # [C]
        seconds_full = time.perf_counter() - start
        full_top = [str(parts[i]) for i in drops.argsort()[::-1][:3]]
        fresh = ModelRun(run.model, run.problems, run.discovery, ResultCache(None))
        start = time.perf_counter()
        result = race(fresh, parts, 3, mode)
        seconds_race = time.perf_counter() - start
        full_conditions, race_top = len(parts) * len(run.problems), [str(c) for c in result.top]
        out["modes"][mode] = {
            "full_top": full_top, "race_top": race_top, "same_top": full_top == race_top,
            "separated": result.separated, "race_problem_conditions": result.problem_conditions,
            "full_problem_conditions": full_conditions, "share": round(result.problem_conditions / full_conditions, 3),
            "seconds_full": round(seconds_full, 1), "seconds_race": round(seconds_race, 1),
        }  # fmt: skip
        print(f"{name} {mode}: {out['modes'][mode]}", file=sys.stderr)
    heads = components(run, "head")
    start = time.perf_counter()
    stacked_logprobs(run, heads, "zero")
    stacked_cps = len(heads) / (time.perf_counter() - start)
    start = time.perf_counter()
    for part in heads[:sample]:
        teacher_forced(run.codi, run.problems, run.batch_size, installer(part.spec("zero"), run))
    unstacked_cps = sample / (time.perf_counter() - start)
    out.update(conditions_per_second=round(stacked_cps, 2), conditions_per_second_unstacked=round(unstacked_cps, 2),
               speedup=round(stacked_cps / unstacked_cps, 2))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHIPPED))
    parser.add_argument("--sample", type=int, default=8, help="heads timed one at a time")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = [measure(name, args.sample) for name in args.models]
    print(json.dumps({"models": results}) if args.json else json.dumps({"models": results}, indent=1))


if __name__ == "__main__":
    main()
