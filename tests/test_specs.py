"""Intervention specs and the generic runner: a spec measures exactly what it names (checked
against independent computations), its fields are its cache key, the answer log-probability
equals a full recompute, and randomised conditions are averaged over draws."""

import numpy as np
import pytest
import torch

from conftest import zeroed_attention
from harness.data.problems import format_number, synthetic_split
from harness.interventions.hooks import HeadAblation, HeadCapture, InterventionError
from harness.interventions.specs import (
    NOISE_SEED_STRIDE,
    AblateHeads,
    AttentionPattern,
    PatchThoughts,
    derangement,
    with_draw,
)
from harness.judgment.claims import evaluate_claim, parse_claim
from harness.judgment.kinds.head_ablation import random_head_sets
from harness.measures.evaluation import evaluate
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head, SiteError
from harness.runtime.cache import ResultCache
from harness.runtime.loop import (
    ThoughtPatch,
    answer_logprobs,
    answer_targets,
    encode_questions,
    position_ids,
    run_latents,
)
from harness.runtime.positions import PositionError
from harness.statistics.effects import accuracy_drop

TEST = synthetic_split("test")[:24]
DISCOVERY = synthetic_split("discovery")[:12]


@pytest.fixture
def run(load_model, tmp_path):
    return ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(tmp_path), requested_batch_size=8)


def _logprobs(result) -> np.ndarray:
    return np.array([r.answer_logprob for r in result.records])


def test_named_heads_at_a_named_thought_equal_zeroed_attention_weights(run):
    claim = parse_claim(
        {"id": "c", "phase": 1, "statement": "s", "metric": "ablation_drop", "threshold": 1.0,
         "direction": "greater", "experiment": {"heads": ["L3H1", "L1H2"], "positions": ["CT2"], "n_random": 0}},
        "test",
    )  # fmt: skip
    result = evaluate_claim(claim, run)
    assert result.heads == "L3H1 L1H2 (claim)" and result.positions == "CT2" and result.mode == "zero"
    codi, heads = run.codi, [Head(1, 2), Head(3, 1)]
    base = evaluate(codi, TEST, batch_size=5, progress=False)
    width = {}

    def zeroing(pmap, indices):
        width["ct2"] = pmap.index("CT2")
        return zeroed_attention(codi, heads, [pmap.index("CT2")])

    ref = evaluate(codi, TEST, batch_size=5, progress=False, intervene=zeroing)
    measured = run.measure(AblateHeads(("L1H2", "L3H1"), ("CT2",)))
    np.testing.assert_allclose(measured.answer_logprob, _logprobs(ref), atol=2e-4)
    assert np.abs(_logprobs(ref) - _logprobs(base)).max() > 1e-3, "the ablation must change something"
    effect = accuracy_drop([r.correct for r in base.records], [r.correct for r in ref.records])
    assert result.effect == pytest.approx(effect.effect) and result.n == len(TEST)
    latent_everywhere = run.measure(AblateHeads(("L1H2", "L3H1")))
    assert not np.allclose(latent_everywhere.answer_logprob, measured.answer_logprob), "CT2 alone is not latent"


def test_another_seed_is_another_computation_of_a_random_condition_only(run):
    """Noise and resample draws come from the seed: a run with another --seed on the same cache
    must draw again (it once read seed 0's draws back), a deterministic condition need not."""
    other = ModelRun(run.model, TEST, DISCOVERY, run.cache, requested_batch_size=8, seed=1)
    noise, resample, zero = (
        PatchThoughts(("CT1",)),
        AblateHeads(("L1H2",), ("CT1",), "resample"),
        PatchThoughts(("CT1",), "zero"),
    )
    for spec in (noise, resample, zero):
        run.measure(spec)
        other.measure(spec)
    assert len(run._computed) == 3 and len(other._computed) == 2, "only the zero patch is shared"
    assert not np.array_equal(run.measure(noise).answer_logprob, other.measure(noise).answer_logprob)
    assert not np.array_equal(run.measure(resample).answer_logprob, other.measure(resample).answer_logprob)


