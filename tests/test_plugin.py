"""The hypotheses suite end to end, run by pytester in a subprocess on a small problem count."""

import io
import json
from pathlib import Path

import numpy as np
import pytest

from harness.interventions.hooks import HeadAblation
from harness.judgment.claims import load_registry
from harness.measures.evaluation import evaluate
from harness.report.folder import read_claims
from harness.runtime.arch import Head
from harness.runtime.progress import LOG_INTERVAL_S, bar, show_on
from harness.statistics.effects import accuracy_drop

ROOT = Path(__file__).resolve().parent.parent
N = 40
PHASE1 = [c.id for c in load_registry() if c.phase == 1]


def _run(pytester, suite_args, report_dir, cache_dir, *args):
    phase1 = ("-k", "phase1", "--model", "tiny-gpt2", "--n-problems", str(N))
    return pytester.runpytest_inprocess(*suite_args(report_dir, cache_dir, *phase1, *args))


REFERENCE = Path(__file__).parent / "data" / "phase1_tiny-gpt2_n40.json"


def _matches_reference(claims: list[dict]) -> None:
    """Every claim's numbers and verdicts as the committed reference run has them: a change to
    the machinery (a refactor, a cache key) must not move a single effect, CI or verdict."""
    reference = json.loads(REFERENCE.read_text())["claims"]
    assert [(c["id"], c["model"]) for c in claims] == [(r["id"], r["model"]) for r in reference]
    for claim, ref in zip(claims, reference):
        for key, value in ref.items():
            if isinstance(value, float):
                assert claim[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (claim["id"], key)
            else:
                assert claim[key] == value, (claim["id"], key)


def test_phase1_end_to_end(pytester, tmp_path, suite_args):
    cache = tmp_path / "cache"
    cold = _run(pytester, suite_args, tmp_path / "reports" / "run1", cache)
    report = read_claims(tmp_path / "reports" / "run1")
    claims, info = report["claims"], report["run"]
    assert sorted(c["id"] for c in claims) == sorted(PHASE1)
    verdicts = [c["verdict"] for c in claims]
    assert set(verdicts) <= {"SUPPORTED", "REFUTED", "INCONCLUSIVE"}
    outcomes = cold.parseoutcomes()
    assert outcomes.get("passed", 0) == verdicts.count("SUPPORTED")
    assert outcomes.get("failed", 0) == verdicts.count("REFUTED")
    assert outcomes.get("inconclusive", 0) == verdicts.count("INCONCLUSIVE")
    assert cold.ret == (1 if "REFUTED" in verdicts else 0)
    vs_random = next(c for c in claims if c["id"] == "1.1-top3-vs-random")
    control = vs_random["details"]["control"]
    assert vs_random["threshold"] == pytest.approx(np.percentile(control, 95)), "threshold 0: no margin"
    assert vs_random["p_value"] == pytest.approx((1 + sum(x >= vs_random["effect"] for x in control)) / 21)
    for c in claims:
        assert c["ci_low"] <= c["effect"] <= c["ci_high"]
        assert c["model"] == "tiny-gpt2" and c["n"] == N and 0 <= c["p_value"] <= c["p_holm"] <= 1
    run = tmp_path / "reports" / "run1"
    for name in (
        "report.html",
        "claims.csv",
        "ablation.csv",
        "positions.csv",
        "patterns.csv",
        "summary.md",
        "ablation.png",
        "positions.png",
        "patterns.png",
        "ranked_heads_tiny-gpt2.csv",
        "forest.png",
        "by_type.csv",
    ):
        assert (run / name).stat().st_size > 0, name
    for figure in run.glob("*.png"):
        assert "<svg" in (run / f"{figure.stem}.svg").read_text()[:2000], f"{figure.stem}: no SVG beside the PNG"
    _matches_reference(claims)
    model = info["models"]["tiny-gpt2"]
    baseline = next(c for c in claims if c["id"] == "1.1-top3-causal")
    assert model["n"] == N and model["baseline_accuracy"] == pytest.approx(baseline["baseline"], abs=0.05)
    assert model["heads"] == baseline["details"]["heads"] and model["heads_from"].startswith("ranking")
    assert model["hub"] == next(c for c in claims if c["id"] == "1.2-hub-drop")["positions"]
    assert info["seed"] == 0 and {"harness", "torch", "transformers", "python"} <= set(info["versions"])
    assert len(model["fingerprint"]) == 16 and len(info["registry_hash"]) == 16
    table = (run / "claims.csv").read_text().splitlines()
    assert {"n", "heads", "positions", "mode", "measure", "baseline", "ci_low", "ci_high"} <= set(table[0].split(","))
    assert not any(len(x) > 12 for line in table[1:] for x in line.split(",") if x.replace(".", "").isdigit())
    assert (run / "ablation.csv").read_text().startswith("n_heads,tiny-gpt2_acc")
    assert (run / "positions.csv").read_text().startswith("position,tiny-gpt2_drop")
    page = (run / "report.html").read_text()
    assert all(cid in page for cid in PHASE1) and "data:image/png;base64" in page
    assert '<title id="head-title">CODI claims — run1</title>' in page
    cold.stdout.fnmatch_lines(["*tiny-gpt2: Baseline(): * s, computed"])  # progress, past the capture
    assert (tmp_path / "reports" / "latest").resolve() == run.resolve()

    cold.stdout.fnmatch_lines(["models loaded: tiny-gpt2"])
    warm = _run(pytester, suite_args, tmp_path / "reports" / "run2", cache)
    assert warm.ret == cold.ret
    warm.stdout.fnmatch_lines(["models loaded: none (every result was in the cache)"])
    assert not [line for line in warm.outlines if line.endswith(", computed")]
    warm.stdout.fnmatch_lines(["Compared with the newest earlier run of the same configuration*: run1."])
    again = read_claims(tmp_path / "reports" / "run2")["claims"]
    assert [(c["id"], c["effect"], c["ci_low"], c["ci_high"]) for c in again] == [
        (c["id"], c["effect"], c["ci_low"], c["ci_high"]) for c in claims
    ]
    assert (tmp_path / "reports" / "latest").resolve() == (tmp_path / "reports" / "run2").resolve()
    assert (run / "claims.json").exists(), "an earlier run's report is never overwritten"


def test_top3_effect_equals_an_independent_recomputation(pytester, tmp_path, load_model, suite_args):
    _run(pytester, suite_args, tmp_path / "r", tmp_path / "cache", "-k", "1.1-top3-causal")
    claim = read_claims(tmp_path / "r")["claims"][0]
    codi = load_model("tiny-gpt2")
    from harness.data.problems import synthetic_split

    problems = synthetic_split("test")[:N]
    heads = [Head(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in claim["details"]["heads"]]
    base = evaluate(codi, problems, batch_size=7, progress=False)
    ablated = evaluate(
        codi, problems, batch_size=7, progress=False, intervene=lambda pmap, idx: HeadAblation(codi, heads, pmap.latent)
    )
    effect = accuracy_drop([r.correct for r in base.records], [r.correct for r in ablated.records])
    assert claim["effect"] == pytest.approx(effect.effect)
    assert (claim["ci_low"], claim["ci_high"]) == pytest.approx((effect.ci_low, effect.ci_high))
    assert claim["p_value"] == pytest.approx(effect.p_value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "L99H0"], "out of range"),
        (["--model", "/no/such/model"], "not found"),
        (["--n-problems", "0"], "must be positive"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    ],
)
def test_usage_errors_exit_4_before_any_model_runs(pytester, tmp_path, args, message, suite_args):
    result = _run(pytester, suite_args, tmp_path / "r", tmp_path / "cache", *args)
    assert result.ret == 4
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()
    assert not (tmp_path / "r").exists(), "a run that measured nothing leaves no report folder"


