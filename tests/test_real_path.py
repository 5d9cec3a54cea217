"""The real path's setup mistakes, caught: a model below the baseline floor is not judged, each
hub-format checkpoint has its own base, checkpoints that share a folder name keep distinct names,
a run measures the registry of its own folder, a run that parametrizes no claim is refused, and
a row that could not be measured says why."""

import json
import shutil
from pathlib import Path

import pytest

from harness.commands.fullsize import build_checkpoint
from harness.report.folder import read_claims

ROOT = Path(__file__).resolve().parent.parent
CHEAP = (  # two cheap claims: zeroing CT1, in accuracy and in answer log-probability
    '[[claim]]\nid = "ct1-acc"\nphase = 1\nstatement = "s"\nmetric = "position_drop"\nthreshold = 1.0\n'
    'direction = "greater"\nexperiment = { positions = ["CT1"], mode = "zero" }\n\n'
    '[[claim]]\nid = "ct1-logprob"\nphase = 1\nstatement = "s"\nmetric = "position_drop"\nthreshold = 0.1\n'
    'direction = "greater"\nmeasure = "answer_logprob"\nexperiment = { positions = ["CT1"], mode = "zero" }\n'
)


def _registry(tmp_path: Path) -> str:
    path = tmp_path / "cheap.toml"
    path.write_text(CHEAP)
    return str(path)


@pytest.fixture(scope="module")
def hub_pair(tmp_path_factory) -> dict:
    """Two published-format checkpoints (random weights), each with its own base, both in a
    folder named `ckpt`."""
    root = tmp_path_factory.mktemp("hub")
    return {arch: build_checkpoint(arch, root / arch, tiny=True) for arch in ("gpt2", "llama")}


def test_a_model_below_the_baseline_floor_is_not_judged(pytester, tmp_path, suite_args):
    """tiny-gpt2 solves about 77% of the problems: held to a floor of 99 points it is not judged,
    an accuracy and a log-prob claim alike; exit status 7; with the floor off it is judged."""
    args = ("--model", "tiny-gpt2", "--n-problems", "20", "--registry", _registry(tmp_path))
    gated = pytester.runpytest_inprocess(*suite_args(tmp_path / "gated", tmp_path / "c", *args, "--min-baseline", "99"))
    assert gated.ret == 7, gated.outlines[-20:]
    rows = read_claims(tmp_path / "gated")["claims"]
    assert len(rows) == 2 and {r["verdict"] for r in rows} == {"NOT JUDGED"}
    assert all(r["effect"] is None and "below --min-baseline 99" in r["note"] for r in rows)
    gated.stdout.fnmatch_lines(["*tiny-gpt2 not judged: baseline accuracy *% on 20 problems is below --min-baseline 99:"
                                " check --base, --n-latent and --data*(exit status 7)"])  # fmt: skip
    gated.stdout.fnmatch_lines(["NOT JUDGED * ct1-logprob * tiny-gpt2 * not judged: baseline accuracy*"])
    judged = pytester.runpytest_inprocess(
        *suite_args(tmp_path / "judged", tmp_path / "c", *args, "--min-baseline", "0")
    )
    assert judged.ret in (0, 1)
    assert {r["verdict"] for r in read_claims(tmp_path / "judged")["claims"]} <= {
        "SUPPORTED",
        "REFUTED",
        "INCONCLUSIVE",
    }
    bad = pytester.runpytest_inprocess(*suite_args(tmp_path / "bad", tmp_path / "c", *args, "--min-baseline", "-1"))
    assert bad.ret == 4 and "--min-baseline is in [0, 100)" in bad.stderr.str()


def test_a_python_claim_on_a_model_below_the_floor_is_not_judged(pytester, tmp_path, suite_args):
    test = pytester.makepyfile(
        test_mine="""
        from harness import PatchThoughts

        def test_mine(model_run, assert_claim):
            assert_claim(model_run.paired(PatchThoughts(("CT1",), "zero")).claim("mine", "s", -200.0, "greater"))
        """
    )
    args = suite_args(tmp_path / "r", tmp_path / "c", "--model", "tiny-gpt2", "--n-problems", "12")
    result = pytester.runpytest_inprocess(str(test), *args[1:], "--min-baseline", "99")
    assert result.ret == 7, result.outlines[-20:]
    (row,) = read_claims(tmp_path / "r")["claims"]
    assert row["verdict"] == "NOT JUDGED" and row["effect"] is None


