"""`python -m harness train|evaluate|rank-heads|sweep|claims|init`: argument parsing, one-line usage errors (exit 4)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harness.cache import DEFAULT_DIR
from harness.codi import ModelLoadError

if TYPE_CHECKING:
    from harness.experiments import ModelRun
from harness.data import WORK_ROOT, DataError

USAGE_ERROR = 4
REGISTRY_DEFAULT = WORK_ROOT / "hypotheses" / "claims.toml"
DATA_HELP = "synthetic, gsm8k (default: the model's own data, as in the claims suite)"


def _train(args: argparse.Namespace) -> int:
    from harness.training import TrainConfig, train

    options = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in options})  # every option reaches the run
    command = "python -m harness " + shlex.join(sys.argv[1:])
    train(cfg, command=command)
    card = json.loads((Path(args.out) / "card.json").read_text())
    print(json.dumps(card["accuracy"], indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from harness.data import load_problems
    from harness.evaluation import REFERENCE_BATCH_SIZE, evaluate, mean_patch, thought_means
    from harness.models import default_batch_size, load

    if args.reference_batching and args.batch_size not in (None, REFERENCE_BATCH_SIZE):
        raise ModelLoadError(
            f"--reference-batching runs the official batches of {REFERENCE_BATCH_SIZE}; drop --batch-size"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = load_problems(args.data, args.n)
    codi = load(args.model, args.base, args.n_latent, args.dtype, args.device, args.reference_batching)
    batch_size = REFERENCE_BATCH_SIZE if args.reference_batching else args.batch_size or default_batch_size(codi)
    patch = mean_patch(thought_means(codi, problems, batch_size)) if args.latent_patch == "mean" else None
    result = evaluate(codi, problems, batch_size, patch, args.max_new_tokens, progress=not args.json)
    summary = {
        "model": codi.name,
        "data": args.data,
        "latent_patch": args.latent_patch,
        "dtype": args.dtype,
        "device": str(codi.device),
        "batch_size": batch_size,
        "reference_batching": args.reference_batching,
        **result.summary(),
    }
    if args.records:
        with open(args.records, "w") as f:
            for row in result.as_rows():
                f.write(json.dumps(row) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"model {codi.name}  data {args.data}  latent patch {args.latent_patch}")
        print(f"accuracy {result.accuracy:.1%} on {result.n} problems ({result.problems_per_second:.1f} problems/s)")
        for steps, acc in result.accuracy_by_steps().items():
            print(f"  {steps} step(s): {acc:.1%}")
    return 0


def _rank_heads(args: argparse.Namespace) -> int:
    import torch

    from harness.data import held_out_splits
    from harness.discovery import head_metrics, model_hub_position, record_latent_attention
    from harness.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    _, discovery = held_out_splits(args.data, 1)
    codi = load(args.model, args.base, args.n_latent)
    attention = record_latent_attention(codi, discovery, args.batch_size, progress=not args.json)
    ranked = head_metrics(attention)
    out = Path(args.out or f"ranked_heads_{codi.name}.csv")
    ranked.to_csv(out, index=False)
    top = ranked.head(args.top)
    if args.json:
        print(
            json.dumps(
                {
                    "model": codi.name,
                    "hub_position": model_hub_position(attention),
                    "csv": str(out),
                    "top": top.to_dict(orient="records"),
                }
            )
        )
        return 0
    print(f"model {codi.name}: {attention.n_problems} discovery problems, hub position {model_hub_position(attention)}")
    columns = ["rank", "name", "composite", "flow", "hub", "skip", "hub_position"]
    print(top[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"all {len(ranked)} heads: {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:

    import torch

    from harness.cache import ResultCache
    from harness.causal import SCREEN_STEPS
    from harness.data import held_out_splits
    from harness.experiments import ModelRun
    from harness.models import resolve

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

    from harness.causal import components, stacked_logprobs
    from harness.evaluation import teacher_forced
    from harness.specs import installer

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

    from harness.causal import components, race, screen_estimates, screened, stacked
    from harness.kinds.sweep import screen_label
    from harness.specs import Baseline

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

    from harness.causal import screen_estimates, sweep
    from harness.kinds.sweep import screen_label, sweep_table, top_overlap

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


def _claims(args: argparse.Namespace) -> int:
    from harness.claims import ClaimError, check_against_model, load_registry
    from harness.models import resolve

    try:
        claims = load_registry(Path(args.registry))
        for name in args.model or []:
            facts = resolve(name, args.base, args.n_latent).facts  # geometry from the cache, else by loading it
            check_against_model(claims, facts.geometry, facts.n_latent, name)
    except ClaimError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    for claim in claims:
        print(claim.describe())
    checked = f"; checked against {', '.join(args.model)}" if args.model else ""
    print(f"{len(claims)} claims in {args.registry}{checked}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from harness.starter import StarterError, write

    try:
        written = write(Path(args.dir))
    except StarterError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(f"run the claims: cd {shlex.quote(args.dir)} && pytest   (pytest --list-claims lists them)")
    return 0


N_LATENT_HELP = "thoughts of a hub-format checkpoint (default 6; refused where the checkpoint records another)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a tiny CODI model on synthetic arithmetic")
    tr.add_argument("--arch", choices=["gpt2", "llama"], required=True)
    tr.add_argument("--out", required=True, help="output directory (checkpoint + card.json)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--data-seed", type=int, default=0)
    tr.add_argument("--teacher-steps", type=int, default=2000, help="explicit-CoT warm-up steps")
    tr.add_argument("--codi-steps", type=int, default=4000, help="joint CODI objective steps")
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--distill-weight", type=float, default=20.0)
    tr.add_argument("--n-latent", type=int, default=6)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--init-from", help="continue training a checkpoint of ours (e.g. with --teacher-steps 0)")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="latent-mode accuracy of a CODI model")
    ev.add_argument("--model", default="tiny-gpt2", help="tiny-gpt2, tiny-llama, codi-gpt2, codi-llama or a path")
    ev.add_argument("--base", help="base model (HF id or directory) for hub-format checkpoints")
    ev.add_argument("--n-latent", type=int, help=N_LATENT_HELP)
    ev.add_argument("--data", help=DATA_HELP + ", a GSM8K-format .jsonl or a datasets id")
    ev.add_argument("--n", type=int, help="first N problems (default: all)")
    ev.add_argument("--latent-patch", choices=["none", "mean"], default="none")
    ev.add_argument("--batch-size", type=int, help="default 128 on CPU; on CUDA, what memory holds (at most 512)")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    ev.add_argument("--threads", type=int, help="torch CPU threads")
    ev.add_argument(
        "--reference-batching",
        action="store_true",
        help="the official evaluator's batching (128 in data order, padding leaks into the thoughts), to reproduce "
        "published numbers bit for bit; default: batch-invariant",
    )
    ev.add_argument("--records", help="write per-problem records to this .jsonl")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_evaluate)
    rk = sub.add_parser("rank-heads", help="rank attention heads by flow/hub/skip among the thoughts")
    rk.add_argument("--model", default="tiny-gpt2", help="tiny-gpt2, tiny-llama, codi-gpt2, codi-llama or a path")
    rk.add_argument("--base", help="base model (HF id or directory) for hub-format checkpoints")
    rk.add_argument("--n-latent", type=int, help=N_LATENT_HELP)
    rk.add_argument("--data", help="whose discovery split: " + DATA_HELP + " or a .jsonl")
    rk.add_argument("--top", type=int, default=10, help="how many heads to print")
    rk.add_argument("--out", help="CSV of every head (default ranked_heads_<model>.csv)")
    rk.add_argument("--batch-size", type=int, default=128)
    rk.add_argument("--threads", type=int, help="torch CPU threads")
    rk.add_argument("--json", action="store_true", help="print one JSON object")
    rk.set_defaults(func=_rank_heads)
    sw = sub.add_parser("sweep", help="every head alone ablated at the thoughts, and attribution patching's estimate")
    sw.add_argument("--model", default="tiny-gpt2", help="tiny-gpt2, tiny-llama, codi-gpt2, codi-llama or a path")
    sw.add_argument("--base", help="base model (HF id or directory) for hub-format checkpoints")
    sw.add_argument("--n-latent", type=int, help=N_LATENT_HELP)
    sw.add_argument("--data", help=DATA_HELP + " or a .jsonl (its discovery split: see docs)")
    sw.add_argument("--n-problems", type=int, help="problems from the test split (default 1000; plain sweep only)")
    sw.add_argument("--mode", choices=["zero", "mean"], default="zero", help="ablation mode (default zero)")
    sw.add_argument("--batch-size", type=int, help="default 128 on CPU; on CUDA, what memory holds (at most 512)")
    sw.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1")
    sw.add_argument("--threads", type=int, help="torch CPU threads")
    sw.add_argument("--top", type=int, default=10, help="how many heads to print")
    sw.add_argument("--cache-dir", default=str(DEFAULT_DIR), help="result cache directory (shared with the suite)")
    sw.add_argument("--no-cache", action="store_true", help="recompute everything (honest timings)")
    sw.add_argument("--json", action="store_true", help="print one JSON object")
    sw.add_argument("--resolution", choices=["head", "head_thought"], default="head",
                    help="head (ablated at every thought, default) or head_thought (one head at one thought): "
                    "anything but head runs the teacher-forced sweep on the discovery split")  # fmt: skip
    sw.add_argument("--racing", action="store_true", help="race the components on the discovery split (see docs)")
    sw.add_argument("--n-top", type=int, help="top components (default 3): the race's places, the screen's top-k")
    sw.add_argument("--screen", choices=["atp", "ig"],
                    help="a gradient screen's estimate beside the sweep, with Spearman's rho and top-k overlap: atp "
                    "(attribution patching; the plain sweep's default) or ig (integrated gradients)")  # fmt: skip
    sw.add_argument("--steps", type=int, help="--screen ig: points on the path from ablated to clean (default 16)")
    sw.set_defaults(func=_sweep)
    cl = sub.add_parser("claims", help="validate the claims registry and list every claim with its parameters")
    cl.add_argument("--registry", default=str(REGISTRY_DEFAULT), help="default hypotheses/claims.toml")
    cl.add_argument("--model", action="append", help="also check named heads and thoughts against this model")
    cl.add_argument("--base", help="base model (HF id or directory) for hub-format checkpoints")
    cl.add_argument("--n-latent", type=int, help=N_LATENT_HELP)
    cl.set_defaults(func=_claims)
    it = sub.add_parser("init", help="write a starter claims.toml, test file and pytest.ini into a folder of yours")
    it.add_argument("dir", help="the folder (created if needed); files already there are never overwritten")
    it.set_defaults(func=_init)
    return parser


def _log_to_stderr() -> None:
    """The harness's own messages (progress of training, cache warnings) on stderr. Not the root
    logger: huggingface_hub has a handler of its own and would print each message twice."""
    handler = logging.StreamHandler()  # today's sys.stderr (main may run more than once in a process)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("harness")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return USAGE_ERROR if e.code else 0
    _log_to_stderr()
    for option in ("batch_size", "max_new_tokens", "threads", "top", "n_latent", "n_problems", "n_top"):
        value = getattr(args, option, None)
        if value is not None and value <= 0:
            print(f"error: --{option.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return USAGE_ERROR
    if hasattr(args, "data") and args.data is None:  # the claims suite's default for this model
        from harness.models import default_data

        args.data = default_data(args.model)
    try:
        return args.func(args)
    except (ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
