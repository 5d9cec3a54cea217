"""Intervention specs: typed, frozen descriptions of one experimental condition.

A spec's fields *are* its cache key (`Spec.key`): the hook that runs is built from the same
fields, so two different head sets can never share a cache entry and a reordered head set is
the same condition. Specs compose with `+` (ablate heads *and* patch a thought in one
condition). What a spec needs from its model's run (the clean thoughts, captured head
outputs, the peer models) it asks through `RunContext`, so this module knows nothing of
`ModelRun`.

    AblateHeads(heads=("L2H3", "L3H1"), positions=("CT2",), mode="mean")
    PatchThoughts(positions=("CT1",), mode="noise", draw=2)
    AttentionPattern(heads=("L0H3",), pattern="uniform", hub="CT1")
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from harness.interventions.attention import PATTERNS, AttentionOverride, rewritten_thoughts
from harness.interventions.context import RunContext
from harness.interventions.hooks import HeadAblation, InterventionError
from harness.interventions.transplant import transplant_hook
from harness.runtime.arch import Head
from harness.runtime.loop import LatentPatch, ThoughtPatch, norm_matched_noise
from harness.runtime.positions import PositionMap, is_fixed, thought_number

HEAD_MODES = ("zero", "mean", "resample")
THOUGHT_MODES = ("noise", "zero", "mean", "resample")
PATCH_MODES = (*THOUGHT_MODES, "interchange")  # interchange: the counterfactual source's thought
NOISE_SEED_STRIDE = 1_000_003  # seeds of draw d: seed * 1000 + thought + d * stride (draw 0: as before)


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point: [n] (another problem for
    every problem), by rejection (about e tries)."""
    assert n >= 2, "a derangement needs at least two problems"
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == torch.arange(n)).any()):
            return perm


def check_head_mode(mode: str, positions: Sequence[str]) -> None:
    """Mean and resample replace a head's output by values per position: they need positions
    with one index per row (not the question or answer spans)."""
    spans = [p for p in positions if not is_fixed(p)]
    if mode != "zero" and spans:
        raise InterventionError(
            f"mode {mode!r} needs positions with one index per row (bot, CT<i>, eot, latent), not "
            f"{', '.join(spans)} (question and answer spans take mode 'zero')"
        )


def check_thought_positions(positions: Sequence[str]) -> None:
    """Thought patches act on continuous thoughts: `CT<i>` or `latent`."""
    bad = [p for p in positions if p != "latent" and thought_number(p) is None]
    if bad:
        raise InterventionError(f"thought patches act on thoughts (CT<i> or latent), not {', '.join(bad)}")


@dataclass(frozen=True)
class Spec:
    """Base of every condition. Subclasses are frozen dataclasses of canonical fields."""

    randomised = False  # a `draw` field picks one of several independent draws

    @property
    def reads_discovery(self) -> bool:
        """Whether its values come from the discovery split (mean modes): the split is then
        part of its cache key."""
        return any(getattr(part, "mode", None) == "mean" for part in self.parts())

    def key(self) -> dict:
        """The cache key: the spec's type and every field (heads as names)."""
        return {
            "spec": type(self).__name__,
            **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)},
        }

    def parts(self) -> tuple[Spec, ...]:
        return (self,)

    def patched_thoughts(self) -> tuple[str, ...]:
        """The thoughts whose values this part replaces (two parts may not replace the same)."""
        return ()

    def label(self) -> str:
        """What it does, in the claims table's mode column."""
        return type(self).__name__

    def latent_only(self, n_latent: int) -> bool:
        """Acts from CT0 on: every batch's question pass (question + bot) can be shared."""
        return True

    def latent_patch(self, run: RunContext, indices: list[int]) -> LatentPatch | None:
        """A replacement of thoughts for the batch of problems `indices`, if the spec has one."""
        return None

    def hooks(self, run: RunContext, pmap: PositionMap, indices: list[int]) -> list[AbstractContextManager]:
        """Hooks to install while the batch runs."""
        return []

    def __add__(self, other: Spec) -> Compose:
        return Compose(self.parts() + other.parts())

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.key().items() if k != "spec")
        return f"{type(self).__name__}({fields})"


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Head):
        return str(value)
    if isinstance(value, Spec):
        return value.key()
    return value


