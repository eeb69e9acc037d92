"""kvpass's KV cache layers, living inside a Hugging Face ``Cache(layers=[...])``.

HF's ``generate()`` creates a ``DynamicCache``; each kvpass attention swaps the layer at its
index for a kvpass layer before the first token is stored (``ensure_layer``), so ``generate``
(greedy, sampling, beam search) keeps working while the storage is kvpass's own.  The bytes a
cache really holds are read back with :func:`cache_nbytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["KVCacheLayer", "KVSlidingCacheLayer", "KVSharedLayer", "KVRingLayer", "RingSpec", "ensure_layer",
           "cache_nbytes", "find_caches", "token_positions"]


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
        self.is_sliding = getattr(source, "is_sliding", False)

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.source.get_mask_sizes(query_length)

    def nbytes(self) -> int:
        return 0


def ensure_layer(cache: Cache, idx: int, source: int | None = None, ring: RingSpec | None = None):
    """The kvpass layer at ``idx`` of ``cache``, swapping in one where HF put its default.

    ``source``: for a cross-layer consumer, the producer's index (the slot then stores nothing).
    ``ring``: the slot stores tokens with their positions (:class:`KVRingLayer`).
    """
    while len(cache.layers) <= max(idx, source or 0):
        cache.layers.append(DynamicLayer())
    if source is not None:
        if not isinstance(cache.layers[idx], KVSharedLayer):
            cache.layers[idx] = KVSharedLayer(ensure_layer(cache, source))
        return cache.layers[idx]
    layer = cache.layers[idx]
    if isinstance(layer, (KVCacheLayer, KVSlidingCacheLayer, KVRingLayer)):
        return layer
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        return layer  # a cache filled elsewhere: use as it is
    if ring is not None and type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        new = KVRingLayer(ring, getattr(layer, "sliding_window", None))
    elif type(layer) is DynamicSlidingWindowLayer:
        new = KVSlidingCacheLayer(sliding_window=layer.sliding_window)
    elif type(layer) is DynamicLayer:
        new = KVCacheLayer()
    else:
        return layer
    cache.layers[idx] = new
    return new


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by every layer's stored tensors (keys, values, and a ring's positions)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "positions"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def find_caches(tree) -> list[Cache]:
    """Every HF ``Cache`` among a call's arguments (top level or one dict deep)."""
    vals = tree.values() if isinstance(tree, dict) else tree
    return [v for v in vals if isinstance(v, Cache)]


@dataclass(frozen=True)
class RingSpec:
    """What a :class:`KVRingLayer` keeps: ``pinned`` first tokens (attention sinks, global
    blocks) and a ring of ``ring`` slots for the most recent tokens (None: keep everything).
    ``block``: evict whole blocks (block-sparse local bands), else single tokens (windows)."""

    pinned: int = 0
    ring: int | None = None
    block: int | None = None

    @property
    def capacity(self) -> int | None:
        return None if self.ring is None else self.pinned + self.ring

    def keep_from(self, n_seen: Tensor) -> Tensor:
        """Per row, the first position still visible to future queries in the recent band."""
        if self.block is None:
            return n_seen - self.ring
        last = (n_seen - 1).clamp(min=0) // self.block
        return (last + 1) * self.block - self.ring

    def slot(self, pos: Tensor) -> Tensor:
        """Slot of a (non-negative) token position: pinned tokens stay, the rest rotate."""
        if self.ring is None:
            return pos
        return torch.where(pos < self.pinned, pos, self.pinned + (pos - self.pinned) % self.ring)


def token_positions(valid: Tensor, n_seen: Tensor | None = None) -> Tensor:
    """Positions of new tokens counting only real ones (padding -> -1). [B, S] int64.

    >>> token_positions(torch.tensor([[False, True, True], [True, True, True]]))
    tensor([[-1,  0,  1],
            [ 0,  1,  2]])
    """
    pos = valid.long().cumsum(1) - 1
    if n_seen is not None:
        pos = pos + n_seen[:, None]
    return pos.masked_fill(~valid, -1)