def test_distinct_head_sets_are_two_computations_and_a_reordered_set_is_one(run):
    run.measure(AblateHeads(("L0H1", "L1H2")))
    assert len(run._computed) == 1
    hits = run.cache.hits
    run.measure(AblateHeads((Head(1, 2), Head(0, 1))))  # the same set, another order
    assert len(run._computed) == 1 and run.cache.hits == hits + 1
    for other in (
        AblateHeads(("L0H1", "L1H3")),
        AblateHeads(("L0H1", "L1H2"), positions=("CT2",)),
        AblateHeads(("L0H1", "L1H2"), mode="mean"),
        AttentionPattern(("L0H1", "L1H2"), "uniform", hub="CT1"),
    ):
        run.measure(other)
    assert len(run._computed) == 5, "each distinct spec is its own computation"
    keys = {run.key(**s.key()) for s in (AblateHeads(("L0H1",)), AblateHeads(("L0H2",)), AblateHeads(("L1H1",)))}
    assert len(keys) == 3


@torch.no_grad()
def test_mean_mode_uses_each_heads_mean_over_the_discovery_split(run):
    codi, heads = run.codi, [Head(2, 3), Head(0, 5)]
    outputs = {h: [] for h in heads}
    for p in DISCOVERY:  # one problem at a time: no batching in the reference
        batch = encode_questions(codi, [p.question])
        with HeadCapture(codi, heads, [batch.positions(codi.n_latent).index("CT2")]) as cap:
            run_latents(codi, batch)
        for h in heads:
            outputs[h].append(cap.values[h][0])  # [1, hd]
    means = {h: torch.stack(v).mean(0) for h, v in outputs.items()}  # [1, hd]
    ref = evaluate(
        codi,
        TEST,
        batch_size=24,
        progress=False,
        intervene=lambda pmap, idx: HeadAblation(codi, heads, [pmap.index("CT2")], "mean", means),
    )
    measured = run.measure(AblateHeads(tuple(heads), ("CT2",), mode="mean"))
    np.testing.assert_allclose(measured.answer_logprob, _logprobs(ref), atol=2e-4)
    zero = run.measure(AblateHeads(tuple(heads), ("CT2",)))
    assert np.abs(zero.answer_logprob - measured.answer_logprob).max() > 1e-3


@torch.no_grad()
def test_resample_mode_gives_each_problem_another_problems_head_output(run):
    codi, heads, problems = run.codi, [Head(1, 4)], TEST[:8]
    small = ModelRun(codi, problems, DISCOVERY, ResultCache(None), requested_batch_size=3)
    spec = AblateHeads(tuple(heads), ("CT1", "CT3"), mode="resample", draw=1)
    measured = small.measure(spec)
    source = derangement(len(problems), torch.Generator().manual_seed(0 * 1000 + 500 + NOISE_SEED_STRIDE))
    assert all(int(source[i]) != i for i in range(len(problems))), "a derangement"
    own = []
    for p in problems:  # each problem alone
        batch = encode_questions(codi, [p.question])
        pmap = batch.positions(codi.n_latent)
        with HeadCapture(codi, heads, [pmap.index("CT1"), pmap.index("CT3")]) as cap:
            run_latents(codi, batch)
        own.append(cap.values[heads[0]])  # [1, 2, hd]
    for i, p in enumerate(problems):

        def resampled(pmap, idx, values={heads[0]: own[int(source[i])]}):  # noqa: B006 (bound per problem)
            return HeadAblation(codi, heads, [pmap.index("CT1"), pmap.index("CT3")], "resample", values)

        ref = evaluate(codi, [p], progress=False, intervene=resampled)
        assert measured.answer_logprob[i] == pytest.approx(ref.records[0].answer_logprob, abs=2e-4)
    assert small.measure(with_draw(spec, 2)).answer_logprob.tolist() != measured.answer_logprob.tolist()


@torch.no_grad()
def test_composed_specs_apply_both_interventions(run):
    codi, heads = run.codi, [Head(2, 1)]
    composed = AblateHeads(tuple(heads), ("CT1",)) + PatchThoughts(("CT3",), mode="zero")

    def both(pmap, idx):
        class Both:
            def __enter__(self):
                self.a = HeadAblation(codi, heads, [pmap.index("CT1")]).__enter__()
                self.b = ThoughtPatch(codi, lambda i, t: torch.zeros_like(t) if i == 3 else t).__enter__()

            def __exit__(self, *exc):
                self.b.__exit__(*exc)
                self.a.__exit__(*exc)

        return Both()

    ref = evaluate(codi, TEST, batch_size=8, progress=False, intervene=both)
    np.testing.assert_allclose(run.measure(composed).answer_logprob, _logprobs(ref), atol=2e-4)
    alone = run.measure(AblateHeads(tuple(heads), ("CT1",)))
    assert np.abs(alone.answer_logprob - _logprobs(ref)).max() > 1e-3
    assert run.paired(composed).claim("x", "s", 0.0, "greater").mode == "heads zero + thoughts zero"


