"""Speed and scale in one run: batched latent inference against a per-problem loop, the cost of
each intervention kind against the plain batched pass, and phase 1 end to end (cold cache, warm
cache, and cold under pytest-xdist). Progress goes to stderr, one JSON object to stdout.

python benchmarks/suite.py --json                      # tiny-llama, 1,000 problems, batch 128; phase 1 on both
python benchmarks/suite.py --json --skip-phase1 --n 200  # a quick check, no subprocesses

Every in-process timing is the best of `--repeats` runs on the same problems. An overhead is
time(intervened) / time(plain), the two timed alternately (plain, intervened, plain, ...) so
that the machine's drift between blocks of runs does not enter the ratio; it includes any change
in the number of decoded tokens that the intervention causes (capture changes nothing, and its
predictions are checked). The xdist workers run with OMP_NUM_THREADS = CPU cores / workers
(`--xdist-threads`): with torch's default every worker spins a thread per core, and on two cores
two workers slow each other down ~10x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from harness.data.problems import Problem, held_out_splits
from harness.interventions.attention import AttentionOverride
from harness.interventions.hooks import HeadAblation, HeadCapture
from harness.measures.discovery import head_metrics, model_hub_position, record_latent_attention, top_heads
from harness.measures.evaluation import EvalResult, Intervene, evaluate
from harness.report.folder import read_claims
from harness.runtime.arch import Head
from harness.runtime.codi import CODIModel
from harness.runtime.loop import ThoughtPatch, encode_questions, run_latents
from harness.runtime.models import SHIPPED, load

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[suite] {message}", file=sys.stderr, flush=True)


def best_of(repeats: int, run: Callable[[], EvalResult]) -> EvalResult:
    """The fastest of `repeats` runs (each `EvalResult` carries its own wall time)."""
    return min((run() for _ in range(repeats)), key=lambda r: r.seconds)


def interleaved(repeats: int, plain: Callable[[], EvalResult], treated: Callable[[], EvalResult]):
    """(fastest plain run, fastest treated run), timed alternately: a ratio of the two is not
    moved by the machine speeding up or slowing down between blocks of runs."""
    runs = [(plain(), treated()) for _ in range(repeats)]
    return min((p for p, _ in runs), key=lambda r: r.seconds), min((t for _, t in runs), key=lambda r: r.seconds)


def noise_for(codi: CODIModel, problems: list[Problem], position: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    """Gaussian noise [N, d] scaled to the mean norm of CT_position (over the first batch)."""
    with torch.no_grad():
        first = problems[:batch_size]
        thoughts = run_latents(codi, encode_questions(codi, [p.question for p in first])).thoughts[:, position]
    noise = torch.randn(len(problems), thoughts.shape[-1], generator=torch.Generator().manual_seed(seed))
    return noise / noise.norm(dim=-1, keepdim=True) * thoughts.float().norm(dim=-1).mean().cpu()


def interventions(
    codi: CODIModel, problems: list[Problem], heads: list[Head], hub: str, batch_size: int
) -> dict[str, Intervene]:
    """One intervention of each kind, in the form `evaluate(..., intervene=...)` takes."""
    noise = noise_for(codi, problems, 0, batch_size)

    def patch_ct0(pmap, indices):
        values = noise[indices]
        return ThoughtPatch(codi, lambda i, t: values.to(t) if i == 0 else t)

    return {
        "head_ablation": lambda pmap, idx: HeadAblation(codi, heads, pmap.latent),
        "position_patch": patch_ct0,
        "attention_override": lambda pmap, idx: AttentionOverride(codi, heads, "hub", pmap, hub),
        "capture": lambda pmap, idx: HeadCapture(codi, heads, pmap.latent),
    }


def inference(args: argparse.Namespace) -> dict:
    problems, discovery = held_out_splits(args.data, args.n)
    codi = load(args.model)
    log(f"{codi.name}: {len(problems)} problems, batch {args.batch_size}, {torch.get_num_threads()} threads")
    evaluate(codi, problems[: args.batch_size], args.batch_size, progress=False)  # warm-up
    log("batched pass")
    plain = best_of(args.repeats, lambda: evaluate(codi, problems, args.batch_size, progress=False))
    log(f"batched: {plain.problems_per_second:.0f} problems/s; per-problem loop")
    single = best_of(args.repeats, lambda: evaluate(codi, problems, 1, progress=False))
    log(f"per problem: {single.problems_per_second:.0f} problems/s")
    attention = record_latent_attention(codi, discovery, args.batch_size, progress=False)
    heads, hub = top_heads(head_metrics(attention), 3), model_hub_position(attention)
    result = {
        "model": codi.name,
        "n": len(problems),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "batched_problems_per_second": round(plain.problems_per_second, 2),
        "per_problem_problems_per_second": round(single.problems_per_second, 2),
        "batched_speedup": round(single.seconds / plain.seconds, 2),
        "same_predictions": [r.pred for r in plain.records] == [r.pred for r in single.records],
        "accuracy": plain.accuracy,
        "heads": [str(h) for h in heads],
        "hub": hub,
    }
    for kind, intervene in interventions(codi, problems, heads, hub, args.batch_size).items():
        log(f"intervention {kind} on {', '.join(map(str, heads))}")
        base, treated = interleaved(
            args.repeats,
            partial(evaluate, codi, problems, args.batch_size, progress=False),
            partial(evaluate, codi, problems, args.batch_size, progress=False, intervene=intervene),
        )
        result[f"overhead_{kind}"] = round(treated.seconds / base.seconds, 3)
        if kind == "capture":
            result["capture_same_predictions"] = [r.pred for r in treated.records] == [r.pred for r in plain.records]
    return result


def run_phase1(args: argparse.Namespace, cache_dir: Path, report_dir: Path, extra: list[str]) -> dict:
    """`pytest hypotheses/ -k phase1` in a subprocess: wall time, exit status, claims."""
    command = [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "-k", "phase1", "-q", "-p", "no:cacheprovider"]
    command += [arg for model in args.phase1_models for arg in ("--model", model)]
    command += ["--cache-dir", str(cache_dir), "--report-dir", str(report_dir), *extra]
    if args.phase1_n:
        command += ["--n-problems", str(args.phase1_n)]
    env = dict(os.environ)
    if args.xdist_threads and "-n" in extra:
        env["OMP_NUM_THREADS"] = str(args.xdist_threads)
    log("$ " + " ".join(command[1:]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    claims_file = report_dir / "claims.json"
    if done.returncode not in (0, 1) or not claims_file.exists():
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"phase 1 run failed (exit {done.returncode}):\n{tail}")
    log(f"phase 1: {wall:.1f} s wall, exit {done.returncode}")
    claims = sorted(read_claims(report_dir)["claims"], key=lambda c: (c["id"], c["model"]))
    return {"wall_s": round(wall, 2), "exit": done.returncode, "claims": claims}


def phase1(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="codi-suite-") as tmp:
        tmp_path = Path(tmp)
        serial = [tmp_path / "cache-serial", tmp_path / "reports" / "serial"]
        cold = run_phase1(args, serial[0], serial[1], [])
        warm = run_phase1(args, serial[0], tmp_path / "reports" / "warm", [])
        xdist_args = ["-n", str(args.workers), "--dist", "loadgroup"]
        xdist = run_phase1(args, tmp_path / "cache-xdist", tmp_path / "reports" / "xdist", xdist_args)
    return {
        "phase1_models": args.phase1_models,
        "phase1_n_problems": args.phase1_n or 1000,
        "phase1_cold_wall_s": cold["wall_s"],
        "phase1_warm_wall_s": warm["wall_s"],
        "phase1_xdist_wall_s": xdist["wall_s"],
        "phase1_exit": cold["exit"],
        "xdist_workers": args.workers,
        "xdist_omp_threads": args.xdist_threads or None,
        "warm_over_cold": round(warm["wall_s"] / cold["wall_s"], 3),
        "xdist_speedup": round(cold["wall_s"] / xdist["wall_s"], 2),
        "xdist_identical_claims": cold["claims"] == xdist["claims"],
        "warm_identical_claims": cold["claims"] == warm["claims"],
    }


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (Linux: KiB)."""
    return {
        "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="model for the inference timings")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--n", type=int, default=1000, help="problems for the inference timings")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per timing")
    parser.add_argument("--threads", type=int, help="torch CPU threads in this process (default: torch's choice)")
    parser.add_argument("--phase1-models", nargs="+", default=list(SHIPPED), help="--model values for phase 1")
    parser.add_argument("--phase1-n", type=int, help="--n-problems for phase 1 (default: the suite's, 1000)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (-n)")
    parser.add_argument(
        "--xdist-threads",
        type=int,
        help="OMP_NUM_THREADS of each xdist worker (default: CPU cores / workers; 0 leaves it unset)",
    )
    parser.add_argument("--skip-phase1", action="store_true", help="only the in-process timings")
    parser.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    args = parser.parse_args()
    if args.xdist_threads is None:
        args.xdist_threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = inference(args)
    phase = None if args.skip_phase1 else phase1(args)
    result.update(phase or dict.fromkeys(["warm_over_cold", "xdist_speedup", "xdist_identical_claims"]))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    checks = [result["same_predictions"], result["capture_same_predictions"]]
    checks += [result["xdist_identical_claims"], result["warm_identical_claims"]] if phase else []
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
