"""The causal head sweep and attribution patching: the estimate is exact where the path from a
head to the answer is linear, the sweep's per-head effect is the single-head claim's (same
cache entries), the causal ranking comes from the discovery split, and `python -m harness
sweep --json` reports what the sweep measured."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from harness.arch import Head
from harness.attribution import attribution_patching
from harness.cache import ResultCache
from harness.causal import causal_ranking
from harness.claims import evaluate_claim, parse_claim
from harness.cli import main
from harness.codi import CODIModel
from harness.data import format_number, synthetic_split
from harness.experiments import ModelRun
from harness.interventions import HeadAblation, HeadCapture
from harness.kinds import ClaimError
from harness.kinds.sweep import sweep_table
from harness.runtime import answer_logprobs, encode_questions, run_latents
from harness.specs import AblateHeads
from harness.training import build_tiny

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
def _exact_drops(codi, head: Head, mean: torch.Tensor | None) -> np.ndarray:
    """Clean minus ablated answer log-probability per problem (zero, or `mean` [K, hd])."""
    batch = encode_questions(codi, [p.question for p in TEST])
    answers = [format_number(p.answer) for p in TEST]
    clean = answer_logprobs(codi, run_latents(codi, batch), answers)
    positions = batch.positions(codi.n_latent).latent
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
    head = Head(0, 2)
    codi = linear_path_codi(head)
    means = _mean_outputs(codi, DISCOVERY)
    estimate = attribution_patching(codi, TEST, means, batch_size=3)  # [2, N, L, H]
    for m, mean in enumerate((None, means[0, head.head])):
        exact = _exact_drops(codi, head, mean)
        assert np.abs(exact).max() > 1e-3, "the ablation must change the answer's log-probability"
        np.testing.assert_allclose(estimate[m, :, 0, head.head], exact, rtol=0.03, atol=2e-5)


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
    heads, source = run.heads_for((), 3, "causal")
    assert [str(h) for h in heads] == best and source == "causal ranking"
    assert run.heads_for((), 3)[1] == "ranking"  # the attention ranking stays the default


@pytest.mark.parametrize(
    ("metric", "experiment", "message"),
    [
        ("ablation_drop", {"heads": ["L1H2"], "ranking": "causal"}, "give 'heads' or 'ranking', not both"),
        ("ablation_drop", {"ranking": "casual"}, "did you mean 'causal'"),
        ("pattern_drop", {"pattern": "uniform", "scope": "all", "ranking": "causal"}, "ranking applies to scope 'top'"),
        ("head_sweep", {"test": "attention", "mode": "resample"}, "choose from zero, mean"),
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
