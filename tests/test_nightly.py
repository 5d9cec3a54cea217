"""The nightly job as docs/nightly.md describes it: the workflow file says what the page says,
and --fail-on-flip gives a changed verdict an exit status of its own."""

import json
import re
from pathlib import Path

import pytest
import yaml

from harness.plugin.suite import FLIPPED, NOT_JUDGED
from harness.report.folder import read_claims

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "claims-nightly.yml"
DOC = ROOT / "docs" / "nightly.md"


@pytest.fixture(scope="module")
def steps() -> list[dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    return workflow["jobs"]["claims"]["steps"]


def _step(steps: list[dict], uses: str) -> tuple[int, dict]:
    (found,) = [(i, s) for i, s in enumerate(steps) if s.get("uses", "").startswith(f"{uses}@")]
    return found


def test_the_workflow_installs_torch_first_then_runs_the_readmes_command(steps):
    runs = "\n".join(s.get("run", "") for s in steps)
    assert 0 <= runs.find("pip install torch==2.13.0") < runs.find('pip install -e ".[dev]"')
    assert "`pytest hypotheses/`" in (ROOT / "README.md").read_text(), "the README's command for every claim"
    (suite,) = [s for s in steps if s.get("id") == "suite"]
    (command,) = [line for line in suite["run"].splitlines() if "pytest" in line]
    assert re.search(r"\bpytest hypotheses/(\s|$)", command), command
    assert not re.search(r"\s-[km]\s", command.split("pytest hypotheses/")[1]), "every claim, none deselected"
    assert "set +e" in suite["run"] and 'echo "status=$?" >> "$GITHUB_OUTPUT"' in suite["run"]


def test_the_workflow_keeps_cache_and_reports_and_publishes_the_report_always(steps):
    cache_at, cache = _step(steps, "actions/cache")
    suite_at = next(i for i, s in enumerate(steps) if s.get("id") == "suite")
    assert cache_at < suite_at, "restored before the suite runs"
    assert set(cache["with"]["path"].split()) == {".cache/results", "reports"}
    key, restore = cache["with"]["key"], cache["with"]["restore-keys"]
    assert "github.run_id" in key and key.startswith(restore), "a new key each night, the last night's restored"
    upload_at, upload = _step(steps, "actions/upload-artifact")
    assert upload_at > suite_at and upload["if"] == "always()" and upload["with"]["path"].startswith("reports/latest")


def test_the_workflow_fails_only_a_broken_run(steps):
    (alarm,) = [s for s in steps if "steps.suite.outputs.status" in s.get("if", "")]
    broken = json.loads(re.search(r"fromJSON\('(.*?)'\)", alarm["if"]).group(1))
    assert sorted(broken) == ["2", "3", "4", "5"] and alarm["run"].strip().startswith("exit 1")


def test_the_nightly_page_names_the_workflow_and_every_exit_status():
    doc = DOC.read_text()
    assert ".github/workflows/claims-nightly.yml" in doc
    assert all(block == WORKFLOW.read_text() for block in re.findall(r"```yaml\n(.*?)```", doc, re.S)), "one source"
    statuses = re.findall(r"^\| ([\d, ]+) \|", doc, re.M)
    assert statuses == ["0", "1", "4", "5", str(FLIPPED), str(NOT_JUDGED), "2, 3"] and "--fail-on-flip" in doc


CLAIM = """
[[claim]]
id = "l1h2-ct1"
phase = 1
statement = "Zero-ablating L1H2 at the second thought drops accuracy by more than 5 points"
metric = "ablation_drop"
threshold = 5.0
direction = "greater"
experiment = { heads = ["L1H2"], positions = ["CT1"], n_random = 1 }
"""
OTHER = {"SUPPORTED": "REFUTED", "REFUTED": "SUPPORTED", "INCONCLUSIVE": "SUPPORTED"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, list[str]]:
    """A cache shared by this file's runs (the first computes, the others read) and the options
    of a one-claim run (two conditions beside the baseline, on one model, 20 problems)."""
    root = tmp_path_factory.mktemp("nightly")
    (root / "claims.toml").write_text(CLAIM)
    return root / "cache", ["--registry", str(root / "claims.toml"), "--model", "tiny-gpt2", "--n-problems", "20"]


@pytest.mark.parametrize(
    ("flip", "option", "flipped"),
    [(True, True, True), (True, False, False), (False, True, False)],
    ids=["flip-fails", "flip-without-option", "no-flip"],
)
def test_fail_on_flip_exits_6_when_a_verdict_changed_since_the_last_run(
    pytester, tmp_path, suite_args, shared, flip, option, flipped
):
    cache, claim = shared
    first = pytester.runpytest_inprocess(*suite_args(tmp_path / "first", cache, *claim))
    (row,) = read_claims(tmp_path / "first")["claims"]
    usual = 1 if row["verdict"] == "REFUTED" else 0
    assert first.ret == usual
    nights = tmp_path / "nights"  # last night's run (its verdict edited where it flips), then tonight's
    (nights / "last").mkdir(parents=True)
    last = read_claims(tmp_path / "first")
    last["claims"][0]["verdict"] = OTHER[row["verdict"]] if flip else row["verdict"]
    (nights / "last" / "claims.json").write_text(json.dumps(last))
    option = ["--fail-on-flip"] if option else []
    tonight = pytester.runpytest_inprocess(*suite_args(nights / "tonight", cache, *claim, *option))
    assert tonight.ret == (FLIPPED if flipped else usual), tonight.outlines[-15:]
    assert any(line.startswith("Compared with the newest earlier run") for line in tonight.outlines)
    changed = [line for line in tonight.outlines if line.startswith("verdict changed: l1h2-ct1 on tiny-gpt2")]
    assert len(changed) == (1 if flip else 0), "the flip is listed, whatever the status"
    assert read_claims(nights / "tonight")["claims"][0]["verdict"] == row["verdict"]
    paged = [line for line in tonight.outlines if line.startswith(f"exit status {FLIPPED} (--fail-on-flip)")]
    assert len(paged) == (1 if flipped else 0)


MINE = """
from harness.interventions.specs import AblateHeads


def test_mine_recorded(model_run, assert_claim):  # the registry claim's condition: read from the cache
    assert_claim(model_run.paired(AblateHeads(("L1H2",), ("CT1",))).claim("mine", "s", -200.0, "greater"))


def test_mine_refused(model_run):
    model_run.paired(AblateHeads(("L9H0",)))  # a head tiny-gpt2 lacks: a usage error, exit status 4
"""


def test_a_usage_error_keeps_status_4_when_a_verdict_flipped(pytester, tmp_path, suite_args, shared):
    cache, claim = shared
    (tmp_path / "test_mine.py").write_text(MINE)
    (tmp_path / "last").mkdir()
    last = {"run": {}, "claims": [{"id": "mine", "model": "tiny-gpt2", "verdict": "REFUTED"}]}
    (tmp_path / "last" / "claims.json").write_text(json.dumps(last))
    args = ["--fail-on-flip", "--compare-to", str(tmp_path / "last"), str(tmp_path / "test_mine.py"), "-k", "mine"]
    result = pytester.runpytest_inprocess(*suite_args(tmp_path / "tonight", cache, *claim, *args))
    assert result.ret == 4, result.outlines[-15:]
    assert "verdict changed: mine on tiny-gpt2: REFUTED -> SUPPORTED (vs last)" in result.outlines
    assert not any(line.startswith(f"exit status {FLIPPED}") for line in result.outlines)
