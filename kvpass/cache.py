"""kvpass's KV cache layers, living inside a Hugging Face ``Cache(layers=[...])``.

HF's ``generate()`` creates a ``DynamicCache``; each kvpass attention swaps the layer at its
index for a kvpass layer before the first token is stored (``ensure_layer``), so ``generate``
(greedy, sampling, beam search) keeps working while the storage is kvpass's own.  The bytes a
cache really holds are read back with :func:`cache_nbytes`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["KVCacheLayer", "KVSlidingCacheLayer", "KVSharedLayer", "ensure_layer", "cache_nbytes", "find_caches"]


class KVCacheLayer(DynamicLayer):
    """Full-length storage of the kept K/V heads: [B, Hkv, S, D] each."""

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class KVSlidingCacheLayer(DynamicSlidingWindowLayer):
    """A model's own sliding window (e.g. Gemma 3's local layers), kept as the model had it."""

    nbytes = KVCacheLayer.nbytes


class KVSharedLayer(DynamicLayer):
    """A cross-layer consumer's slot: stores nothing, reports its producer's sizes (masks)."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.source.get_mask_sizes(query_length)

    def nbytes(self) -> int:
        return 0


def ensure_layer(cache: Cache, idx: int, source: int | None = None):
    """The kvpass layer at ``idx`` of ``cache``, swapping in one where HF put its default.

    ``source``: for a cross-layer consumer, the producer's index (the slot then stores nothing).
    """
    while len(cache.layers) <= max(idx, source or 0):
        cache.layers.append(DynamicLayer())
    if source is not None:
        if not isinstance(cache.layers[idx], KVSharedLayer):
            cache.layers[idx] = KVSharedLayer(ensure_layer(cache, source))
        return cache.layers[idx]
    layer = cache.layers[idx]
    if isinstance(layer, (KVCacheLayer, KVSlidingCacheLayer)):
        return layer
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        return layer  # a cache filled elsewhere: use as it is
    if type(layer) is DynamicSlidingWindowLayer:
        new = KVSlidingCacheLayer(sliding_window=layer.sliding_window)
    elif type(layer) is DynamicLayer:
        new = KVCacheLayer()
    else:
        return layer
    cache.layers[idx] = new
    return new


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by every layer's stored tensors."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def find_caches(tree) -> list[Cache]:
    """Every HF ``Cache`` among a call's arguments (top level or one dict deep)."""
    vals = tree.values() if isinstance(tree, dict) else tree
    return [v for v in vals if isinstance(v, Cache)]
