"""Phases 2-4: probes, attribution, tiers and gates against independent checks, and the late
phases of the hypotheses suite end to end (pytester, a few problems)."""

from pathlib import Path

import numpy as np
import pytest

from harness.commands.fullsize import build_checkpoint
from harness.data.counterfactuals import counterfactuals
from harness.data.problems import held_out_splits, synthetic_split
from harness.judgment.claims import load_registry
from harness.measures.attribution import CATEGORIES, integrated_gradients, token_category
from harness.measures.probes import chance, control_labels, critical_layer, first_result, probe_correct
from harness.measures.tiers import assign_tiers, tier_sizes
from harness.report.folder import read_claims
from harness.runtime.arch import Head

ROOT = Path(__file__).resolve().parent.parent
LATE = [c.id for c in load_registry() if c.phase > 1 and c.metric != "das"]  # das: its own test (it trains)


def test_a_probe_finds_a_planted_signal_and_the_control_task_does_not():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 100, 600)
    labels = values % 10  # the last digit
    features = rng.normal(size=(600, 32))
    features[:, :10] += 5 * np.eye(10)[labels]  # linearly decodable digit, nothing else of the value
    task = probe_correct(features, labels, seed=0)
    control = probe_correct(features, control_labels(values, labels, seed=0), seed=0)
    assert task.mean() > 0.9
    assert control.mean() < chance(labels) + 0.1  # random labels per value carry no digit signal
    # selectivity rises where the signal appears: layer 2 of three
    stack = lambda hit, n: np.stack([np.zeros(n, bool), np.zeros(n, bool), hit])  # noqa: E731
    assert critical_layer(stack(task, 600), stack(control, 600)) == 1


def test_control_labels_are_consistent_per_value():
    values = np.array([5, 7, 5, 9, 7, 5])
    control = control_labels(values, np.array([5, 7, 5, 9, 7, 5]) % 10, seed=3)
    assert control[0] == control[2] == control[5] and control[1] == control[4]


def test_first_intermediate_result_from_both_cot_formats():
    problem = synthetic_split("test")[3]
    assert first_result(problem) == float(problem.cot.split("=")[1].split(">>")[0])
    gsm = problem.__class__("g", "q", "<<48/2=24>> <<48+24=72>>", 72.0, 2)
    assert first_result(gsm) == 24.0


@pytest.mark.parametrize(
    ("token", "category"),
    [("35", "number"), ("Ġ1,200", "number"), ("more", "operator"), ("Ġtimes", "operator"), ("Ravi", "entity"),
     ("coins", "other"), ("?", "other")],
)  # fmt: skip
def test_token_categories(token, category):
    assert token_category(token) == category


def test_integrated_gradients_are_complete_within_the_reported_delta(random_codi):
    problems = synthetic_split("test")[:4]
    ig = integrated_gradients(random_codi, problems, [Head(1, 1), Head(0, 2)], thought=1, n_steps=48, batch_size=2)
    total = np.nansum(ig.scores, -1)  # [N, H]: sum over the question tokens
    # captum's delta is sum(attributions) - (f(x) - f(baseline)); our f gap is computed apart
    np.testing.assert_allclose(total - ig.outputs, ig.deltas, atol=1e-4)
    assert np.abs(ig.deltas).mean() < 0.05 * np.abs(ig.outputs).mean()
    for i, tokens in enumerate(ig.tokens):
        assert (ig.categories[i] >= 0).sum() == len(tokens)
        assert np.isnan(ig.scores[i, :, : ig.scores.shape[2] - len(tokens)]).all()  # padding has no score
    attr, share = ig.shares()
    np.testing.assert_allclose(attr.sum(-1), 1.0)
    np.testing.assert_allclose(share.sum(-1), 1.0)
    assert attr.shape == (4, 2, len(CATEGORIES))


def test_tiers_on_a_hand_made_table():
    steps = np.array([1, 1, 1, 2, 2, 3, 4, 1])
    conf = np.array([0.95, 0.85, 0.5, 0.95, 0.7, 0.99, 0.8, 0.91])
    assert list(assign_tiers(steps, conf)) == ["easy", "medium", "hard", "medium", "medium", "hard", "hard", "easy"]
    assert tier_sizes(assign_tiers(steps, conf)) == {"easy": 2, "medium": 3, "hard": 3}


def _late(pytester, suite_args, tmp_path, name, *args):
    return pytester.runpytest_inprocess(*suite_args(tmp_path / name, tmp_path / "cache", "--n-problems", "12", *args))


def test_the_gate_skips_phase2_with_the_reason_and_no_gates_runs_it(pytester, tmp_path, suite_args):
    claim = "2.2-reroute-neighbour-arbitrary"
    gated = _late(pytester, suite_args, tmp_path, "gated", "--model", "tiny-gpt2", "-k", claim, "-rs")
    assert gated.parseoutcomes().get("skipped") == 1
    gated.stdout.fnmatch_lines(["*phase 1 gate not met: 1.1-top3-causal is * for tiny-gpt2*distributed analysis*"])
    lonely = "2.2-reroute-other-hub-arbitrary"  # needs a second model in the run
    forced = _late(pytester, suite_args, tmp_path, "forced", "--model", "tiny-gpt2", "-k", f"{claim} or {lonely}",
                   "--no-gates")  # fmt: skip
    assert "skipped" not in forced.parseoutcomes()
    rows = {r["id"]: r for r in read_claims(tmp_path / "forced")["claims"]}
    assert sorted(rows) == sorted([claim, lonely])
    assert rows[lonely]["verdict"] == "INCONCLUSIVE" and rows[lonely]["details"]["note"].startswith("needs a second")
    forced.stdout.fnmatch_lines([f"INCONCLUSIVE {lonely} * tiny-gpt2 * not measured: needs a second model in the run"])


