"""Path patching through the thought loop (`PatchPath`, `harness/interventions/paths.py`) against the ordinary
patch, the unpatched run and a hand-built two-cache computation; its claims kind."""

import numpy as np
import pytest
import torch

from harness.data.problems import format_number, synthetic_split
from harness.interventions.hooks import InterventionError
from harness.interventions.paths import PatchPath
from harness.interventions.specs import AblateHeads, Baseline, PatchThoughts
from harness.judgment.claims import ClaimError, evaluate_claim, parse_claim
from harness.judgment.kinds.interchange import pairs, sources_correct
from harness.judgment.kinds.thought_flow import flow_matrix
from harness.measures.interchange import interchange
from harness.measures.runner import ModelRun
from harness.runtime.cache import ResultCache
from harness.runtime.loop import _ones, answer_targets, encode_questions, run_latents

TEST = synthetic_split("test")[:16]
DISCOVERY = synthetic_split("discovery")[:8]


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def run(request, load_model):
    return ModelRun(load_model(request.param), TEST, DISCOVERY, ResultCache(None), requested_batch_size=6)


def _same(a, b) -> bool:
    return a.correct.tolist() == b.correct.tolist() and a.answer_logprob.tolist() == b.answer_logprob.tolist()


@pytest.mark.parametrize(("source", "mode"), [("CT1", "zero"), ("CT3", "mean"), ("latent", "zero")])
def test_every_reader_is_the_ordinary_patch_and_none_is_the_baseline(run, source, mode):
    """Per problem and bit for bit, decoding included."""
    everyone = ("latent", "eot", "answer")
    ordinary = run.measure(PatchThoughts((source,), mode))
    assert _same(run.measure(PatchPath(source, everyone, mode)), ordinary)
    assert _same(run.measure(PatchPath(source, (), mode)), run.baseline)
    assert not _same(ordinary, run.baseline), "the patch itself changes something"


@torch.no_grad()
def test_the_answer_alone_reading_a_thought_equals_a_hand_built_two_cache_run(run):
    """eot reads every clean thought; the answer tokens read CT2 as the zero-patched run made it
    (its keys and values in every layer) and the clean rest: built by hand from two loops."""
    codi, problems = run.codi, sorted(TEST, key=lambda p: len(p.question))  # teacher forcing's batch order
    batch = encode_questions(codi, [p.question for p in problems])
    clean = run_latents(codi, batch)
    patched = run_latents(codi, batch, patch=lambda i, t: torch.zeros_like(t) if i == 2 else t)
    source = batch.positions(codi.n_latent).index("CT2")
    ids, scored = answer_targets(codi, [format_number(p.answer) for p in problems])
    width = 1 + max(len(a) for a in ids)
    tokens = torch.full((len(problems), width), codi.eos_id)
    tokens[:, 0] = codi.eot_id
    for row, a in enumerate(ids):
        tokens[row, 1 : 1 + len(a)] = torch.tensor(a)
    mask = _ones(clean.attention_mask, width)
    positions = clean.next_position[:, None] + torch.arange(width)
    eot = codi.step(mask[:, : mask.shape[1] - width + 1], positions[:, :1], clean.cache, input_ids=tokens[:, :1])
    for mine, theirs in zip(clean.cache.layers, patched.cache.layers):
        mine.keys[:, :, source], mine.values[:, :, source] = theirs.keys[:, :, source], theirs.values[:, :, source]
    rest = codi.step(mask, positions[:, 1:], clean.cache, input_ids=tokens[:, 1:])
    hidden = torch.cat([eot.last_hidden_state, rest.last_hidden_state], dim=1)[:, :-1]
    logp = codi.logits(hidden).float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    expected = {p.id: float(logp[r, len(a) - k : len(a)].double().sum()) for r, (p, a, k) in
                enumerate(zip(problems, ids, scored))}  # fmt: skip
    run.requested_batch_size = len(TEST)
    vars(run).pop("batch_size", None)
    got = run.answer_logprobs(PatchPath("CT2", ("answer",), "zero"))
    np.testing.assert_allclose(got, [expected[p.id] for p in TEST], rtol=0, atol=1e-5)
    assert np.abs(got - run.answer_logprobs(Baseline())).max() > 1e-3, "the answer reads the patch"


