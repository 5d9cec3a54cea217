"""Interventions on raw HF modules: context managers that install hooks and always remove them.

A head's output is its slice of the *input* of the attention output projection (`c_proj` in
GPT-2, `o_proj` in LLaMA): the projection mixes heads, so editing its output cannot isolate
one. Positions are sequence indices from `harness.runtime.positions.PositionMap`; every hook is handed
the pass it acts on (`CODIModel.handing`) and finds that pass's tokens through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from harness.runtime.arch import Head, attention, attn_out_proj, blocks
from harness.runtime.codi import CODIModel, Pass

MODES = ("zero", "mean", "resample")


class InterventionError(ValueError):
    """A bad head, position or mode; the message names it."""


class _HeadHooks(ABC):
    """Shared machinery: a forward pre-hook on each touched layer's output projection."""

    def __init__(self, codi: CODIModel, heads: Sequence[Head], positions: Sequence[int]):
        self.codi, self.heads, self.positions = codi, list(heads), list(positions)
        geo = codi.geometry
        self.n_heads, self.head_dim = geo.n_heads, geo.head_dim
        self._handles: list = []

    def __enter__(self):
        for layer in sorted({h.layer for h in self.heads}):
            module = attn_out_proj(self.codi.lm, layer)
            self._handles.append(module.register_forward_pre_hook(self.codi.handing(self._make_hook(layer))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _local(self, step: Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into this pass's tokens, indices into self.positions) of the targets."""
        pairs = step.local(self.positions)
        local = torch.tensor([a for a, _ in pairs], dtype=torch.long)
        which = torch.tensor([b for _, b in pairs], dtype=torch.long)
        return local, which

    def _make_hook(self, layer: int):
        layer_heads = [h for h in self.heads if h.layer == layer]

        def hook(step: Pass, module, args):
            x = args[0]  # [B, T, n_heads * head_dim]
            local, which = self._local(step)
            if local.numel() == 0:
                return None
            return self._on_heads(x, layer_heads, local.to(x.device), which.to(x.device), args)

        return hook

    @abstractmethod
    def _on_heads(self, x, heads, local, which, args):
        """What to do with the targeted head slices; returns new hook args or None."""

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim)  # [B, T, H, hd]


class HeadAblation(_HeadHooks):
    """Replace heads' outputs at `positions`: zero, a mean (per head and position), or
    resampled values (per problem, e.g. another problem's activations)."""

    def __init__(
        self,
        codi: CODIModel,
        heads: Sequence[Head],
        positions: Sequence[int],
        mode: str = "zero",
        values: dict[Head, torch.Tensor] | None = None,
    ):
        super().__init__(codi, heads, positions)
        if mode not in MODES:
            raise InterventionError(f"unknown ablation mode {mode!r}; choose from {', '.join(MODES)}")
        if mode != "zero" and (values is None or set(values) < set(self.heads)):
            raise InterventionError(f"mode {mode!r} needs values for every head")
        self.mode, self.values = mode, values or {}

    def _on_heads(self, x, heads, local, which, args):
        x = x.clone()
        view = self._view(x)
        for head in heads:
            if self.mode == "zero":
                view[:, local, head.head] = 0.0
            elif self.mode == "mean":  # values[head]: [n_positions, hd]
                view[:, local, head.head] = self.values[head][which].to(x.dtype)
            else:  # resample, values[head]: [B, n_positions, hd]
                view[:, local, head.head] = self.values[head][:, which].to(x.dtype)
        return (x, *args[1:])


class HeadCapture(_HeadHooks):
    """Record heads' outputs at `positions`: `.values[head]` is [B, n_positions, hd].
    `keep_graph=True` keeps them differentiable (attribution)."""

    def __init__(self, codi: CODIModel, heads: Sequence[Head], positions: Sequence[int], keep_graph: bool = False):
        super().__init__(codi, heads, positions)
        self.values: dict[Head, torch.Tensor] = {}
        self.keep_graph = keep_graph

    def _on_heads(self, x, heads, local, which, args):
        view = self._view(x)
        for head in heads:
            store = self.values.setdefault(head, x.new_zeros(x.shape[0], len(self.positions), self.head_dim))
            value = view[:, local, head.head]
            store[:, which] = value if self.keep_graph else value.detach()
        return None


class HeadInterpolation(_HeadHooks):
    """The path of attribution patching and integrated gradients: every head's output x at
    `positions` replaced by t + alpha (x - t), t its ablated value (zero, or `targets`
    [L, H, n_positions, hd]), alpha a leaf filled with `alpha` that requires grad, so one
    backward pass gives d(metric)/d(alpha) for every head at every position at once
    (`.alphas[layer]` [B, n_positions, n_heads]). alpha 1 is the clean model, 0 every head ablated."""

    def __init__(
        self, codi: CODIModel, positions: Sequence[int], alpha: float = 1.0, targets: torch.Tensor | None = None
    ):
        geo = codi.geometry
        every = [Head(layer, head) for layer in range(geo.n_layers) for head in range(geo.n_heads)]
        super().__init__(codi, every, positions)
        self.alpha, self.targets = alpha, targets
        self.alphas: dict[int, torch.Tensor] = {}

    def _on_heads(self, x, heads, local, which, args):
        layer = heads[0].layer
        if layer not in self.alphas:
            shape = (x.shape[0], len(self.positions), self.n_heads)
            self.alphas[layer] = x.new_full(shape, self.alpha, requires_grad=True)
        view = self._view(x)  # [B, T, H, hd]
        clean = view[:, local]  # [B, n, H, hd]
        if self.targets is None:
            target = 0.0
        else:
            target = self.targets[layer][:, which.cpu()].transpose(0, 1).to(x)  # [n, H, hd]
        x = x.clone()
        self._view(x)[:, local] = target + self.alphas[layer][:, which, :, None] * (clean - target)
        return (x, *args[1:])


# where an activation is read, per layer: the block's input, its attention's input (after the
# block's first norm), the block's output
SITES = ("resid_pre", "attn_in", "resid_post")
Site = tuple[str, int]  # (site name, layer)


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block or attention module reads (GPT-2 passes them positionally,
    LLaMA by keyword): [B, T, d]."""
    return args[0] if args else kwargs["hidden_states"]


class ActivationCapture:
    """Record activations at named sites at given sequence indices, in every pass run under
    it: `.values[(site, layer)][index]` is [B, d] (detached)."""

    def __init__(self, codi: CODIModel, sites: Sequence[Site], positions: Sequence[int]):
        n_layers = codi.geometry.n_layers
        for name, layer in sites:
            if name not in SITES or not 0 <= layer < n_layers:
                raise InterventionError(
                    f"unknown site ({name!r}, {layer}); sites are {', '.join(SITES)} at layers 0..{n_layers - 1}"
                )
        self.codi, self.positions = codi, list(positions)
        self.values: dict[Site, dict[int, torch.Tensor]] = {site: {} for site in sites}
        self._handles: list = []

    def __enter__(self) -> ActivationCapture:
        lm = self.codi.lm
        for site in self.values:
            name, layer = site
            if name == "resid_post":
                hook = self.codi.handing(self._post_hook(site))
                self._handles.append(blocks(lm)[layer].register_forward_hook(hook))
            else:
                module = blocks(lm)[layer] if name == "resid_pre" else attention(lm, layer)
                hook = self.codi.handing(self._pre_hook(site))
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _store(self, site: Site, step: Pass, x: torch.Tensor) -> None:
        for local, k in step.local(self.positions):
            self.values[site][self.positions[k]] = x[:, local].detach()

    def _pre_hook(self, site: Site):
        def hook(step: Pass, module, args, kwargs) -> None:
            self._store(site, step, hidden_input(args, kwargs))

        return hook

    def _post_hook(self, site: Site):
        def hook(step: Pass, module, args, output) -> None:
            self._store(site, step, output[0] if isinstance(output, tuple) else output)

        return hook

    def stacked(self, site: Site) -> torch.Tensor:
        """One site at every position: [B, P, d]."""
        return torch.stack([self.values[site][p] for p in self.positions], dim=1)


def residual_sites(n_layers: int) -> list[Site]:
    """The residual stream before the first block and after every block (L + 1 sites)."""
    return [("resid_pre", 0)] + [("resid_post", layer) for layer in range(n_layers)]


def leftover_hooks(codi: CODIModel) -> list[str]:
    """Everything an intervention may leave behind; empty when all were removed."""
    found = [
        f"{name or 'model'}: {len(m._forward_pre_hooks) + len(m._forward_hooks)} hook(s)"
        for name, m in codi.named_modules()
        if m._forward_pre_hooks or m._forward_hooks
    ]
    found += [f"{name}: attention plan" for name, m in codi.named_modules() if hasattr(m, "codi_plans")]
    if codi.thought_patch is not None:
        found.append("an active thought patch")
    if codi.lm.config._attn_implementation == "codi_attention":
        found.append("the override attention implementation")
    return found
