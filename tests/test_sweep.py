"""The causal head sweep and attribution patching: the estimate is exact where the path from a
head to the answer is linear, the sweep's per-head effect is the single-head claim's (same
cache entries), the causal ranking comes from the discovery split, and `python -m harness
sweep --json` reports what the sweep measured."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from harness.commands.cli import main
from harness.commands.training import build_tiny
from harness.data.problems import format_number, synthetic_split
from harness.interventions.hooks import HeadAblation, HeadCapture, HeadInterpolation
from harness.interventions.specs import AblateHeads, Baseline
from harness.judgment.claims import evaluate_claim, parse_claim
from harness.judgment.kinds import ClaimError
from harness.judgment.kinds import sweep as sweep_kind
from harness.judgment.kinds.sweep import sweep_table, top_overlap
from harness.measures.attribution import path_attributions
from harness.measures.causal import causal_ranking, components, head_means, heads_for, screen_estimates, screened
from harness.measures.runner import ModelRun
from harness.runtime.arch import Head
from harness.runtime.cache import ResultCache
from harness.runtime.codi import CODIModel
from harness.runtime.loop import answer_logprobs, encode_questions, run_latents

TEST = synthetic_split("test")[:8]
DISCOVERY = synthetic_split("discovery")[:8]


@torch.no_grad()
def linear_path_codi(head: Head) -> CODIModel:
    """A one-layer tiny GPT-2 whose answer log-probability is affine in `head`'s outputs at the
    thoughts up to the final log-softmax (made near-linear by small logits): norms, MLP and
    `prj` are identities or zero, queries are zero (uniform attention, linear in the values),
    every head writes only the first half of the residual and `head` reads only the second,
    so its later outputs do not depend on its earlier ones."""
    torch.manual_seed(0)
    codi = build_tiny("gpt2").eval()
    lm, d = codi.lm, codi.lm.config.n_embd
    lm.transformer.h = lm.transformer.h[:1]
    lm.config.n_layer = 1
    block = lm.transformer.h[0]
    block.ln_1, block.ln_2, lm.transformer.ln_f = nn.Identity(), nn.Identity(), nn.Identity()
    block.mlp.c_proj.weight.zero_()
    block.mlp.c_proj.bias.zero_()
    for weight in (lm.transformer.wte.weight, block.attn.c_attn.weight, block.attn.c_proj.weight):
        weight.mul_(10.0)  # gains near 1: without the norms, effects would vanish in rounding
    block.attn.c_attn.weight[:, :d] = 0.0  # queries
    block.attn.c_attn.bias[:d] = 0.0
    block.attn.c_proj.weight[:, d // 2 :] = 0.0  # every head writes the first half only
    block.attn.c_proj.bias[d // 2 :] = 0.0
    hd = d // lm.config.n_head
    block.attn.c_attn.weight[: d // 2, 2 * d + head.head * hd : 2 * d + (head.head + 1) * hd] = 0.0  # reads the second
    unembed = nn.Linear(d, lm.config.vocab_size, bias=False)
    unembed.weight.copy_(0.1 * lm.transformer.wte.weight)  # small logits: log-softmax near-linear
    lm.lm_head = unembed
    codi.prj = nn.Identity()
    return codi


@torch.no_grad()
def _exact_drops(codi, head: Head, mean: torch.Tensor | None, thought: int | None = None) -> np.ndarray:
    """Clean minus ablated answer log-probability per problem (zero, or `mean` [K, hd]), the
    head ablated at every thought or at `thought` alone."""
    batch = encode_questions(codi, [p.question for p in TEST])
    answers = [format_number(p.answer) for p in TEST]
    clean = answer_logprobs(codi, run_latents(codi, batch), answers)
    positions = batch.positions(codi.n_latent).latent
    if thought is not None:
        positions, mean = positions[thought : thought + 1], None if mean is None else mean[thought : thought + 1]
    values = None if mean is None else {head: mean}
    with HeadAblation(codi, [head], positions, "zero" if mean is None else "mean", values):
        ablated = answer_logprobs(codi, run_latents(codi, batch), answers)
    return (clean - ablated).numpy()


@torch.no_grad()
def _mean_outputs(codi, problems) -> torch.Tensor:
    """Every head's mean output at each thought: [L, H, K, hd]."""
    geo = codi.geometry
    heads = [Head(layer, h) for layer in range(geo.n_layers) for h in range(geo.n_heads)]
    batch = encode_questions(codi, [p.question for p in problems])
    with HeadCapture(codi, heads, batch.positions(codi.n_latent).latent) as capture:
        run_latents(codi, batch)
    means = torch.stack([capture.values[h].mean(0) for h in heads])
    return means.view(geo.n_layers, geo.n_heads, *means.shape[1:])


