"""Window: each query sees its last ``size`` tokens plus the first ``sinks`` (attention sinks).

The layer becomes *positional* (see :class:`kvpass.ir.plan.LayerPlan`): prefill attends under
the window rule on token positions, and the cache is a ring buffer of ``size + sinks`` slots
(:class:`kvpass.runtime.cache.KVRingLayer`) — memory stays constant however long generation runs.
Positions count real tokens (left padding does not shift windows or sinks), and keys keep the
RoPE of their original positions (RoPE is applied before the cache, as in the model).

What it saves: **memory** (cache of ``size + sinks`` tokens instead of all) and **compute**
(each query reads at most ``size + sinks`` keys; kernels skip the tiles outside).

A layer the model already slides (Gemma 3's local layers, Mistral) keeps its own window under
``Full()`` / ``SharedKV``; a ``Window`` form replaces it with the policy's window and sinks.
Windows need causal attention; bidirectional encoders can use :class:`kvpass.Sparse`.

Sink logits (``Window(W, sinks=S, sink="logit")``, what vLLM's attention can run): no tokens are
pinned; one logit per query head joins every softmax row with value zero.  :func:`fit_sink_logits`
calibrates it per head so that the layer's attention output with the logit matches its output
with the first ``S`` tokens as sinks, on the calibration text's rows beyond the window (chunks
of twice the window: :func:`kvpass.transform.registry.calibration_shape`).  With a window, a row's output is
``N_w / (Z_w + e^σ)`` for its window's unnormalised sums ``N_w, Z_w``, so each head's loss is
a cheap function of one number: a grid over σ, then a finer one around the best.

Composes with ``SharedKV`` (fewer heads in each slot: the savings multiply) and, in the
policy, with per-layer choices (e.g. full attention on a few layers, windows elsewhere).

Example:
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.Window(size=8, sinks=2))
    >>> out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
    ...                  return_dict_in_generate=True)
    >>> [layer.keys.shape[2] for layer in out.cache.layers]  # 10 slots, not 22
    [10, 10]
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import SiteError
from ...graph.sites import AttentionSite
from ...ir.forms import Window
from ...ir.plan import LayerPlan
from ...runtime.attention import KVAttention
from ..calibrate import run_calls
from ..registry import register_pass

__all__ = ["apply", "fit_sink_logits", "sink_logit_loss", "sink_logits_for", "best_logits"]


def _structural(form: Window, att) -> Window:
    """Checkpoints rebuild a logit-sink layer with an uncalibrated logit (the file holds it)."""
    return dataclasses.replace(form, sinks=0) if form.sink == "logit" else form


@register_pass(Window, positional=True, calibrates=lambda f: f.sink == "logit" and f.sinks > 0,
               structural=_structural, context=lambda f: 2 * (f.size + f.sinks) if f.sink == "logit" else 0)
def apply(att: KVAttention, site: AttentionSite, form: Window, ctx=None) -> LayerPlan:
    """Give the layer the window ``form.size`` with ``form.sinks`` sinks (no weights change;
    logit sinks add the layer's ``kv_core.sink_logits`` parameter, calibrated when
    ``form.sinks > 0``)."""
    core = att.kv_core
    plan = core.plan
    if not site.causal:
        raise SiteError(f"{site.name}: Window needs causal attention, but this attention is "
                        "bidirectional (every query sees later tokens); use Sparse(local=...) instead")
    if form.sink == "logit":
        if getattr(site, "sink_logits", None) is not None:
            raise SiteError(f"{site.name}: Window(sink='logit') on a layer that already has sink logits "
                            f"({site.sink_logits}); use sink='token' (or sinks=0) here")
        dtype = next((p.dtype for p in att.parameters() if p.is_floating_point()), torch.float32)
        logits = torch.zeros(site.num_heads, dtype=torch.float32)
        if form.sinks > 0:
            logits = fit_sink_logits(att, form, ctx.calls)
        core.register_parameter("sink_logits", nn.Parameter(logits.to(dtype), requires_grad=False))
    return dataclasses.replace(plan, window=form.size, sinks=form.pinned)


def _capture(att: KVAttention, calls: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    """(q [B,H,S,D], k, v [B,H,S,D] as each query head reads them) of the layer's calls."""
    core, got = att.kv_core, []

    def tap(q, k, v):
        k, v = core._select(k, v) if core.plan.keep is not None else (k, v)
        head_map = torch.tensor(core.plan.head_map or core.spec.kv_head_map, device=k.device)
        got.append((q.detach().float(), k.detach().float().index_select(1, head_map),
                    v.detach().float().index_select(1, head_map)))

    core.taps.append(tap)
    try:
        with torch.no_grad():
            run_calls(att, calls)
    finally:
        core.taps.remove(tap)
    return got


