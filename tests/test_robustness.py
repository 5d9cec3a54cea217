"""Robustness (issue 6): bad input is one usage line with exit status 4 before any long work, in
the CLI and in the claims suite; report folders are never reused and `latest` moves atomically;
one seed gives the same claims twice."""

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from harness.commands.cli import USAGE_ERROR, main
from harness.commands.fullsize import build_tokenizer, shape_of
from harness.judgment.claims import load_registry
from harness.report import folder as report
from harness.report.folder import read_claims

ROOT = Path(__file__).resolve().parent.parent
GOOD_LINE = json.dumps({"question": "Tom has 3 apples . how many apples ?", "answer": "<<3=3>> #### 3"})
MISFIT_KEY = "codi.base_model.model.transformer.wte.weight"
OFFLINE_ID = "nobody/no-such-codi-model"


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """Paths of bad inputs: a folder that is no checkpoint, a hub-format checkpoint whose tensors do
    not fit its (tiny, local) base model, and broken data files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "notes.txt").write_text("no weights here\n")
    tokenizer = build_tokenizer(shape_of("gpt2", tiny=True))  # passes the load-time tokenizer checks
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=eos, eos_token_id=eos
    )
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "misfit").mkdir()
    torch.save({MISFIT_KEY: torch.zeros(3, 3)}, root / "misfit" / "pytorch_model.bin")
    files = {
        "malformed": f"{GOOD_LINE}\n{{not json\n".encode(),
        "empty": b"",
        "no-gold": f"{GOOD_LINE}\n{json.dumps({'question': 'q', 'answer': 'no gold here'})}\n".encode(),
        "no-answer": f"{GOOD_LINE}\n{json.dumps({'question': 'q'})}\n".encode(),
        "latin1": f"{GOOD_LINE}\n".encode() + '{"question": "caf\u00e9", "answer": "#### 1"}\n'.encode("latin-1"),
    }
    for name, content in files.items():
        (root / f"{name}.jsonl").write_bytes(content)
    return {name: str(root / name) for name in ("not-a-checkpoint", "base", "misfit")} | {
        name: str(root / f"{name}.jsonl") for name in files
    }


# (arguments, expected text); data errors must stop before the model is even loaded
DATA_CASES = [
    (["--data", "{malformed}"], "malformed.jsonl:2: malformed JSON"),
    (["--data", "{empty}"], "empty.jsonl: no problems in the file"),
    (["--data", "{no-gold}"], "no-gold.jsonl:2: no gold number after '####'"),
    (["--data", "{no-answer}"], "no-answer.jsonl:2: expected an object with 'question' and 'answer'"),
    (["--data", "{latin1}"], "latin1.jsonl:2: not UTF-8 text"),
]
MODEL_CASES = [
    (["--model", "{not-a-checkpoint}"], "not-a-checkpoint is not a CODI checkpoint"),
    (["--model", "{misfit}", "--base", "{base}"], f"key '{MISFIT_KEY}' has shape (3, 3), the base model expects"),
]


def _fill(args: list[str], bad: dict[str, str]) -> list[str]:
    return [a.format(**bad) for a in args]


@pytest.mark.parametrize(
    ("args", "message", "data_error"),
    [(a, m, True) for a, m in DATA_CASES]
    + [(a, m, False) for a, m in MODEL_CASES]
    + [
        (["--n", "-3"], "--n must be positive, got -3", True),
        (["--max-new-tokens", "0"], "--max-new-tokens must be positive, got 0", True),
        (["--batch-size", "-8"], "--batch-size must be positive, got -8", True),
    ],
)
def test_cli_usage_errors(bad, args, message, data_error, capsys, monkeypatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("long work started before the input was checked")

    monkeypatch.setattr("harness.measures.evaluation.evaluate", must_not_run)
    if data_error:
        monkeypatch.setattr("harness.runtime.models.load", must_not_run)
    assert main(["evaluate", *_fill(args, bad)]) == USAGE_ERROR
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]  # not transformers' bars
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], captured.err


def _claims_args(tmp_path: Path, *args: str) -> list[str]:
    folders = ["--report-dir", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "cache")]
    return [str(ROOT / "hypotheses"), "-k", "phase1", "-p", "no:cacheprovider", *folders, *args]


def _assert_usage_error(result: pytest.RunResult, message: str, tmp_path: Path) -> None:
    errors = [line for line in result.errlines if "error" in line.lower()]  # not transformers' bars
    assert result.ret == 4, result.outlines + result.errlines
    assert len(errors) == 1 and errors[0].startswith("ERROR: ") and message in errors[0], errors
    assert "Traceback" not in "\n".join(result.outlines + result.errlines)
    assert not (tmp_path / "report").exists()
    written = [np.load(entry) for entry in (tmp_path / "cache").glob("*.npy")]
    assert all(entry.ndim == 0 and "fingerprint" in str(entry) for entry in written), "only model facts"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--model", "tiny-gpt2", *a], m) for a, m in DATA_CASES]
    + MODEL_CASES
    + [
        (["--model", "tiny-gpt2", "--heads", "L1H2,L1H2"], "head L1H2 given twice"),
        (["--model", "tiny-gpt2", "--heads", "L1H2;L0H0"], "malformed head 'L1H2;L0H0'"),
        (["--model", "tiny-gpt2", "--heads", "L0H8"], "head L0H8 out of range for tiny-gpt2: 4 layers x 8 heads"),
        (["--model", "tiny-gpt2", "--n-problems", "-5"], "--n-problems must be positive, got -5"),
        (["--model", "tiny-gpt2", "--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["--model", "tiny-gpt2", "--n-problems", "1001"], "larger than the data set (1000 problems in"),
        (["--model", "tiny-gpt2", "--heads", ""], "no heads in ''"),
        (["--model", "tiny-gpt2", "--heads", "seed"], "no seed head list for 'tiny-gpt2'"),
        (["--model", "tiny-gpt2", "--compare-to", "/no/such/report"], "--compare-to /no/such/report: no readable"),
        (["--model", "tiny-gpt2", "--keep-reports", "0"], "--keep-reports must be at least 1, got 0"),
        (["--model", "tiny-gpt2", "--n-latent", "4"], "tiny-gpt2 was trained with 6 thoughts"),
        (["--model", "tiny-gpt2", "--n-latent", "0"], "--n-latent must be at least 1, got 0"),
        (["--model", "tiny-gpt2", "--keep-reports", "5"], "--keep-reports prunes reports/; a --report-dir folder"),
        (
            ["--model", "tiny-gpt2", "--reference-batching", "--batch-size", "64"],
            "--reference-batching runs the official batches of 128; drop --batch-size",
        ),
    ],
)
def test_claims_suite_usage_errors(bad, args, message, pytester, tmp_path):
    """In-process (no torch import per case): the same hooks as a pytest subprocess, in milliseconds."""
    result = pytester.runpytest_inprocess(*_claims_args(tmp_path, *_fill(args, bad)))
    _assert_usage_error(result, message, tmp_path)


def test_an_earlier_report_folder_is_refused(pytester, tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "claims.json").write_text("[]")
    result = pytester.runpytest_inprocess(*_claims_args(tmp_path, "--model", "tiny-gpt2"))
    assert result.ret == 4
    assert any("already holds a report; choose a new folder" in line for line in result.errlines)
    assert (tmp_path / "report" / "claims.json").read_text() == "[]"


def test_hub_id_without_network_or_local_copy(pytester, tmp_path, monkeypatch):
    """The CLI in a fresh process with HF_HUB_OFFLINE=1 (read when huggingface_hub is imported);
    the claims suite in-process, with the flag huggingface_hub read from it set."""
    expected = f"'{OFFLINE_ID}' is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE is set)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli = subprocess.run(
        [sys.executable, "-m", "harness", "evaluate", "--model", OFFLINE_ID, "--base", "gpt2", "--n", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == USAGE_ERROR
    assert cli.stderr.count("\n") == 1 and expected in cli.stderr and "--model PATH" in cli.stderr, cli.stderr
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    suite = pytester.runpytest_inprocess(*_claims_args(tmp_path, "--model", OFFLINE_ID, "--base", "gpt2"))
    _assert_usage_error(suite, expected, tmp_path)


# --- nothing is lost ---------------------------------------------------------------------


@pytest.fixture
def frozen_clock(monkeypatch) -> str:
    """Every run starts in the same second."""
    monkeypatch.setattr(report.time, "strftime", lambda _fmt: "20260101-000000")
    return "20260101-000000"


def test_run_dirs_are_new_and_never_an_earlier_run(tmp_path, frozen_clock):
    root = tmp_path / "reports"
    earlier = root / frozen_clock
    earlier.mkdir(parents=True)
    (earlier / "claims.json").write_text("[]\n")
    first, second = report.new_run_dir(root), report.new_run_dir(root)
    assert len({earlier, first, second}) == 3
    assert first.is_dir() and second.is_dir() and not any(first.iterdir())
    assert (earlier / "claims.json").read_text() == "[]\n"


def test_run_dirs_are_claimed_atomically_by_concurrent_runs(tmp_path, frozen_clock):
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: report.new_run_dir(tmp_path), range(40)))
    assert len(set(dirs)) == 40 and all(d.is_dir() for d in dirs)


def test_latest_moves_atomically(tmp_path):
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    for run in runs:
        run.mkdir()
        (run / "claims.json").write_text(f'"{run.name}"\n')
    report.point_latest(runs[0])
    latest, stop, misses = tmp_path / "latest", threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            try:
                json.loads((latest / "claims.json").read_text())
            except (OSError, ValueError) as e:
                misses.append(e)

    def repoint(offset: int) -> None:
        for i in range(150):
            report.point_latest(runs[(i + offset) % 2])

    reader = threading.Thread(target=read)
    reader.start()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(repoint, (0, 1)))  # two writers at once (e.g. two sessions finishing together)
    stop.set()
    reader.join()
    assert not misses, misses[:3]
    report.point_latest(runs[1])
    assert latest.is_symlink() and os.readlink(latest) == "run-b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run-a", "run-b"]


# --- reproducibility ---------------------------------------------------------------------


def test_one_seed_gives_identical_claims_serial_and_under_xdist(pytester, tmp_path, monkeypatch, suite_args):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # all runs alike; torch's spinning threads crawl on a busy CPU
    phase1 = ("-k", "phase1", "--model", "tiny-gpt2", "--n-problems", "30", "--seed", "3")
    runs = {"serial": (), "xdist": ("-n", "2", "--dist", "loadgroup")}  # two processes, one seed
    for name, extra in runs.items():
        run = pytester.runpytest_subprocess(*suite_args(tmp_path / name, None, *phase1, *extra))
        assert run.ret in (0, 1), run.outlines[-20:]
    serial, xdist = (read_claims(tmp_path / name)["claims"] for name in runs)
    assert serial and xdist == serial, "serial and -n 2 runs disagree"
    assert (tmp_path / "serial" / "claims.csv").read_text() == (tmp_path / "xdist" / "claims.csv").read_text()


def test_a_hub_warning_is_printed_once():
    """huggingface_hub logs through a handler of its own: the CLI must not add a second copy
    (its connection retries used to appear twice)."""
    script = (
        "import logging, huggingface_hub\n"
        "from harness.commands.cli import main\n"
        "assert main(['evaluate', '--max-new-tokens', '0']) == 4\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('retrying in 1s')\n"
        "logging.getLogger('harness.runtime.cache').warning('cache entry unreadable')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("retrying in 1s") == 1 and done.stderr.count("cache entry unreadable") == 1, done.stderr


_EXTRA = """
[[claim]]
id = "mine"
phase = 1
statement = "s"
metric = "{metric}"
threshold = 1.0
direction = "greater"
experiment = {experiment}
"""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("threshold = 10.0", "threshhold = 10.0", 1), "unknown key 'threshhold' (did you mean"),
        (
            lambda t: t + _EXTRA.format(metric="ablation_drop", experiment="{ heads = ['L9H0'] }"),
            "claim 'mine': head L9H0 out of range for tiny-gpt2: 4 layers x 8 heads",
        ),
        (
            lambda t: t + _EXTRA.format(metric="ablation_drop", experiment="{ positions = ['CT9'] }"),
            "claim 'mine': unknown position 'CT9'; choose from CT0..CT5",
        ),
        (
            lambda t: t + _EXTRA.format(metric="pattern_drop", experiment="{ pattern = 'hub', scope = 'layr' }"),
            "experiment key 'scope' is 'layr' (did you mean 'layer'?)",
        ),
        (
            lambda t: (
                t
                + _EXTRA.format(metric="ablation_drop", experiment="{ mode = 'mean', heads = ['L0H0'] }").replace(
                    'direction = "greater"\nexperiment', 'direction = "greater"\nmesure = "accuracy"\nexperiment'
                )
            ),
            "unknown key 'mesure' (did you mean 'measure'?)",
        ),
    ],
)
def test_a_broken_registry_stops_the_suite_with_one_line(edit, message, pytester, tmp_path, monkeypatch):
    registry = tmp_path / "claims.toml"
    registry.write_text(edit((ROOT / "hypotheses" / "claims.toml").read_text()))
    result = pytester.runpytest_inprocess(*_claims_args(tmp_path, "--model", "tiny-gpt2", "--registry", str(registry)))
    _assert_usage_error(result, message, tmp_path)


def test_list_claims_shows_every_parameter_and_loads_no_model(pytester, tmp_path, monkeypatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("--list-claims loaded a model")

    monkeypatch.setattr("harness.runtime.models.resolve", must_not_run)
    monkeypatch.setattr("harness.plugin.session.resolve", must_not_run)
    result = pytester.runpytest_inprocess(str(ROOT / "hypotheses"), "--list-claims", "-p", "no:cacheprovider")
    assert result.ret == 0
    out = "\n".join(result.outlines)
    for claim in load_registry():
        assert claim.id in out and claim.statement in out
    assert "1.1-top3-causal  phase 1  ablation_drop(heads=[], n_heads=3, ranking='attention', positions=" in out
    assert f"{len(load_registry())} claims in" in out
    registry = tmp_path / "claims.toml"
    registry.write_text("[[claim]]\nid = 'x'\n")
    broken = pytester.runpytest_inprocess(str(ROOT / "hypotheses"), "--list-claims", "--registry", str(registry))
    assert broken.ret == 4 and any("missing key 'phase'" in line for line in broken.errlines)


def test_list_claims_honours_the_selection_and_lists_python_claims(pytester, tmp_path, monkeypatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("--list-claims loaded a model")

    monkeypatch.setattr("harness.plugin.session.resolve", must_not_run)
    mine = tmp_path / "test_mine.py"
    mine.write_text("import pytest\n\n\n@pytest.mark.phase1\ndef test_my_python_claim(model_run, assert_claim):\n"
                    "    raise AssertionError('listing runs nothing')\n")  # fmt: skip
    args = ("--list-claims", "-p", "no:cacheprovider", "--report-dir", str(tmp_path / "r"))
    result = pytester.runpytest_inprocess(str(ROOT / "hypotheses"), str(mine), *args, "-k", "1.2-hub-drop or my_python")
    assert result.ret == 0
    out = "\n".join(result.outlines)
    assert "1.2-hub-drop  phase 1  position_drop(" in out and "1.1-top3-causal" not in out
    python = "test_mine.py::test_my_python_claim  Python claim  models: tiny-gpt2, tiny-llama"
    assert any(line.endswith(python) for line in result.outlines)
    assert f"1 of {len(load_registry())} claims in" in out and "1 Python claim tests" in out
    phase2 = pytester.runpytest_inprocess(str(ROOT / "hypotheses"), *args, "-m", "phase2", "--model", "tiny-llama")
    listed = [line.split()[0] for line in phase2.outlines if "  phase 2  " in line]
    assert listed == [c.id for c in load_registry() if c.phase == 2]
    assert "    models: tiny-llama" in phase2.outlines