def test_two_composed_thought_patches_both_act(run):
    """CT1 zeroed by one part and CT3 by the other is the one patch of CT1 and CT3 together
    (the chained thought patch; with only the last part acting it equals CT3 alone)."""
    composed = PatchThoughts(("CT1",), mode="zero") + PatchThoughts(("CT3",), mode="zero")
    together = run.answer_logprobs(PatchThoughts(("CT1", "CT3"), mode="zero"))
    assert run.answer_logprobs(composed).tolist() == together.tolist()
    for alone in ("CT1", "CT3"):
        assert np.abs(run.answer_logprobs(PatchThoughts((alone,), mode="zero")) - together).max() > 1e-3


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (AblateHeads(("L1H2",), ("CT1",)), AblateHeads(("L1H2", "L0H0"), ("CT1",), mode="mean"), "on L1H2 at CT1"),
        (AblateHeads(("L1H2",), ("latent",)), AblateHeads(("L1H2",), ("CT4", "eot")), "both act on L1H2 at CT4"),
        (AblateHeads(("L1H2",), ("CT3",)), AttentionPattern(("L1H2",), "uniform", hub="CT1"), "L1H2 at CT3"),
        (AttentionPattern(("L1H2",), "uniform", hub="CT1"), AttentionPattern(("L1H2",), "hub", hub="CT1"), "L1H2"),
        (PatchThoughts(("latent",), mode="zero"), PatchThoughts(("CT3",)), "both patch CT3"),
        (PatchThoughts(("CT2", "CT3"), mode="zero"), PatchThoughts(("CT3",), mode="mean"), "both patch CT3"),
    ],
)
def test_a_composition_whose_parts_would_override_each_other_is_refused(first, second, message):
    with pytest.raises(InterventionError, match=message):
        first + second
    with pytest.raises(InterventionError, match=message):
        second + first


def test_composition_is_order_free_and_two_patterns_on_one_layer_both_apply(run):
    a, b = AttentionPattern(("L1H2",), "uniform", hub="CT1"), AttentionPattern(("L1H3",), "sequential", hub="CT1")
    assert (a + b).key() == (b + a).key()
    question_span = AblateHeads(("L1H2",), ("question",)) + a  # a head's question output and its thought queries
    assert len(question_span.parts()) == 2
    both, first, second = (run.measure(s).answer_logprob for s in (a + b, a, b))
    assert np.abs(both - second).max() > 1e-4 and np.abs(both - first).max() > 1e-4, "each part acts"
    assert run.measure(b + a).answer_logprob.tolist() == both.tolist()
    assert len(run._computed) == 3, "a + b and b + a are one condition"


def test_a_pattern_no_thought_can_see_is_refused_and_a_claim_on_it_is_inconclusive(run):
    with pytest.raises(InterventionError, match="changes nothing: no thought's query comes after the hub CT5"):
        run.measure(AttentionPattern(("L1H2",), "hub", hub="CT5"))
    with pytest.raises(InterventionError, match="rerouting the hub CT2 to itself is the identity"):
        AttentionPattern(("L1H2",), "reroute", hub="CT2", target="CT2")
    spec = {"id": "c", "phase": 1, "statement": "s", "metric": "pattern_drop", "threshold": 5.0, "direction": "less",
            "experiment": {"pattern": "hub", "heads": ["L1H2"]}}  # fmt: skip
    claim = parse_claim(spec, "test")
    run.__dict__["hub_thought"] = 1
    result = evaluate_claim(claim, run)
    assert result.positions == "CT2 CT3 CT4 CT5" and "note" not in result.details
    run.__dict__["hub_thought"] = run.n_latent - 1  # a hub at the last thought: the pattern is a no-op
    result = evaluate_claim(claim, run)
    assert result.verdict == "INCONCLUSIVE" and "changes nothing" in result.details["note"]
    assert result.positions == ""
    reroute = parse_claim({**spec, "metric": "reroute_drop", "experiment": {"target": "CT5", "heads": ["L1H2"]}}, "t")
    run.__dict__["hub_thought"] = 2
    result = evaluate_claim(reroute, run)
    assert result.verdict == "INCONCLUSIVE" and "rerouting changes nothing" in result.details["note"]
    run.__dict__["hub_thought"] = 5
    result = evaluate_claim(reroute, run)  # the target is the hub: the identity
    assert result.verdict == "INCONCLUSIVE" and "identity" in result.details["note"]


