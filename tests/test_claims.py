"""The claims registry (data) and the verdict logic that judges every claim."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.arch import Head
from harness.cache import ResultCache
from harness.claims import REGISTRY, ClaimError, ClaimResult, judge, load_registry, point_judge
from harness.codi import ModelLoadError
from harness.data import synthetic_split
from harness.experiments import ModelRun
from harness.interventions import InterventionError
from harness.models import seed_heads
from harness.stats import accuracy_drop

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
        (ENTRY + ENTRY, "duplicate claim ids"),
    ],
)
def test_malformed_registry_entries_are_named(tmp_path, text, message):
    with pytest.raises(ClaimError) as err:
        load_registry(_registry(tmp_path, text))
    assert message in str(err.value)


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
        effect=12.0,
        ci_low=9.0,
        ci_high=15.0,
        threshold=10.0,
        direction="greater",
        p_value=0.01,
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
    } <= set(row)


def test_head_scopes(random_codi, tmp_path):
    run = ModelRun(random_codi, [], synthetic_split("discovery")[:4], ResultCache(tmp_path), heads=[Head(1, 2)])
    geo = random_codi.geometry
    assert run.scoped_heads("top", 1) == [Head(1, 2)]
    assert run.scoped_heads("layer", layer=2) == [Head(2, h) for h in range(geo.n_heads)]
    assert len(run.scoped_heads("all")) == geo.n_layers * geo.n_heads
    with pytest.raises(InterventionError, match="needs a layer"):
        run.scoped_heads("layer", layer=geo.n_layers)
    with pytest.raises(InterventionError, match="unknown head scope"):
        run.scoped_heads("some")


def test_seed_head_lists_of_the_real_models():
    assert seed_heads("codi-llama") == "L4H5,L5H30,L5H28"
    assert seed_heads("codi-gpt2").split(",")[0] == "L0H3"
    with pytest.raises(ModelLoadError, match="no seed head list"):
        seed_heads("tiny-llama")
