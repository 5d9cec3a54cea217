"""`python -m harness train|evaluate|rank-heads|sweep|claims|init`: argument parsing, one-line usage errors (exit 4)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

from harness.commands import USAGE_ERROR
from harness.data.problems import WORK_ROOT, DataError
from harness.runtime.cache import DEFAULT_DIR

REGISTRY_DEFAULT = WORK_ROOT / "hypotheses" / "claims.toml"
DATA_HELP = "synthetic, gsm8k (default: the model's own data, as in the claims suite)"


def _train(args: argparse.Namespace) -> int:
    from harness.commands.training import TrainConfig, train

    options = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in options})  # every option reaches the run
    command = "python -m harness " + shlex.join(sys.argv[1:])
    train(cfg, command=command)
    card = json.loads((Path(args.out) / "card.json").read_text())
    print(json.dumps(card["accuracy"], indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from harness.data.problems import load_problems
    from harness.measures.evaluation import REFERENCE_BATCH_SIZE, evaluate, mean_patch, thought_means
    from harness.runtime.codi import ModelLoadError
    from harness.runtime.models import default_batch_size, load

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

    from harness.data.problems import held_out_splits
    from harness.measures.discovery import head_metrics, model_hub_position, record_latent_attention
    from harness.runtime.models import load

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
    from harness.commands.sweep import sweep

    return sweep(args)


def _claims(args: argparse.Namespace) -> int:
    from harness.judgment.claims import ClaimError, check_against_model, load_registry
    from harness.runtime.models import resolve

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


def _counterfactuals(args: argparse.Namespace) -> int:
    from harness.data.counterfactuals import counterfactuals
    from harness.data.problems import format_number, load_problems

    problems = load_problems(args.data, args.n_problems, option="--n-problems")
    made = counterfactuals(problems, args.seed)
    if args.json:
        pairs = [
            {"base_id": p.base.id, "base_question": p.base.question, "base_answer": p.base.answer,
             "source_question": p.source.question, "source_cot": p.source.cot, "source_answer": p.source.answer,
             "changed": {"from": p.changed[0], "to": p.changed[1]}}
            for p in made.pairs
        ]  # fmt: skip
        print(json.dumps({"problems": made.problems, "coverage": made.coverage, "rejected": made.reasons(),
                          "pairs": pairs}, indent=2))  # fmt: skip
        return 0
    print(f"{len(made.pairs)} of {made.problems} problems paired ({100 * made.coverage:.1f}%)")
    for reason, count in made.reasons().items():
        print(f"  {count:5d}  rejected: {reason}")
    for p in made.pairs[: args.sample]:
        print(f"\n{p.base.id}: {p.changed[0]} -> {p.changed[1]}; answer {format_number(p.base.answer)} -> "
              f"{format_number(p.source.answer)}\n  {p.source.question}\n  {p.source.cot}")  # fmt: skip
    return 0


def _init(args: argparse.Namespace) -> int:
    from harness.commands.starter import StarterError, write

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
    cf = sub.add_parser("counterfactuals", help="counterfactual pairs from the solution annotations: coverage, "
                        "rejections by reason, a sample")  # fmt: skip
    cf.add_argument("--data", required=True, help="synthetic, gsm8k or a GSM8K-format .jsonl")
    cf.add_argument("--n-problems", type=int, help="the first N problems (default: all)")
    cf.add_argument("--seed", type=int, default=0, help="which number changes and to what (default 0, as the suite)")
    cf.add_argument("--sample", type=int, default=3, help="pairs printed (default 3)")
    cf.add_argument("--json", action="store_true", help="print one JSON object, every pair")
    cf.set_defaults(func=_counterfactuals)
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
        from harness.runtime.models import default_data

        args.data = default_data(args.model)
    if args.func is _init:
        return _init(args)
    from harness.runtime.codi import ModelLoadError  # here: `init` never pays for torch

    try:
        return args.func(args)
    except (ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
