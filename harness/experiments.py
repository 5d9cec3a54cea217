"""A model's run on one data set: a generic cached runner of intervention specs.

`ModelRun.measure(spec)` gives a `Condition`: per-problem correctness, teacher-forced answer
log-probability and answer confidence over the same test problems (so every effect is
paired), cached on disk under a content key of the model, data, decoding config and the
spec's own fields. `ModelRun.effect` compares conditions and memoises the statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from harness.arch import Head, HeadGeometry, check_heads
from harness.attribution import Attributions, attribution_patching, integrated_gradients, question_tokens
from harness.cache import ResultCache, content_key
from harness.codi import CODIModel
from harness.data import Problem
from harness.discovery import LatentAttention, head_metrics, model_hub_thought, record_latent_attention, top_heads
from harness.evaluation import PrefixStore, evaluate, teacher_forced
from harness.interchange import interchange, interchange_pairs
from harness.interventions import HeadCapture, InterventionError
from harness.lens import lens_tokens, step_tokens
from harness.models import LazyModel, default_batch_size
from harness.positions import PositionError, check_position
from harness.probes import ProbeResults, all_thought_states, run_probes, step_probes, thought_states
from harness.progress import bar
from harness.runtime import encode_questions, generate, run_latents
from harness.specs import AblateHeads, Baseline, Spec, TransplantHead, installer, what_runs, with_draw
from harness.stats import PairedEffect, paired_effect
from harness.transplant import DEFAULT_RIDGE, HeadTransplant, LinearMap, paired_states
from harness.verdicts import ClaimResult, claim_result

MAX_NEW_TOKENS = 256
IG_PROBLEMS = 100  # problems attributed by integrated gradients (3.2)
IG_STEPS = 32
MAX_PROBE_STEPS = 4  # solution steps probed (the synthetic problems have 1-4)
MAX_LENS_STEPS = 8  # solution steps scored by the logit lens (GSM8K has a few longer ones)
RANKINGS = ("attention", "causal")  # where a claim's top heads come from (`heads_for`)


@dataclass(frozen=True)
class Condition:
    """One condition's per-problem results over the run's test problems."""

    correct: np.ndarray  # [N] 1.0 / 0.0
    answer_logprob: np.ndarray  # [N] nats: log p of the gold number, teacher-forced after eot
    confidence: np.ndarray  # [N] probability of the first token of the predicted number

    def values(self, measure: str) -> np.ndarray:
        """[N] values of `measure` ("accuracy": the correctness flags)."""
        return self.correct if measure == "accuracy" else self.answer_logprob

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    def mean(self, measure: str) -> float:
        """Accuracy (%) or mean answer log-probability (nats) over the problems."""
        value = float(np.mean(self.values(measure)))
        return 100.0 * value if measure == "accuracy" else value


@dataclass(frozen=True)
class Paired:
    """A condition (its draws) beside the baseline over the same problems: what a Python claim
    measures. `effect(measure)` is the paired drop with its CI; `claim(...)` its verdict row."""

    run: ModelRun
    spec: Spec
    baseline: Condition
    draws: list[Condition]

    def effect(self, measure: str = "accuracy") -> PairedEffect:
        return self.run.effect(self.draws, measure, reference=self.baseline)

    def frame(self) -> pd.DataFrame:
        """One row per problem: id, baseline and treated (mean over draws) of both measures."""
        treated = {f: np.mean([getattr(d, f) for d in self.draws], axis=0) for f in ("correct", "answer_logprob")}
        return pd.DataFrame(
            {
                "id": [p.id for p in self.run.problems],
                "baseline_correct": self.baseline.correct,
                "correct": treated["correct"],
                "baseline_answer_logprob": self.baseline.answer_logprob,
                "answer_logprob": treated["answer_logprob"],
            }
        )

    def claim(
        self, id: str, statement: str, threshold: float, direction: str, measure: str = "accuracy", **kwargs
    ) -> ClaimResult:
        """The verdict row of "this condition's drop in `measure` is `direction` than
        `threshold`" (keywords as `verdicts.claim_result`)."""
        return claim_result(
            self.effect(measure),
            id=id,
            statement=statement,
            model=self.run.name,
            threshold=threshold,
            direction=direction,
            measure=measure,
            baseline=self.baseline.mean(measure),
            details={"spec": self.spec.key(), "n_draws": len(self.draws)},
            **what_runs(self.spec),
            **kwargs,
        )


