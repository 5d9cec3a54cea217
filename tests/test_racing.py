"""Stacked sweep conditions and the racing sweep (`harness/measures/causal.py`)."""

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from harness.data.problems import Problem, synthetic_split
from harness.interventions.hooks import InterventionError
from harness.measures import causal
from harness.measures.causal import Component, components, race, stacked, stacked_logprobs
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head
from harness.runtime.cache import ResultCache

TEST = synthetic_split("test")[:10]
DISCOVERY = synthetic_split("discovery")[:6]


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_a_stacked_condition_equals_the_same_condition_alone(load_model, model, mode):
    """Per problem, head and head-by-thought components, batches and stacks. To 1e-4 nats, not
    bit for bit: a stack is a batch of another size, whose matrix products may block and round
    differently (1.0e-5 nats apart on an AMD EPYC with one thread); the heads' own drops here
    are over 100 times larger."""
    run = ModelRun(load_model(model), TEST, DISCOVERY, ResultCache(None), requested_batch_size=4)
    parts = [Component(Head(0, 1)), Component(Head(3, 5)), Component(Head(1, 2), 0), Component(Head(1, 2), 4),
             Component(Head(2, 7), 5)]  # fmt: skip
    causal.MAX_STACKED_ROWS, previous = 8, causal.MAX_STACKED_ROWS  # two components per stack
    try:
        together = stacked_logprobs(run, parts, mode)
    finally:
        causal.MAX_STACKED_ROWS = previous
    for part, row in zip(parts, together):
        alone = run.answer_logprobs(part.spec(mode))
        np.testing.assert_allclose(row, alone, rtol=0, atol=1e-4, err_msg=str(part))
    assert np.abs(together[0] - together[1]).max() > 1e-2, "each slice ablates its own head"


def test_stacked_results_are_cached_per_component(load_model):
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(None), requested_batch_size=5)
    parts = components(run, "head_thought")[:7]
    first = stacked(run, parts, "zero")
    assert len(run._computed) == 7 and run._computed[0] == "7 stacked ablations (zero)"
    np.testing.assert_array_equal(stacked(run, parts[2:5], "zero"), first[2:5])
    assert len(run._computed) == 7, "read back, not recomputed"
    assert str(parts[0]) == "L0H0@CT0" and parts[0].position == "CT0" and len(components(run, "head")) == 32


class FakeRun:
    """A run whose components' drops are given per problem id: what `race` reads of a run."""

    drops: dict[Component, dict[str, float]] = {}
    seen: list[str] = []

    def __init__(self, model, problems, discovery, cache, batch_size=None, seed=0, progress=False, on_measured=None):
        self.model, self.problems, self.discovery, self.cache = model, problems, discovery, cache
        self.requested_batch_size, self.seed, self.on_measured = batch_size, seed, on_measured

    def answer_logprobs(self, spec) -> np.ndarray:
        FakeRun.seen.extend(p.id for p in self.problems)
        return np.zeros(len(self.problems))


def _fake(monkeypatch, means: list[float], n: int, sd: float = 0.3):
    rng = np.random.default_rng(0)
    parts = [Component(Head(0, k)) for k in range(len(means))]
    problems = [Problem(f"p{i}", "q", "", 1.0, 1) for i in range(n)]
    FakeRun.drops = {c: {p.id: m + sd * rng.standard_normal() for p in problems} for c, m in zip(parts, means)}
    FakeRun.seen = []
    monkeypatch.setattr(causal, "stacked", lambda run, alive, mode: -np.array(
        [[FakeRun.drops[c][p.id] for p in run.problems] for c in alive]))  # fmt: skip
    return FakeRun(None, problems, [], None), parts


def test_racing_finds_the_full_sweeps_top_on_a_separable_case_with_fewer_problems(monkeypatch):
    run, parts = _fake(monkeypatch, [1.0, 0.8, 0.6] + [0.0] * 17, n=800)
    result = race(run, parts, n_top=3)
    full = sorted(parts, key=lambda c: -np.mean(list(FakeRun.drops[c].values())))[:3]
    assert result.top == full == parts[:3] and result.separated
    assert result.problem_conditions <= 0.4 * len(parts) * 800
    assert (result.table.problems[3:] < 800).all() and result.table.problems.min() == causal.RACE_FIRST


def test_racing_says_so_when_the_top_cannot_be_separated(monkeypatch):
    run, parts = _fake(monkeypatch, [1.0, 0.5, 0.5] + [0.0] * 5, n=200)
    result = race(run, parts, n_top=2)
    assert not result.separated
    assert (result.table.set_index("component").problems[["L0H0", "L0H1", "L0H2"]] == 200).all()
    with pytest.raises(InterventionError, match="more components"):
        race(run, parts[:2], n_top=2)


def test_the_causal_ranking_races_on_the_discovery_split_only(monkeypatch, load_model):
    FakeRun.seen = []
    seen = []
    original = causal.stacked

    def spy(run, alive, mode):
        seen.extend(p.id for p in run.problems)
        return original(run, alive, mode)

    monkeypatch.setattr(causal, "stacked", spy)
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(None), requested_batch_size=8)
    ranked = causal.causal_ranking(run, 3)
    assert seen and set(seen) <= {p.id for p in DISCOVERY} and not set(seen) & {p.id for p in TEST}
    assert list(ranked["rank"]) == list(range(1, 33)) and set(ranked.problems) == {len(DISCOVERY)}


