"""The report's parts that decide what a nightly reader is told: which earlier run a verdict
is compared with, which folders are pruned, how numbers are rounded, and which problem type
the error analysis names."""

import json
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from harness.data.problems import Problem
from harness.judgment import error_analysis
from harness.measures.runner import Condition
from harness.report import folder as report
from harness.report import runinfo

CONFIG = {"seed": 0, "device": "cpu", "dtype": "float32", "reference_batching": False, "registry_hash": "r1",
          "claim_code_hash": "c1"}  # fmt: skip
MODELS = {"m": {"fingerprint": "f1", "data_hash": "d1", "n": 100}}


def _run(root, name, verdicts: dict[str, str], mtime: int, **changes) -> None:
    """An earlier report folder: its run block and one claim row per verdict."""
    folder = root / name
    folder.mkdir(parents=True)
    run = {**CONFIG, "id": name, "models": MODELS, **changes}
    claims = [{"id": cid, "model": "m", "verdict": v} for cid, v in verdicts.items()]
    path = folder / "claims.json"
    path.write_text(json.dumps({"run": run, "claims": claims}))
    os.utime(path, (mtime, mtime))


def _now(verdicts: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"id": cid, "model": "m", "verdict": v} for cid, v in verdicts.items()])


def test_flips_are_against_the_newest_run_of_the_same_configuration_that_measured_each_claim(tmp_path):
    _run(tmp_path, "20260101-000000", {"x": "SUPPORTED", "y": "SUPPORTED"}, 100)  # the last full nightly
    _run(tmp_path, "20260101-010000", {"x": "REFUTED", "y": "REFUTED"}, 200, seed=7)  # ad hoc: another seed
    _run(tmp_path, "20260101-020000", {"x": "SUPPORTED"}, 300)  # a `-k x` run of the same configuration
    current = tmp_path / "20260102-000000"
    current.mkdir()
    flips, said, used = report.compare(
        _now({"x": "REFUTED", "y": "REFUTED"}), {**CONFIG, "models": MODELS}, current, None
    )
    assert sorted(flips) == [
        "x on m: SUPPORTED -> REFUTED (vs 20260101-020000)",
        "y on m: SUPPORTED -> REFUTED (vs 20260101-000000)",  # not hidden by the -k run, not faked by the ad-hoc one
    ]
    assert used == ["20260101-020000", "20260101-000000"] and "same configuration" in said


def test_other_weights_data_n_heads_or_python_claims_are_not_comparable(tmp_path):
    changes = ({"fingerprint": "f2"}, {"data_hash": "d2"}, {"n": 50}, {"forced_heads": ["L0H0", "L1H1"]})
    for i, model in enumerate(changes):
        _run(tmp_path, f"2026010{i}-000000", {"x": "SUPPORTED"}, 100 + i, models={"m": {**MODELS["m"], **model}})
    _run(tmp_path, "20260108-000000", {"x": "SUPPORTED"}, 200, claim_code_hash="c2")  # an edited Python claim
    current = tmp_path / "20260109-000000"
    current.mkdir()
    flips, said, used = report.compare(_now({"x": "REFUTED"}), {**CONFIG, "models": MODELS}, current, None)
    assert flips == [] and used == [] and "nothing to compare with" in said
    _, said, _ = report.compare(
        _now({"x": "REFUTED"}), {**CONFIG, "models": MODELS}, current, tmp_path / "20260103-000000"
    )
    assert "differs: m forced_heads" in said


def test_the_python_claims_hash_follows_their_code(tmp_path):
    (tmp_path / "sub").mkdir()
    claim, notes = tmp_path / "sub" / "test_mine.py", tmp_path / "notes.txt"
    claim.write_text("x = 1\n")
    notes.write_text("a")
    before = runinfo.code_hash([tmp_path])
    notes.write_text("b")  # not a Python file
    assert runinfo.code_hash([tmp_path]) == before == runinfo.code_hash([claim])
    claim.write_text("x = 2\n")
    assert runinfo.code_hash([tmp_path]) != before


def test_compare_to_names_the_run_and_says_when_its_configuration_differs(tmp_path):
    _run(tmp_path, "old", {"x": "SUPPORTED"}, 100, seed=7)
    current = tmp_path / "new"
    current.mkdir()
    flips, said, _ = report.compare(_now({"x": "REFUTED"}), {**CONFIG, "models": MODELS}, current, tmp_path / "old")
    assert flips == ["x on m: SUPPORTED -> REFUTED (vs old)"]
    assert "--compare-to" in said and "differs: seed" in said