def _heads(heads: Sequence[Head | str]) -> tuple[Head, ...]:
    parsed = [h if isinstance(h, Head) else Head.parse(h) for h in heads]
    if not parsed:
        raise InterventionError("an intervention on heads needs at least one head")
    if len(set(parsed)) != len(parsed):
        raise InterventionError(f"a head is given twice in {', '.join(map(str, parsed))}")
    return tuple(sorted(parsed))


def _names(positions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(positions, str):
        positions = (positions,)
    if not positions:
        raise InterventionError("an intervention needs at least one position")
    return tuple(sorted(set(positions)))


@dataclass(frozen=True)
class Baseline(Spec):
    """No intervention."""


@dataclass(frozen=True)
class AblateHeads(Spec):
    """Heads' outputs (their slice of the attention output projection's input) replaced at the
    named positions: zero; mean (per head and position over the discovery split); resample
    (the same head and position from another test problem: a derangement, one per draw)."""

    heads: tuple[Head, ...]
    positions: tuple[str, ...] = ("latent",)
    mode: str = "zero"
    draw: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _heads(self.heads))
        object.__setattr__(self, "positions", _names(self.positions))
        if self.mode not in HEAD_MODES:
            raise InterventionError(f"unknown head-ablation mode {self.mode!r}; choose from {', '.join(HEAD_MODES)}")
        check_head_mode(self.mode, self.positions)
        if self.draw and self.mode != "resample":
            raise InterventionError(f"mode {self.mode!r} is not random: it has no draws")

    @property
    def randomised(self) -> bool:  # type: ignore[override]
        return self.mode == "resample"

    def latent_only(self, n_latent: int) -> bool:
        return not {"bot", "question"} & set(self.positions)

    def hooks(self, run: RunContext, pmap: PositionMap, indices: list[int]) -> list[AbstractContextManager]:
        targets = pmap.resolve(self.positions)
        values = None
        if self.mode == "mean":  # [P, hd] per head
            values = {h: v.mean(0) for h, v in run.head_outputs(self.heads, self.positions, "discovery").items()}
        elif self.mode == "resample":  # [B, P, hd] per head: another problem's output
            outputs = run.head_outputs(self.heads, self.positions, "test")
            n = next(iter(outputs.values())).shape[0]
            generator = torch.Generator().manual_seed(run.seed * 1000 + 500 + self.draw * NOISE_SEED_STRIDE)
            source = derangement(n, generator)[indices]
            values = {h: v[source] for h, v in outputs.items()}
        return [HeadAblation(run.codi, self.heads, targets, self.mode, values)]


@dataclass(frozen=True)
class PatchThoughts(Spec):
    """Continuous thoughts replaced before they are fed back: Gaussian noise matched to that
    thought's mean norm over the test problems (one draw per `draw`), zero, the mean over the
    discovery split, or another test problem's thought (a derangement, one per draw; every
    thought patched comes from the same other problem)."""

    positions: tuple[str, ...]
    mode: str = "noise"
    draw: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _names(self.positions))
        if self.mode not in PATCH_MODES:
            raise InterventionError(f"unknown thought-patch mode {self.mode!r}; choose from {', '.join(PATCH_MODES)}")
        check_thought_positions(self.positions)
        if self.draw and self.mode not in ("noise", "resample"):
            raise InterventionError(f"mode {self.mode!r} is not random: it has no draws")

    @property
    def randomised(self) -> bool:  # type: ignore[override]
        return self.mode in ("noise", "resample")

    def patched_thoughts(self) -> tuple[str, ...]:
        return self.positions

    def thought_indices(self, n_latent: int) -> list[int]:
        if "latent" in self.positions:
            return list(range(n_latent))
        return sorted(int(p.removeprefix("CT")) for p in self.positions)

    def replacement(self, run: RunContext, thought: int) -> torch.Tensor:
        """What CT_thought becomes for every test problem: [N, d]."""
        thoughts = run.clean_thoughts("test")[:, thought]  # [N, d]
        if self.mode == "zero":
            return torch.zeros_like(thoughts)
        if self.mode == "mean":
            return run.clean_thoughts("discovery")[:, thought].mean(0, keepdim=True).expand_as(thoughts)
        if self.mode == "interchange":  # the problem's counterfactual source's own thought
            return run.counterfactual_thoughts()[:, thought].to(thoughts)
        if self.mode == "resample":  # one donor problem per problem for every thought patched
            donors = torch.Generator().manual_seed(run.seed * 1000 + 700 + self.draw * NOISE_SEED_STRIDE)
            return thoughts[derangement(len(thoughts), donors)]
        generator = torch.Generator().manual_seed(run.seed * 1000 + thought + self.draw * NOISE_SEED_STRIDE)
        return norm_matched_noise(thoughts, generator)

    def latent_patch(self, run: RunContext, indices: list[int]) -> LatentPatch:
        chosen = self.thought_indices(run.codi.n_latent)
        if max(chosen) >= run.codi.n_latent:
            raise InterventionError(f"{run.codi.name} has thoughts CT0..CT{run.codi.n_latent - 1}, not CT{max(chosen)}")
        values = {i: self.replacement(run, i)[indices] for i in chosen}
        return lambda i, thought: values[i].to(thought) if i in values else thought


