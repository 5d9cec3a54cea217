"""Full-size smoke run: random-weight checkpoints with the exact shapes of CODI-GPT2 (124M) and
CODI-LLaMA-3.2-1B, in the published one-file hub format with a local base directory, loaded
through the real hub-format path; then a baseline, a no-op intervention, the zero-ablation of
the seed's heads, norm-matched noise at the hub thought and the hub attention pattern, each
timed, on the first N GSM8K test problems. No network. See harness/commands/fullsize.py.

python scripts/fullsize_smoke.py --arch llama --dtype bfloat16 --n 4 --max-new-tokens 16 --json
python scripts/fullsize_smoke.py --arch gpt2 --device cuda --dtype bfloat16 --n 1319 --max-new-tokens 256 \\
    --batch-size 512 --workdir /tmp/smoke-gpt2 --json-out gpt2.json

The checkpoint is built in a child process (so `peak_rss_mb` is the load and the run's) under
`--workdir` (kept, and reused by a later run with the same arch, dtype and size), else in a
temporary folder. `--json-out` is rewritten after every stage: a run cut short by a timeout
leaves what it measured. Exit status 0 when the no-op reproduces the baseline and no hook is
left behind, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from harness.commands.fullsize import HubFiles, build_checkpoint, smoke
from harness.runtime.models import DTYPES

BUILT = "built.json"


def ensure_checkpoint(arch: str, root: Path, dtype: str, tiny: bool) -> tuple[HubFiles, float | None]:
    """The checkpoint under `root`, built (in a child process) unless a matching one is there;
    with the build's seconds (None when reused)."""
    meta = {"arch": arch, "dtype": dtype, "tiny": tiny}
    marker = root / BUILT
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return HubFiles(root / "ckpt" / "pytorch_model.bin", root / "base"), None
    start = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        files = pool.submit(build_checkpoint, arch, root, dtype, tiny).result()
    marker.write_text(json.dumps(meta) + "\n")
    return files, round(time.perf_counter() - start, 1)


def run(args: argparse.Namespace, root: Path) -> dict:
    files, build_seconds = ensure_checkpoint(args.arch, root, args.dtype, args.tiny)
    extra = {"build_seconds": build_seconds, "checkpoint": str(files.checkpoint), "base": str(files.base)}
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None

    def write(out: dict) -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({**out, **extra, "gpu": gpu}, indent=2) + "\n")

    result = smoke(
        files,
        args.arch,
        device=args.device,
        dtype=args.dtype,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        tiny=args.tiny,
        on_update=write,
    )
    result = {**result, **extra, "gpu": gpu, "complete": True}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["gpt2", "llama"], required=True)
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--n", type=int, default=8, help="GSM8K test problems (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, help="problems per batched pass (default: as the harness chooses)")
    parser.add_argument("--workdir", help="build (or reuse) the checkpoint here and keep it")
    parser.add_argument("--json-out", help="also write the measurements here, after every stage")
    parser.add_argument("--tiny", action="store_true", help="toy sizes of the same layout (seconds, for tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    for option in ("n", "max_new_tokens", "batch_size"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        result = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix=f"codi-smoke-{args.arch}-") as tmp:
            result = run(args, Path(tmp))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.arch} ({result['params']:,} parameters, {args.dtype}, {result['device']}): "
              f"loaded in {result['load_seconds']} s")  # fmt: skip
        for name, row in result["conditions"].items():
            print(f"  {name:20s} {row['seconds']:8.2f} s  {row['problems_per_second']:8.3f} problems/s")
        print(
            f"  no-op equals baseline: {result['noop_equals_baseline']}; hooks left: {result['hooks_left'] or 'none'}"
        )
        print(
            f"  peak RSS {result['peak_rss_mb']} MB"
            + (f", peak GPU {result['peak_gpu_mb']} MB" if result["gpu"] else "")
        )
    return 0 if result["noop_equals_baseline"] and not result["hooks_left"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