def data_hash(problems: list[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\t{p.question}\t{p.answer}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class ModelRun:
    """One model's experiments on one data set. `model` may be a loaded `CODIModel` or a
    `LazyModel`, loaded only when a result is not in the cache."""

    model: LazyModel | CODIModel
    problems: list[Problem]  # the test split: every effect is paired over these
    discovery: list[Problem]  # disjoint split for head ranking
    cache: ResultCache
    requested_batch_size: int | None = None  # else `default_batch_size` of the loaded model
    seed: int = 0
    heads: list[Head] | None = None  # user-named critical heads (else the ranking)
    progress: bool = False
    on_measured: Callable[[str, str, float, bool], None] | None = None  # (model, what, seconds, computed)
    _computed: list[str] = field(default_factory=list)
    log: list[tuple[Spec, Condition]] = field(default_factory=list)  # every condition measured, in order
    drops: dict = field(default_factory=dict)  # memo of paired statistics (see `effect`)
    peers: dict[str, ModelRun] = field(default_factory=dict)  # the session's other models (phase 2)
    _maps: dict = field(default_factory=dict)  # (donor, layers) -> transplant maps
    _prefixes: PrefixStore = field(default_factory=PrefixStore)  # question passes, shared by interventions
    _thoughts: dict = field(default_factory=dict)  # split -> clean thoughts
    _head_outputs: dict = field(default_factory=dict)  # (heads, positions, split) -> clean head outputs
    _donors: dict = field(default_factory=dict)  # fingerprint -> donor run (transplants)

    def __post_init__(self) -> None:
        if isinstance(self.model, CODIModel):
            self.model = LazyModel.of(self.model)

    @property
    def codi(self) -> CODIModel:
        return self.model.codi

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def n_latent(self) -> int:
        return self.model.facts.n_latent

    @property
    def geometry(self) -> HeadGeometry:
        return self.model.facts.geometry

    @property
    def fingerprint(self) -> str:
        return self.model.facts.fingerprint

    @cached_property
    def batch_size(self) -> int:
        return self.requested_batch_size or default_batch_size(self.codi)

    @property
    def decoding(self) -> dict:
        """What besides weights and data decides a result: decoding settings, and the device
        type (CPU and GPU kernels round differently, which can flip a close answer)."""
        decoding = {
            "greedy": True,
            "max_new_tokens": MAX_NEW_TOKENS,
            "n_latent": self.n_latent,
            "device": self.model.device_type,
        }
        if self.model.reference_batching:  # results then depend on the batch (keys of default runs unchanged)
            decoding["reference_batching"] = True
        return decoding

    def key(self, **spec) -> str:
        return content_key(
            model=self.fingerprint,
            data=data_hash(self.problems),
            decoding=self.decoding,
            spec=spec,
        )

    def spec_key(self, spec: Spec, **part) -> str:
        """The cache key of one condition: its fields, and the seed when it is randomised (noise
        and resample draws come from the seed: another `--seed` is another computation)."""
        seeded = {"seed": self.seed} if spec.randomised else {}
        return self.key(**spec.key(), **seeded, **part)

    def measure(self, spec: Spec) -> Condition:
        """Per-problem results of one condition, cached on disk under the spec's own fields."""

        def compute() -> np.ndarray:
            result = evaluate(
                self.codi,
                self.problems,
                self.batch_size,
                max_new_tokens=MAX_NEW_TOKENS,
                progress=self.progress,
                intervene=None if isinstance(spec, Baseline) else installer(spec, self),
                prefixes=self._prefixes if spec.latent_only(self.n_latent) else None,
            )
            return np.array([[r.correct, r.answer_logprob, r.confidence] for r in result.records]).T  # [3, N]

        self.check_sites(spec)
        condition = Condition(*self._get(self.spec_key(spec), spec.describe(), compute))
        self.log.append((spec, condition))
        return condition

    def check_sites(self, spec: Spec) -> None:
        """Every head and position a condition names exists in this model (a `SiteError` or
        `PositionError` naming the model), before anything is computed or read."""
        heads = [h for part in spec.parts() for h in getattr(part, "heads", ())]
        heads += [part.head for part in spec.parts() if isinstance(part, TransplantHead)]
        for head in dict.fromkeys(heads):
            check_heads([head], self.geometry, self.name)
        names = [n for part in spec.parts() for n in getattr(part, "positions", ())]
        names += [n for part in spec.parts() for n in (getattr(part, "hub", None), getattr(part, "target", None)) if n]
        for name in dict.fromkeys(names):
            try:
                check_position(name, self.n_latent)
            except PositionError as e:
                raise PositionError(f"{self.name}: {e}") from None

    def _get(self, key: str, what: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached result under `key`, else `compute()` stored; each one announced to
        `on_measured` as it finishes (what, seconds, computed or read from the cache)."""
        start, computed = time.perf_counter(), []

        def run() -> np.ndarray:
            computed.append(what)
            self._computed.append(what)
            return compute()

        value = self.cache.get_or_compute(key, run)
        if self.on_measured is not None:
            self.on_measured(self.name, what, time.perf_counter() - start, bool(computed))
        return value

    def answer_logprobs(self, spec: Spec) -> np.ndarray:
        """Per-problem gold-answer log-probability of one condition without decoding (the
        `answer_logprob` of `measure`, for rankings that need nothing else): [N], cached."""

        def compute() -> np.ndarray:
            intervene = None if isinstance(spec, Baseline) else installer(spec, self)
            prefixes = self._prefixes if spec.latent_only(self.n_latent) else None
            return teacher_forced(self.codi, self.problems, self.batch_size, intervene, prefixes)

        return self._get(self.spec_key(spec, part="answer_logprob"), f"{spec.describe()} (answer log-prob)", compute)

    def measure_draws(self, spec: Spec, n_draws: int) -> list[Condition]:
        """A randomised condition's `n_draws` independent draws (one condition otherwise)."""
        return [self.measure(with_draw(spec, d)) for d in range(n_draws if spec.randomised else 1)]

    def paired(self, spec: Spec, n_draws: int = 5) -> Paired:
        """`spec` measured (`n_draws` draws if it is randomised) beside the baseline. The draws
        are 0..n_draws-1: a spec naming a draw of its own is refused (it would be replaced)."""
        if n_draws < 1:
            raise InterventionError(f"n_draws must be at least 1, got {n_draws}")
        if with_draw(spec, 0) != spec:
            raise InterventionError(f"paired() measures draws 0..{n_draws - 1} itself: give the spec without draw=")
        return Paired(self, spec, self.baseline, self.measure_draws(spec, n_draws))

    def effect(
        self, treated: Spec | Sequence[Condition], measure: str = "accuracy", reference: Condition | None = None
    ) -> PairedEffect:
        """The paired drop from `reference` (default: the baseline) to `treated` (a spec: one
        draw; or the conditions of several draws), memoised: several claims share comparisons
        and the bootstrap is the slow part of a warm run."""
        conditions = [self.measure(treated)] if isinstance(treated, Spec) else list(treated)
        reference = self.baseline if reference is None else reference
        ref = reference.values(measure)
        values = np.stack([c.values(measure) for c in conditions])  # [D, N]
        key = (measure, ref.tobytes(), values.tobytes())
        if key not in self.drops:
            self.drops[key] = paired_effect(ref, values, measure, seed=self.seed)
        return self.drops[key]

    # --- baselines and discovery ---------------------------------------------------------

    @cached_property
    def baseline(self) -> Condition:
        return self.measure(Baseline())

    def describe(self) -> dict:
        """This model's part of the run configuration (the report's `run.models`). What this run
        neither computed nor finds in the cache is None: describing a run never runs the model."""
        baseline_known = "baseline" in vars(self) or self.key(**Baseline().key()) in self.cache
        ranked = self.heads is None and self.ranking_known
        return {
            "fingerprint": self.fingerprint,
            "n": len(self.problems),
            "data_hash": data_hash(self.problems),
            "baseline_accuracy": round(100 * self.baseline.accuracy, 1) if baseline_known else None,
            "heads": [str(h) for h in (self.heads or (top_heads(self.ranking, 3) if ranked else []))] or None,
            "heads_from": "--heads" if self.heads else "ranking (top 3)" if ranked else None,
            "forced_heads": [str(h) for h in self.heads] if self.heads else None,
            "hub": self.hub if self.ranking_known else None,
        }

    @property
    def baseline_confidence(self) -> np.ndarray:
        """Probability of the first answer token per problem (difficulty tiers)."""
        return self.baseline.confidence

    @cached_property
    def _attention(self) -> LatentAttention:
        def compute() -> np.ndarray:
            return record_latent_attention(self.codi, self.discovery, self.batch_size, progress=self.progress).packed()

        packed = self._get(self._attention_key, "latent attention (discovery split)", compute)
        return LatentAttention.unpack(packed, len(self.discovery))

    @property
    def _attention_key(self) -> str:
        return content_key(
            model=self.fingerprint,
            data=data_hash(self.discovery),
            decoding=self.decoding,
            spec={"kind": "latent_attention"},
        )

    @property
    def ranking_known(self) -> bool:
        """Whether the ranking (and hub) is computed or in the cache: reading it then costs no model pass."""
        return "_attention" in vars(self) or self._attention_key in self.cache

    @cached_property
    def ranking(self) -> pd.DataFrame:
        return head_metrics(self._attention)

    @cached_property
    def hub_thought(self) -> int:
        return model_hub_thought(self._attention)

    @property
    def hub(self) -> str:
        return f"CT{self.hub_thought}"

    def split_key(self, split: str, **spec) -> str:
        """The cache key of a result over the `test` or `discovery` problems."""
        return content_key(model=self.fingerprint, data=data_hash(self.split(split)), decoding=self.decoding, spec=spec)

    def lens(self, split: str = "test") -> np.ndarray:
        """Logit lens of bot and every thought (hidden state and thought): top-5 tokens,
        [N, 2, K + 1, 5], cached."""

        def compute() -> np.ndarray:
            return lens_tokens(self.codi, self.split(split), self.batch_size, progress=self.progress)

        return self._get(self.split_key(split, kind="logit_lens"), f"logit lens ({split} split)", compute)

    def step_targets(self, split: str = "test", n_steps: int = MAX_LENS_STEPS) -> np.ndarray:
        """Each problem's intermediate results as the model's tokens: [N, n_steps], -1 where a
        problem has fewer steps (cached: a warm run loads no tokenizer)."""
        problems = self.split(split)
        key = self.split_key(split, kind="step_targets", n_steps=n_steps)
        return self.cache.get_or_compute(key, lambda: step_tokens(self.codi, problems, n_steps))

    @cached_property
    def pairs(self) -> tuple[list[int], list[Problem]]:
        """Interchange pairs: (indices of the base test problems, their counterfactual sources)."""
        return interchange_pairs(self.problems, self.seed)

    def interchange(self, thoughts: tuple[int, ...]) -> np.ndarray:
        """Each pair's base run with thoughts `thoughts` from its source: [3, n_pairs] (answer
        is the counterfactual, answer is the base's, log-prob of the counterfactual), cached."""
        bases, sources = [self.problems[i] for i in self.pairs[0]], self.pairs[1]

        def compute() -> np.ndarray:
            result, stays = interchange(self.codi, bases, sources, thoughts, self.batch_size, self.progress)
            return np.array([[r.correct for r in result.records], stays, [r.answer_logprob for r in result.records]])

        key = self.key(kind="interchange", thoughts=sorted(thoughts), sources=data_hash(sources))
        return self._get(key, f"interchange of thoughts {', '.join(f'CT{t}' for t in sorted(thoughts))}", compute)

    def pair_sources_correct(self) -> np.ndarray:
        """Whether the model answers each pair's source right, unpatched: [n_pairs], cached."""
        sources = self.pairs[1]

        def compute() -> np.ndarray:
            result = evaluate(
                self.codi, sources, self.batch_size, max_new_tokens=MAX_NEW_TOKENS, progress=self.progress
            )
            return np.array([r.correct for r in result.records])

        key = self.key(kind="interchange_sources", sources=data_hash(sources))
        return self._get(key, "interchange sources (unpatched)", compute)

    @cached_property
    def probes(self) -> ProbeResults:
        """3.1: layer-wise probes at the hub thought over the test problems, cached."""

        def compute() -> np.ndarray:
            states = thought_states(self.codi, self.problems, self.hub_thought, self.batch_size, self.progress)
            return run_probes(states, self.problems, self.seed, self.progress).packed()

        packed = self._get(self.key(kind="probes", thought=self.hub, seed=self.seed), f"probes at {self.hub}", compute)
        return ProbeResults.unpack(packed, self.problems)

    def step_probes(self, n_steps: int = MAX_PROBE_STEPS) -> np.ndarray:
        """Probes of each step's result at every thought and layer, with the control task:
        [n_steps, 2, K, L + 1, N] per-problem correctness (-1: no such step), cached."""

        def compute() -> np.ndarray:
            states = all_thought_states(self.codi, self.problems, self.batch_size, self.progress)
            return step_probes(states, self.problems, n_steps, self.seed, self.progress)

        key = self.key(kind="step_probes", n_steps=n_steps, seed=self.seed)
        return self._get(key, "step-result probes (every thought and layer)", compute)

    def attributions(self, heads: list[Head], n_problems: int = IG_PROBLEMS, n_steps: int = IG_STEPS) -> Attributions:
        """3.2: integrated gradients of each head's output at the hub thought, cached."""
        problems = self.problems[:n_problems]
        thought = self.hub_thought

        def compute() -> np.ndarray:
            ig = integrated_gradients(self.codi, problems, heads, thought, n_steps, progress=self.progress)
            return ig.packed()

        spec = {"kind": "integrated_gradients", "heads": list(map(str, heads)), "thought": thought, "n": n_problems}
        what = f"integrated gradients {' '.join(spec['heads'])}"
        packed = self._get(self.key(**spec, n_steps=n_steps), what, compute)
        tokens = self.cache.get_or_compute(  # as the tokenizer spells them, kept: a warm run loads no model
            self.key(kind="question_tokens", n=n_problems),
            lambda: np.asarray(json.dumps(question_tokens(self.codi, problems))),
        )
        return Attributions.unpack(packed, json.loads(str(tokens)))

    def transplant_maps(self, donor: ModelRun, recipient_layer: int, donor_layer: int) -> tuple[LinearMap, LinearMap]:
        """2.1: (map_in, map_out) between this model and `donor` at those layers, fitted by
        least squares on paired states of the discovery problems (memoised)."""
        key = (donor.name, recipient_layer, donor_layer)
        if key not in self._maps:
            states = paired_states(self.codi, donor.codi, self.discovery, recipient_layer, donor_layer, self.batch_size)
            self._maps[key] = states.maps()
        return self._maps[key]

    def transplant_spec(self, donor: ModelRun, donor_head: Head, head: Head) -> TransplantHead:
        """2.1: `donor_head` of `donor` transplanted into this model's `head` (every position)."""
        spec = TransplantHead(donor.fingerprint, donor_head, head, DEFAULT_RIDGE, data_hash(self.discovery))
        self._donors[donor.fingerprint] = donor
        return spec

    def transplant_fit(self, spec: TransplantHead) -> np.ndarray:
        """The maps' fit [R^2 in, held-out R^2 in, R^2 out, held-out R^2 out], cached."""
        donor = self._donors[spec.donor]

        def fit() -> np.ndarray:
            maps = self.transplant_maps(donor, spec.head.layer, spec.donor_head.layer)
            return np.array([v for m in maps for v in (m.r2, np.nan if m.r2_heldout is None else m.r2_heldout)])

        return self._get(self.key(**spec.key(), part="fit"), f"transplant maps {spec.describe()}", fit)

    def transplant_hook(self, spec: TransplantHead) -> HeadTransplant:
        donor = self._donors[spec.donor]
        map_in, map_out = self.transplant_maps(donor, spec.head.layer, spec.donor_head.layer)
        return HeadTransplant(self.codi, spec.head, donor.codi, spec.donor_head, map_in, map_out)

    def critical_heads(self, n: int) -> list[Head]:
        return self.heads_for((), n)[0]

    def heads_for(self, named: Sequence[str], n_heads: int, ranking: str = "attention") -> tuple[list[Head], str]:
        """The heads a claim acts on and where they come from: the claim's own `heads`, else
        the session's `--heads`, else the top `n_heads` of the discovery split's attention
        ranking or (`ranking="causal"`) of its causal sweep."""
        if named:
            return [Head.parse(h) for h in named], "claim"
        if self.heads:
            return self.heads[:n_heads], "--heads"
        if ranking == "causal":
            return top_heads(self.causal_ranking, n_heads), "causal ranking"
        return top_heads(self.ranking, n_heads), "ranking"

    # --- the causal head sweep --------------------------------------------------------------

    @property
    def every_head(self) -> list[Head]:
        geo = self.geometry
        return [Head(layer, head) for layer in range(geo.n_layers) for head in range(geo.n_heads)]

    def sweep(self, mode: str = "zero") -> list[Condition]:
        """Every head alone ablated at every thought: the `AblateHeads((head,), ("latent",),
        mode)` conditions a single-head claim measures (the same cache entries), in
        `every_head` order."""
        heads = bar(self.every_head, desc=f"head sweep {self.name} ({mode})", disable=not self.progress)
        return [self.measure(AblateHeads((head,), ("latent",), mode)) for head in heads]

    def head_means(self) -> torch.Tensor:
        """Every head's mean output at each thought over the discovery split (mean ablation's
        values): [L, H, K, hd]."""
        outputs = self.head_outputs(tuple(self.every_head), ("latent",), "discovery")
        geo = self.geometry
        means = torch.stack([outputs[h].mean(0) for h in self.every_head])  # [L * H, K, hd]
        return means.view(geo.n_layers, geo.n_heads, *means.shape[1:])

    def attribution_patching(self) -> np.ndarray:
        """Attribution patching's estimate of every head's ablation drop in answer
        log-probability, per problem: [2 (zero, mean), N, L, H] nats, cached."""

        def compute() -> np.ndarray:
            means = self.head_means()
            return attribution_patching(self.codi, self.problems, means, self.batch_size, self.progress)

        key = self.key(kind="attribution_patching", means=data_hash(self.discovery))
        return self._get(key, "attribution patching (every head)", compute)

    def on_discovery(self) -> ModelRun:
        """This model's run on the discovery split (mean values from that split too): what a
        ranking is chosen on, disjoint from the test problems claims are measured on."""
        announce = self._on_discovery_measured
        return ModelRun(self.model, self.discovery, self.discovery, self.cache, self.requested_batch_size, self.seed,
                        progress=self.progress, on_measured=announce, _prefixes=PrefixStore())  # fmt: skip

    def _on_discovery_measured(self, model: str, what: str, seconds: float, computed: bool) -> None:
        if self.on_measured is not None:  # the discovery run's measurements, announced as this run's
            self.on_measured(model, f"{what} [discovery split]", seconds, computed)

    @cached_property
    def causal_ranking(self) -> pd.DataFrame:
        """Heads by their zero-ablation drop in answer log-probability at every thought on the
        discovery split (the sweep's causal ranking, teacher-forced only), best first, with
        `rank`, `layer`, `head`, `name`, `drop_logprob`."""
        run = self.on_discovery()
        base = run.answer_logprobs(Baseline())
        heads = bar(run.every_head, desc=f"causal ranking {self.name}", disable=not self.progress)
        rows = [
            {"layer": h.layer, "head": h.head, "name": str(h),
             "drop_logprob": float(np.mean(base - run.answer_logprobs(AblateHeads((h,), ("latent",), "zero"))))}
            for h in heads
        ]  # fmt: skip
        df = pd.DataFrame(rows).sort_values(["drop_logprob", "layer", "head"], ascending=[False, True, True])
        df.insert(0, "rank", range(1, len(df) + 1))
        return df.reset_index(drop=True)

    def random_head_sets(self, like: list[Head], n_sets: int = 20) -> list[list[Head]]:
        """`n_sets` distinct random head sets matched by layer to `like`, never containing its
        heads; fewer when fewer exist (one head of an 8-head layer has 7), so a control of
        "20 sets" is never one set counted twice."""
        n_heads = self.geometry.n_heads
        per_layer = Counter(h.layer for h in like)
        for layer, m in per_layer.items():
            if n_heads - m < m:
                raise InterventionError(f"no random heads matched by layer: layer {layer} has no {m} other heads")
        possible = math.prod(math.comb(n_heads - m, m) for m in per_layer.values())
        rng, sets, seen = random.Random(self.seed), [], set()
        while len(sets) < min(n_sets, possible):
            chosen: list[Head] = []
            for h in like:
                options = [Head(h.layer, k) for k in range(n_heads) if Head(h.layer, k) not in like + chosen]
                chosen.append(rng.choice(options))
            if frozenset(chosen) not in seen:
                seen.add(frozenset(chosen))
                sets.append(chosen)
        return sets

    # --- what specs read (`specs.RunContext`) ---------------------------------------------

    def split(self, name: str) -> list[Problem]:
        return {"test": self.problems, "discovery": self.discovery}[name]

    @torch.no_grad()
    def clean_thoughts(self, split: str) -> torch.Tensor:
        """Unpatched thoughts of every problem of `split`: [N, K, d] (memoised)."""
        if split not in self._thoughts:
            problems, out = self.split(split), []
            for start in range(0, len(problems), self.batch_size):
                chunk = problems[start : start + self.batch_size]
                out.append(run_latents(self.codi, encode_questions(self.codi, [p.question for p in chunk])).thoughts)
            self._thoughts[split] = torch.cat(out)
        return self._thoughts[split]

    @torch.no_grad()
    def head_outputs(self, heads: tuple[Head, ...], positions: tuple[str, ...], split: str) -> dict[Head, torch.Tensor]:
        """Each head's clean output at named fixed positions over `split`: {head: [N, P, hd]}
        (memoised; eot needs the first decoding step, so it runs when eot is named)."""
        key = (heads, positions, split)
        if key not in self._head_outputs:
            problems, parts = self.split(split), {h: [] for h in heads}
            for start in range(0, len(problems), self.batch_size):
                chunk = problems[start : start + self.batch_size]
                batch = encode_questions(self.codi, [p.question for p in chunk])
                targets = batch.positions(self.n_latent).resolve(positions)
                with HeadCapture(self.codi, heads, targets) as capture:
                    state = run_latents(self.codi, batch)
                    if "eot" in positions:
                        generate(self.codi, state, max_new_tokens=1)
                for h in heads:
                    parts[h].append(capture.values[h])
            self._head_outputs[key] = {h: torch.cat(v) for h, v in parts.items()}
        return self._head_outputs[key]
