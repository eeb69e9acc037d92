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

from ...errors import SiteError
from ...graph.sites import AttentionSite
from ...ir.forms import Window
from ...ir.plan import LayerPlan
from ...runtime.attention import KVAttention
from ..registry import register_pass

__all__ = ["apply"]


@register_pass(Window, positional=True)
def apply(att: KVAttention, site: AttentionSite, form: Window, ctx=None) -> LayerPlan:
    """Give the layer the window ``form.size`` with ``form.sinks`` sinks (no weights change)."""
    plan = att.kv_core.plan
    if not site.causal:
        raise SiteError(f"{site.name}: Window needs causal attention, but this attention is "
                        "bidirectional (every query sees later tokens); use Sparse(local=...) instead")
    return dataclasses.replace(plan, window=form.size, sinks=form.sinks)












