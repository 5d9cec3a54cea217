"""Speed and scale: bfloat16 weights, per-model xdist groups, per-worker devices, and the
published-checkpoint reproduction script on a checkpoint in the real format."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from test_checkpoints import hub_checkpoint  # noqa: F401 - the published-format checkpoint fixture

from harness.commands.cli import USAGE_ERROR, main
from harness.data.problems import synthetic_split
from harness.measures.evaluation import evaluate
from harness.runtime.models import (
    AUTO_BATCH_TOKENS,
    CPU_BATCH_SIZE,
    MAX_AUTO_BATCH,
    batch_size_for_memory,
    default_batch_size,
    load,
    session_device,
    worker_device,
)

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_bfloat16_agrees_with_float32_on_most_answers(model):
    problems = synthetic_split("test")[:48]
    full = load(model)
    half = load(model, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in half.buffers()), "RoPE frequencies stay float32"
    a = evaluate(full, problems, 48, progress=False)
    b = evaluate(half, problems, 48, progress=False)
    agree = sum(x.pred == y.pred for x, y in zip(a.records, b.records)) / len(problems)
    assert agree >= 0.9
    assert abs(a.accuracy - b.accuracy) <= 0.05


def test_cli_takes_dtype_and_refuses_a_missing_device(capsys):
    assert main(["evaluate", "--model", "tiny-gpt2", "--n", "8", "--dtype", "bfloat16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "bfloat16" and out["device"] == "cpu" and out["batch_size"] == CPU_BATCH_SIZE
    if not torch.cuda.is_available():
        assert main(["evaluate", "--model", "tiny-gpt2", "--n", "8", "--device", "cuda"]) == USAGE_ERROR
        err = capsys.readouterr().err.strip()
        assert "CUDA is not available" in err and "\n" not in err


def test_default_batch_size():
    full, half = load("tiny-llama"), load("tiny-llama", dtype="bfloat16")
    assert default_batch_size(full) == CPU_BATCH_SIZE  # off CUDA
    # tiny-llama: 4 layers x 2 KV heads x 20 dims, K and V, float32 -> 1,280 bytes of cache a token
    per_problem = 2 * AUTO_BATCH_TOKENS * 1280 + full.lm.config.vocab_size * 12
    assert batch_size_for_memory(full, 100 * per_problem) == 50  # half of the free memory
    assert batch_size_for_memory(half, 100 * per_problem) > 90  # bfloat16 halves the cache
    assert batch_size_for_memory(full, 0) == 1
    assert batch_size_for_memory(full, 10**15) == MAX_AUTO_BATCH


@pytest.mark.parametrize(
    ("device", "worker", "n_gpus", "expected"),
    [
        ("cuda", "gw0", 4, "cuda:0"),
        ("cuda", "gw3", 4, "cuda:3"),
        ("cuda", "gw5", 4, "cuda:1"),
        ("cuda", "gw1", 1, "cuda:0"),
        ("cuda", None, 4, "cuda"),  # no xdist: torch's current GPU
        ("cuda", "gw2", 0, "cuda"),
        ("cuda:1", "gw0", 4, "cuda:1"),  # an explicit GPU is kept
        ("cpu", "gw1", 4, "cpu"),
        ("cpu", None, 0, "cpu"),
    ],
)
def test_worker_device(device, worker, n_gpus, expected):
    assert worker_device(device, worker, n_gpus) == expected


@pytest.mark.parametrize(
    ("worker", "expected", "current"), [("gw3", "cuda:1", [torch.device("cuda:1")]), (None, "cuda", [])]
)
def test_only_a_worker_touches_its_gpu(worker, expected, current, monkeypatch):
    """The xdist controller (no worker id) leaves CUDA uninitialised: no context on GPU 0."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert session_device("cuda", worker) == expected
    assert chosen == current
    assert session_device("cpu", worker) == "cpu" and chosen == current


def test_claims_are_grouped_by_model_for_loadgroup(pytester, tmp_path):
    items, _ = pytester.inline_genitems(
        str(ROOT / "hypotheses"),
        "-k",
        "phase1",
        *("--model", "tiny-gpt2", "--model", "tiny-llama"),
        *("--n-problems", "5", "--report-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")),
    )
    assert {item.callspec.params["model_name"] for item in items} == {"tiny-gpt2", "tiny-llama"}
    for item in items:
        groups = [mark.args[0] for mark in item.iter_markers("xdist_group")]
        assert groups == [item.callspec.params["model_name"]], item.nodeid


def test_xdist_workers_group_claims_by_model(pytester):
    """The groups reach xdist: its worker suffixes each node id with the group (`...@tiny-gpt2`)."""
    pytester.makepyfile(
        test_models="""
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_one(model_name, i):
            pass
        """
    )
    result = pytester.runpytest_inprocess(  # the controller here; xdist starts its worker process
        *("-p", "harness.plugin.suite", "-p", "no:benchmark", "-n", "1", "--dist", "loadgroup", "-v"),
        *("--model", "tiny-gpt2", "--model", "tiny-llama"),
    )
    result.assert_outcomes(passed=6)
    found = [re.search(r"PASSED .*test_one\[([\w-]+)-\d\]@([\w-]+)", line) for line in result.outlines]
    pairs = [m.groups() for m in found if m]
    assert len(pairs) == 6 and all(model == group for model, group in pairs), result.outlines


def test_reproduce_published_evaluates_a_real_format_checkpoint(hub_checkpoint):  # noqa: F811
    script = _script("reproduce_published")
    root, _, _ = hub_checkpoint
    ckpt, base = root / "ckpt", root / "base"
    problems = synthetic_split("test")[:6]
    row = script.reproduce(str(ckpt), str(base), 0.5, "synthetic", 6, "cpu", "float32", 3, max_new_tokens=4)
    direct = evaluate(load(str(ckpt), str(base)), problems, 3, max_new_tokens=4, progress=False)
    assert row["n"] == 6 and row["batch_size"] == 3 and row["device"] == "cpu"
    assert row["accuracy"] == round(direct.accuracy, 4)
    assert row["difference_points"] == pytest.approx(100 * (direct.accuracy - 0.5), abs=0.01)
    assert row["reproduced"] == (abs(row["difference_points"]) <= row["tolerance_points"])


def test_reproduce_published_phase1_command(tmp_path):
    script = _script("reproduce_published")
    command = script.phase1_command(
        "codi-llama", "meta-llama/Llama-3.2-1B-Instruct", "gsm8k", "cuda", "bfloat16", tmp_path
    )
    joined = " ".join(command)
    assert command[1:3] == ["-m", "pytest"] and str(ROOT / "hypotheses") in command
    for flags in ("-k phase1", "--model codi-llama", "--base meta-llama/Llama-3.2-1B-Instruct", "--data gsm8k"):
        assert flags in joined
    assert "--device cuda --dtype bfloat16" in joined
    assert f"--report-dir {tmp_path / 'report'}" in joined and f"--cache-dir {tmp_path / 'cache'}" in joined
