"""Sparse: block-sparse attention, BigBird / Longformer style (:mod:`kvpass.semantics.block_sparse`).

``Sparse(block=B, local=L, global_tokens=G, random=R, seed=s)``: per query block, the ``L``
nearest key blocks (causal: its own and the ``L - 1`` before it; bidirectional: ``|Δ| < L``),
the first ``⌈G / B⌉`` blocks (global tokens are rounded up to whole blocks; in bidirectional
attention those blocks' queries also see everything), and ``R`` random blocks drawn with
``seed``.  Causality, padding and empty slots are applied per token from positions.

The pattern is one :class:`~kvpass.semantics.block_sparse.BlockTable` read by both the reference and the
generated kernels.  What each setting saves:

- causal, ``random=0``: **memory and compute** — the cache keeps only the global blocks and
  the last ``L`` blocks (a ring buffer evicting whole blocks), each query reads ``≤ (G/B + L)``
  blocks.
- causal, ``random>0``: **compute only** — a random block may point anywhere back, so the
  cache keeps every token; kernels read only the listed blocks.
- bidirectional (encoders): **compute only** — no cache; kernels skip unlisted blocks.
  (The plain-torch reference, used on CPU, computes the dense scores and masks them.)

Example:
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.Sparse(block=4, local=2, global_tokens=4))
    >>> out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
    ...                  return_dict_in_generate=True)
    >>> [layer.keys.shape[2] for layer in out.cache.layers]  # 1 global + 2 local blocks
    [12, 12]
"""

from __future__ import annotations

import dataclasses

from ...graph.sites import AttentionSite
from ...ir.forms import Sparse
from ...ir.plan import LayerPlan
from ...runtime.attention import KVAttention
from ...semantics.block_sparse import SparsePattern
from ..registry import register_pass

__all__ = ["apply", "pattern_of"]


def pattern_of(site: AttentionSite, form: Sparse) -> SparsePattern:
    """The block pattern ``form`` gives ``site`` (causal or bidirectional as the site is)."""
    return SparsePattern(block=form.block, local=form.local, global_blocks=-(-form.global_tokens // form.block),
                         random=form.random, seed=form.seed, causal=site.causal)


@register_pass(Sparse, positional=True)
def apply(att: KVAttention, site: AttentionSite, form: Sparse, ctx=None) -> LayerPlan:
    """Give the layer the block pattern of ``form`` (no weights change)."""
    plan = att.kv_core.plan
    return dataclasses.replace(plan, pattern=pattern_of(site, form))
