"""DAS with a thought's ranks stacked in one batch against one rank at a time, on both shipped
models: seconds of each and the largest difference between their subspaces (as projectors).
One JSON object to stdout.

python benchmarks/das_stacking.py [--thought 3] [--steps 20] [--n-pairs 140]

The pairs are the discovery split's counterfactual pairs (`harness.data.counterfactuals`), the
ranks those a claim with `max_rank = 8` fits (1, 2, 4, 8). Nothing is read from a cache.
"""

from __future__ import annotations

import argparse
import json
import time

from harness.data.counterfactuals import counterfactuals
from harness.data.problems import held_out_splits
from harness.measures.das import fit_subspaces
from harness.measures.interchange import clean_thoughts
from harness.runtime.models import SHIPPED, load

RANKS = (1, 2, 4, 8)


def measure(name: str, thought: int, steps: int, n_pairs: int) -> dict:
    codi = load(name)
    made = counterfactuals(held_out_splits("synthetic", 1000)[1], seed=0).pairs[:n_pairs]
    bases, sources = [p.base for p in made], [p.source for p in made]
    donor = clean_thoughts(codi, sources, 128)  # [N, K, d]
    start = time.perf_counter()
    alone = {r: fit_subspaces(codi, bases, sources, donor, thought, (r,), steps=steps)[r] for r in RANKS}
    middle = time.perf_counter()
    together = fit_subspaces(codi, bases, sources, donor, thought, RANKS, steps=steps)
    end = time.perf_counter()
    gap = max(float((together[r].T @ together[r] - alone[r].T @ alone[r]).abs().max()) for r in RANKS)
    return {"pairs": len(made), "one_rank_at_a_time_s": round(middle - start, 2),
            "stacked_s": round(end - middle, 2), "largest_projector_difference": gap}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thought", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-pairs", type=int, default=140)
    args = parser.parse_args()
    out = {name: measure(name, args.thought, args.steps, args.n_pairs) for name in SHIPPED}
    print(json.dumps({"thought": args.thought, "steps": args.steps, "ranks": RANKS, "models": out}, indent=2))


if __name__ == "__main__":
    main()