def test_each_hub_checkpoint_takes_its_own_base_and_names_stay_distinct(pytester, tmp_path, suite_args, hub_pair):
    models = [a for arch in ("gpt2", "llama") for a in ("--model", str(hub_pair[arch].checkpoint.parent))]
    bases = [a for arch in ("gpt2", "llama") for a in ("--base", str(hub_pair[arch].base))]
    common = ("--data", "gsm8k", "--n-problems", "2", "--registry", _registry(tmp_path), "-k", "ct1-logprob",
              "--max-new-tokens", "8",  # random weights never stop: decode little
              "--min-baseline", "0")  # fmt: skip
    result = pytester.runpytest_inprocess(*suite_args(tmp_path / "r", tmp_path / "c", *models, *bases, *common))
    assert result.ret in (0, 1), result.outlines[-20:] + result.errlines[-20:]
    assert sorted(r["model"] for r in read_claims(tmp_path / "r")["claims"]) == ["gpt2-ckpt", "llama-ckpt"]
    one = pytester.runpytest_inprocess(*suite_args(tmp_path / "one", tmp_path / "c", *models, *bases[:2], *common))
    assert one.ret == 4 and "has shape" in one.stderr.str(), "one base for both: the llama checkpoint does not fit"
    three = pytester.runpytest_inprocess(*suite_args(tmp_path / "3", tmp_path / "c", *models, *bases, *bases[:2],
                                                      *common))  # fmt: skip
    assert three.ret == 4 and "3 --base values for 2 hub-format --model values" in three.stderr.str()
    ours = pytester.runpytest_inprocess(*suite_args(tmp_path / "o", tmp_path / "c", "--model", "tiny-gpt2",
                                                     *bases[:2], *common))  # fmt: skip
    assert ours.ret == 4 and "--base is for hub-format checkpoints" in ours.stderr.str()


def test_two_checkpoints_with_one_folder_name_get_distinct_names(pytester, tmp_path, suite_args):
    """runs/seed0/final and runs/seed1/final: named seed0-final and seed1-final, both measured."""
    for seed in ("seed0", "seed1"):
        shutil.copytree(ROOT / "fixtures" / "models" / "tiny-gpt2", tmp_path / seed / "final")
    models = ["--model", str(tmp_path / "seed0" / "final"), "--model", str(tmp_path / "seed1" / "final")]
    args = ("--n-problems", "12", "--registry", _registry(tmp_path), "-k", "ct1-logprob")
    result = pytester.runpytest_inprocess(*suite_args(tmp_path / "r", tmp_path / "cache", *models, *args))
    assert result.ret in (0, 1), result.outlines[-20:]
    rows = read_claims(tmp_path / "r")["claims"]
    assert sorted(r["model"] for r in rows) == ["seed0-final", "seed1-final"]
    assert rows[0]["effect"] == pytest.approx(rows[1]["effect"]), "the same weights, the same numbers"
    twice = pytester.runpytest_inprocess(*suite_args(tmp_path / "t", tmp_path / "cache", *models[:2], *models[:2]))
    assert twice.ret == 4 and "is named twice" in twice.stderr.str()


