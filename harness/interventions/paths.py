"""Path patching through the thought loop: a thought's patched value seen only by named readers.

In the KV-cached loop every later position reads a thought through its keys and values at the
thought's position, and the next thought also reads it through the loop itself (its input is
`prj` of the state the thought's pass ends with). `PathPatch` runs each source thought's pass
twice, clean and with the patched input (under the same hooks, so it composes with other
interventions), keeps both versions of its keys and values in every layer, and before every
later pass puts the version that pass may read into the cache: the patched one for a reader,
the clean one for everyone else. The next thought's input is the patched state exactly when it
is a reader. A pass whose tokens differ in what they may read (teacher forcing feeds eot and the
answer in one pass) is re-run in segments, each reading its own version.

With every later position a reader this is the ordinary thought patch, bit for bit; with none
it is the unpatched run, bit for bit (both tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from harness.interventions.context import RunContext
from harness.interventions.hooks import InterventionError
from harness.interventions.specs import PATCH_MODES, PatchThoughts, Spec
from harness.runtime.arch import backbone
from harness.runtime.codi import CODIModel, Pass
from harness.runtime.positions import PositionMap, thought_number

READER_SPANS = ("latent", "eot", "answer")  # reader names besides CT<i> (`latent`: every later thought)


@dataclass
class _Versions:
    """Both versions of one source thought's keys and values, per layer: [B, H_kv, hd] each."""

    clean: list[tuple[torch.Tensor, torch.Tensor]]
    patched: list[tuple[torch.Tensor, torch.Tensor]]


def _kv_at(cache, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys[:, :, index].clone(), layer.values[:, :, index].clone()) for layer in cache.layers]


