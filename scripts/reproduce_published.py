"""Reproduce the published CODI accuracies on GSM8K with the real checkpoints, and time phase 1
on each of them. Needs a GPU and the weights (the hub, or local copies); prints one JSON object.

python scripts/reproduce_published.py                                  # hub ids, --device cuda, bfloat16
python scripts/reproduce_published.py --gpt2-path DIR --gpt2-base DIR --llama-path DIR --llama-base DIR
python scripts/reproduce_published.py --skip-phase1 --models codi-gpt2  # accuracy of one model only
python scripts/reproduce_published.py --reference-batching              # the official evaluator's batches

Published (Shen et al. 2025, greedy decoding, 1,319 GSM8K test problems): CODI-GPT2 43.7%,
CODI-LLaMA-1B 55.6%. The reference evaluation runs in bfloat16 (`--bf16` in its test scripts),
hence the default dtype. A model reproduces when its accuracy is within `--tolerance` points.
`--reference-batching` runs the official evaluator's batching (128 problems in data order,
padding attended to during the thoughts) instead of ours, which no batch influences.
Exit status 0 when every evaluated model reproduces, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from harness.data.problems import DataError, load_problems
from harness.measures.evaluation import REFERENCE_BATCH_SIZE, evaluate
from harness.report.folder import read_claims
from harness.runtime.codi import ModelLoadError
from harness.runtime.models import MODEL_SPECS, default_batch_size, load

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = {"codi-gpt2": 0.437, "codi-llama": 0.556}
OVERRIDES = {"codi-gpt2": ("gpt2_path", "gpt2_base"), "codi-llama": ("llama_path", "llama_base")}


def log(message: str) -> None:
    print(f"[reproduce] {message}", file=sys.stderr, flush=True)


def reproduce(
    checkpoint: str,
    base: str | None,
    published: float,
    data: str = "gsm8k",
    n: int | None = None,
    device: str = "cuda",
    dtype: str = "bfloat16",
    batch_size: int | None = None,
    max_new_tokens: int = 256,
    tolerance: float = 2.0,
    reference_batching: bool = False,
) -> dict:
    """Evaluate one checkpoint (a spec name, hub id or local path, on `base`) and compare its
    accuracy with the published one (a fraction); differences are in percentage points."""
    problems = load_problems(data, n)
    codi = load(checkpoint, base, dtype=dtype, device=device, reference_batching=reference_batching)
    batch_size = REFERENCE_BATCH_SIZE if reference_batching else batch_size or default_batch_size(codi)
    result = evaluate(codi, problems, batch_size, max_new_tokens=max_new_tokens, progress=False)
    difference = 100.0 * (result.accuracy - published)
    return {
        "checkpoint": checkpoint,
        "base": base,
        "data": data,
        "n": result.n,
        "device": str(codi.device),
        "dtype": dtype,
        "batch_size": batch_size,
        "reference_batching": reference_batching,
        "accuracy": round(result.accuracy, 4),
        "published": published,
        "difference_points": round(difference, 2),
        "tolerance_points": tolerance,
        "reproduced": abs(difference) <= tolerance,
        "seconds": round(result.seconds, 2),
        "problems_per_second": round(result.problems_per_second, 2),
    }


def phase1_command(
    checkpoint: str, base: str | None, data: str, device: str, dtype: str, out: Path, reference_batching: bool = False
) -> list[str]:
    """The claims suite's phase 1 on one model, its report and cache under `out`."""
    command = [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "-k", "phase1", "-q", "-p", "no:cacheprovider"]
    command += ["--model", checkpoint, *(["--base", base] if base else [])]
    command += ["--data", data, "--device", device, "--dtype", dtype]
    command += ["--reference-batching"] if reference_batching else []
    return command + ["--report-dir", str(out / "report"), "--cache-dir", str(out / "cache")]


def time_phase1(command: list[str], report_dir: Path) -> dict:
    """Run a phase-1 command from the project root: wall time, exit status, verdict counts."""
    log("$ " + " ".join(command[1:]))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    claims_file = report_dir / "claims.json"
    claims = read_claims(report_dir)["claims"] if claims_file.exists() else []
    if done.returncode not in (0, 1) or not claims:
        log(f"phase 1 failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return {
        "wall_s": round(wall, 1),
        "exit": done.returncode,
        "verdicts": dict(Counter(c["verdict"] for c in claims)),
        "claims": [{k: c[k] for k in ("id", "effect", "ci_low", "ci_high", "verdict")} for c in claims],
    }


def run(args: argparse.Namespace, out: Path) -> dict:
    """Every requested model: accuracy against the published one, then phase 1 (unless skipped)."""
    results = {}
    for name in args.models:
        path_arg, base_arg = OVERRIDES[name]
        checkpoint = getattr(args, path_arg) or name
        base = getattr(args, base_arg) or MODEL_SPECS[name].base
        log(f"{name}: evaluating {checkpoint} on {args.data} ({args.device}, {args.dtype})")
        row = reproduce(
            checkpoint,
            base,
            PUBLISHED[name],
            args.data,
            args.n,
            args.device,
            args.dtype,
            args.batch_size,
            tolerance=args.tolerance,
            reference_batching=args.reference_batching,
        )
        log(f"{name}: {row['accuracy']:.1%} (published {row['published']:.1%}) in {row['seconds']} s")
        if not args.skip_phase1:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the subprocess gets the memory this evaluation reserved
            command = phase1_command(
                checkpoint, base, args.data, args.device, args.dtype, out / name, args.reference_batching
            )
            row["phase1"] = time_phase1(command, out / name / "report")
        results[name] = row
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PUBLISHED), default=sorted(PUBLISHED))
    parser.add_argument("--gpt2-path", help="local copy of zen-E/CODI-gpt2 (directory or pytorch_model.bin)")
    parser.add_argument("--gpt2-base", help="local copy of gpt2")
    parser.add_argument("--llama-path", help="local copy of zen-E/CODI-llama3.2-1b-Instruct")
    parser.add_argument("--llama-base", help="local copy of meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--data", default="gsm8k", help="gsm8k (the shipped 1,319 test problems) or a .jsonl")
    parser.add_argument("--n", type=int, help="first N problems (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--batch-size", type=int, help="default: what the GPU's free memory holds")
    parser.add_argument("--tolerance", type=float, default=2.0, help="points from the published accuracy")
    parser.add_argument("--skip-phase1", action="store_true", help="accuracy only")
    parser.add_argument(
        "--reference-batching", action="store_true", help="the official evaluator's batches of 128 (see above)"
    )
    parser.add_argument("--out", help="keep phase 1's reports and caches here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="codi-reproduce-") as tmp:
        try:
            results = run(args, Path(args.out or tmp))
        except (ModelLoadError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 4
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    summary = {"gpu": gpu, "models": results, "reproduced": all(r["reproduced"] for r in results.values())}
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0 if summary["reproduced"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