def test_prune_keeps_the_newest_run_folders_and_nothing_else_is_touched(tmp_path):
    runs = [tmp_path / f"202601{d:02d}-000000" for d in range(1, 26)]
    for run in runs:
        run.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "latest").symlink_to(runs[-1].name)
    removed = report.prune_reports(tmp_path, 20, runs[-1])
    assert removed == runs[:5]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([r.name for r in runs[5:]] + ["notes", "latest"])


@pytest.mark.parametrize(
    ("value", "shown"), [(60.099999999999994, 60.1), (0.012345678, 0.0123), (123.456, 123.5), (-2.0049, -2.0)]
)
def test_rounding(value, shown):
    assert report.rounded(value) == shown


def _problem(i: int, steps: int) -> Problem:
    cot = " ".join(["<< 2 + 3 = 5 >>"] + ["<< 5 * 2 = 10 >>"] * (steps - 1))
    return Problem(f"p{i}", "q", cot, 10.0, steps)


def test_the_error_analysis_names_the_type_a_planted_condition_hurts():
    problems = [_problem(i, 1 + i % 3) for i in range(300)]  # 1, 2 and 3 steps, 100 each
    correct = np.ones(300)
    hurt = np.array([0.0 if p.n_steps == 3 and i % 2 == 0 else 1.0 for i, p in enumerate(problems)])
    baseline = Condition(correct, np.zeros(300), np.ones(300))
    treated = Condition(hurt, np.zeros(300), np.ones(300))
    rows = error_analysis.by_type(problems, baseline, {"planted": [treated], "other": [baseline]}, with_ci="planted")
    assert all(np.isnan(r["ci_low"]) for r in rows if r["condition"] == "other")
    rows = [r for r in rows if r["condition"] == "planted"]
    top = error_analysis.most_affected(rows)
    assert (top["dimension"], top["type"]) == ("steps", "3 steps") and top["drop"] == pytest.approx(50.0)
    unhurt = [r for r in rows if r["type"] in ("1 step", "2 steps")]
    assert all(r["drop"] == 0 for r in unhurt)
    assert {r["type"] for r in rows if r["dimension"] == "operations"} == {"+", "+ ×"}


def test_operations_are_read_from_the_solution_not_the_question():
    assert error_analysis.operations(Problem("a", "5 - 3 = ?", "<<48/2=24>> <<24*3=72>>", 72.0, 2)) == "× ÷"
    assert error_analysis.operations(Problem("b", "q", "<< 4 - -2 = 6 >>", 6.0, 1)) == "-"
    # GSM8K chains operations in one step and writes decimals without a leading zero
    assert error_analysis.operations(Problem("c", "q", "<<15*3/5=9>>", 9.0, 1)) == "× ÷"
    assert error_analysis.operations(Problem("d", "q", "<<30*.5=15>> <<(2+3)*4=20>>", 20.0, 2)) == "+ ×"


def test_claims_json_keeps_small_p_values_and_writes_nan_as_null(tmp_path):
    from harness.statistics.effects import PairedEffect
    from harness.statistics.verdicts import claim_result

    rows = [
        claim_result(PairedEffect(8.5, 6.3, 10.7, 2.3e-14, 1000, "McNemar exact"), id="tiny-p", statement="s",
                     model="m", threshold=20.0, direction="greater"),
        claim_result(PairedEffect(*[float("nan")] * 4, 10, ""), id="unmeasured", statement="s", model="m",
                     threshold=1.0, direction="less"),
    ]  # fmt: skip
    run = {**CONFIG, "id": "r", "versions": {}, "data": [], "registry": "claims.toml", "models": {}}
    written = report.write_report(tmp_path / "r", rows, {}, run)
    claims = {c["id"]: c for c in report.read_claims(tmp_path / "r")["claims"]}
    assert claims["tiny-p"]["p_value"] == 2.3e-14, "full precision (pandas' to_json wrote 0.0)"
    assert claims["tiny-p"]["p_holm"] == pytest.approx(2.3e-14, rel=1e-9, abs=0), "NaN p: not in the family"
    assert claims["unmeasured"]["effect"] is None and claims["unmeasured"]["verdict"] == "INCONCLUSIVE"
    assert "2.3e-14" in (tmp_path / "r" / "claims.csv").read_text()
    assert (tmp_path / "r" / "forest.svg").exists() and "id='forest.png'" in written.html