def _put(cache, index: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (k, v) in zip(cache.layers, kv):
        layer.keys[:, :, index] = k
        layer.values[:, :, index] = v


class PathPatch:
    """Context manager: thoughts `sources` (indices) replaced by `values[i]` ([B, d]) as seen by
    the `readers` alone: thought indices, and/or `eot`, `answer` (every answer token)."""

    def __init__(
        self,
        codi: CODIModel,
        pmap: PositionMap,
        values: dict[int, torch.Tensor],
        reader_thoughts: Sequence[int],
        eot: bool,
        answer: bool,
    ):
        self.codi, self.pmap, self.values = codi, pmap, values
        self.reader_thoughts, self.eot, self.answer = set(reader_thoughts), eot, answer
        self._sources = {pmap.latent[i]: i for i in values}  # sequence index -> thought index
        self._versions: dict[int, _Versions] = {}
        self._inner = False  # while this patch re-runs a pass itself
        self._handles: list = []

    def __enter__(self) -> PathPatch:
        module = backbone(self.codi.lm)
        self._handles = [
            module.register_forward_pre_hook(self.codi.handing(self._before), with_kwargs=True),
            module.register_forward_hook(self.codi.handing(self._after), with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._versions.clear()

    def reads(self, index: int, source: int) -> bool:
        """Whether the position at sequence `index` reads the patched version of `source`."""
        if index <= source:
            return False
        if index in self.pmap.latent:
            return self.pmap.latent.index(index) in self.reader_thoughts
        eot = self.pmap.index("eot")
        return self.eot if index == eot else self.answer if index > eot else False

    def _show(self, cache, index: int) -> None:
        """Put into `cache` the versions the position at `index` may read."""
        for source, versions in self._versions.items():
            if source < cache.get_seq_length():
                _put(cache, source, versions.patched if self.reads(index, source) else versions.clean)

    def _before(self, step: Pass, module, args, kwargs) -> None:
        if not self._inner and self._versions:
            self._show(kwargs["cache"], step.offset)

    def _after(self, step: Pass, module, args, kwargs, output):
        if self._inner:
            return None
        cache = kwargs["cache"]
        if step.offset in self._sources and step.n_new == 1:
            return self._fork(step, cache, kwargs, output)
        indices = range(step.offset, step.offset + step.n_new)
        statuses = [tuple(self.reads(i, s) for s in self._versions) for i in indices]
        if len(set(statuses)) > 1:
            return self._segmented(step, cache, kwargs, statuses)
        return None

    def _rerun(self, cache, kwargs, start: int, stop: int, **inputs):
        """Tokens `start:stop` of the current pass again, through `CODIModel.step` (hooks of
        other interventions run as in any pass); this patch's own hooks stand aside."""
        step = self.codi.current_pass()
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        self._inner = True
        try:
            return self.codi.step(
                None if mask is None else mask[:, : step.offset + stop],
                None if positions is None else positions[:, start:stop],
                cache,
                output_hidden_states=bool(kwargs.get("output_hidden_states")),
                **inputs,
            )
        finally:
            self._inner = False

    def _fork(self, step: Pass, cache, kwargs, clean_output):
        """The source thought's pass again with its patched input: both versions kept; the loop
        goes on from the patched state only if the next thought reads the source."""
        source = step.offset
        clean = _kv_at(cache, source)
        cache.crop(-1)
        embeds = kwargs["inputs_embeds"]  # [B, 1, d]
        value = self.values[self._sources[source]].to(embeds)[:, None]  # [B, 1, d]
        patched_output = self._rerun(cache, kwargs, 0, 1, inputs_embeds=value)
        self._versions[source] = _Versions(clean, _kv_at(cache, source))
        return patched_output if self.reads(source + 1, source) else clean_output

    def _segmented(self, step: Pass, cache, kwargs, statuses: list[tuple[bool, ...]]):
        """A pass whose tokens read different versions, again in segments that each read one."""
        cache.crop(-step.n_new)
        ids = kwargs.get("input_ids")
        start, outputs = 0, []
        while start < step.n_new:
            stop = start + 1
            while stop < step.n_new and statuses[stop] == statuses[start]:
                stop += 1
            self._show(cache, step.offset + start)
            inputs = {"input_ids": ids[:, start:stop]} if ids is not None else {
                "inputs_embeds": kwargs["inputs_embeds"][:, start:stop]}  # fmt: skip
            outputs.append(self._rerun(cache, kwargs, start, stop, **inputs))
            start = stop
        last = outputs[-1]
        last["last_hidden_state"] = torch.cat([o.last_hidden_state for o in outputs], dim=1)
        return last


@dataclass(frozen=True)
class PatchPath(Spec):
    """Path patching (`harness.interventions.paths`): the thought `source` (`CT<i>`, or `latent`: every
    thought) replaced as `PatchThoughts` would (zero, mean, resample, noise: the same values),
    seen only by the `readers`: later thoughts (`CT<j>`, or `latent`: every thought after the
    source; with every thought patched, each reads the patched thoughts before it), `eot`,
    `answer` (every answer token). Every other position, the loop included, reads the clean
    thought."""

    source: str
    readers: tuple[str, ...]
    mode: str = "mean"
    draw: int = 0

    def __post_init__(self) -> None:
        if self.source != "latent" and thought_number(self.source) is None:
            raise InterventionError(f"a path patch's source is a thought (CT<i> or latent), not {self.source!r}")
        readers = (self.readers,) if isinstance(self.readers, str) else tuple(self.readers)
        object.__setattr__(self, "readers", tuple(sorted(set(readers))))
        bad = [r for r in self.readers if r not in READER_SPANS and thought_number(r) is None]
        if bad:
            raise InterventionError(f"readers are later thoughts (CT<j>, latent), eot or answer, not {', '.join(bad)}")
        first = thought_number(self.source) if self.source != "latent" else 0
        early = [r for r in self.readers if (thought_number(r) if thought_number(r) is not None else 10**9) <= first]
        if early:
            raise InterventionError(
                f"{', '.join(early)} cannot read {self.source}: a position reads only earlier ones (readers come after)"
            )
        if self.mode not in PATCH_MODES:
            raise InterventionError(f"unknown thought-patch mode {self.mode!r}; choose from {', '.join(PATCH_MODES)}")
        if self.draw and self.mode not in ("noise", "resample"):
            raise InterventionError(f"mode {self.mode!r} is not random: it has no draws")

    @property
    def randomised(self) -> bool:  # type: ignore[override]
        return self.mode in ("noise", "resample")

    @property
    def patch(self) -> PatchThoughts:
        """The ordinary patch of the source (what every reader together sees)."""
        return PatchThoughts((self.source,), self.mode, self.draw)

    def patched_thoughts(self) -> tuple[str, ...]:
        return (self.source,)

    def label(self) -> str:
        return f"path {self.mode} -> {' '.join(self.readers) or 'no reader'}"

    def reader_thoughts(self, n_latent: int) -> list[int]:
        first = thought_number(self.source) if self.source != "latent" else 0
        named = [thought_number(r) for r in self.readers if thought_number(r) is not None]
        return list(range(first + 1, n_latent)) if "latent" in self.readers else named

    def hooks(self, run: RunContext, pmap: PositionMap, indices: list[int]) -> list[AbstractContextManager]:
        thoughts = self.patch.thought_indices(pmap.n_latent)
        if max(thoughts) >= pmap.n_latent or max(self.reader_thoughts(pmap.n_latent), default=0) >= pmap.n_latent:
            raise InterventionError(f"{run.codi.name} has thoughts CT0..CT{pmap.n_latent - 1}: {self.describe()}")
        values = {i: self.patch.replacement(run, i)[indices] for i in thoughts}
        readers = self.reader_thoughts(pmap.n_latent)
        return [PathPatch(run.codi, pmap, values, readers, "eot" in self.readers, "answer" in self.readers)]
