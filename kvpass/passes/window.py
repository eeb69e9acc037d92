"""Window: each query sees its last ``size`` tokens plus the first ``sinks`` (attention sinks).

The layer becomes *positional* (see :class:`kvpass.lower.LayerPlan`): prefill attends under
the window rule on token positions, and the cache is a ring buffer of ``size + sinks`` slots
(:class:`kvpass.cache.KVRingLayer`) — memory stays constant however long generation runs.
Positions count real tokens (left padding does not shift windows or sinks), and keys keep the
RoPE of their original positions (RoPE is applied before the cache, as in the model).

What it saves: **memory** (cache of ``size + sinks`` tokens instead of all) and **compute**
(each query reads at most ``size + sinks`` keys; kernels skip the tiles outside).

A layer the model already slides (Gemma 3's local layers, Mistral) keeps its own window under
``Full()`` / ``SharedKV``; a ``Window`` form replaces it with the policy's window and sinks.
Windows need causal attention; bidirectional encoders can use :class:`kvpass.Sparse`.

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

from ..errors import SiteError
from ..lower import KVAttention, LayerPlan
from ..policy import Window
from ..sites import AttentionSite

__all__ = ["apply"]


def apply(att: KVAttention, site: AttentionSite, form: Window, ctx=None) -> LayerPlan:
    """Give the layer the window ``form.size`` with ``form.sinks`` sinks (no weights change)."""
    plan = att.kv_core.plan
    if not site.causal:
        raise SiteError(f"{site.name}: Window needs causal attention, but this attention is "
                        "bidirectional (every query sees later tokens); use Sparse(local=...) instead")
    if plan.pattern is not None:
        raise SiteError(f"{site.name}: Window and Sparse cannot be composed on one layer; "
                        "use Sparse(local=..., global_tokens=...) for a block-aligned window with globals")
    return dataclasses.replace(plan, window=form.size, sinks=form.sinks)


def far_attention(model, ids, window: int, sinks: int = 0, last: int = 32) -> dict[int, float]:
    """Per layer: the attention mass the last ``last`` queries of each sequence put on keys a
    ``Window(window, sinks)`` would hide (mean over heads and queries; 0 = the window loses
    nothing).  ``model``: an original or optimised model; ``ids``: [N, S] calibration token ids,
    S well beyond ``window``.  Layers with a large value are the ones to keep full in a hybrid.

    Example:
        >>> import torch, kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> mass = far_attention(LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 40)), window=8)
        >>> sorted(mass), all(0 < m < 1 for m in mass.values())
        ([0, 1], True)
    """
    import torch

    from ..api import optimize
    from ..lower import KVCore

    if not any(isinstance(m, KVCore) for m in model.modules()):
        model = optimize(model)
    cores = [m for m in model.modules() if isinstance(m, KVCore)]
    sums: dict[int, list[float]] = {}

    def tap_for(core):
        def tap(q, k, v):
            if k is None:
                return
            s = core.spec
            kk = k.index_select(1, torch.tensor(core.plan.head_map or s.kv_head_map, device=k.device))
            n, m = k.shape[2], min(last, q.shape[2])
            scores = (q[:, :, -m:].float() @ kk.float().transpose(-1, -2)) * s.scale
            qp = torch.arange(n - m, n, device=q.device)[:, None]
            kp = torch.arange(n, device=q.device)[None, :]
            probs = scores.masked_fill(kp > qp, float("-inf")).softmax(-1)
            hidden = ((qp - kp >= window) & (kp >= sinks)).float()
            sums.setdefault(core.layer_idx, []).append(float((probs * hidden).sum(-1).mean()))
        return tap

    for c in cores:
        c.taps.append(tap_for(c))
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None])
    finally:
        for c in cores:
            c.taps.pop()
    return {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}


def hybrid_layers(mass: dict[int, float], full_layers: int) -> list[int]:
    """The ``full_layers`` layers with the most far attention (see :func:`far_attention`).

    >>> hybrid_layers({0: 0.1, 1: 0.6, 2: 0.3}, 2)
    [1, 2]
    """
    return sorted(sorted(mass, key=mass.get, reverse=True)[:full_layers])