def test_the_ablation_table_keeps_one_row_per_condition_and_measure():
    from harness.judgment.kinds import head_ablation
    from harness.statistics.verdicts import ClaimResult

    def row(cid: str, measure: str, effect: float) -> ClaimResult:
        details = {"heads": ["L0H1"], "heads_from": "claim", "positions": ["latent"], "mode": "zero", "n_draws": 1,
                   "baseline_accuracy": 80.0, "accuracy": 70.0, "control": [1.0, 2.0]}  # fmt: skip
        return ClaimResult(id=cid, phase=1, model="m", statement="s", metric="ablation_drop", measure=measure,
                           effect=effect, ci_low=effect - 1, ci_high=effect + 1, threshold=1.0, direction="greater",
                           p_value=0.01, p_test="t", verdict="SUPPORTED", point_verdict="", n=100,
                           details=details)  # fmt: skip

    rows = [row("acc", "accuracy", 10.0), row("acc-again", "accuracy", 10.0), row("logp", "answer_logprob", 0.3)]
    table = head_ablation.section(rows, {}).tables["ablation_claims"]
    assert table[["claim", "measure", "drop"]].values.tolist() == [["acc acc-again", "accuracy", 10.0],
                                                                   ["logp", "answer_logprob", 0.3]]  # fmt: skip


def test_holm_adjusts_within_each_model_and_phase(tmp_path):
    """Holm's step-down correction over a (model, phase) family: three phase-1 claims share
    one family; a phase-2 claim and another model's claim are families of their own."""
    from harness.statistics.effects import PairedEffect
    from harness.statistics.verdicts import claim_result

    def row(cid: str, p: float, model: str = "m", phase: int = 1):
        effect = PairedEffect(8.5, 6.3, 10.7, p, 100, "McNemar exact")
        return claim_result(effect, id=cid, statement="s", model=model, threshold=1.0, direction="greater", phase=phase)

    rows = [row("a", 0.01), row("b", 0.04), row("c", 0.03), row("d", 0.02, phase=2), row("e", 0.01, model="n")]
    run = {**CONFIG, "id": "r", "versions": {}, "data": [], "registry": "claims.toml", "models": {}}
    report.write_report(tmp_path / "r", rows, {}, run)
    p_holm = {c["id"]: c["p_holm"] for c in report.read_claims(tmp_path / "r")["claims"]}
    assert p_holm == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02, "e": 0.01})


def test_the_point_estimate_line_is_named_as_such():
    """Under INCONCLUSIVE the seed's criterion on the point estimate ("supported") is labelled,
    not a bare second verdict."""
    from harness.report.page import claims_table
    from harness.statistics.effects import PairedEffect
    from harness.statistics.verdicts import claim_result

    row = claim_result(PairedEffect(12.0, 8.0, 16.0, 0.01, 100, "McNemar exact"), id="c", statement="s", model="m",
                       threshold=10.0, direction="greater")  # fmt: skip
    df = pd.DataFrame([row.as_row()]).assign(p_holm=0.01)
    page = claims_table(df)
    assert row.verdict == "INCONCLUSIVE" and "point estimate alone: supported" in page


def test_the_forest_plot_draws_rows_with_an_effect_and_counts_the_others():
    """An unmeasured row has no point and no unit: drawn, it sat as an empty line in whatever
    panel its measure's default unit named (a "% of pairs" claim under "accuracy points")."""
    from harness.report.page import forest_plot
    from harness.statistics.effects import PairedEffect
    from harness.statistics.verdicts import claim_result

    def row(effect, claim, unit=""):
        result = claim_result(PairedEffect(effect, effect - 1, effect + 1, 0.01, 50, "t"), id=claim, statement="s",
                              model="m", threshold=1.0, direction="greater")  # fmt: skip
        return replace(result, unit=unit).as_row()  # a registry kind's unit (Python claims have the measure's)

    nan = float("nan")
    df = pd.DataFrame([row(4.0, "drop"), row(nan, "pairs-none", "% of pairs"), row(30.0, "pairs", "% of pairs")])
    fig = forest_plot(df)
    labels = {ax.get_xlabel(): [t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes}
    assert labels == {"effect (accuracy points)": ["drop · m"], "effect (% of pairs)": ["pairs · m"]}
    assert "1 without an effect" in fig._suptitle.get_text()
    empty = forest_plot(df.iloc[[1]])
    assert len(empty.axes) == 0 and "no claim has an effect to plot" in empty.texts[0].get_text()