class KVRingLayer(DynamicLayer):
    """Tokens stored with their positions: a ring buffer for windows and local bands.

    ``keys``/``values`` are [B, Hkv, slots, D] and ``positions`` [B, slots] (``-1`` = empty slot
    or padding).  Positions count real tokens per row, so left padding never shifts a window
    or takes a sink's place.  With a bounded :class:`RingSpec` the slots never exceed
    ``pinned + ring`` however long generation runs: token ``p`` overwrites ``p - ring``, which
    no later query can see.  ``update`` returns every key the new queries may need (stored +
    new, with positions) and then stores only what future queries can still see.

    To HF (``generate``, mask creation) the layer looks like the one it replaced:
    ``get_seq_length`` is the number of tokens seen, ``get_mask_sizes`` and ``is_sliding``
    follow the model's own layer type (``model_window`` for a model's sliding layer).
    """

    def __init__(self, spec: RingSpec, model_window: int | None = None):
        super().__init__()
        self.spec = spec
        self.model_window = model_window
        self.is_sliding = model_window is not None
        self.cumulative_length = 0
        self.positions: Tensor | None = None
        self.n_seen: Tensor | None = None
        self.step: tuple | None = None  # this step's (keys, values, q_pos, k_pos), for consumers

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.positions = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        self.n_seen = torch.zeros(B, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, valid: Tensor | None = None, *args, **kwargs):
        """Store new tokens. -> (keys, values, q_pos [B, Sq], k_pos [B, Sk]) to attend with."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, S, _ = key_states.shape
        if valid is None:
            valid = torch.ones(B, S, dtype=torch.bool, device=key_states.device)
        pos = token_positions(valid, self.n_seen)
        k_all = torch.cat([self.keys, key_states], dim=2)
        v_all = torch.cat([self.values, value_states], dim=2)
        kp_all = torch.cat([self.positions, pos], dim=1)
        self.cumulative_length += S
        self.n_seen = self.n_seen + valid.sum(1)
        spec = self.spec
        if spec.ring is None:
            self.keys, self.values, self.positions = k_all, v_all, kp_all
        else:
            self._write(key_states, value_states, pos, valid)
        self.step = (k_all, v_all, pos, kp_all)
        return self.step

    def _write(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> None:
        spec = self.spec
        slots = min(spec.capacity, int(self.n_seen.max()))
        grow = slots - self.keys.shape[2]
        if grow > 0:  # slot(p) == p below capacity, so growing appends empty slots
            B, H, _, D = self.keys.shape
            self.keys = torch.cat([self.keys, self.keys.new_zeros(B, H, grow, D)], dim=2)
            self.values = torch.cat([self.values, self.values.new_zeros(B, H, grow, self.values.shape[-1])], 2)
            self.positions = torch.cat([self.positions, self.positions.new_full((B, grow), -1)], dim=1)
        keep = valid & ((pos < spec.pinned) | (pos >= spec.keep_from(self.n_seen)[:, None]))
        bi, ti = keep.nonzero(as_tuple=True)
        p = pos[bi, ti]
        slot = spec.slot(p)
        self.keys[bi, :, slot] = k[bi, :, ti]
        self.values[bi, :, slot] = v[bi, :, ti]
        self.positions[bi, slot] = p

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        w = self.model_window
        if w is None:
            return self.cumulative_length + query_length, 0
        offset = max(self.cumulative_length - w + 1, 0)
        if self.cumulative_length >= w:
            return w - 1 + query_length, offset
        return self.cumulative_length + query_length, offset

    def get_max_length(self) -> int:
        return -1 if self.spec.capacity is None else self.spec.capacity

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    def _batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.positions, self.n_seen = fn(self.positions), fn(self.n_seen)
        self.step = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("kvpass ring-buffer cache layers cannot be cropped (evicted tokens "
                                      "are gone); assisted decoding needs a Full() layer")

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.n_seen = self.step = None
        self.is_initialized = False
        self.cumulative_length = 0
