"""The claims registry (data) and the verdict logic that judges every claim."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.data.problems import synthetic_split
from harness.judgment.claims import REGISTRY, ClaimError, check_against_model, evaluate_claim, load_registry
from harness.judgment.kinds.attention_pattern import PatternParams, scoped_heads
from harness.measures.causal import heads_for
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head
from harness.runtime.cache import ResultCache
from harness.runtime.codi import ModelLoadError
from harness.runtime.models import seed_heads
from harness.statistics.effects import accuracy_drop
from harness.statistics.verdicts import ClaimResult, criterion, judge, point_judge

ENTRY = """
[[claim]]
id = "x.1"
phase = 1
statement = "s"
metric = "ablation_drop"
threshold = 10.0
direction = "greater"
"""

points = st.floats(min_value=-100, max_value=100, allow_nan=False)


def _registry(tmp_path, text):
    path = tmp_path / "claims.toml"
    path.write_text(text)
    return path


def test_shipped_registry_has_the_seed_phase1_claims():
    claims = load_registry(REGISTRY)
    phase1 = {c.id for c in claims if c.phase == 1}
    assert {"1.1-top3-causal", "1.1-top3-vs-random", "1.2-hub-drop", "1.3-sequential-drops"} <= phase1
    assert all(c.marker == f"phase{c.phase}" for c in claims)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ENTRY.replace("threshold = 10.0", "treshold = 10.0"), "unknown key 'treshold' (did you mean 'threshold'?)"),
        (ENTRY.replace("ablation_drop", "ablation_dorp"), "unknown metric 'ablation_dorp'"),
        (ENTRY.replace('"greater"', '"more"'), "direction must be"),
        (ENTRY + ENTRY, "duplicate claim id 'x.1'"),
        (
            ENTRY.replace("threshold = 10.0", "threshhold = 10.0"),
            "unknown key 'threshhold' (did you mean 'threshold'?)",
        ),
        (ENTRY.replace("threshold = 10.0", 'threshold = "ten"'), "threshold must be a number, got 'ten'"),
        (ENTRY.replace("phase = 1", "phase = 7"), "unknown phase 7"),
        (ENTRY.replace("threshold = 10.0", ""), "missing key 'threshold'"),
        (ENTRY + 'measure = "answer_logprb"', "unknown measure 'answer_logprb' (did you mean 'answer_logprob'?)"),
        (ENTRY + "experiment = { head = ['L0H1'] }", "unknown experiment key 'head' (did you mean 'heads'?)"),
        (ENTRY + "experiment = { heads = 'L0H1' }", "experiment key 'heads' must be a list, got 'L0H1'"),
        (ENTRY + "experiment = { heads = ['L0-H1'] }", "malformed head 'L0-H1'"),
        (ENTRY + "experiment = { positions = ['CT-1'] }", "unknown position 'CT-1'"),
        (ENTRY + "experiment = { positions = ['thought2'] }", "unknown position 'thought2'"),
        (ENTRY + "experiment = { mode = 'meen' }", "'mode' is 'meen' (did you mean 'mean'?); choose from zero, mean"),
        (ENTRY + "experiment = { n_heads = 2.5 }", "'n_heads' must be an integer, got 2.5"),
        (ENTRY + "experiment = { heads = ['L0H1'], n_heads = 2 }", "give 'heads' or 'n_heads', not both"),
        (ENTRY + "experiment = { n_draws = 3 }", "n_draws applies to mode 'resample'; mode 'zero' is deterministic"),
        (ENTRY + "experiment = { mode = 'mean', positions = ['question'] }", "mode 'mean' needs positions"),
        (
            ENTRY.replace("ablation_drop", "pattern_drop") + "experiment = { pattern = 'hub', scope = 'layr' }",
            "'scope' is 'layr' (did you mean 'layer'?)",
        ),
        (
            ENTRY.replace("ablation_drop", "pattern_drop") + "experiment = { pattern = 'hub', layer = 1 }",
            "layer applies to scope 'layer', not 'top'",
        ),
        (
            ENTRY.replace("ablation_drop", "pattern_drop") + "experiment = { scope = 'all' }",
            "experiment key 'pattern' is required",
        ),
        (
            ENTRY.replace("ablation_drop", "position_drop") + "experiment = { which = 'hub', positions = ['CT1'] }",
            "give 'which' or 'positions', not both",
        ),
        (
            ENTRY.replace("ablation_drop", "position_drop") + "experiment = { positions = ['bot'] }",
            "thought patches act on thoughts (CT<i> or latent), not bot",
        ),
        (
            ENTRY.replace("ablation_drop", "probe_layer")
            + 'measure = "answer_logprob"\nexperiment = { test = "critical_layer" }',
            "metric 'probe_layer' measures accuracy, not 'answer_logprob'",
        ),
        (ENTRY + 'measure = "answer_logprob"\nthreshold_of_baseline = true', "threshold_of_baseline is a fraction"),
        (ENTRY + 'gate = "nope"', "gated on unknown claim id 'nope'"),
        (ENTRY + 'gate = "x.1"', "claim 'x.1': its gates form a cycle (x.1 -> x.1)"),
        (
            ENTRY + "threshold_of_baseline = true\nexperiment = { against_control = true }",
            "threshold_of_baseline would be",
        ),
        (ENTRY.replace('"greater"', '"less"') + "experiment = { against_control = true }", "needs direction 'greater'"),
        (ENTRY + "refute_at = 2.0\nexperiment = { against_control = true }", "refute_at would be an absolute number"),
        (ENTRY + "refute_at = 20.0", "refute_at 20 must be at most the threshold 10 for direction 'greater'"),
        (ENTRY.replace('"greater"', '"less"') + "refute_at = 5.0", "refute_at 5 must be at least the threshold 10"),
        (ENTRY + 'labels = { supported = "yes", refutd = "no" }', "labels maps supported, refuted, inconclusive"),
        (
            ENTRY.replace("ablation_drop", "head_sweep")
            + 'threshold_of_baseline = true\nexperiment = { test = "attention" }',
            "metric 'head_sweep' measures a Spearman rank correlation, not a drop from baseline accuracy",
        ),
        (
            ENTRY.replace("ablation_drop", "position_drop") + "experiment = { which = 'max_non_hub' }",
            "which 'max_non_hub' judges the largest non-hub drop: it answers direction 'less' only",
        ),
        (
            ENTRY.replace("ablation_drop", "position_drop").replace('"greater"', '"less"')
            + "experiment = { which = 'hub_minus_non_hub' }",
            "answers direction 'greater' only",
        ),
    ],
)
def test_malformed_registry_entries_are_named(tmp_path, text, message):
    with pytest.raises(ClaimError) as err:
        load_registry(_registry(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value), "one line"


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ("{ heads = ['L4H0'] }", "head L4H0 out of range for m: 4 layers x 8 heads"),
        ("{ heads = ['L0H8'] }", "head L0H8 out of range for m"),
        ("{ heads = ['L0H1', 'L0H1'] }", "head L0H1 given twice"),
        ("{ positions = ['CT6'] }", "unknown position 'CT6'; choose from CT0..CT5"),
    ],
)
def test_heads_and_positions_are_checked_against_each_model(tmp_path, random_codi, experiment, message):
    claims = load_registry(_registry(tmp_path, ENTRY + f"experiment = {experiment}"))
    with pytest.raises(ClaimError, match="claim 'x.1': " + message.replace("(", r"\(").replace(")", r"\)")):
        check_against_model(claims, random_codi.geometry, random_codi.n_latent, "m")


def test_every_shipped_claim_fits_both_tiny_models(random_codi):
    check_against_model(load_registry(), random_codi.geometry, random_codi.n_latent, random_codi.name)


def test_defaults_are_written_once_and_shown_filled_in(tmp_path):
    (claim,) = load_registry(_registry(tmp_path, ENTRY + "experiment = { heads = ['L2H3'], positions = ['CT2'] }"))
    params = claim.params.describe()
    assert params["heads"] == ["L2H3"] and params["positions"] == ["CT2"]
    assert params["mode"] == "zero" and params["n_random"] == 0 and claim.measure == "accuracy"
    assert "heads=['L2H3']" in claim.describe() and "positions=['CT2']" in claim.describe()
    # what does not act is not listed: named heads need no ranking, mode zero has no draws
    assert not {"n_heads", "ranking", "n_draws"} & set(params)
    (ranked,) = load_registry(_registry(tmp_path, ENTRY + "experiment = { mode = 'resample' }"))
    assert {"n_heads", "ranking", "n_draws"} <= set(ranked.params.describe())
    text = ENTRY.replace("ablation_drop", "pattern_drop") + "experiment = { pattern = 'hub', scope = 'all' }"
    (pattern,) = load_registry(_registry(tmp_path, text))
    assert not {"n_heads", "ranking", "layer"} & set(pattern.params.describe())


@given(low=points, width=st.floats(min_value=0, max_value=50), threshold=points)
def test_a_ci_above_the_threshold_is_supported_and_never_refuted(low, width, threshold):
    high = low + width
    verdict = judge(low, high, threshold, "greater", threshold)
    assert (verdict == "SUPPORTED") == (low > threshold)
    assert verdict != "REFUTED" or high < threshold
    mirrored = judge(-high, -low, -threshold, "less", -threshold)
    assert mirrored == verdict  # "less" is "greater" seen in a mirror


@given(low=points, width=st.floats(min_value=0, max_value=50), threshold=points, gap=st.floats(0, 30))
def test_between_the_two_criteria_is_inconclusive(low, width, threshold, gap):
    refute_at = threshold - gap
    high = low + width
    verdict = judge(low, high, threshold, "greater", refute_at)
    if low <= threshold and high >= refute_at:
        assert verdict == "INCONCLUSIVE"


@given(effect=points, threshold=points)
def test_point_verdict_uses_the_seed_labels(effect, threshold):
    labels = {"supported": "causal", "refuted": "redundant"}
    label = point_judge(effect, threshold, "greater", threshold, labels)
    assert label == ("causal" if effect > threshold else "redundant" if effect < threshold else "inconclusive")


@given(flags=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=60))
def test_the_ci_always_contains_the_effect(flags):
    base, treated = (np.array(x, bool) for x in zip(*flags))
    eff = accuracy_drop(base, treated, n_resamples=200)
    assert eff.ci_low - 1e-9 <= eff.effect <= eff.ci_high + 1e-9
    assert -100 <= eff.ci_low and eff.ci_high <= 100
    assert 0.0 <= eff.p_value <= 1.0


def test_claim_rows_round_trip_through_their_schema():
    row = ClaimResult(
        id="1.1",
        phase=1,
        model="m",
        statement="s",
        metric="ablation_drop",
        measure="accuracy",
        effect=12.0,
        ci_low=9.0,
        ci_high=15.0,
        threshold=10.0,
        direction="greater",
        p_value=0.01,
        p_test="McNemar exact",
        verdict="INCONCLUSIVE",
        point_verdict="causal",
        n=100,
    ).as_row()
    assert ClaimResult(**row).as_row() == row
    assert {
        "id",
        "phase",
        "model",
        "statement",
        "effect",
        "ci_low",
        "ci_high",
        "threshold",
        "p_value",
        "verdict",
        "measure",
        "heads",
        "positions",
        "mode",
        "baseline",
    } <= set(row)


def test_head_scopes(random_codi, tmp_path):
    run = ModelRun(random_codi, [], synthetic_split("discovery")[:4], ResultCache(tmp_path), heads=[Head(1, 2)])
    geo = random_codi.geometry
    assert scoped_heads(PatternParams("hub", n_heads=1), run) == ([Head(1, 2)], "--heads")
    assert scoped_heads(PatternParams("hub", heads=("L0H3",)), run) == ([Head(0, 3)], "claim")
    assert scoped_heads(PatternParams("hub", scope="layer", layer=2), run)[0] == [Head(2, h) for h in range(8)]
    assert len(scoped_heads(PatternParams("hub", scope="all"), run)[0]) == geo.n_layers * geo.n_heads
    with pytest.raises(ValueError, match="layer 4 out of range"):
        PatternParams("hub", scope="layer", layer=geo.n_layers).check_model(geo, 6, "m")


def test_seed_head_lists_of_the_real_models():
    assert seed_heads("codi-llama") == "L4H5,L5H30,L5H28"
    assert seed_heads("codi-gpt2").split(",")[0] == "L0H3"
    with pytest.raises(ModelLoadError, match="no seed head list"):
        seed_heads("tiny-llama")


def test_a_gates_own_gate_is_checked_first(monkeypatch, tmp_path):
    """a <- b <- c: c runs only when b and a are SUPPORTED; when a is not, c reports a."""
    import harness.plugin.suite as plugin

    text = (ENTRY.replace("x.1", "a") + ENTRY.replace("x.1", "b") + 'gate = "a"\n'
            + ENTRY.replace("x.1", "c") + 'gate = "b"\n')  # fmt: skip
    claims = {c.id: c for c in load_registry(_registry(tmp_path, text))}
    verdicts = {"a": "REFUTED", "b": "SUPPORTED"}
    evaluated = []

    def fake_evaluate(claim, run):
        evaluated.append(claim.id)
        return ClaimResult(id=claim.id, phase=claim.phase, model="m", statement="s", metric=claim.metric,
                           measure="accuracy", effect=1.0, ci_low=0.0, ci_high=2.0, threshold=10.0, direction="greater",
                           p_value=0.5, p_test="", verdict=verdicts[claim.id], point_verdict="", n=10)  # fmt: skip

    monkeypatch.setattr(plugin, "_REGISTRY", claims)
    monkeypatch.setattr(plugin, "evaluate_claim", fake_evaluate)
    assert plugin._unmet_gate(claims["c"], None).id == "a" and evaluated == ["a"]
    verdicts["a"] = "SUPPORTED"
    assert plugin._unmet_gate(claims["c"], None) is None and evaluated == ["a", "a", "b"]


def test_every_view_of_a_criterion_says_where_refuted_starts():
    """1.1's CI [3, 8] is INCONCLUSIVE, not REFUTED, because REFUTED starts below 2: the text
    must say so wherever the threshold is shown."""
    assert criterion("greater", 10.0, 2.0) == "greater than 10.00 (refuted below 2.00)"
    assert criterion("less", 22.5, 30.0, 1) == "less than 22.5 (refuted above 30.0)"
    assert criterion("greater", 10.0, 10.0) == criterion("greater", 10.0, float("nan")) == "greater than 10.00"
    result = ClaimResult(id="c", phase=1, model="m", statement="s", metric="ablation_drop", measure="accuracy",
                         effect=5.0, ci_low=3.0, ci_high=8.0, threshold=10.0, direction="greater", p_value=0.01,
                         p_test="t", verdict=judge(3.0, 8.0, 10.0, "greater", 2.0), point_verdict="", n=100,
                         refute_at=2.0)  # fmt: skip
    assert result.verdict == "INCONCLUSIVE" and "needs greater than 10.00 (refuted below 2.00)" in result.message()


def test_a_registry_claims_refute_at_decides_where_refuted_starts(tmp_path, monkeypatch):
    """A claim "drop > 10" with refute_at 2 and a CI of [3, 8]: below the threshold but above
    refute_at, so INCONCLUSIVE (REFUTED only once the CI is below 2)."""
    from harness.judgment import claims as claims_module
    from harness.judgment.kinds import KINDS, Kind, Measured, Params, Section
    from harness.statistics.effects import PairedEffect

    ci = {"low": 3.0, "high": 8.0}

    def measure(params, run, measure):
        return Measured(PairedEffect(5.0, ci["low"], ci["high"], 0.01, 40, "fixed"), {"heads": []})

    fixed = Kind("fixed_effect", Params, measure, lambda results, runs: Section("s", {}), "a fixed effect",
                 error_analysis=False)  # fmt: skip
    monkeypatch.setitem(KINDS, "fixed_effect", fixed)
    run = ModelRun.__new__(ModelRun)
    run.log, run.model = [], type("M", (), {"name": "m"})()
    text = ENTRY.replace("ablation_drop", "fixed_effect") + "refute_at = 2.0\n"
    (claim,) = load_registry(_registry(tmp_path, text))
    result = claims_module.evaluate_claim(claim, run)
    assert (result.refute_at, result.verdict, result.point_verdict) == (2.0, "INCONCLUSIVE", "inconclusive")
    ci.update(low=0.5, high=1.5)
    assert claims_module.evaluate_claim(claim, run).verdict == "REFUTED"


def test_heads_shorter_than_a_claims_n_heads_say_so(random_codi, tmp_path):
    """--heads naming fewer heads than a claim's n_heads are used as they are, and the row's
    source says how many of how many (they were silently fewer)."""
    run = ModelRun(random_codi, [], synthetic_split("discovery")[:4], ResultCache(tmp_path), heads=[Head(1, 2)])
    assert heads_for(run, (), 3) == ([Head(1, 2)], "--heads (1 of the 3 asked)")
    assert heads_for(run, (), 1) == ([Head(1, 2)], "--heads")


def test_the_random_control_runs_only_where_a_verdict_reads_it(random_codi, tmp_path, monkeypatch):
    """A claim neither judged against the control nor asking for one measures no random head
    sets (they were 20 by default, most of a named-heads claim's run); judged against it, 20."""
    import harness.judgment.kinds.head_ablation as ablation

    asked = []
    monkeypatch.setattr(ablation, "random_head_sets", lambda run, like, n: asked.append(n) or [])
    plain, judged, given = load_registry(_registry(tmp_path, "".join(
        ENTRY.replace('"x.1"', f'"x.{i}"') + f"experiment = {{ heads = ['L1H2'], {extra} }}\n"
        for i, extra in enumerate(["mode = 'zero'", "against_control = true", "n_random = 3"]))))  # fmt: skip
    assert [c.params.describe()["n_random"] for c in (plain, judged, given)] == [0, 20, 3]
    run = ModelRun(random_codi, synthetic_split("test")[:4], synthetic_split("discovery")[:4], ResultCache(tmp_path))
    for claim in (plain, judged, given):
        evaluate_claim(claim, run)
    assert asked == [0, 20, 3]
