"""Batched latent inference against a per-problem loop, same model and problems, one run.

python benchmarks/throughput.py --json            # tiny-gpt2, 1,000 synthetic problems, batch 128
"""

from __future__ import annotations

import argparse
import json

import torch

from harness.data.problems import load_problems
from harness.measures.evaluation import evaluate
from harness.runtime.models import load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = load_problems(args.data, args.n)
    codi = load(args.model)
    evaluate(codi, problems[: args.batch_size], args.batch_size, progress=False)  # warm-up
    batched = evaluate(codi, problems, args.batch_size, progress=not args.json)
    single = evaluate(codi, problems, 1, progress=not args.json)
    same = [a.pred for a in batched.records] == [b.pred for b in single.records]
    result = {
        "model": codi.name,
        "n": len(problems),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "batched_problems_per_second": round(batched.problems_per_second, 2),
        "per_problem_problems_per_second": round(single.problems_per_second, 2),
        "batched_speedup": round(batched.problems_per_second / single.problems_per_second, 2),
        "same_predictions": same,
        "accuracy": batched.accuracy,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