def test_collect_only_makes_no_report_folder(pytester, tmp_path, suite_args):
    result = _run(pytester, suite_args, tmp_path / "r", tmp_path / "cache", "--collect-only")
    assert result.ret == 0 and not (tmp_path / "r").exists()


def test_a_bar_written_to_a_log_redraws_at_most_every_30_s():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log, terminal = io.StringIO(), Terminal()
    with show_on(log):
        logged = bar(range(1000), desc="evaluate")
        list(logged)
    with show_on(terminal):
        live = bar(range(3))
        list(live)
    assert logged.mininterval == LOG_INTERVAL_S and live.mininterval < 1
    assert log.getvalue().count("evaluate") <= 3, "a fast loop draws its bar once or twice in a log, not per step"


_PYTHON_CLAIM = """
from harness.interventions.specs import AblateHeads, PatchThoughts


def test_python_claim_of_mine(model_run, assert_claim):
    {body}
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('model_run.paired(AblateHeads(("L9H0",)))', "head L9H0 out of range for tiny-gpt2: 4 layers x 8 heads"),
        (
            'p = model_run.paired(PatchThoughts(("CT1",), "zero"))\n'
            '    assert_claim(p.claim("same", "s", -200.0, "greater"))  # SUPPORTED: the test goes on\n'
            '    assert_claim(p.claim("same", "s", -100.0, "greater"))',
            "claim 'same' on tiny-gpt2 is recorded twice",
        ),
    ],
    ids=["head", "duplicate-id"],  # the other refusals are InterventionErrors too: tests/test_specs.py
)
def test_a_python_claim_that_cannot_run_as_written_is_a_usage_error(pytester, tmp_path, suite_args, body, message):
    test_file = tmp_path / "test_mine.py"
    test_file.write_text(_PYTHON_CLAIM.format(body=body))
    args = suite_args(tmp_path / "r", tmp_path / "cache", "--model", "tiny-gpt2", "--n-problems", "12", "-k", "of_mine")
    result = pytester.runpytest_inprocess(*args, str(test_file))
    assert result.ret == 4, result.outlines[-10:] + result.errlines[-10:]
    assert message in result.stdout.str() + result.stderr.str()
