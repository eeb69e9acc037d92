"""Quantize: the cache stores packed integers with per-group scales and zeros.

Composes with every other form (it is applied after them): fewer heads, a latent, a window
or a block-sparse ring decide *which* values the cache keeps, ``Quantize`` *how many bits* each
takes, and the savings multiply.  The layer becomes positional (tokens carry positions) and
its cache is a :class:`kvpass.runtime.cache.KVQuantLayer`; the meaning (which query sees which token
quantized) is :class:`kvpass.semantics.qformat.QuantRule`, tested against :mod:`kvpass.semantics.reference`.

``Quantize(format="fp8")``: each key and value is stored as one float8 e4m3 byte (scale 1,
saturating at ±448; the cache tensors are uint8 views of them), read back in the model's dtype:
vLLM's ``kv_cache_dtype="fp8"``, so that kvpass's runtime measures the quality vLLM serves.
No positions are needed (the layer stays non-positional unless another form makes it so).

What it saves: **memory** (``bits/16`` of a 16-bit cache plus scales: int8 with groups of 64
≈ 0.53, int4 ≈ 0.28, int2 ≈ 0.16; the residual buffer is a constant) — not compute: the
attention still reads every visible token.

Example:
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> base = kvpass.optimize(LlamaForCausalLM(cfg).eval())
    >>> small = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.Quantize(bits=4, group=16))
    >>> kvpass.kv_bytes_per_token(base), kvpass.kv_bytes_per_token(small)
    (512, 144)

    Per layer and token: 64 fp32 values (256 B) become 32 B of 4-bit codes, 16 B of key
    scales/zeros (per channel, shared by 16 tokens), 16 B of value scales/zeros (per token and
    head) and an 8-byte position.
"""

from __future__ import annotations

import dataclasses

from ...errors import SiteError
from ...graph.sites import AttentionSite
from ...ir.forms import Quantize
from ...ir.plan import LayerPlan
from ...runtime.attention import KVAttention
from ...semantics.qformat import QuantRule
from ..registry import register_pass

__all__ = ["apply", "rule"]


def rule(form: Quantize) -> QuantRule:
    """The :class:`QuantRule` a form asks for."""
    axis = {"per_channel": "channel", "per_token": "token"}
    return QuantRule(bits=form.bits, group=form.group, keys=axis[form.keys], values=axis[form.values],
                     residual=form.residual)


@register_pass(Quantize, positional=True, order=1)
def apply(att: KVAttention, site: AttentionSite, form: Quantize, ctx=None) -> LayerPlan:
    """Quantize what the layer stores (after the other forms: the latent or the kept heads)."""
    plan = att.kv_core.plan
    if not site.causal:
        raise SiteError(f"{site.name}: Quantize stores a KV cache, but this attention is bidirectional "
                        "(an encoder keeps no cache); leave it Full() or use Sparse")
    if form.format == "fp8":
        if plan.latent is not None or att.kv_core.latent is not None:
            raise SiteError(f"{site.name}: Quantize(format='fp8') on an MHC latent is not supported yet; "
                            "use int bits (Quantize(bits=8)) there")
        return dataclasses.replace(plan, kv_dtype="fp8_e4m3")
    r = rule(form)
    core = att.kv_core
    parts = core.stored_parts() if core.latent is not None or plan.latent is None else [(1, plan.latent), (1, 0)]
    for (_, width), what in zip(parts, ("stored keys" if plan.latent is None else "the MHC latent",
                                        "stored values")):
        why = r.check_width(width, what)
        if why:
            raise SiteError(f"{site.name}: Quantize(bits={form.bits}, group={form.group}): {why}")
    return dataclasses.replace(plan, quant=r, window=plan.kept_window(site.window))