def _row_sums(q, k, v, *, scale, softcap, size: int, sinks: int, q_offset: int = 0):
    """Per row: window sums (N_w [B,H,Sq,D], Z_w [B,H,Sq]), the token-sink target output and
    the row maximum the sums are relative to.  ``q`` holds queries at positions
    ``q_offset, q_offset + 1, ...``; ``k``/``v`` every position from 0, one head per query head."""
    Sq, Sk = q.shape[2], k.shape[2]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(q_offset, q_offset + Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    win = (j <= i) & (i - j < size)
    extra = (j <= i) & ~win & (j < sinks)
    s = s.masked_fill(~(win | extra), float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m[..., None])
    pw = p * win
    zw, nw = pw.sum(-1), pw @ v
    target = (p @ v) / p.sum(-1, keepdim=True)
    return nw, zw, target, m


def best_logits(parts: list[tuple], heads: int) -> torch.Tensor:
    """The per-head σ minimising :func:`sink_logit_loss` summed over ``parts`` (outputs of
    :func:`_row_sums`): a grid from -20 to 40, then three finer grids around the best."""

    def loss(sigma):  # sigma [G, H] -> [G, H], a few grid points at a time (memory: G x rows x D)
        return torch.cat([sum(sink_logit_loss(g, *p) for p in parts) for g in sigma.split(4)])

    grid = torch.linspace(-20.0, 40.0, 121)
    best = grid[loss(grid[:, None].expand(-1, heads)).argmin(0)]
    for step in (0.5, 0.05, 0.005):
        fine = best[None, :] + step * torch.arange(-10, 11, dtype=torch.float32)[:, None]
        best = fine.gather(0, loss(fine).argmin(0)[None])[0]
    return best


def sink_logits_for(q, k, v, *, scale, softcap, size: int, sinks: int, q_offset: int = 0) -> torch.Tensor:
    """σ [H] fitted on one batch: ``q`` [B,H,Sq,D] at positions from ``q_offset``, ``k``/``v``
    [B,H,Sk,D] (already one head per query head) from position 0."""
    part = _row_sums(q.float(), k.float(), v.float(), scale=scale, softcap=softcap, size=size, sinks=sinks,
                     q_offset=q_offset)
    return best_logits([part], q.shape[1])


def sink_logit_loss(sigma: torch.Tensor, nw, zw, target, m) -> torch.Tensor:
    """Squared output error per head ([G, H] for ``sigma`` [G, H]) of logit sinks ``sigma``
    against the token-sink target (rows summed over batch and positions)."""
    e = torch.exp(sigma[:, None, :, None] - m[None])  # [G, B, H, S]
    out = nw[None] / (zw[None] + e)[..., None]
    return ((out - target[None]) ** 2).sum(-1).sum((1, 3))


def fit_sink_logits(att: KVAttention, form: Window, calls: list[dict] | None) -> torch.Tensor:
    """Per query head, the sink logit σ whose attention (window ``form.size``, no sink tokens,
    σ in every row's softmax) best matches the layer's attention with the first
    ``form.sinks`` tokens as sinks, on ``calls`` (least squares over the outputs of the rows
    beyond the window, where the sink tokens are out of sight: nearer rows see the sink tokens
    themselves and would rather have no logit, but at serving lengths they are few; fitting
    them too was measured worse: SmolLM2, Window(512, 4) at 2048 tokens, +23.3% perplexity
    against +18.7% far rows only)."""
    if not calls:
        raise SiteError(f"{att.site.name}: Window(sink='logit', sinks={form.sinks}) calibrates its sink logits: "
                        "pass calibration text (or use sinks=0 for a logit trained by healing only)")
    spec = att.kv_core.spec
    far = form.size + form.sinks  # rows from here on no longer see the sink tokens in their window
    parts = []
    for q, k, v in _capture(att, calls):
        if q.shape[2] > far:
            parts.append(_row_sums(q[:, :, far:], k, v, scale=spec.scale, softcap=spec.softcap, size=form.size,
                                   sinks=form.sinks, q_offset=far))
    if not parts:
        raise SiteError(f"{att.site.name}: Window(sink='logit') calibration needs sequences longer than "
                        f"{far} tokens (window + sinks); the calibration calls are shorter")
    return best_logits(parts, spec.num_heads)












