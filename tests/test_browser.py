"""The report as a reader sees it: rendered by headless Chromium (pytest-html's scripts run),
its counters match the verdicts in claims.json, INCONCLUSIVE rows are neither hidden nor
counted as passed, and the forest plot and claims table come first.

Needs Debian's `chromium` (`.ci/run` installs it and sets CODI_REQUIRE_BROWSER=1, so CI
fails rather than skips when it is missing)."""

import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

from harness.report.folder import read_claims

CLAIMS = """
import pytest
from harness.statistics.effects import PairedEffect
from harness.statistics.verdicts import claim_result

CASES = [  # id, effect, CI: threshold 10, refuted below 2
    ("a-supported", 12.0, 11.0, 13.0),
    ("b-refuted", 0.5, 0.0, 1.0),
    ("c-inconclusive", 5.0, -1.0, 11.0),
    ("d-inconclusive", 9.0, 1.0, 20.0),
    ("e-supported", 30.0, 20.0, 40.0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_claim(case, model_name, assert_claim):
    cid, effect, low, high = case
    result = claim_result(
        PairedEffect(effect, low, high, 0.01, 100, "McNemar exact"),
        id=cid, statement=f"{cid} statement", model=model_name, threshold=10.0, direction="greater", refute_at=2.0,
    )
    assert_claim(result)
"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _dump_dom(browser: str, page, profile) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
               "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_rendered_report_counts_each_verdict_in_its_own_category(pytester, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CODI_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed, and CODI_REQUIRE_BROWSER is set (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    test_file = tmp_path / "test_fabricated_claims.py"
    test_file.write_text(CLAIMS)
    report = tmp_path / "report"
    result = pytester.runpytest_inprocess(
        str(test_file), "-p", "harness.plugin.suite", "-p", "no:cacheprovider", "--report-dir", str(report),
        "--cache-dir", str(tmp_path / "cache"), "--model", "tiny-gpt2", "--n-problems", "20",
    )  # fmt: skip
    assert result.ret == 1, result.outlines[-20:] + result.errlines[-20:]
    verdicts = Counter(c["verdict"] for c in read_claims(report)["claims"])
    assert verdicts == {"SUPPORTED": 2, "REFUTED": 1, "INCONCLUSIVE": 2}

    dom = _dump_dom(browser, report / "report.html", tmp_path / "profile")
    counters = {k.lower(): int(n) for n, k in re.findall(r'<span class="\w+">(\d+) ([A-Z][a-z ]+),?</span>', dom)}
    assert counters["passed"] == verdicts["SUPPORTED"], counters
    assert counters["failed"] == verdicts["REFUTED"], counters
    assert counters["inconclusive"] == verdicts["INCONCLUSIVE"], counters
    shown = Counter(re.findall(r'<td class="col-result[^"]*">(\w+)</td>', dom))  # rows pytest-html's script drew
    assert shown == {"Passed": 2, "Failed": 1, "Inconclusive": 2}, "every row is shown under its own outcome"
    assert re.search(r"<title[^>]*>CODI claims — report</title>", dom)
    forest = re.search(r"<img[^>]*id=\"forest\.png\"[^>]*alt=\"forest plot", dom)
    table = dom.find('<table class="codi-claims"')
    assert forest and 0 < forest.start() < table < dom.find('id="results-table"'), "forest plot, then claims table"
    start = dom.find('id="environment"')
    environment = re.sub(r"<[^>]+>|\s+", " ", dom[start : dom.find("</table>", start)])
    assert re.search(r"model tiny-gpt2 +fingerprint [0-9a-f]{16}, data synthetic", environment), environment
    assert re.search(r"torch +2\.", environment), "the environment box names torch and the models"
    rows = re.findall(r"<tr class=\"(supported|refuted|inconclusive)\" title=", dom)
    assert Counter(rows) == {"supported": 2, "refuted": 1, "inconclusive": 2}
