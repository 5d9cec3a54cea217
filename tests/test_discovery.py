import numpy as np
import pytest

from harness.data.problems import synthetic_split
from harness.measures.discovery import (
    LatentAttention,
    head_metrics,
    model_hub_position,
    record_latent_attention,
    top_heads,
)
from harness.runtime.arch import Head


def _attention(k=4, n_layers=2, n_heads=3):
    """Every head spreads its mass uniformly over the visible thoughts, except two planted heads."""
    a = np.zeros((n_layers, n_heads, k, k))
    for i in range(k):
        a[..., i, : i + 1] = 1.0 / (i + 1)
    a[1, 2] = 0.0
    a[1, 2, :, 1] = 1.0  # L1H2: every later thought reads CT1 (a hub head)
    a[1, 2, 0, 0] = 1.0  # CT0 can only see itself
    a[0, 1] = np.eye(k)  # L0H1: every thought reads only itself: no flow, no hub
    zeros = np.zeros((n_layers, n_heads, k))
    return LatentAttention(a, zeros, zeros, n_problems=1)


def test_planted_hub_head_ranks_first_and_self_attention_last():
    ranked = head_metrics(_attention())
    assert ranked.iloc[0]["name"] == "L1H2"
    assert ranked.iloc[0]["hub_position"] == "CT1"
    assert ranked.iloc[0]["hub"] == pytest.approx(1.0)
    assert ranked.iloc[-1]["name"] == "L0H1"
    assert ranked.iloc[-1]["flow"] == 0.0
    assert list(ranked["rank"]) == list(range(1, 7))
    assert top_heads(ranked, 2)[0] == Head(1, 2)
    assert model_hub_position(_attention()) in {"CT0", "CT1"}


def test_metric_definitions_on_the_planted_head():
    row = head_metrics(_attention()).set_index("name").loc["L1H2"]
    # queries CT1..CT3: CT1 puts all its mass on itself (not earlier), CT2 and CT3 on CT1
    assert row["flow"] == pytest.approx(2 / 3)
    assert row["skip"] == pytest.approx(1.0)  # the last thought reads CT1, in the first half


def test_recorded_attention_is_a_distribution(random_codi):
    att = record_latent_attention(random_codi, synthetic_split("discovery")[:10], batch_size=4, progress=False)
    total = att.latent.sum(-1) + att.bot + att.question
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    ranked = head_metrics(att)
    geo = random_codi.geometry
    assert len(ranked) == geo.n_layers * geo.n_heads
    assert ranked["composite"].is_monotonic_decreasing


def test_packed_attention_round_trips():
    att = _attention()
    back = LatentAttention.unpack(att.packed(), att.n_problems)
    for name in ("latent", "bot", "question"):
        np.testing.assert_array_equal(getattr(back, name), getattr(att, name))