def test_a_reader_before_its_source_and_overlapping_patches_are_refused():
    with pytest.raises(InterventionError, match="CT1 cannot read CT2"):
        PatchPath("CT2", ("CT1", "eot"), "zero")
    with pytest.raises(InterventionError, match="CT2 cannot read CT2"):
        PatchPath("CT2", ("CT2",), "zero")
    with pytest.raises(InterventionError, match="CT0 cannot read latent"):
        PatchPath("latent", ("CT0",), "zero")
    with pytest.raises(InterventionError, match="source is a thought"):
        PatchPath("eot", ("answer",), "zero")
    with pytest.raises(InterventionError, match="both patch CT2"):
        PatchPath("CT2", ("answer",)) + PatchThoughts(("CT2",), "zero")
    with pytest.raises(InterventionError, match="both patch CT3"):
        PatchPath("latent", ("eot",)) + PatchPath("CT3", ("answer",))
    composed = PatchPath("CT2", ("answer",)) + AblateHeads(("L1H1",), ("CT4",))
    assert composed.key() == (AblateHeads(("L1H1",), ("CT4",)) + PatchPath("CT2", ("answer",))).key()


def test_a_path_patch_composes_with_a_head_ablation(run):
    """Both act: the composed condition differs from each part alone, and with every reader it
    equals the ordinary patch composed with the same ablation (bit for bit)."""
    ablation = AblateHeads(("L1H1",), ("CT4",))
    composed = run.measure(PatchPath("CT2", ("latent", "eot", "answer"), "zero") + ablation)
    assert _same(composed, run.measure(PatchThoughts(("CT2",), "zero") + ablation))
    assert not _same(composed, run.measure(ablation))


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ({"test": "cell", "source": "CT2", "readers": ["CT1"]}, "CT1 cannot read CT2"),
        ({"test": "cell", "source": "CT2"}, "test 'cell' needs readers"),
        ({"test": "via_thoughts", "readers": ["eot"]}, "readers apply to test 'cell'"),
        ({"test": "via_eot", "source": "CT1"}, "via_eot patches every thought"),
        ({"test": "via_thoughts", "fraction": 0.3}, "fraction applies to test 'via_eot'"),
        ({"test": "cell", "source": "bot", "readers": ["eot"]}, "source is a thought"),
        ({"test": "via_thoughts", "mode": "zero", "n_draws": 3}, "n_draws applies to modes"),
        ({"test": "via_thoughts", "mode": "interchange"}, "mode 'interchange' measures test 'cell'"),
    ],
)
def test_flow_claims_are_checked_at_load(experiment, message):
    entry = {"id": "f", "phase": 3, "statement": "s", "metric": "thought_flow", "threshold": 0.0,
             "direction": "greater", "experiment": experiment}  # fmt: skip
    with pytest.raises(ClaimError, match=message):
        parse_claim(entry, "test")


def test_flow_claims_measure_what_they_say(run):
    """via_eot is drop(eot alone) - fraction * drop(everything); via_thoughts is drop(later
    thoughts) - drop(answer alone); the flow matrix has one cell per reader after each source."""
    entry = {"id": "f", "phase": 3, "statement": "s", "metric": "thought_flow", "threshold": 0.0,
             "direction": "greater", "measure": "answer_logprob"}  # fmt: skip
    run.__dict__["hub_thought"] = 1
    via_eot = evaluate_claim(parse_claim({**entry, "experiment": {"test": "via_eot", "fraction": 0.25}}, "t"), run)
    base = run.baseline.answer_logprob
    eot = run.measure(PatchPath("latent", ("eot",), "mean")).answer_logprob
    everything = run.measure(PatchThoughts(("latent",), "mean")).answer_logprob
    assert via_eot.effect == pytest.approx(np.mean(base - eot) - 0.25 * np.mean(base - everything), abs=1e-9)
    via_thoughts = evaluate_claim(parse_claim({**entry, "experiment": {"test": "via_thoughts"}}, "t"), run)
    loop = run.measure(PatchPath("CT1", ("latent",), "mean")).answer_logprob
    direct = run.measure(PatchPath("CT1", ("answer",), "mean")).answer_logprob
    assert via_thoughts.effect == pytest.approx(np.mean(direct - loop), abs=1e-9)
    assert via_thoughts.positions == "CT1" and via_thoughts.details["condition"].startswith("PatchPath(source=CT1")
    cells = {(r["source"], r["reader"]) for r in flow_matrix(run, "mean", 1) if r["measure"] == "accuracy"}
    k = run.n_latent
    assert ("CT0", "CT1") in cells and ("CT1", "CT1") not in cells and (f"CT{k - 1}", "latent") not in cells
    assert len(cells) == k * (k - 1) // 2 + (k - 1) + 3 * k + 4  # single thoughts, latent, eot/answer/all


