"""Cross-model head transplantation (experiment 2.1): run a donor model's attention head inside
a recipient model, in place of one of the recipient's heads.

The two models may differ in hidden size, head size, positional scheme (learned positions vs
RoPE), norm and GQA layout, so nothing is copied into the recipient's weight matrices. The
transplant is functional, through hooks: the recipient head's own output is removed and the
donor head is computed with the donor's own Q/K/V/O weights on the recipient's attention input
carried into the donor's space by `map_in`; its output is carried back into the recipient's
residual space by `map_out`. Both maps are fitted by least squares on paired activations of the
two models on the same problems (`paired_states`), and their R^2 says how much of one space the
other explains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harness.data.problems import Problem
from harness.interventions.context import RunContext
from harness.interventions.hooks import ActivationCapture, InterventionError, hidden_input
from harness.runtime.arch import Head, attention, attn_out_proj, backbone
from harness.runtime.codi import CODIModel, Pass
from harness.runtime.loop import encode_questions, run_latents

# shrinks each standardised input direction by ~1%: on the shipped models' 300 discovery problems
# the held-out R^2 equals that of 1e-6 (to +-0.03) with maps of 3-5x smaller norm
DEFAULT_RIDGE = 1e-2
DEFAULT_HOLDOUT = 0.2


# --- linear maps between activation spaces -------------------------------------------------


@dataclass(frozen=True)
class LinearMap:
    """y ~ x @ W + b, with the fit's R^2 (variance-weighted over output dimensions) on the fit
    data and, when there was room for it, on held-out rows."""

    W: torch.Tensor  # [d_in, d_out]
    b: torch.Tensor  # [d_out]
    r2: float = 1.0
    r2_heldout: float | None = None

    @classmethod
    def identity(cls, d: int) -> LinearMap:
        return cls(torch.eye(d), torch.zeros(d))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map states: [..., d_in] -> [..., d_out]."""
        return x @ self.W.to(x) + self.b.to(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Map a displacement (e.g. a head's output added to the residual): the bias, an offset
        between the two spaces' states, cancels in a difference. [..., d_in] -> [..., d_out]."""
        return x @ self.W.to(x)


def _fit(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression on standardised inputs with an unpenalised intercept, folded back into
    raw-input coordinates: (W [d_in, d_out], b [d_out]).

    Every input column's penalty is `ridge` times its own sum of squares, so the shrinkage is
    the same small fraction whatever a column's scale: it keeps a fit with few rows per
    dimension well posed and its weights from amplifying noise.
    """
    from sklearn.linear_model import Ridge  # here: a warm (cached) run never fits a map
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    model = Ridge(alpha=ridge * len(x)).fit(scaler.transform(x), y)
    w = (model.coef_ / scaler.scale_).T  # coef_: [d_out, d_in]
    return w, model.intercept_ - scaler.mean_ @ w


def fit_linear_map(
    x: torch.Tensor,  # [N, d_in]
    y: torch.Tensor,  # [N, d_out]
    ridge: float = DEFAULT_RIDGE,
    holdout: float = DEFAULT_HOLDOUT,
) -> LinearMap:
    """Least-squares map x -> y (float64, a small ridge for stability); R^2 is sklearn's
    variance-weighted one (1 - SS_res / SS_tot summed over output dimensions).

    `r2_heldout` comes from a fit on the first rows scored on the last `holdout` fraction (rows
    from `paired_states` are problem-major, so those are unseen problems); the returned map is
    then refitted on all rows and `r2` is its in-sample score.
    """
    from sklearn.metrics import r2_score

    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y pair rows: got {x.shape[0]} and {y.shape[0]}")
    x_np, y_np = x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()
    n_test = int(len(x_np) * holdout)
    r2_heldout = None
    if n_test >= 2 and len(x_np) - n_test >= 2:
        w, b = _fit(x_np[:-n_test], y_np[:-n_test], ridge)
        r2_heldout = float(r2_score(y_np[-n_test:], x_np[-n_test:] @ w + b, multioutput="variance_weighted"))
    w, b = _fit(x_np, y_np, ridge)
    r2 = float(r2_score(y_np, x_np @ w + b, multioutput="variance_weighted"))
    return LinearMap(torch.from_numpy(w).float(), torch.from_numpy(b).float(), r2, r2_heldout)


# --- paired activations of two models ------------------------------------------------------


@dataclass
class PairedStates:
    """Activations of two models at the same (problem, named position) rows, problem-major."""

    names: tuple[str, ...]  # the positions, e.g. bot, CT0..CT5
    recipient_in: torch.Tensor  # [N, d_r] recipient attention input at its layer
    recipient_out: torch.Tensor  # [N, d_r] recipient residual after its layer
    donor_in: torch.Tensor  # [N, d_d]
    donor_out: torch.Tensor  # [N, d_d]

    def maps(self, ridge: float = DEFAULT_RIDGE, holdout: float = DEFAULT_HOLDOUT) -> tuple[LinearMap, LinearMap]:
        """(map_in: recipient attention input -> donor attention input,
        map_out: donor residual -> recipient residual), the two maps a transplant needs."""
        map_in = fit_linear_map(self.recipient_in, self.donor_in, ridge, holdout)
        map_out = fit_linear_map(self.donor_out, self.recipient_out, ridge, holdout)
        return map_in, map_out


def _layer_states(
    codi: CODIModel, problems: Sequence[Problem], layer: int, names: Sequence[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention input, residual after `layer`) at `names`, each [len(problems) * P, d]."""
    attn_in, resid_out = [], []
    for start in range(0, len(problems), batch_size):
        batch = encode_questions(codi, [p.question for p in problems[start : start + batch_size]])
        pmap = batch.positions(codi.n_latent)
        sites = [("attn_in", layer), ("resid_post", layer)]
        with ActivationCapture(codi, sites, [pmap.index(n) for n in names]) as capture:
            run_latents(codi, batch)
        for store, site in zip((attn_in, resid_out), sites):
            values = capture.stacked(site)  # [B, P, d]
            store.append(values.reshape(-1, values.shape[-1]))  # problem-major
    return torch.cat(attn_in), torch.cat(resid_out)


@torch.no_grad()
def paired_states(
    recipient: CODIModel,
    donor: CODIModel,
    problems: Sequence[Problem],
    recipient_layer: int,
    donor_layer: int,
    batch_size: int = 64,
) -> PairedStates:
    """Run both models' latent loops on the same problems and pair their states at bot and
    CT0..CT{K-1}: positions that exist in both models whatever their tokenizers."""
    if recipient.n_latent != donor.n_latent:
        raise InterventionError(f"{recipient.name} and {donor.name} think in different numbers of thoughts")
    names = ("bot", *(f"CT{i}" for i in range(recipient.n_latent)))
    r_in, r_out = _layer_states(recipient, problems, recipient_layer, names, batch_size)
    d_in, d_out = _layer_states(donor, problems, donor_layer, names, batch_size)
    return PairedStates(names, r_in, r_out, d_in, d_out)


# --- the transplant ------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeadWeights:
    """One query head's projections, as `x @ w + b` matrices, and its positional treatment."""

    w_q: torch.Tensor  # [d, hd]
    b_q: torch.Tensor  # [hd]
    w_k: torch.Tensor  # [d, hd], the KV head this query head reads (GQA)
    b_k: torch.Tensor
    w_v: torch.Tensor
    b_v: torch.Tensor
    w_o: torch.Tensor  # [hd, d], the head's slice of the output projection
    scaling: float
    rotary: nn.Module | None  # RoPE (LLaMA); None where positions live in the residual (GPT-2)


def _head_weights(codi: CODIModel, head: Head) -> _HeadWeights:
    geo = codi.geometry
    hd, attn = geo.head_dim, attention(codi.lm, head.layer)
    q_span = slice(head.head * hd, (head.head + 1) * hd)
    if codi.arch.model_type == "gpt2":  # Conv1D: weight [d, 3d] = q | k | v columns, then bias
        w, b, d = attn.c_attn.weight, attn.c_attn.bias, geo.d_model
        spans = [slice(i * d + q_span.start, i * d + q_span.stop) for i in range(3)]
        qkv = [(w[:, s], b[s]) for s in spans]
        w_o, rotary = attn.c_proj.weight[q_span], None
    else:  # nn.Linear: weight [out, in]; the KV head of this query head's group
        kv = head.head // (geo.n_heads // geo.n_kv_heads)
        kv_span = slice(kv * hd, (kv + 1) * hd)
        qkv = [
            (proj.weight[s].T, proj.bias[s] if proj.bias is not None else proj.weight.new_zeros(hd))
            for proj, s in ((attn.q_proj, q_span), (attn.k_proj, kv_span), (attn.v_proj, kv_span))
        ]
        w_o, rotary = attn.o_proj.weight[:, q_span].T, backbone(codi.lm).rotary_emb
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = [(w.detach(), b.detach()) for w, b in qkv]
    return _HeadWeights(w_q, b_q, w_k, b_k, w_v, b_v, w_o.detach(), attn.scaling, rotary)


def _check_head(codi: CODIModel, head: Head) -> None:
    geo = codi.geometry
    if not (0 <= head.layer < geo.n_layers and 0 <= head.head < geo.n_heads):
        raise InterventionError(
            f"head {head} out of range for {codi.name}: {geo.n_layers} layers x {geo.n_heads} heads"
        )


class HeadTransplant:
    """Context manager: the recipient head's output is replaced by the donor head's.

    While active, at `positions` (default: every position) the recipient head's slice of its
    output-projection input is zeroed (as in `HeadAblation`) and, to the attention output, is
    added `map_out.linear(O_h(attn_h(map_in(x))))`: x is the recipient's attention input,
    q/k/v come from the donor head's weights and biases, RoPE with the donor's rotary embedding
    and the pass's position ids for a LLaMA donor (nothing for a GPT-2 donor, whose positions
    live in the residual stream), the causal + left-padding mask from the pass's 2-D mask, and
    O_h is the donor head's slice of the output projection (no output bias: it belongs to no
    head). Only the linear part of `map_out` applies, the head output being a displacement.

    The donor head keeps its own K/V cache over every position of a sequence (question pass,
    thoughts, decoding), reset when a new sequence starts (`offset == 0`) and cut back when a pass branches from an
    earlier point (teacher forcing on a copy of the latent cache); the donor model is
    never run. GQA: a LLaMA donor's query head reads its own group's KV head; for a LLaMA
    recipient only the query head's output is replaced, and the KV head it shares with the
    other query heads of its group is left untouched for them.
    """

    def __init__(
        self,
        recipient: CODIModel,
        recipient_head: Head,
        donor: CODIModel,
        donor_head: Head,
        map_in: LinearMap,
        map_out: LinearMap,
        positions: Sequence[int] | None = None,
    ):
        _check_head(recipient, recipient_head)
        _check_head(donor, donor_head)
        d_r, d_d = recipient.geometry.d_model, donor.geometry.d_model
        if map_in.shape != (d_r, d_d) or map_out.shape != (d_d, d_r):
            raise InterventionError(
                f"maps must be {d_r}->{d_d} (in) and {d_d}->{d_r} (out); got {map_in.shape} and {map_out.shape}"
            )
        self.recipient, self.recipient_head, self.donor_head = recipient, recipient_head, donor_head
        self.map_in, self.map_out = map_in, map_out
        self.positions = None if positions is None else list(positions)
        self._donor = _head_weights(donor, donor_head)
        geo = recipient.geometry
        self._n_heads, self._head_dim = geo.n_heads, geo.head_dim
        self._handles: list = []
        self._keys = self._values = None  # [B, 1, S, hd_donor]: the donor head's cache
        self._delta = self._targets = None  # this pass's donor output [B, T, d_r], target tokens

    def __enter__(self) -> HeadTransplant:
        lm, layer = self.recipient.lm, self.recipient_head.layer
        out_proj = attn_out_proj(lm, layer)
        self._handles = [
            attention(lm, layer).register_forward_pre_hook(
                self.recipient.handing(self._on_attention), with_kwargs=True
            ),
            out_proj.register_forward_pre_hook(self._remove_own),
            out_proj.register_forward_hook(self._add_donor),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keys = self._values = self._delta = self._targets = None

    def _on_attention(self, step: Pass, module, args, kwargs) -> None:
        x = hidden_input(args, kwargs)  # [B, T, d_r]
        local = range(x.shape[1]) if self.positions is None else [t for t, _ in step.local(self.positions)]
        self._targets = torch.tensor(local, dtype=torch.long, device=x.device)
        self._delta = self._donor_output(step, x)

    def _donor_output(self, step: Pass, x: torch.Tensor) -> torch.Tensor:
        """The donor head on this pass's tokens, in recipient residual space: [B, T, d_r]."""
        d = self._donor
        mask, offset, n = step.mask, step.offset, x.shape[1]  # mask [B, offset + T]
        if offset == 0:
            self._keys = self._values = None
        elif self._keys is not None and self._keys.shape[2] > offset:  # a branch from an earlier point
            # (teacher forcing runs on a copy of the latent cache, then decoding continues from it)
            self._keys, self._values = self._keys[:, :, :offset], self._values[:, :, :offset]
        xd = self.map_in(x)  # [B, T, d_d]
        q, k, v = ((xd @ w.to(xd) + b.to(xd))[:, None] for w, b in ((d.w_q, d.b_q), (d.w_k, d.b_k), (d.w_v, d.b_v)))
        if d.rotary is not None:  # q, k: [B, 1, T, hd]
            cos, sin = d.rotary(xd, step.positions)  # [B, T, hd]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        self._keys = k if self._keys is None else torch.cat([self._keys, k], dim=2)
        self._values = v if self._values is None else torch.cat([self._values, v], dim=2)
        n_keys = self._keys.shape[2]
        if mask.shape != (x.shape[0], n_keys) or n_keys != offset + n:
            raise InterventionError("the transplanted head's cache is out of step with the pass (use CODIModel.step)")
        query_at = offset + torch.arange(n, device=x.device)[:, None]  # [T, 1]
        key_at = torch.arange(n_keys, device=x.device)[None]  # [1, S]
        visible = (key_at <= query_at)[None] & mask[:, None].bool()  # [B, T, S]
        visible |= (key_at == query_at)[None]  # a padding query sees itself: no empty row, no NaN
        out = F.scaled_dot_product_attention(q, self._keys, self._values, attn_mask=visible[:, None], scale=d.scaling)
        return self.map_out.linear(out[:, 0] @ d.w_o.to(xd))  # [B, 1, T, hd] -> [B, T, d_d] -> [B, T, d_r]

    def _remove_own(self, module, args):
        x = args[0].clone()  # [B, T, n_heads * head_dim]
        view = x.view(x.shape[0], x.shape[1], self._n_heads, self._head_dim)
        view[:, self._targets, self.recipient_head.head] = 0.0
        return (x, *args[1:])

    def _add_donor(self, module, args, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()  # [B, T, d_r]
        output[:, self._targets] += self._delta[:, self._targets]
        return output


# --- a run's transplants (the maps fitted once per run, their fit cached) -------------------


def fitted_maps(
    run: RunContext, donor: RunContext, recipient_layer: int, donor_layer: int
) -> tuple[LinearMap, LinearMap]:
    """(map_in, map_out) between `run`'s model and `donor`'s at those layers, fitted by least
    squares on paired states of the discovery problems (memoised by the run)."""

    def fit() -> tuple[LinearMap, LinearMap]:
        states = paired_states(run.codi, donor.codi, run.discovery, recipient_layer, donor_layer, run.batch_size)
        return states.maps()

    return run.remember(("transplant_maps", donor.name, recipient_layer, donor_layer), fit)


def transplant_hook(run: RunContext, head: Head, donor_fingerprint: str, donor_head: Head) -> HeadTransplant:
    """`head` of `run`'s model replaced by `donor_head` of the run's peer with those weights."""
    donor = run.peer(donor_fingerprint)
    map_in, map_out = fitted_maps(run, donor, head.layer, donor_head.layer)
    return HeadTransplant(run.codi, head, donor.codi, donor_head, map_in, map_out)
