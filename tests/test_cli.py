import argparse
import json
import subprocess
import sys

import pandas as pd
import pytest

from harness.commands.cli import USAGE_ERROR, build_parser, main
from harness.judgment.claims import load_registry
from harness.runtime.codi import save_codi


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    import torch

    from harness.commands.training import build_tiny

    torch.manual_seed(0)
    return save_codi(build_tiny("gpt2").eval(), tmp_path_factory.mktemp("m") / "random-gpt2")


def test_evaluate_prints_one_json_object(saved_model, capsys, tmp_path):
    records = tmp_path / "records.jsonl"
    args = ["evaluate", "--model", str(saved_model), "--n", "6", "--max-new-tokens", "4", "--json"]
    assert main([*args, "--records", str(records)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6 and 0.0 <= out["accuracy"] <= 1.0 and out["problems_per_second"] > 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"test-{i}" for i in range(6)]
    assert out["accuracy"] == sum(r["correct"] for r in rows) / 6
    assert main([*args, "--latent-patch", "mean"]) == 0
    assert json.loads(capsys.readouterr().out)["latent_patch"] == "mean"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/dir"], "not found"),
        (["--n", "0"], "must be positive"),
        (["--n", "2000"], "larger than the data set (1000 problems"),
        (["--data", "/no/such.jsonl"], "data file not found"),
        (["--latent-patch", "median"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_with_status_4(args, message, capsys):
    assert main(["evaluate", *args]) == USAGE_ERROR
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "Traceback" not in err


def test_module_entry_point(saved_model):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "evaluate",
            "--model",
            str(saved_model),
            "--n",
            "2",
            "--max-new-tokens",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n"] == 2


def test_rank_heads_prints_and_writes_every_head(saved_model, capsys, tmp_path):
    out = tmp_path / "ranked.csv"
    assert main(["rank-heads", "--model", str(saved_model), "--top", "3", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ranked = pd.read_csv(out)
    assert len(ranked) == 4 * 8  # every (layer, head) of the tiny GPT-2 geometry
    assert [row["name"] for row in printed["top"]] == list(ranked["name"][:3])
    assert ranked["composite"].is_monotonic_decreasing
    assert printed["hub_position"] in {f"CT{i}" for i in range(6)}


def test_claims_command_validates_and_lists(capsys, tmp_path):
    assert main(["claims", "--model", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(load_registry())} claims in" in out and "checked against tiny-gpt2" in out
    assert "1.2-hub-drop  phase 1" in out
    registry = tmp_path / "claims.toml"
    registry.write_text(
        '[[claim]]\nid = "x"\nphase = 1\nstatement = "s"\nmetric = "ablation_drop"\nthreshold = 1.0\n'
        'direction = "greater"\nexperiment = { heads = ["L7H0"] }\n'
    )
    assert main(["claims", "--registry", str(registry), "--model", "tiny-gpt2"]) == USAGE_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: claim 'x': head L7H0 out of range for tiny-gpt2: 4 layers x 8 heads"]


def test_every_train_option_reaches_the_training_config(monkeypatch, tmp_path):
    """A train option the CLI parses but does not pass on is silently ignored (--init-from was)."""
    import harness.commands.training

    seen = {}

    def fake_train(cfg, command):
        seen["cfg"] = cfg
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "card.json").write_text('{"accuracy": {}}')

    monkeypatch.setattr(harness.commands.training, "train", fake_train)
    args = ["train", "--arch", "llama", "--out", str(tmp_path / "out"), "--seed", "3", "--data-seed", "4",
            "--teacher-steps", "0", "--codi-steps", "7", "--batch-size", "5", "--lr", "0.5", "--distill-weight", "2.5",
            "--n-latent", "4", "--threads", "2", "--init-from", "fixtures/models/tiny-llama"]  # fmt: skip
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    options = {a.dest for a in train._actions if a.dest != "help"}
    given, defaults = parser.parse_args(args), parser.parse_args(["train", "--arch", "gpt2", "--out", "elsewhere"])
    assert all(getattr(given, o) != getattr(defaults, o) for o in options), "the test sets every option"
    assert main(args) == 0
    assert {o: getattr(seen["cfg"], o, "missing") for o in options} == {o: getattr(given, o) for o in options}
