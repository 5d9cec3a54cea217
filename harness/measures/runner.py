"""A model's run on one data set: a generic cached runner of intervention specs.

`ModelRun.measure(spec)` gives a `Condition`: per-problem correctness, teacher-forced answer
log-probability and answer confidence over the same test problems (so every effect is
paired), cached on disk under a content key of the model, data, decoding config and the
spec's own fields. `ModelRun.effect` compares conditions and memoises the statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from harness.data.counterfactuals import counterfactuals
from harness.data.problems import Problem, data_hash
from harness.interventions.hooks import HeadCapture, InterventionError
from harness.interventions.specs import Baseline, Spec, TransplantHead, installer, what_runs, with_draw
from harness.measures.discovery import (
    LatentAttention,
    head_metrics,
    model_hub_thought,
    record_latent_attention,
    top_heads,
)
from harness.measures.evaluation import PrefixStore, evaluate, teacher_forced
from harness.runtime.arch import Head, check_heads
from harness.runtime.cache import ResultCache, content_key
from harness.runtime.codi import CODIModel
from harness.runtime.loop import encode_questions, generate, run_latents
from harness.runtime.models import LazyModel, default_batch_size
from harness.runtime.positions import PositionError, check_position
from harness.statistics.effects import PairedEffect, paired_effect
from harness.statistics.verdicts import ClaimResult, claim_result

MAX_NEW_TOKENS = 256
T = TypeVar("T")


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


@dataclass
class ModelRun:
    """One model's experiments on one data set: it measures specs over the test problems and
    caches any named computation by content key (`cached`), but knows no experiment kind; each
    kind owns its computations and asks the run to cache them. `model` may be a loaded
    `CODIModel` or a `LazyModel`, loaded only when a result is not in the cache."""

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
    _prefixes: PrefixStore = field(default_factory=PrefixStore)  # question passes, shared by interventions
    _memo: dict = field(default_factory=dict)  # in-memory results by name (`remember`)
    sources: list[Problem] | None = None  # each test problem's counterfactual (`counterfactual_run`)
    max_new_tokens: int = MAX_NEW_TOKENS  # answer tokens decoded at most (part of every cache key)

    def __post_init__(self) -> None:
        if isinstance(self.model, CODIModel):
            self.model = LazyModel.of(self.model)

    codi = property(lambda self: self.model.codi)
    name = property(lambda self: self.model.name)
    n_latent = property(lambda self: self.model.facts.n_latent)
    geometry = property(lambda self: self.model.facts.geometry)
    fingerprint = property(lambda self: self.model.facts.fingerprint)

    @cached_property
    def batch_size(self) -> int:
        return self.requested_batch_size or default_batch_size(self.codi)

    @property
    def decoding(self) -> dict:
        """What besides weights and data decides a result: decoding settings, and the device
        type (CPU and GPU kernels round differently, which can flip a close answer)."""
        decoding = {
            "greedy": True,
            "max_new_tokens": self.max_new_tokens,
            "n_latent": self.n_latent,
            "device": self.model.device_type,
        }
        if self.model.reference_batching:  # results then depend on the batch (keys of default runs unchanged)
            decoding["reference_batching"] = True
        return decoding

    # --- keys and the generic cached computation ------------------------------------------

    def key(self, **spec) -> str:
        """The cache key of a computation over the test problems."""
        return self.split_key("test", **spec)

    def split_key(self, split: str, **spec) -> str:
        """The cache key of a computation over the `test` or `discovery` problems."""
        return content_key(model=self.fingerprint, data=data_hash(self.split(split)), decoding=self.decoding, spec=spec)

    def spec_key(self, spec: Spec, **part) -> str:
        """The cache key of one condition: its fields; the seed when it is randomised (noise and
        resample draws come from the seed: another `--seed` is another computation); the
        discovery split when its values come from there (mean modes)."""
        seeded = {"seed": self.seed} if spec.randomised else {}
        means = {"discovery": data_hash(self.discovery)} if spec.reads_discovery else {}
        return self.key(**spec.key(), **seeded, **means, **part)

    def cached(self, key: str, what: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array under `key`, else `compute()` stored; each one announced to
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

    def remember(self, name: Hashable, compute: Callable[[], T]) -> T:
        """`compute()` once per run under `name` (in memory: objects a cache cannot hold)."""
        if name not in self._memo:
            self._memo[name] = compute()
        return self._memo[name]

    # --- conditions -------------------------------------------------------------------------

    def measure(self, spec: Spec) -> Condition:
        """Per-problem results of one condition, cached on disk under the spec's own fields."""

        def compute() -> np.ndarray:
            result = evaluate(
                self.codi,
                self.problems,
                self.batch_size,
                max_new_tokens=self.max_new_tokens,
                progress=self.progress,
                intervene=None if isinstance(spec, Baseline) else installer(spec, self),
                prefixes=self._prefixes if spec.latent_only(self.n_latent) else None,
            )
            return np.array([[r.correct, r.answer_logprob, r.confidence] for r in result.records]).T  # [3, N]

        self.check_sites(spec)
        condition = Condition(*self.cached(self.spec_key(spec), spec.describe(), compute))
        self.log.append((spec, condition))
        return condition

    def check_sites(self, spec: Spec) -> None:
        """Every head and position a condition names exists in this model (a `SiteError` or
        `PositionError` naming the model), before anything is computed or read."""
        heads = [h for part in spec.parts() for h in getattr(part, "heads", ())]
        heads += [part.head for part in spec.parts() if isinstance(part, TransplantHead)]
        for head in dict.fromkeys(heads):
            check_heads([head], self.geometry, self.name)
        names = [n for part in spec.parts() for n in (*getattr(part, "positions", ()), *getattr(part, "readers", ()))]
        singles = ("hub", "target", "source", "thought")
        names += [n for part in spec.parts() for n in (getattr(part, s, None) for s in singles) if n]
        for name in dict.fromkeys(names):
            try:
                check_position(name, self.n_latent)
            except PositionError as e:
                raise PositionError(f"{self.name}: {e}") from None

    def answer_logprobs(self, spec: Spec) -> np.ndarray:
        """Per-problem gold-answer log-probability of one condition without decoding (the
        `answer_logprob` of `measure`, for rankings that need nothing else): [N], cached."""

        def compute() -> np.ndarray:
            intervene = None if isinstance(spec, Baseline) else installer(spec, self)
            prefixes = self._prefixes if spec.latent_only(self.n_latent) else None
            return teacher_forced(self.codi, self.problems, self.batch_size, intervene, prefixes)

        return self.cached(self.spec_key(spec, part="answer_logprob"), f"{spec.describe()} (answer log-prob)", compute)

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

    @cached_property
    def baseline(self) -> Condition:
        return self.measure(Baseline())

    @property
    def baseline_confidence(self) -> np.ndarray:
        """Probability of the first answer token per problem (difficulty tiers)."""
        return self.baseline.confidence

    def describe(self) -> dict:
        """This model's part of the run configuration (the report's `run.models`). What this run
        neither computed nor finds in the cache is None: describing a run never runs the model."""
        baseline_known = "baseline" in vars(self) or self.key(**Baseline().key()) in self.cache
        ranked = self.heads is None and self.ranking_known
        return {
            "fingerprint": self.fingerprint,
            "n": len(self.problems),
            "max_new_tokens": self.max_new_tokens,
            "data_hash": data_hash(self.problems),
            "baseline_accuracy": round(100 * self.baseline.accuracy, 1) if baseline_known else None,
            "heads": [str(h) for h in (self.heads or (top_heads(self.ranking, 3) if ranked else []))] or None,
            "heads_from": "--heads" if self.heads else "ranking (top 3)" if ranked else None,
            "forced_heads": [str(h) for h in self.heads] if self.heads else None,
            "hub": self.hub if self.ranking_known else None,
        }

    # --- the attention ranking and where a claim's heads come from -----------------------

    @cached_property
    def _attention(self) -> LatentAttention:
        def compute() -> np.ndarray:
            return record_latent_attention(self.codi, self.discovery, self.batch_size, progress=self.progress).packed()

        packed = self.cached(self._attention_key, "latent attention (discovery split)", compute)
        return LatentAttention.unpack(packed, len(self.discovery))

    @property
    def _attention_key(self) -> str:
        return self.split_key("discovery", kind="latent_attention")

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

    @property
    def every_head(self) -> list[Head]:
        geo = self.geometry
        return [Head(layer, head) for layer in range(geo.n_layers) for head in range(geo.n_heads)]

    def on_discovery(self) -> ModelRun:
        """This model's run on the discovery split (mean values from that split too): what a
        ranking is chosen on, disjoint from the test problems claims are measured on."""
        announce = self._on_discovery_measured
        return ModelRun(self.model, self.discovery, self.discovery, self.cache, self.requested_batch_size, self.seed,
                        progress=self.progress, on_measured=announce, _prefixes=PrefixStore(),
                        max_new_tokens=self.max_new_tokens)  # fmt: skip

    def _on_discovery_measured(self, model: str, what: str, seconds: float, computed: bool) -> None:
        if self.on_measured is not None:  # the discovery run's measurements, announced as this run's
            self.on_measured(model, f"{what} [discovery split]", seconds, computed)

    # --- what specs read (`specs.RunContext`) ---------------------------------------------

    def split(self, name: str) -> list[Problem]:
        return {"test": self.problems, "discovery": self.discovery}[name]

    def clean_thoughts(self, split: str) -> torch.Tensor:
        """Unpatched thoughts of every problem of `split`: [N, K, d] (memoised)."""

        @torch.no_grad()
        def compute() -> torch.Tensor:
            problems, out = self.split(split), []
            for start in range(0, len(problems), self.batch_size):
                chunk = problems[start : start + self.batch_size]
                out.append(run_latents(self.codi, encode_questions(self.codi, [p.question for p in chunk])).thoughts)
            return torch.cat(out)

        return self.remember(("clean_thoughts", split), compute)

    def counterfactual_thoughts(self) -> torch.Tensor:
        """Each test problem's counterfactual source's unpatched thoughts: [N, K, d] (memoised;
        only a `counterfactual_run` has sources)."""
        if self.sources is None:
            raise InterventionError(
                "mode 'interchange' reads counterfactual sources: measure it on run.counterfactual_run()"
            )

        @torch.no_grad()
        def compute() -> torch.Tensor:
            out = []
            for start in range(0, len(self.sources), self.batch_size):
                chunk = self.sources[start : start + self.batch_size]
                out.append(run_latents(self.codi, encode_questions(self.codi, [p.question for p in chunk])).thoughts)
            return torch.cat(out)

        return self.remember("counterfactual_thoughts", compute)

    def counterfactual_run(self) -> ModelRun:
        """The run over the test problems that have a counterfactual pair (`harness.data.
        counterfactuals`), each scored against its source's answer, the sources' thoughts at
        hand for mode `interchange`: `correct` is "the answer moved to the counterfactual's".
        A problem's id carries a digest of its source's question, so cache keys cover the
        pairs."""

        def build() -> ModelRun:
            made = counterfactuals(self.problems, self.seed)
            scored = [
                dataclasses.replace(pair.base, id=f"{pair.base.id}|cf-{_digest(pair.source.question)}",
                                    answer=pair.source.answer)
                for pair in made.pairs
            ]  # fmt: skip
            sources = [pair.source for pair in made.pairs]
            return ModelRun(self.model, scored, self.discovery, self.cache, self.requested_batch_size, self.seed,
                            self.heads, self.progress, self.on_measured, sources=sources,
                            max_new_tokens=self.max_new_tokens)  # fmt: skip

        return self.remember("counterfactual_run", build)

    def head_outputs(self, heads: tuple[Head, ...], positions: tuple[str, ...], split: str) -> dict[Head, torch.Tensor]:
        """Each head's clean output at named fixed positions over `split`: {head: [N, P, hd]}
        (memoised; eot needs the first decoding step, so it runs when eot is named)."""

        @torch.no_grad()
        def compute() -> dict[Head, torch.Tensor]:
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
            return {h: torch.cat(v) for h, v in parts.items()}

        return self.remember(("head_outputs", heads, positions, split), compute)

    def peer(self, fingerprint: str) -> ModelRun:
        """The session's other model with these weights (a transplant's donor)."""
        found = [p for p in self.peers.values() if p.fingerprint == fingerprint]
        if not found:
            raise InterventionError(f"{self.name}: no model of this run has fingerprint {fingerprint}")
        return found[0]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]
