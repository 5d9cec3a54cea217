"""The claims suite's command-line options (the "codi" group of `pytest --help`), the checks on
them that need no model, and the exit statuses a run documents beside pytest's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.measures.runner import MAX_NEW_TOKENS
from harness.plugin.entry import INI, INI_HELP
from harness.plugin.session import MIN_BASELINE
from harness.report.folder import KEEP_REPORTS, read_claims

FLIPPED = 6  # the exit status of --fail-on-flip
NOT_JUDGED = 7  # the exit status of a run with a model below --min-baseline (a broken load is no finding)


def add_options(parser: pytest.Parser) -> None:
    """The "codi" group of `pytest --help`."""
    group = parser.getgroup("codi", "CODI hypotheses")
    group.addoption(
        "--model", action="append", help="shipped name (repeatable) or checkpoint path; default both tiny models"
    )
    group.addoption("--base", action="append",
                    help="base model (HF id or directory) of the hub-format checkpoints: once for all, or once per "
                    "hub-format --model, in order")  # fmt: skip
    group.addoption(
        "--n-latent",
        type=int,
        help="continuous thoughts of a hub-format checkpoint (default 6; the format does not record it; "
        "refused where the checkpoint records another)",
    )
    group.addoption(
        "--data", default=None, help="synthetic, gsm8k or a .jsonl path (default: ours synthetic, hub-format gsm8k)"
    )
    group.addoption("--n-problems", type=int, default=1000, help="problems from the test split (default 1000)")
    group.addoption(
        "--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1; with -n, cuda is one GPU per worker"
    )
    group.addoption("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    group.addoption(
        "--heads",
        help="critical heads instead of the ranking, e.g. L4H5,L5H30,L5H28, or 'seed' for the seed analysis's list",
    )
    group.addoption("--seed", type=int, default=0, help="seed for controls, noise and the bootstrap")
    group.addoption(
        "--min-baseline",
        type=float,
        default=MIN_BASELINE,
        help=f"baseline accuracy (points) below which a model is not judged (default {MIN_BASELINE:g}; 0: off)",
    )
    group.addoption(
        "--batch-size", type=int, help="problems per batched pass (default 128 on CPU; on CUDA, what memory holds)"
    )
    group.addoption("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                    help=f"answer tokens decoded at most (default {MAX_NEW_TOKENS}; a cache key part)")  # fmt: skip
    group.addoption("--report-dir", help="where the report goes (default reports/<run-id>/)")
    group.addoption(
        "--fail-on-flip",
        action="store_true",
        help=f"exit status {FLIPPED} when a verdict changed against the baseline (in place of 0 or 1; a usage "
        "error or an interrupted run keeps its own status)",
    )
    group.addoption(
        "--compare-to",
        help="an earlier report folder to compare verdicts with (default: the newest earlier run of the same "
        "configuration that measured each claim)",
    )
    group.addoption(
        "--keep-reports",
        type=int,
        help=f"run folders kept under reports/ (default {KEEP_REPORTS}; older ones are deleted)",
    )
    group.addoption("--no-cache", action="store_true", help="recompute every result")
    group.addoption(
        "--cache-dir", help="result cache directory (default .cache/results beside the registry's pytest configuration)"
    )
    group.addoption("--no-gates", action="store_true", help="run phase-2 claims even when phase 1's gate is not met")
    group.addoption(
        "--reference-batching",
        action="store_true",
        help="the official evaluator's batching (128 in data order; results depend on the batch), cached apart "
        "from default runs",
    )
    group.addoption(
        "--registry",
        help=f"the claims registry (default: {INI} in the pytest configuration, else hypotheses/claims.toml); "
        "naming one turns the plugin on",
    )
    parser.addini(INI, INI_HELP)  # also here: the plugin runs without its entry point too (conftest.py, -p)
    group.addoption(
        "--list-claims",
        action="store_true",
        help="print every claim (id, phase, kind, parameters with defaults, statement) and exit; loads no model",
    )


def check_options(config: pytest.Config) -> None:
    """Options that cannot be honoured, each refused in one line (a usage error)."""
    compare_to = config.getoption("compare_to")
    if compare_to:
        try:
            read_claims(Path(compare_to))
        except (OSError, ValueError) as e:
            raise pytest.UsageError(f"--compare-to {compare_to}: no readable claims.json there ({e})") from None
    if not 0 <= config.getoption("min_baseline") < 100:
        raise pytest.UsageError(f"--min-baseline is in [0, 100) points, got {config.getoption('min_baseline'):g}")
    keep = config.getoption("keep_reports")
    if keep is not None and keep < 1:
        raise pytest.UsageError(f"--keep-reports must be at least 1, got {keep}")
    if keep is not None and config.getoption("report_dir"):
        raise pytest.UsageError("--keep-reports prunes reports/; a --report-dir folder is yours and never pruned")