def test_late_phases_end_to_end(pytester, tmp_path, suite_args):
    late = "(phase2 or phase3 or phase4) and not das"
    result = _late(pytester, suite_args, tmp_path, "late", "-k", late, "--no-gates")
    assert result.ret in (0, 1)
    rows = read_claims(tmp_path / "late")["claims"]
    assert sorted((r["id"], r["model"]) for r in rows) == sorted(
        (c, m) for c in LATE for m in ("tiny-gpt2", "tiny-llama")
    )
    run = tmp_path / "late"
    csvs = ("transplant.csv", "rerouting.csv", "probes.csv", "attribution.csv", "tiers.csv")
    pngs = (
        "transplant.png",
        "rerouting.png",
        "probes_answer_last_digit.png",
        "attribution_tiny-llama.png",
        "tiers.png",
    )
    for name in csvs + pngs:
        assert (run / name).stat().st_size > 0, name
    transplant = {r["model"]: r for r in rows if r["id"] == "2.1-transplant-universal"}
    assert transplant["tiny-gpt2"]["details"]["donor"].startswith("tiny-llama")
    assert 0 < transplant["tiny-gpt2"]["details"]["r2"]["in"] <= 1
    assert len(transplant["tiny-llama"]["details"]["control"]) == 3
    summary = (run / "summary.md").read_text()
    for title in ("(2.1)", "(2.2)", "(3.1)", "(3.2)", "(4.1)"):
        assert title in summary

    warm = _late(pytester, suite_args, tmp_path, "warm", "-k", late, "--no-gates")
    warm.stdout.fnmatch_lines(["models loaded: none (every result was in the cache)"])
    assert read_claims(tmp_path / "warm")["claims"] == rows


def test_a_das_claim_end_to_end(pytester, tmp_path, suite_args):
    """A learned-subspace claim (two training steps, one thought) lands in the report with its
    chosen rank, its control and das.csv / das.png."""
    registry = tmp_path / "claims.toml"
    registry.write_text(
        '[[claim]]\nid = "d"\nphase = 3\nstatement = "s"\nmetric = "das"\nthreshold = 50.0\n'
        'direction = "greater"\nexperiment = { thought = "CT1", steps = 2, n_random = 2 }\n'
    )
    result = _late(pytester, suite_args, tmp_path, "das", "--model", "tiny-gpt2", "--registry", str(registry))
    assert result.ret in (0, 1), result.outlines[-20:]
    (row,) = read_claims(tmp_path / "das")["claims"]
    assert row["positions"] == "CT1" and row["details"]["rank"] in (1, 2, 4, 8) and len(row["details"]["control"]) == 2
    table = (tmp_path / "das" / "das.csv").read_text().splitlines()
    assert table[0].startswith("thought,rank,discovery,test,whole_thought")
    assert [line.split(",")[1] for line in table[1:]] == ["1", "2", "4", "8"]  # up to max_rank 8, not 16
    assert (tmp_path / "das" / "das.png").stat().st_size > 0


def test_interchange_and_das_claims_on_a_published_format_checkpoint_with_gsm8k(pytester, tmp_path, suite_args):
    """The published layout (random weights, bfloat16) on GSM8K: the counterfactual claims make
    their pairs from the annotations, say how many and how many are answered right on both
    sides, and, none being right, say so instead of an effect."""
    files = build_checkpoint("gpt2", tmp_path / "hub", "bfloat16", tiny=True)
    registry = tmp_path / "claims.toml"
    registry.write_text(
        '[[claim]]\nid = "i"\nphase = 3\nstatement = "s"\nmetric = "interchange"\nthreshold = 50.0\n'
        'direction = "greater"\n\n'
        '[[claim]]\nid = "d"\nphase = 3\nstatement = "s"\nmetric = "das"\nthreshold = 50.0\n'
        'direction = "greater"\nexperiment = { thought = "CT1", steps = 2, n_random = 2 }\n'
    )
    model = (
        "--model",
        str(files.checkpoint.parent),
        "--base",
        str(files.base),
        "--data",
        "gsm8k",
        "--min-baseline",
        "0",
    )
    result = _late(pytester, suite_args, tmp_path, "gsm8k", *model, "--dtype", "bfloat16", "--registry", str(registry),
                   "--n-problems", "8")  # fmt: skip
    assert result.ret in (0, 1), result.outlines[-20:] + result.errlines[-20:]
    rows = {r["id"]: r for r in read_claims(tmp_path / "gsm8k")["claims"]}
    made = counterfactuals(held_out_splits("gsm8k", 8)[0], seed=0)
    assert len(made.pairs) >= 4
    for row in rows.values():
        assert (
            f"0 of {len(made.pairs)} pairs right on both sides ({len(made.pairs)} of 8 problems paired)" in row["mode"]
        )
        assert row["details"]["note"] == "no pair answered right on both sides" and row["verdict"] == "INCONCLUSIVE"