@dataclass(frozen=True)
class AttentionPattern(Spec):
    """Heads' attention at the latent queries rewritten: hub (80% on `hub`), uniform,
    sequential (all on the previous position) or reroute (the hub's mass moved to `target`)."""

    heads: tuple[Head, ...]
    pattern: str
    hub: str
    target: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _heads(self.heads))
        if self.pattern not in PATTERNS:
            raise InterventionError(f"unknown attention pattern {self.pattern!r}; choose from {', '.join(PATTERNS)}")
        if (self.pattern == "reroute") != (self.target is not None):
            raise InterventionError("a target is given exactly for pattern 'reroute'")
        if self.target is not None and self.target == self.hub:
            raise InterventionError(f"rerouting the hub {self.hub} to itself is the identity: choose another target")

    def rewritten(self, n_latent: int) -> list[str]:
        """The thoughts whose queries this pattern rewrites (the others cannot see the hub)."""
        return [f"CT{i}" for i in rewritten_thoughts(self.pattern, self.hub, self.target, n_latent)]

    def hooks(self, run: RunContext, pmap: PositionMap, indices: list[int]) -> list[AbstractContextManager]:
        if not self.rewritten(pmap.n_latent):
            where = f"the hub {self.hub}" + (f" and the target {self.target}" if self.target else "")
            raise InterventionError(
                f"pattern {self.pattern!r} changes nothing: no thought's query comes after {where} "
                f"(a query sees only earlier positions)"
            )
        return [AttentionOverride(run.codi, self.heads, self.pattern, pmap, self.hub, self.target)]


@dataclass(frozen=True)
class TransplantHead(Spec):
    """The donor model's head replaces this model's `head` at every position, through linear
    maps between the residual spaces fitted on the discovery split (see `harness.interventions.transplant`)."""

    donor: str  # the donor model's fingerprint
    donor_head: Head
    head: Head
    ridge: float
    discovery: str  # hash of the problems the maps are fitted on

    def latent_only(self, n_latent: int) -> bool:
        return False

    def hooks(self, run: RunContext, pmap: PositionMap, indices: list[int]) -> list[AbstractContextManager]:
        return [transplant_hook(run, self.head, self.donor, self.donor_head)]