def test_attribution_patching_equals_the_ablation_effect_on_a_linear_path():
    """At every thought and at each thought alone, zero and mean: first order is exact there."""
    head = Head(0, 2)
    codi = linear_path_codi(head)
    means = _mean_outputs(codi, DISCOVERY)
    for mean in (None, means[0, head.head]):
        estimate = path_attributions(codi, TEST, None if mean is None else means, (1.0,), batch_size=3)  # [N, L, H, K]
        exact = _exact_drops(codi, head, mean)
        assert np.abs(exact).max() > 1e-3, "the ablation must change the answer's log-probability"
        np.testing.assert_allclose(estimate[:, 0, head.head].sum(-1), exact, rtol=0.03, atol=2e-5)
        at_ct2 = _exact_drops(codi, head, mean, thought=2)
        assert np.abs(at_ct2 - exact).max() > 1e-3, "one thought's drop differs from every thought's"
        np.testing.assert_allclose(estimate[:, 0, head.head, 2], at_ct2, rtol=0.03, atol=2e-5)


def _path_logprobs(codi, alpha: float, targets=None) -> np.ndarray:
    batch = encode_questions(codi, [p.question for p in TEST])
    with torch.no_grad(), HeadInterpolation(codi, batch.positions(codi.n_latent).latent, alpha, targets):
        return answer_logprobs(codi, run_latents(codi, batch), [format_number(p.answer) for p in TEST]).double().numpy()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_screens_path_runs_from_every_head_ablated_to_clean(load_model, name, tmp_path):
    """alpha 1 is the baseline, alpha 0 every head ablated at every thought (zero and mean, as
    the conditions ablate them); between, the gradient summed over heads and thoughts is the
    path's derivative (a central difference)."""
    run = ModelRun(load_model(name), TEST, DISCOVERY, ResultCache(tmp_path), len(TEST))
    every = AblateHeads(tuple(run.every_head), ("latent",), "zero")
    # Not bit for bit: the interpolated head output is a new tensor fed to the output projection,
    # whose matrix product may take another kernel path (1.07e-6 nats apart on an AMD EPYC).
    np.testing.assert_allclose(_path_logprobs(run.codi, 1.0), run.answer_logprobs(Baseline()), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_path_logprobs(run.codi, 0.0), run.answer_logprobs(every), atol=1e-5)
    means = head_means(run)
    mean_every = AblateHeads(tuple(run.every_head), ("latent",), "mean")
    np.testing.assert_allclose(_path_logprobs(run.codi, 0.0, means), run.answer_logprobs(mean_every), atol=1e-4)
    eps = 1e-3
    slope = (_path_logprobs(run.codi, 0.9 + eps) - _path_logprobs(run.codi, 0.9 - eps)) / (2 * eps)
    gradient = path_attributions(run.codi, TEST, None, (0.9,), batch_size=len(TEST)).sum((1, 2, 3))
    assert np.abs(slope).max() > 1.0
    np.testing.assert_allclose(gradient, slope, atol=0.02 * np.abs(slope).max())


def test_integrated_gradients_average_the_gradient_over_the_paths_midpoints(load_model, tmp_path):
    """`ig` with k steps is the mean of the gradients at (j + 0.5) / k; `atp` the gradient at 1;
    a head's estimate at every thought is the sum of its per-thought estimates."""
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(tmp_path), 4)
    at = {a: path_attributions(run.codi, TEST, None, (a,), batch_size=4) for a in (0.25, 0.75, 1.0)}
    np.testing.assert_allclose(screen_estimates(run, "ig", "zero", steps=2), (at[0.25] + at[0.75]) / 2, atol=1e-6)
    np.testing.assert_allclose(screen_estimates(run, "atp", "zero"), at[1.0], atol=1e-6)
    parts = components(run, "head") + components(run, "head_thought")
    per = screened(at[1.0], parts)  # [C, N]
    n_heads = len(run.every_head)
    np.testing.assert_allclose(per[:n_heads], per[n_heads:].reshape(n_heads, run.n_latent, -1).sum(1), atol=1e-9)
    assert not np.allclose(at[0.25], at[1.0], atol=1e-3), "the gradient changes along the path"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep-cache")


