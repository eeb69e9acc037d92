"""kvpass's KV cache layers, living inside a Hugging Face ``Cache(layers=[...])``.

HF's ``generate()`` creates a ``DynamicCache``; each kvpass attention swaps the layer at its
index for a kvpass layer before the first token is stored (``ensure_layer``), so ``generate``
(greedy, sampling, beam search) keeps working while the storage is kvpass's own.  The bytes a
cache really holds are read back with :func:`cache_nbytes`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..semantics.layout import RingSpec, token_positions
from ..semantics.qformat import QTensor, QuantRule, dequantize, fake_quantize, quantize

__all__ = ["KVCacheLayer", "KVSlidingCacheLayer", "KVSharedLayer", "KVRingLayer", "KVQuantLayer",
           "ensure_layer", "cache_nbytes", "find_caches"]


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


def ensure_layer(cache: Cache, idx: int, source: int | None = None, ring: RingSpec | None = None,
                 quant: QuantRule | None = None):
    """The kvpass layer at ``idx`` of ``cache``, swapping in one where HF put its default.

    ``source``: for a cross-layer consumer, the producer's index (the slot then stores nothing).
    ``ring``: the slot stores tokens with their positions (:class:`KVRingLayer`); with
    ``quant`` as packed integers (:class:`KVQuantLayer`).
    """
    cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache: its self part
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
    if quant is not None and type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        new = KVQuantLayer(ring or RingSpec(), quant, getattr(layer, "sliding_window", None))
    elif ring is not None and type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
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
    """Bytes held by every layer's stored tensors (keys, values, a ring's positions; packed
    codes, scales, zeros and the full-precision residual of a quantized layer)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, KVQuantLayer):
            total += layer.nbytes()
            continue
        for name in ("keys", "values", "positions"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def find_caches(tree) -> list[Cache]:
    """Every HF ``Cache`` among a call's arguments (top level or one dict deep)."""
    vals = tree.values() if isinstance(tree, dict) else tree
    return [v for v in vals if isinstance(v, Cache)]






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


def _uniform(n_seen: Tensor) -> int | None:
    """The count every row shares, or None if rows differ (or there are none)."""
    return int(n_seen[0]) if n_seen.numel() and bool((n_seen == n_seen[0]).all()) else None


class _QPart:
    """One quantized tensor of a :class:`KVQuantLayer` (keys or values): packed codes
    [B, H, slots, W·bits/8], scale/zero [B, H, slots, W/group] (token axis) or
    [B, H, slots/unit, W] (channel axis), in the cache dtype."""

    def __init__(self, like: Tensor, rule: QuantRule, axis: str):
        B, H, _, W = like.shape
        self.rule, self.axis, self.width = rule, axis, W
        self.codes = torch.zeros(B, H, 0, W * rule.bits // 8, dtype=torch.uint8, device=like.device)
        sw = W // rule.group if axis == "token" else W
        self.scale = like.new_zeros(B, H, 0, sw)
        self.zero = like.new_zeros(B, H, 0, sw)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.codes, self.scale, self.zero

    def grow(self, slots: int) -> None:
        B, H, n, Wp = self.codes.shape
        if slots <= n:
            return
        self.codes = torch.cat([self.codes, self.codes.new_zeros(B, H, slots - n, Wp)], 2)
        rows = slots if self.axis == "token" else slots // self.rule.unit
        extra = rows - self.scale.shape[2]
        self.scale = torch.cat([self.scale, self.scale.new_zeros(B, H, extra, self.scale.shape[3])], 2)
        self.zero = torch.cat([self.zero, self.zero.new_zeros(B, H, extra, self.zero.shape[3])], 2)

    def qtensor(self) -> QTensor:
        r = self.rule
        group = r.group if self.axis == "token" else r.unit
        return QTensor(self.codes, self.scale, self.zero, r.bits, group, self.axis)

    def dequantized(self) -> Tensor:
        if self.axis == "channel" and self.codes.shape[2] % self.rule.unit:
            raise AssertionError("channel-axis store must hold whole units")
        return dequantize(self.qtensor())

    def encode(self, x: Tensor, pos: Tensor, base: Tensor):
        """-> (x̂ of every token, a writer ``write(bi, ti, slot)`` storing token ti of row bi)."""
        r = self.rule
        if self.axis == "token":
            qt = quantize(x, r.bits, r.group, "token")
            hat = dequantize(qt, x.dtype)

            def write(bi, ti, slot):
                self.codes[bi, :, slot] = qt.codes[bi, :, ti]
                self.scale[bi, :, slot] = qt.scale[bi, :, ti]
                self.zero[bi, :, slot] = qt.zero[bi, :, ti]
            return hat, write
        hat, qt, local = fake_quantize(x, pos, r.bits, r.unit, "channel", base)

        def write(bi, ti, slot):
            li = local[bi, ti]
            self.codes[bi, :, slot] = qt.codes[bi, :, li]
            self.scale[bi, :, slot // r.unit] = qt.scale[bi, :, li // r.unit]
            self.zero[bi, :, slot // r.unit] = qt.zero[bi, :, li // r.unit]
        return hat, write

    def select(self, fn) -> None:
        self.codes, self.scale, self.zero = fn(self.codes), fn(self.scale), fn(self.zero)


class KVQuantLayer(KVRingLayer):
    """Keys and values stored as packed integers with scales and zeros (:mod:`kvpass.semantics.qformat`).

    Slots work as in :class:`KVRingLayer` (a ring buffer when ``spec`` is bounded; the plan
    aligns ``pinned`` and ``ring`` to the rule's unit so a per-channel group's slots are
    contiguous).  Tokens not yet flushed (positions ``>= rule.flushed(n)``: the newest
    ``residual`` tokens and an incomplete unit) wait in a full-precision buffer of
    ``rule.buffer`` slots.  ``update`` returns every key the new queries may see, each in full
    precision and as quantized (the rule picks per query), then flushes what it must.

    Memory: ``slots × (codes + scales + 8-byte position)`` + the fixed residual buffer, all
    counted by :meth:`nbytes` (what :func:`cache_nbytes` reads).
    """

    def __init__(self, spec: RingSpec, rule: QuantRule, model_window: int | None = None):
        super().__init__(spec, model_window)
        self.rule = rule
        self.kq = self.vq = None
        self.rk = self.rv = self.rpos = None
        self.last_positions: Tensor | None = None  # positions of the last update's new tokens
        self._n_int: int | None = 0  # tokens seen, when every row has seen as many (else None)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = self.values = None  # nothing stored in full precision but the residual
        r = self.rule
        self.kq = _QPart(key_states, r, r.keys)
        self.vq = _QPart(value_states, r, r.values) if value_states.shape[-1] else None
        B, H, _, D = key_states.shape
        self.rk = key_states.new_zeros(B, H, r.buffer, D)
        self.rv = value_states.new_zeros(B, value_states.shape[1], r.buffer, value_states.shape[-1])
        self.rpos = torch.full((B, r.buffer), -1, dtype=torch.long, device=self.device)

    def stored(self) -> tuple[Tensor, Tensor]:
        """The quantized slots, dequantized (keys, values) -- what a kernel reads in registers."""
        k = self.kq.dequantized()
        v = self.vq.dequantized() if self.vq is not None else k.new_zeros(*k.shape[:3], 0)
        return k, v

    def update(self, key_states: Tensor, value_states: Tensor, valid: Tensor | None = None, *args,
               lazy: bool = False, **kwargs):
        """-> (keys, values, q_pos, k_pos, keys_hat, values_hat) to attend with.

        ``lazy``: store only and return None (a decode step that reads the packed cache
        directly, :meth:`current`); nothing is dequantized, and new tokens are quantized only
        when a unit is flushed."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, S, _ = key_states.shape
        if lazy and S == 1 and self._n_int is not None and self._append(key_states, value_states, valid):
            return None
        if valid is None:
            valid = torch.ones(B, S, dtype=torch.bool, device=key_states.device)
        rule, spec = self.rule, self.spec
        pos = token_positions(valid, self.n_seen)
        q_old = rule.flushed(self.n_seen)
        n_new = self.n_seen + valid.sum(1)
        q_new = rule.flushed(n_new)
        ok = torch.cat([self.rk, key_states.to(self.rk.dtype)], 2)  # open tokens: residual + new
        ov = torch.cat([self.rv, value_states.to(self.rv.dtype)], 2)
        opos = torch.cat([self.rpos, pos], 1)
        flushing = bool((q_new > q_old).any())
        step = None
        if flushing or not lazy:
            k_hat, write_k = self.kq.encode(ok, opos, q_old)
            if self.vq is not None:
                v_hat, write_v = self.vq.encode(ov, opos, q_old)
            else:
                v_hat, write_v = ov, None
        if not lazy:
            sk, sv = self.stored()
            keys, values = torch.cat([sk, ok], 2), torch.cat([sv, ov], 2)
            step = (keys, values, pos, torch.cat([self.positions, opos], 1),
                    torch.cat([sk, k_hat], 2), torch.cat([sv, v_hat], 2))
        # flush: open tokens now below flushed(n), that future queries can still see
        self.cumulative_length += S
        self.n_seen = n_new
        if flushing:
            flush = (opos >= 0) & (opos < q_new[:, None])
            if spec.ring is not None:
                flush = flush & ((opos < spec.pinned) | (opos >= spec.keep_from(n_new)[:, None]))
            slots = int(q_new.max())
            if spec.capacity is not None:
                slots = min(slots, spec.capacity)
            self._grow(slots)
            bi, ti = flush.nonzero(as_tuple=True)
            if bi.numel():
                p = opos[bi, ti]
                slot = spec.slot(p)
                write_k(bi, ti, slot)
                if write_v is not None:
                    write_v(bi, ti, slot)
                self.positions[bi, slot] = p
        # the new residual: open tokens at or above flushed(n), at index pos - flushed(n)
        stay = (opos >= q_new[:, None])
        self.rk = torch.zeros_like(self.rk)
        self.rv = torch.zeros_like(self.rv)
        self.rpos = torch.full_like(self.rpos, -1)
        bi, ti = stay.nonzero(as_tuple=True)
        if bi.numel():
            idx = opos[bi, ti] - q_new[bi]
            self.rk[bi, :, idx] = ok[bi, :, ti]
            self.rv[bi, :, idx] = ov[bi, :, ti]
            self.rpos[bi, idx] = opos[bi, ti]
        self.step = step
        self.last_positions = pos
        self._n_int = _uniform(n_new)
        return step

    def _append(self, k: Tensor, v: Tensor, valid: Tensor | None) -> bool:
        """A lazy decode step that flushes nothing, when every row has seen the same ``n``
        tokens and the new one is real: the token goes to residual slot ``n - flushed(n)``,
        which the general path's rebuild would give it (the residual keeps its tokens at
        ``pos - flushed``, and ``flushed`` does not move).  -> False where that does not hold
        (the general path runs)."""
        n, rule = self._n_int, self.rule
        if rule.flushed(n + 1) != rule.flushed(n) or (valid is not None and not bool(valid.all())):
            return False
        i = n - rule.flushed(n)
        self.rk[:, :, i] = k[:, :, 0].to(self.rk.dtype)
        self.rv[:, :, i] = v[:, :, 0].to(self.rv.dtype)
        self.rpos[:, i] = n
        self.cumulative_length += 1
        self.n_seen = self.n_seen + 1
        self._n_int = n + 1
        self.last_positions = torch.full((k.shape[0], 1), n, dtype=torch.long, device=k.device)
        self.step = None
        return True

    def current(self) -> tuple[Tensor, Tensor, Tensor]:
        """(keys, values, k_pos) of the cache as it is: the store dequantized, then the residual
        -- what the newest query sees (:class:`kvpass.semantics.qformat.QuantRule`)."""
        sk, sv = self.stored()
        return (torch.cat([sk, self.rk], 2), torch.cat([sv, self.rv], 2),
                torch.cat([self.positions, self.rpos], 1))

    def _grow(self, slots: int) -> None:
        n = self.positions.shape[1]
        if slots <= n:
            return
        self.kq.grow(slots)
        if self.vq is not None:
            self.vq.grow(slots)
        B = self.positions.shape[0]
        self.positions = torch.cat([self.positions, self.positions.new_full((B, slots - n), -1)], 1)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        ts = [*self.kq.tensors(), self.positions, self.rk, self.rv, self.rpos]
        ts += list(self.vq.tensors()) if self.vq is not None else []
        return sum(t.numel() * t.element_size() for t in ts)

    def _batch(self, fn) -> None:
        if self.is_initialized:
            self.kq.select(fn)
            if self.vq is not None:
                self.vq.select(fn)
            self.rk, self.rv, self.rpos = fn(self.rk), fn(self.rv), fn(self.rpos)
            self.positions, self.n_seen = fn(self.positions), fn(self.n_seen)
            self._n_int = _uniform(self.n_seen)
        self.step = None

    def reset(self) -> None:
        super().reset()
        self.kq = self.vq = self.rk = self.rv = self.rpos = None
        self._n_int = 0