def test_randomised_conditions_are_measured_over_draws(run):
    noise = run.measure_draws(PatchThoughts(("CT1",)), 3)
    assert len(noise) == 3 and len(run._computed) == 3
    assert len({c.answer_logprob.tobytes() for c in noise}) == 3, "independent draws"
    assert len(run.measure_draws(PatchThoughts(("CT1",), mode="zero"), 3)) == 1, "a deterministic mode: one"
    effect = run.effect(noise, "answer_logprob")
    per_draw = [run.effect([c], "answer_logprob").effect for c in noise]
    assert effect.effect == pytest.approx(np.mean(per_draw)) and effect.test == "Wilcoxon signed-rank"
    with pytest.raises(InterventionError, match="not random"):
        PatchThoughts(("CT1",), mode="zero", draw=1)


@torch.no_grad()
def test_answer_logprob_equals_a_full_recompute(load_model):
    codi = load_model("tiny-gpt2")
    problems = TEST[:5]
    batch = encode_questions(codi, [p.question for p in problems])
    answers = [format_number(p.answer) for p in problems]
    got = answer_logprobs(codi, run_latents(codi, batch), answers)
    ids, scored = answer_targets(codi, answers)
    assert all(k == len(a) - 3 for a, k in zip(ids, scored)), "the number after 'answer is :'"
    for row, p in enumerate(problems):  # one sequence, no cache, no padding: every input embedded at once
        alone = encode_questions(codi, [p.question])
        thoughts = run_latents(codi, alone).thoughts[0]  # [K, d]
        tokens = torch.tensor(ids[row])
        embeds = torch.cat(
            [codi.embed(alone.input_ids[0]), thoughts, codi.embed(torch.tensor([codi.eot_id])), codi.embed(tokens)]
        )[None]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = codi.step(mask, position_ids(mask), None, inputs_embeds=embeds)
        logp = codi.logits(out.last_hidden_state[0]).log_softmax(-1)  # [T, V+3]
        start = embeds.shape[1] - len(tokens)  # index of the first answer token
        expected = sum(
            float(logp[start + j - 1, t]) for j, t in enumerate(tokens.tolist()) if j >= len(tokens) - scored[row]
        )
        assert float(got[row]) == pytest.approx(expected, abs=1e-4)


def test_every_finished_measurement_is_announced_computed_then_cached(run):
    heard = []
    run.on_measured = lambda model, what, seconds, computed: heard.append((model, what, computed))
    spec = AblateHeads(("L0H1",), ("CT2",))
    run.measure(spec)
    run.measure(spec)
    run.on_discovery().answer_logprobs(spec)  # a ranking's measurement on the discovery split
    assert heard[:2] == [("tiny-gpt2", spec.describe(), True), ("tiny-gpt2", spec.describe(), False)]
    assert heard[2][1].endswith("[discovery split]") and heard[2][2]


def test_resampled_thoughts_all_come_from_one_other_problem(run):
    """`latent` resampled: each problem gets another problem's whole thought trajectory, not a
    mixture of six donors."""
    clean = run.clean_thoughts("test")  # [N, K, d]
    spec = PatchThoughts(("latent",), mode="resample", draw=1)

    def donors(spec: PatchThoughts, t: int) -> list[int]:
        return [int(torch.cdist(row[None], clean[:, t]).argmin()) for row in spec.replacement(run, t)]

    per_thought = [donors(spec, t) for t in range(run.n_latent)]
    assert all(d == per_thought[0] for d in per_thought), "one donor per problem for every thought"
    assert all(d != i for i, d in enumerate(per_thought[0])), "never the problem itself"
    assert donors(with_draw(spec, 2), 0) != per_thought[0], "each draw its own donors"