def test_the_sweeps_per_head_effect_is_the_single_head_claims(load_model, shared_cache):
    run = ModelRun(load_model("tiny-gpt2"), TEST, synthetic_split("discovery"), ResultCache(shared_cache))
    table = sweep_table(run, "zero").set_index("head")
    assert list(table.index[:3]) == ["L0H0", "L0H1", "L0H2"] and len(table) == 32
    computed = len(run._computed)
    for measure, column in (("accuracy", "ablation_drop"), ("answer_logprob", "ablation_drop_logprob")):
        claim = parse_claim(
            {"id": "c", "phase": 3, "statement": "s", "metric": "ablation_drop", "threshold": 0.0,
             "direction": "greater", "measure": measure, "experiment": {"heads": ["L1H2"], "n_random": 0}},
            "test",
        )  # fmt: skip
        assert evaluate_claim(claim, run).effect == pytest.approx(table.loc["L1H2", column])
    assert len(run._computed) == computed, "the claim reads the sweep's cache entry"
    assert table.ablation_drop_logprob.abs().max() > 0.05


def test_sweep_cli_json_reports_every_head(load_model, shared_cache, capsys):
    run = ModelRun(load_model("tiny-gpt2"), TEST, synthetic_split("discovery"), ResultCache(shared_cache))
    table = sweep_table(run, "zero")
    capsys.readouterr()
    assert main(["sweep", "--model", "tiny-gpt2", "--n-problems", "8", "--json", "--cache-dir", str(shared_cache)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"heads", "spearman", "seconds_ablation", "seconds_attribution"} <= set(out)
    assert [h["head"] for h in out["heads"]] == list(table["head"])
    np.testing.assert_allclose([h["ablation_drop_logprob"] for h in out["heads"]], table.ablation_drop_logprob)
    np.testing.assert_allclose([h["attribution"] for h in out["heads"]], table.attribution)
    assert out["spearman"] == pytest.approx(table.attribution.rank().corr(table.ablation_drop_logprob.rank()))
    assert out["screen"] == "atp" and out["steps"] is None
    argv = ["sweep", "--model", "tiny-gpt2", "--n-problems", "8", "--json", "--cache-dir", str(shared_cache)]
    assert main([*argv, "--screen", "ig", "--steps", "2", "--n-top", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    table = sweep_table(run, "zero", "ig", 2)
    assert (out["screen"], out["steps"]) == ("ig", 2)
    np.testing.assert_allclose([h["attribution"] for h in out["heads"]], table.attribution)
    drops = table.ablation_drop_logprob.to_numpy()
    assert out["top_k_overlap"] == top_overlap(table.attribution.to_numpy(), drops, 4)
    assert main(["sweep", "--n-problems", "0"]) == 4


def test_the_causal_ranking_is_the_discovery_sweep_and_feeds_head_claims(load_model, tmp_path):
    run = ModelRun(load_model("tiny-llama"), TEST, DISCOVERY, ResultCache(tmp_path))
    ranked = causal_ranking(run)
    on_discovery = run.on_discovery()
    spec = AblateHeads((Head(1, 3),), ("latent",), "zero")
    measured = on_discovery.measure(spec)  # the full evaluation records the same log-probabilities
    np.testing.assert_array_equal(on_discovery.answer_logprobs(spec), measured.answer_logprob)
    drops = {str(h): np.mean(on_discovery.baseline.answer_logprob - on_discovery.answer_logprobs(
        AblateHeads((h,), ("latent",), "zero"))) for h in run.every_head}  # fmt: skip
    best = sorted(drops, key=lambda h: -drops[h])[:3]  # the full sweep's top 3
    assert list(ranked.name[:3]) == best
    heads, source = heads_for(run, (), 3, "causal")
    assert [str(h) for h in heads] == best and source == "causal ranking"
    assert heads_for(run, (), 3)[1] == "ranking"  # the attention ranking stays the default


def test_a_claim_at_one_thought_takes_the_heads_that_matter_at_that_thought(load_model, tmp_path):
    """ranking = "causal" with positions ["CT<i>"] ranks heads ablated at CT<i> alone (the
    full head-at-that-thought sweep's top 3 on discovery), not at every thought."""
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(tmp_path))
    on_discovery = run.on_discovery()
    base = on_discovery.answer_logprobs(Baseline())
    best = {}
    for where in ("latent", "CT1"):
        drops = {str(h): np.mean(base - on_discovery.answer_logprobs(AblateHeads((h,), (where,), "zero")))
                 for h in run.every_head}  # fmt: skip
        best[where] = sorted(drops, key=lambda h: -drops[h])[:3]
    assert best["latent"] != best["CT1"], "a case where the two resolutions disagree"
    heads, source = heads_for(run, (), 3, "causal", ("CT1",))
    assert [str(h) for h in heads] == best["CT1"] and source == "causal ranking at CT1"
    experiment = {"ranking": "causal", "positions": ["CT1"]}
    claim = parse_claim({"id": "c", "phase": 3, "statement": "s", "metric": "ablation_drop", "threshold": 0.0,
                         "direction": "greater", "experiment": experiment}, "t")  # fmt: skip
    assert evaluate_claim(claim, run).details["heads"] == best["CT1"]


@pytest.mark.parametrize(
    ("metric", "experiment", "message"),
    [
        ("ablation_drop", {"heads": ["L1H2"], "ranking": "causal"}, "give 'heads' or 'ranking', not both"),
        ("ablation_drop", {"ranking": "casual"}, "did you mean 'causal'"),
        ("ablation_drop", {"ranking": "causal", "positions": ["CT1", "CT2"]}, r"every thought .* or at one"),
        ("ablation_drop", {"ranking": "causal", "positions": ["eot"]}, r"not at \['eot'\]"),
        ("pattern_drop", {"pattern": "uniform", "scope": "all", "ranking": "causal"}, "ranking applies to scope 'top'"),
        ("head_sweep", {"test": "attention", "mode": "resample"}, "choose from zero, mean"),
        ("head_sweep", {"test": "attention", "screen": "ig"}, "screen and steps apply to test 'attribution'"),
        ("head_sweep", {"test": "attribution", "steps": 4}, "steps applies to screen 'ig'"),
        ("head_sweep", {"test": "attribution", "screen": "eap"}, "choose from atp, ig"),
        ("head_sweep", {"test": "attention", "resolution": "head_thought"}, "takes test 'attribution'"),
        ("head_sweep", {"test": "attribution", "resolution": "head_thought"}, "measure 'answer_logprob', not 'accura"),
        ("logit_lens", {"test": "ordered", "step": 2}, "step applies to test 'decodes_step'"),
        ("logit_lens", {"test": "decodes_step", "step": 9}, "step is 1 .* to 8"),
        ("interchange", {"positions": ["CT1"], "lens_step": 1}, "give 'positions' or 'lens_step', not both"),
        ("interchange", {"positions": ["bot"]}, "thought patches act on thoughts"),
        ("probe_layer", {"test": "step_selectivity", "label": "answer_magnitude"}, "label applies to the hub probes"),
    ],
)
def test_settings_that_would_be_ignored_are_refused(metric, experiment, message):
    entry = {"id": "c", "phase": 3, "statement": "s", "metric": metric, "threshold": 1.0, "direction": "greater"}
    with pytest.raises(ClaimError, match=message):
        parse_claim({**entry, "experiment": experiment}, "test")


def test_a_head_by_thought_sweep_claim_judges_the_screen_per_head_and_thought(load_model, tmp_path):
    """resolution = "head_thought": every head at each thought alone (the stacked drops, equal
    to the single conditions), the screen's per-thought estimate beside them, rho between the
    two, and one heat map per thought in the report."""
    run = ModelRun(load_model("tiny-gpt2"), TEST, DISCOVERY, ResultCache(tmp_path))
    experiment = {"test": "attribution", "resolution": "head_thought"}
    entry = {"id": "c", "phase": 3, "statement": "s", "metric": "head_sweep", "threshold": 0.5, "direction": "greater"}
    claim = parse_claim({**entry, "measure": "answer_logprob", "experiment": experiment}, "t")
    result = evaluate_claim(claim, run)
    table = pd.DataFrame(result.details["sweep"])
    assert len(table) == 32 * run.n_latent and list(table.position[:2]) == ["CT0", "CT1"]
    base = run.answer_logprobs(Baseline())
    for i in (0, 7, 100):
        single = AblateHeads((Head.parse(table["head"][i]),), (table.position[i],), "zero")
        assert table.ablation_drop_logprob[i] == pytest.approx(np.mean(base - run.answer_logprobs(single)), abs=1e-5)
    estimates = screened(screen_estimates(run, "atp", "zero"), components(run, "head_thought")).mean(1)
    np.testing.assert_allclose(table.attribution, estimates)
    assert result.effect == pytest.approx(spearmanr(estimates, table.ablation_drop_logprob).statistic)
    section = sweep_kind.section([result], {"tiny-gpt2": run})
    fig = section.figures["sweep_tiny-gpt2_zero_by_thought"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 * run.n_latent and panels[3].get_title() == "CT3"
    shown = np.asarray(panels[3].get_images()[0].get_array())  # the drops at CT3, layer x head
    expected = table[table.position == "CT3"].ablation_drop_logprob.to_numpy().reshape(4, 8)
    np.testing.assert_allclose(shown, expected)