def _overlap(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Positions two parts both act on (`latent` covers every thought)."""

    def covers(x: str, y: str) -> bool:
        return x == y or (x == "latent" and thought_number(y) is not None)

    return sorted({y for x in a for y in b if covers(x, y)} | {x for x in a for y in b if covers(y, x)})


def _acts_on(part: Spec) -> dict[Head, tuple[str, ...]]:
    """The heads a part replaces or rewrites, and at which positions (`latent`: the thought
    queries, where attention patterns act; `everywhere` for a transplant)."""
    if isinstance(part, AblateHeads):
        return {h: part.positions for h in part.heads}
    if isinstance(part, AttentionPattern):
        return {h: ("latent",) for h in part.heads}
    if isinstance(part, TransplantHead):
        return {part.head: ("everywhere",)}
    return {}


def check_disjoint(parts: Sequence[Spec]) -> None:
    """Refuse a composition in which one part would override or hide another: the same head
    acted on twice at a common position, or the same thought patched twice (by a thought
    patch or as a path patch's source)."""
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            if common := _overlap(a.patched_thoughts(), b.patched_thoughts()):
                raise InterventionError(
                    f"{a.describe()} and {b.describe()} both patch {', '.join(common)}: one would override the other"
                )
            heads_a, heads_b = _acts_on(a), _acts_on(b)
            for head in sorted(heads_a.keys() & heads_b.keys()):
                pa, pb = heads_a[head], heads_b[head]
                common = ["every position"] if "everywhere" in pa + pb else _overlap(pa, pb)
                if common:
                    raise InterventionError(
                        f"{a.describe()} and {b.describe()} both act on {head} at {', '.join(common)}: "
                        "one would override or hide the other"
                    )


@dataclass(frozen=True)
class Compose(Spec):
    """Several specs in one condition (their hooks together; thought patches chained). The
    parts must act on disjoint heads-at-positions and thoughts (`check_disjoint`), so they
    commute: they are kept in a canonical order, and `a + b` is the same condition (and cache
    entry) as `b + a`."""

    specs: tuple[Spec, ...] = field(default=())

    def __post_init__(self) -> None:
        flat = [p for s in self.specs for p in s.parts() if not isinstance(p, Baseline)]
        check_disjoint(flat)
        canonical = sorted(flat, key=lambda p: (type(p).__name__, json.dumps(p.key(), sort_keys=True)))
        object.__setattr__(self, "specs", tuple(canonical))

    @property
    def randomised(self) -> bool:  # type: ignore[override]
        return any(s.randomised for s in self.specs)

    def parts(self) -> tuple[Spec, ...]:
        return self.specs

    def latent_only(self, n_latent: int) -> bool:
        return all(s.latent_only(n_latent) for s in self.specs)

    def latent_patch(self, run: RunContext, indices: list[int]) -> LatentPatch | None:
        patches = [p for p in (s.latent_patch(run, indices) for s in self.specs) if p is not None]
        if not patches:
            return None

        def chained(i: int, thought: torch.Tensor) -> torch.Tensor:
            for patch in patches:
                thought = patch(i, thought)
            return thought

        return chained

    def hooks(self, run: RunContext, pmap: PositionMap, indices: list[int]) -> list[AbstractContextManager]:
        return [h for s in self.specs for h in s.hooks(run, pmap, indices)]


def what_runs(spec: Spec) -> dict[str, str]:
    """The heads, positions and mode of a condition, as the claims table shows them."""
    heads, positions, modes = [], [], []
    for part in spec.parts():
        if isinstance(part, AblateHeads | AttentionPattern):
            heads += [str(h) for h in part.heads]
        if isinstance(part, TransplantHead):
            heads.append(str(part.head))
        positions += list(part.positions if isinstance(part, AblateHeads) else part.patched_thoughts())
        modes.append(
            {
                AblateHeads: lambda s: f"heads {s.mode}",
                PatchThoughts: lambda s: f"thoughts {s.mode}",
                AttentionPattern: lambda s: f"attention {s.pattern}",
                TransplantHead: lambda s: "transplant",
            }.get(type(part), lambda s: s.label())(part)
        )
    return {"heads": " ".join(heads), "positions": " ".join(dict.fromkeys(positions)), "mode": " + ".join(modes)}


def with_draw(spec: Spec, draw: int) -> Spec:
    """The same condition with draw `draw` of each random part."""
    if isinstance(spec, Compose):
        return Compose(tuple(with_draw(s, draw) for s in spec.specs))
    return dataclasses.replace(spec, draw=draw) if spec.randomised else spec


@contextmanager
def _installed(managers: list[AbstractContextManager]) -> Iterator[None]:
    with ExitStack() as stack:  # a hook that fails to install removes the ones before it
        for manager in managers:
            stack.enter_context(manager)
        yield


def installer(spec: Spec, run: RunContext) -> Callable[[PositionMap, list[int]], AbstractContextManager]:
    """`evaluate`'s `intervene`: every hook of `spec` (and its thought patch) for one batch."""

    def intervene(pmap: PositionMap, indices: list[int]) -> AbstractContextManager:
        patch = spec.latent_patch(run, indices)
        return _installed(spec.hooks(run, pmap, indices) + ([ThoughtPatch(run.codi, patch)] if patch else []))

    return intervene
