"""The worked examples of docs/writing-hypotheses.md run as written and land in the report."""

import re
from pathlib import Path

from harness.judgment.claims import REGISTRY
from harness.report.folder import read_claims

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-hypotheses.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_worked_examples_run_and_land_in_the_report(pytester, tmp_path, suite_args):
    (toml,) = _blocks("toml")
    (python,) = _blocks("python")
    registry = tmp_path / "claims.toml"
    registry.write_text(REGISTRY.read_text() + "\n" + toml)
    test_file = tmp_path / "test_my_claims.py"
    test_file.write_text(python)
    report = tmp_path / "report"
    selected = "-k", "my-mean-ablation-ct2 or mean_ablation_and"
    args = suite_args(report, tmp_path / "cache", "--registry", str(registry), "--model", "tiny-gpt2", *selected)
    result = pytester.runpytest_inprocess(*args, "--n-problems", "40", str(test_file))
    assert result.ret in (0, 1), result.outlines[-20:] + result.errlines[-20:]
    rows = {c["id"]: c for c in read_claims(report)["claims"]}
    assert set(rows) == {"my-mean-ablation-ct2", "my-composed-condition"}
    toml_row, python_row = rows["my-mean-ablation-ct2"], rows["my-composed-condition"]
    assert toml_row["measure"] == "answer_logprob" and toml_row["p_test"] == "Wilcoxon signed-rank"
    assert toml_row["heads"] == "L1H2 L3H1 (claim)" and toml_row["positions"] == "CT2" and toml_row["mode"] == "mean"
    assert toml_row["details"]["mode"] == "mean" and len(toml_row["details"]["control"]) == 5
    assert python_row["measure"] == "accuracy" and python_row["mode"] == "heads mean + thoughts zero"
    assert python_row["heads"] == "L1H2" and python_row["positions"] == "CT2 CT3" and python_row["n"] == 40
    outcomes = result.parseoutcomes()
    verdicts = [r["verdict"] for r in rows.values()]
    assert outcomes.get("passed", 0) == verdicts.count("SUPPORTED")
    assert outcomes.get("failed", 0) == verdicts.count("REFUTED")
    summary = (report / "summary.md").read_text()
    assert "my-mean-ablation-ct2" in summary and "my-composed-condition" in summary
    assert "my-composed-condition" in (report / "report.html").read_text()