def _claim(metric: str, experiment: dict, **keys):
    entry = {"id": "c", "phase": 1, "statement": "s", "metric": metric, "threshold": 1.0, "direction": "greater",
             "experiment": experiment, **keys}  # fmt: skip
    return parse_claim(entry, "test")


def test_refute_at_is_a_fraction_of_baseline_like_the_threshold(run):
    claim = _claim("pattern_drop", {"pattern": "uniform", "heads": ["L1H2"]}, threshold=0.1, direction="less",
                   threshold_of_baseline=True, refute_at=0.3)  # fmt: skip
    result = evaluate_claim(claim, run)
    baseline = 100.0 * run.baseline.accuracy
    assert baseline > 0
    assert result.threshold == pytest.approx(0.1 * baseline) and result.refute_at == pytest.approx(0.3 * baseline)


def test_the_error_analysis_breaks_down_the_claims_own_thought(run):
    """A `which` claim measures every thought; its error analysis is the hub's (or the judged
    thought's) patch, not the first one measured (CT0)."""
    run = ModelRun(run.model, synthetic_split("test")[:80], DISCOVERY, run.cache, requested_batch_size=40)
    run.__dict__["hub_thought"] = 2
    hub = evaluate_claim(_claim("position_drop", {"which": "hub", "n_draws": 1}), run)
    assert hub.details["condition"] == PatchThoughts(("CT2",)).describe()
    with_ci = {r["condition"] for r in hub.details["by_type"] if not np.isnan(r["ci_low"])}
    assert with_ci == {hub.details["condition"]}, "the types' CIs are the hub patch's"
    worst = evaluate_claim(_claim("position_drop", {"which": "max_non_hub", "n_draws": 1}, direction="less"), run)
    assert worst.details["condition"] == PatchThoughts((worst.details["worst"],)).describe()


def test_an_interchange_step_no_problem_has_is_inconclusive_not_ct0(run):
    result = evaluate_claim(_claim("interchange", {"lens_step": 8}), run)
    assert result.verdict == "INCONCLUSIVE" and result.details["note"] == "no discovery problems with step 8"
    assert result.positions == ""


def test_python_claims_check_their_criteria_too(run):
    paired = run.paired(PatchThoughts(("CT1",), "zero"))
    with pytest.raises(ValueError, match="refute_at 20 must be at most the threshold 10"):
        paired.claim("c", "s", 10.0, "greater", refute_at=20.0)
    with pytest.raises(ValueError, match="labels maps"):
        paired.claim("c", "s", 10.0, "greater", labels={"supportd": "x"})
    with pytest.raises(ValueError, match="phase is a number"):
        paired.claim("c", "s", 10.0, "greater", phase="1")
    with pytest.raises(TypeError, match="metric"):  # a registry kind's section would read details it lacks
        paired.claim("c", "s", 10.0, "greater", metric="position_drop")
    assert paired.claim("c", "s", 10.0, "greater").metric == "python"
    with pytest.raises(InterventionError, match="n_draws must be at least 1"):
        run.paired(PatchThoughts(("CT1",)), n_draws=0)
    with pytest.raises(InterventionError, match=r"paired\(\) measures draws 0..4 itself"):
        run.paired(PatchThoughts(("CT1",), draw=3))
    with pytest.raises(PositionError, match="tiny-gpt2: unknown position 'CT6'"):
        run.paired(PatchThoughts(("CT6",), "zero"))
    with pytest.raises(SiteError, match="head L9H0 out of range for tiny-gpt2"):
        run.measure(AblateHeads(("L9H0",)))


def test_random_head_sets_are_distinct_and_as_many_as_exist(run):
    """A control of "20 random sets" drew sets independently: tiny-gpt2's top-3 at seed 0 got 19
    distinct ones, and a single head's 20 "sets" held at most 7."""
    like = [Head(1, 2), Head(3, 2), Head(2, 1)]
    sets = random_head_sets(run, like, 20)
    assert len(sets) == 20 and len({frozenset(s) for s in sets}) == 20
    assert all([h.layer for h in s] == [h.layer for h in like] and not set(s) & set(like) for s in sets)
    single = random_head_sets(run, [Head(1, 2)], 20)
    assert sorted(s[0] for s in single) == [Head(1, k) for k in range(8) if k != 2], "all 7 others, once each"
    with pytest.raises(InterventionError, match="layer 0 has no 5 other heads"):
        random_head_sets(run, [Head(0, k) for k in range(5)], 3)