@pytest.mark.parametrize("source", ["CT2", "latent"])
def test_a_counterfactual_path_with_every_reader_is_whole_thought_interchange_and_with_none_the_base(run, source):
    """Per pair: the source thought taken from the counterfactual problem's run, read by every
    later position, equals interchanging that thought (the answer scored against the
    counterfactual's); read by nobody, the base run. Bit for bit where both run the same
    passes; against `interchange` (batched by length, another batch shape) within 1e-4 nats."""
    cf = run.counterfactual_run()
    assert 10 <= len(cf.problems) <= len(TEST) and len(cf.sources) == len(cf.problems)
    everyone = ("latent", "eot", "answer")
    whole = cf.measure(PatchThoughts((source,), "interchange"))
    assert _same(cf.measure(PatchPath(source, everyone, "interchange")), whole)
    assert _same(cf.measure(PatchPath(source, (), "interchange")), cf.baseline)
    thoughts = tuple(range(run.n_latent)) if source == "latent" else (2,)
    bases = [run.problems[[p.id for p in run.problems].index(q.id.split("|")[0])] for q in cf.problems]
    reference, _ = interchange(run.codi, bases, cf.sources, thoughts, batch_size=4)
    assert whole.correct.tolist() == [float(r.correct) for r in reference.records]
    np.testing.assert_allclose(whole.answer_logprob, [r.answer_logprob for r in reference.records], atol=1e-4)
    assert [q.answer for q in cf.problems] == [s.answer for s in cf.sources], "scored against the counterfactual"
    if source == "latent":
        assert whole.correct.mean() > cf.baseline.correct.mean(), "the whole loop from the source moves answers"


def test_interchange_needs_a_counterfactual_run(run):
    with pytest.raises(InterventionError, match="run.counterfactual_run"):
        run.measure(PatchThoughts(("CT2",), "interchange"))


def test_a_counterfactual_flow_claim_is_the_share_of_valid_pairs_that_move(run):
    entry = {"id": "f", "phase": 3, "statement": "s", "metric": "thought_flow", "threshold": 10.0,
             "direction": "greater", "experiment": {"test": "cell", "source": "CT2", "readers": ["answer"],
                                                    "mode": "interchange"}}  # fmt: skip
    result = evaluate_claim(parse_claim(entry, "t"), run)
    valid = (run.baseline.correct[pairs(run)[0]] == 1) & (sources_correct(run) == 1)
    moved = run.counterfactual_run().measure(PatchPath("CT2", ("answer",), "interchange")).correct[valid]
    assert result.n == valid.sum() > 0 and result.effect == pytest.approx(100 * moved.mean(), abs=1e-9)
    assert f"{valid.sum()} of {len(pairs(run)[0])} pairs right on both sides" in result.mode
    cells = [r for r in result.details["flow"] if r["measure"] == "counterfactual"]
    assert len(cells) == len(result.details["flow"]) > 0 and all(0 <= r["drop"] <= 100 for r in cells)
    with pytest.raises(ClaimError, match="measure accuracy"):
        parse_claim({**entry, "measure": "answer_logprob"}, "t")