def test_a_run_measures_the_registry_and_keeps_the_reports_of_its_own_folder(pytester):
    """A checkout (or clone) run with no --registry and no --report-dir: its own
    hypotheses/claims.toml, its own reports/, wherever the package is installed from."""
    (pytester.path / "hypotheses").mkdir()
    (pytester.path / "hypotheses" / "claims.toml").write_text(
        '[[claim]]\nid = "only-in-this-clone"\nphase = 1\nstatement = "s"\nmetric = "position_drop"\n'
        'threshold = 1.0\ndirection = "greater"\nexperiment = { positions = ["CT1"], mode = "zero" }\n'
    )
    shutil.copy(ROOT / "hypotheses" / "test_phase1.py", pytester.path / "hypotheses" / "test_phase1.py")
    (pytester.path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    result = pytester.runpytest_inprocess("hypotheses", "-p", "harness.plugin.suite", "--model", "tiny-gpt2",
                                           "--n-problems", "12", "--no-cache")  # fmt: skip
    assert result.ret in (0, 1), result.outlines[-20:] + result.errlines[-20:]
    (report,) = [p for p in (pytester.path / "reports").iterdir() if p.is_dir() and not p.is_symlink()]
    assert [r["id"] for r in read_claims(report)["claims"]] == ["only-in-this-clone"]


def test_a_run_that_parametrizes_no_claim_is_a_usage_error(pytester):
    """The claims plugin off (no registry, no report folder, not under hypotheses/): the claim
    tests would be skipped as NOTSET and the run would pass having measured nothing."""
    test = pytester.makepyfile(
        test_claims="""
        import pytest
        from harness import claim_params

        @pytest.mark.parametrize("claim", claim_params())
        def test_claim(claim):
            pass
        """
    )
    # a process of its own: no registry left by another run (in-process runs share the plugin module)
    result = pytester.runpytest_subprocess(str(test), "-p", "harness.plugin.suite", "-p", "no:cacheprovider")
    assert result.ret == 4, result.outlines[-20:]
    said = result.stdout.str() + result.stderr.str()
    assert "test_claims.py::test_claim parametrizes no claim: the claims plugin is off" in said


def test_a_row_that_could_not_be_measured_says_why_everywhere(pytester, tmp_path, suite_args):
    """An interchange claim on problems without annotations: no pair, so no effect. The
    terminal, claims.csv and summary.md give the reason; claims.json has a null effect."""
    data = tmp_path / "plain.jsonl"
    with data.open("w") as f:
        for i in range(230):
            f.write(json.dumps({"question": f"Tom has {i + 2} apples and buys 3. How many?",
                                "answer": f"He has {i + 5}.\n#### {i + 5}"}) + "\n")  # fmt: skip
    registry = tmp_path / "claims.toml"
    registry.write_text('[[claim]]\nid = "i"\nphase = 3\nstatement = "s"\nmetric = "interchange"\nthreshold = 50.0\n'
                        'direction = "greater"\n')  # fmt: skip
    args = ("--model", "tiny-gpt2", "--data", str(data), "--n-problems", "10", "--registry", str(registry),
            "--min-baseline", "0")  # fmt: skip
    result = pytester.runpytest_inprocess(*suite_args(tmp_path / "r", tmp_path / "c", *args))
    assert result.ret == 0, result.outlines[-20:]
    why = "no counterfactual pair among the 10 problems (10 no annotated steps)"
    result.stdout.fnmatch_lines([f"INCONCLUSIVE i * tiny-gpt2 * not measured: {why}"])
    assert "nan" not in result.stdout.str()
    (row,) = read_claims(tmp_path / "r")["claims"]
    assert row["effect"] is None and row["ci_low"] is None and row["note"] == why
    assert why in (tmp_path / "r" / "claims.csv").read_text()
    assert f"not measured: {why}" in (tmp_path / "r" / "summary.md").read_text()


SMALL = (  # claims whose measures need more problems than a small run has
    '[[claim]]\nid = "hub-final"\nphase = 3\nstatement = "s"\nmetric = "probe_layer"\nthreshold = 0.0\n'
    'direction = "greater"\nexperiment = { test = "final_above_chance", label = "answer_last_digit" }\n\n'
    '[[claim]]\nid = "hub-critical"\nphase = 3\nstatement = "s"\nmetric = "probe_layer"\nthreshold = 1.5\n'
    'direction = "less"\nexperiment = { test = "critical_layer", label = "answer_last_digit" }\n\n'
    '[[claim]]\nid = "step1"\nphase = 3\nstatement = "s"\nmetric = "probe_layer"\nthreshold = 5.0\n'
    'direction = "greater"\nexperiment = { test = "step_selectivity", step = 1 }\n\n'
    '[[claim]]\nid = "hard-vs-easy"\nphase = 4\nstatement = "s"\nmetric = "tier_drop"\nthreshold = 0.0\n'
    'direction = "greater"\nexperiment = { compare = ["hard", "easy"] }\n'
)


def test_claims_a_small_run_cannot_measure_say_why_and_the_report_is_written(pytester, tmp_path, suite_args):
    """On 4 problems no probe can be cross-validated (5 folds) and a difficulty tier is nearly
    empty: each row is unmeasured with its reason (the dress rehearsal found the probes
    crashing and the tier comparison silent), and the report is still written."""
    registry = tmp_path / "small.toml"
    registry.write_text(SMALL)
    args = ("--model", "tiny-gpt2", "--n-problems", "4", "--registry", str(registry), "--min-baseline", "0")
    result = pytester.runpytest_inprocess(*suite_args(tmp_path / "r", tmp_path / "c", *args))
    assert result.ret in (0, 1), result.outlines[-30:]
    rows = {r["id"]: r for r in read_claims(tmp_path / "r")["claims"]}
    assert set(rows) == {"hub-final", "hub-critical", "step1", "hard-vs-easy"}
    assert all(r["effect"] is None and r["verdict"] == "INCONCLUSIVE" for r in rows.values())
    assert "a cross-validated probe needs 10" in rows["hub-final"]["note"]
    assert "a cross-validated probe needs 10" in rows["hub-critical"]["note"]
    assert "too few problems with a step 1" in rows["step1"]["note"]
    assert "fewer than 2 to compare" in rows["hard-vs-easy"]["note"]
    assert (tmp_path / "r" / "report.html").exists()


def test_max_new_tokens_bounds_decoding_and_keys_every_result(load_model):
    """--max-new-tokens reaches the decoder and the cache key: one token cannot hold
    "The answer is: N", so nothing is answered right; 256 (the default) answers as before."""
    from harness.data.problems import synthetic_split
    from harness.measures.runner import MAX_NEW_TOKENS, ModelRun
    from harness.runtime.cache import ResultCache

    problems = synthetic_split("test")[:8]
    runs = {n: ModelRun(load_model("tiny-gpt2"), problems, problems, ResultCache(None), 8, max_new_tokens=n)
            for n in (1, MAX_NEW_TOKENS)}  # fmt: skip
    assert runs[1].baseline.accuracy == 0 < runs[MAX_NEW_TOKENS].baseline.accuracy
    assert runs[1].key(kind="x") != runs[MAX_NEW_TOKENS].key(kind="x")
    assert runs[1].on_discovery().max_new_tokens == 1 and runs[1].describe()["max_new_tokens"] == 1