def test_the_sweep_command_races_and_refuses_what_a_sweep_would_not_read(capsys):
    from harness.commands.cli import USAGE_ERROR, main

    assert main(["sweep", "--racing", "--n-problems", "50"]) == USAGE_ERROR
    assert "--n-problems does not apply to this sweep (the discovery split is fixed)" in capsys.readouterr().err
    for screen in ([], ["--screen", "atp"]):
        assert main(["sweep", *screen, "--steps", "4"]) == USAGE_ERROR
        assert "--steps does not apply to this sweep (it is integrated gradients' (--screen ig))" in (
            capsys.readouterr().err
        )
    argv = ["sweep", "--racing", "--n-top", "2", "--model", "tiny-gpt2", "--no-cache", "--json", "--screen", "ig"]
    assert main([*argv, "--steps", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    screen = out["screen"]  # the screen's estimate of every component beside the race's drops
    assert (screen["screen"], screen["steps"], len(screen["top"])) == ("ig", 2, 2)
    estimates = {r["head"]: r["screen_estimate"] for r in out["rows"]}
    assert screen["top"] == sorted(estimates, key=lambda h: -estimates[h])[:2]
    assert screen["top_k_overlap"] == len(set(screen["top"]) & set(out["top"])) / 2
    drops = [r["ablation_drop_logprob"] for r in out["rows"]]
    assert screen["spearman"] == pytest.approx(spearmanr(list(estimates.values()), drops).statistic)
    assert out["split"] == "discovery" and out["n_problems"] == 300 and len(out["top"]) == 2
    assert len(out["rows"]) == 32 and out["problem_conditions"] == sum(r["problems"] for r in out["rows"])
    assert {r["position"] for r in out["rows"]} == {"latent"} and out["top"][0] == out["rows"][0]["head"]


def _fake_drops(monkeypatch, drops: np.ndarray) -> tuple[FakeRun, list[Component]]:
    """A fake run whose components' drops are given, [C, N], per problem."""
    parts = [Component(Head(0, k)) for k in range(len(drops))]
    problems = [Problem(f"p{i}", "q", "", 1.0, 1) for i in range(drops.shape[1])]
    FakeRun.drops = {c: dict(zip((p.id for p in problems), row)) for c, row in zip(parts, drops)}
    FakeRun.seen = []
    monkeypatch.setattr(causal, "stacked", lambda run, alive, mode: -np.array(
        [[FakeRun.drops[c][p.id] for p in run.problems] for c in alive]))  # fmt: skip
    return FakeRun(None, problems, [], None), parts


def _unpaired_upper(a: np.ndarray, b: np.ndarray) -> float:
    """What an unpaired rule would take for the upper end of mean(a) - mean(b)."""
    return float(a.mean() - b.mean() + causal.RACE_Z * np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def _standard(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def test_the_race_eliminates_on_paired_differences_when_drops_move_together(monkeypatch):
    """Guards against the race eliminating components on unpaired differences (each sample's
    own spread, as if independent): where every head's drop moves with a per-problem factor
    far larger than their gaps, the paired differences separate the top 3 on the first
    RACE_FIRST problems; unpaired ones never do on 300 (every component then runs them all)."""
    rng = np.random.default_rng(0)
    n, means = 300, np.array([1.0, 0.8, 0.6] + [0.3] * 9)
    common = 2.0 * rng.standard_normal(n)  # a problem's difficulty, shared by every head
    drops = means[:, None] + common[None, :] + 0.05 * rng.standard_normal((len(means), n))
    first = drops[:, : causal.RACE_FIRST]
    assert all(causal._paired_upper(first[k] - first[2]) < 0 for k in range(3, len(means)))
    assert all(_unpaired_upper(drops[k], drops[2]) > 0 for k in range(3, len(means))), "unpaired: never separated"
    run, parts = _fake_drops(monkeypatch, drops)
    result = race(run, parts, n_top=3)
    assert result.separated, f"not separated after {result.problem_conditions} problem-conditions"
    assert result.top == parts[:3]
    assert result.problem_conditions == len(parts) * causal.RACE_FIRST, "all eliminated after the first round"
    assert (result.table.problems == causal.RACE_FIRST).all()


def test_the_race_keeps_a_top_head_whose_paired_difference_does_not_exclude_it(monkeypatch):
    """Guards against the race eliminating components on unpaired differences: heads C and D
    are anti-correlated (C = 0.6 + z, D = 0.3 - z per problem) and C starts badly (z's mean
    -0.6 on the first RACE_FIRST problems, 0 over all). On those problems the unpaired
    interval of C - D lies below 0 but the paired one (whose spread is 2 sd(z), not
    sqrt(2) sd(z)) does not: C stays in the race and ends in the full sweep's top 3, where an
    unpaired rule drops it at once and puts D in its place."""
    rng = np.random.default_rng(1)
    n, k = 300, causal.RACE_FIRST
    z = np.concatenate([_standard(rng.standard_normal(k)) - 0.6, _standard(rng.standard_normal(n - k))])
    z[k:] += 0.6 * k / (n - k)  # z's mean over all problems: 0
    flat = np.array([2.0, 1.5, 0.0, 0.0, 0.0, 0.0])[:, None] + 0.05 * rng.standard_normal((6, n))
    drops = np.vstack([flat[:2], 0.6 + z, 0.3 - z, flat[2:]])  # A, B, C, D, then four at 0
    c, d = drops[2, :k], drops[3, :k]
    assert c.mean() < d.mean(), "D is the cut on the first problems"
    assert _unpaired_upper(c, d) < 0 <= causal._paired_upper(c - d), "the case tells the two rules apart"
    run, parts = _fake_drops(monkeypatch, drops)
    result = race(run, parts, n_top=3)
    full = sorted(parts, key=lambda part: -np.mean(list(FakeRun.drops[part].values())))[:3]
    assert full == [parts[0], parts[1], parts[2]]
    assert result.top == full, f"the race's top {[str(p) for p in result.top]}, the full sweep's {list(map(str, full))}"
    assert result.table.set_index("component").problems["L0H2"] > k
