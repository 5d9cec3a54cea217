"""A dress rehearsal of the real path: every claim of the registry on both published-format toy
checkpoints (random weights, each with its own base, both in folders named `ckpt`) with
`--data gsm8k --dtype bfloat16`, as a researcher with the published checkpoints would run it.

Each claim x model row must be judged, not judged by the baseline floor, or not measured with
a reason; nothing may crash. With `--min-baseline 0` (the default here) the floor is off, so every
kind runs its real-path code on models that solve nothing; `--min-baseline 5` shows the floor.

    python scripts/dress_rehearsal.py --n-problems 8 [--min-baseline 0] [--max-new-tokens 16] [--out DIR]
        [--cache-dir DIR]

Prints one line per row and a JSON summary (rows by verdict, unmeasured rows with their reason,
seconds); exits 1 if a row is missing, has no verdict, or has no effect and no reason.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.commands.fullsize import build_checkpoint  # noqa: E402
from harness.judgment.claims import load_registry  # noqa: E402
from harness.report.folder import read_claims  # noqa: E402
from harness.statistics.verdicts import VERDICTS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-problems", type=int, default=8)
    parser.add_argument("--min-baseline", default="0")
    parser.add_argument("--max-new-tokens", default="16", help="random weights never stop: decode little (default 16)")
    parser.add_argument("--out", help="report folder (default: a temporary one)")
    parser.add_argument("--cache-dir", help="result cache (default: a temporary one); reuse one to resume a run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dress-"))
    files = {arch: build_checkpoint(arch, work / arch, "bfloat16", tiny=True) for arch in ("gpt2", "llama")}
    out = Path(args.out) if args.out else work / "report"
    command = [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "-p", "no:cacheprovider", "-q",
               "--data", "gsm8k", "--dtype", "bfloat16", "--n-problems", str(args.n_problems),
               "--min-baseline", args.min_baseline, "--max-new-tokens", args.max_new_tokens, "--no-gates",
               "--report-dir", str(out),
               "--cache-dir", args.cache_dir or str(work / "cache")]  # fmt: skip
    for f in files.values():
        command += ["--model", str(f.checkpoint.parent), "--base", str(f.base)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not (out / "claims.json").exists():
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        print(f"no report: the run exited {done.returncode}")
        return 1
    rows = read_claims(out)["claims"]
    expected = {(c.id, m) for c in load_registry() for m in ("gpt2-ckpt", "llama-ckpt")}
    found = {(r["id"], r["model"]) for r in rows}
    bad = [f"missing: {claim} on {model}" for claim, model in sorted(expected - found)]
    for r in rows:
        why = r.get("note") or ""
        if r["verdict"] not in VERDICTS:
            bad.append(f"{r['id']} on {r['model']}: verdict {r['verdict']!r}")
        if r["effect"] is None and not why:
            bad.append(f"{r['id']} on {r['model']}: no effect and no reason")
        effect = "—" if r["effect"] is None else f"{r['effect']:+.2f}"
        print(f"{r['verdict']:12s} {r['id']:34s} {r['model']:11s} {effect:>8s}  {why}")
    summary = {
        "exit_status": done.returncode,
        "seconds": round(seconds, 1),
        "rows": len(rows),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
        "not_measured": dict(Counter(r["note"] for r in rows if r["effect"] is None)),
        "problems": bad,
    }
    print(json.dumps(summary, indent=2))
    return 1 if bad or done.returncode not in (0, 1, 7) else 0


if __name__ == "__main__":
    raise SystemExit(main())
