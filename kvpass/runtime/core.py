"""KVCore: one layer's cache traffic and attention, for the forms its plan holds."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import kernels
from ..errors import SiteError
from ..ir.forms import Form
from ..ir.plan import CoreSpec, LayerPlan
from ..semantics import reference
from ..semantics.layout import RingSpec, token_positions
from ..semantics.qformat import fake_quantize
from .cache import ensure_layer

__all__ = ["KVCore", "stride_order"]


class KVCore(nn.Module):
    """Cache traffic + attention for one layer, for the form ``forms``.

    ``forward(q [B,H,Sq,D], k [B,Hkv,Sq,D], v [B,Hkv,Sq,D], mask)`` -> [B,H,Sq,D].
    A cross-layer *consumer* (``producer`` set) stores nothing and reads the producer's cache.
    ``taps`` are callbacks ``tap(q, k, v)`` (calibration statistics).
    """

    def __init__(self, spec: CoreSpec, forms: tuple[Form, ...], layer_idx: int):
        super().__init__()
        self.spec, self.forms, self.layer_idx = spec, forms, layer_idx
        #: the layers this core serves: one, or several where one module runs for several layers
        #: (ALBERT's shared layer, HRM's recurrent stacks); each call then takes the next one's
        #: cache slot, in call order, counted per cache
        self.layers: tuple[int, ...] = (layer_idx,)
        self.plan = LayerPlan()
        self.latent = None  # a kvpass.runtime.latent.Latent (MHC), registered when set
        self.taps: list = []
        self.out_order: tuple[int, ...] | None = None  # memory order of the replaced core's output
        self._sink = None  # this call's sink logits
        self._producer: list[KVCore] = []  # unregistered reference
        self._cache = None  # set by KVAttention for the duration of one call
        self._last = None   # this call's stored K/V, for consumers in cache-free forwards

    @property
    def producer(self) -> KVCore | None:
        return self._producer[0] if self._producer else None

    def set_producer(self, core: KVCore | None) -> None:
        self._producer = [] if core is None else [core]

    def ring(self) -> RingSpec | None:
        """How this layer's cache slot stores tokens (None: the plain full cache)."""
        return self.plan.ring() if self.plan.positional else None

    def stored_heads(self) -> int:
        return self.spec.num_kv_heads if self.plan.keep is None else len(self.plan.keep)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Cache bytes one stored token takes: K and V of the stored heads (or the MHC latent),
        plus one int64 position for positional layers."""
        if self.producer is not None:
            return 0
        size = 1 if self.plan.kv_dtype else torch.empty((), dtype=dtype).element_size()
        if self.plan.quant is not None:
            per = self.plan.quant.slot_bytes(self.stored_parts(), size)
            return int(per) if per == int(per) else per
        if self.latent is not None:
            per = self.latent.rank * size
        else:
            per = 2 * self.stored_heads() * self.spec.head_dim * size
        return per + (8 if self.plan.positional else 0)

    def cache_bytes(self, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
        """Bytes this layer's cache slot holds after ``tokens`` tokens (what ``cache_nbytes``
        measures): a ring holds at most its capacity."""
        if self.producer is not None:
            return 0
        ring = self.ring()
        rule = self.plan.quant
        if rule is not None:
            slots = rule.flushed(tokens)
            slots = slots if ring.capacity is None else min(slots, ring.capacity)
            size = torch.empty((), dtype=dtype).element_size()
            parts = self.stored_parts()
            fixed = rule.buffer_bytes(parts, size) if tokens else 0
            return batch * (round(slots * rule.slot_bytes(parts, size)) + fixed)
        slots = tokens if ring is None or ring.capacity is None else min(tokens, ring.capacity)
        return batch * slots * self.bytes_per_token(dtype)

    def stored_parts(self) -> list[tuple[int, int]]:
        """(heads, values per head) of what one token stores: keys, then values (the latent:
        one head of width rank, no values)."""
        if self.latent is not None:
            return [(1, self.latent.rank), (1, 0)]
        h = self.stored_heads()
        return [(h, self.spec.head_dim), (h, self.spec.head_dim)]

    def __getstate__(self):
        """Copies and pickles leave out what belongs to one call (its K/V, cache and sink
        logits): tensors of a forward that ran with autograd cannot be deep-copied."""
        state = dict(self.__dict__)
        state.update(_last=None, _cache=None, _sink=None)
        return state

    def forward(self, q, k=None, v=None, mask=None, sink_logits=None):
        """``sink_logits``: the model's per-head sink logits ([H], gpt-oss), when it has them;
        else the layer's own (``Window(sink="logit")`` registers ``self.sink_logits``)."""
        if sink_logits is None:
            sink_logits = self._parameters.get("sink_logits")
        self.__dict__["_sink"] = sink_logits  # not Module.__setattr__: a Parameter must not register
        try:
            out = self._forward(q, k, v, mask)
        finally:
            self.__dict__["_sink"] = None
        order = self.out_order
        if (order is not None and not torch.compiler.is_compiling() and out.dim() == len(order)
                and stride_order(out) != order):
            # the graph after the core may view the output as the original op laid it out
            # (CPU SDPA returns [B, S, H, D] memory): give it that layout
            out = out.permute(order).contiguous().permute(_inverse(order))
        return out

    def _next_slot(self) -> None:
        """A core serving several layers: this call's layer (its cache slot), in call order."""
        if len(self.layers) == 1 or self._cache is None:
            return
        counts = self._cache.__dict__.setdefault("_kvpass_calls", {})
        i = counts.get(id(self), 0)
        counts[id(self)] = i + 1
        self.layer_idx = self.layers[i % len(self.layers)]

    def _forward(self, q, k=None, v=None, mask=None):
        self._next_slot()
        for tap in self.taps:
            tap(q, k, v)
        if self.plan.positional:
            return self._forward_positional(q, k, v, mask)
        producer = self.producer
        if producer is None:
            k, v = self._select(k, v)
            k, v = self._narrow(k), self._narrow(v)
            if self._cache is not None:
                k, v = ensure_layer(self._cache, self.layer_idx).update(k, v)
            k, v = self._widen(k, q.dtype), self._widen(v, q.dtype)
            self._last = (k, v)
        elif self._cache is not None:
            layer = ensure_layer(self._cache, self.layer_idx, source=producer.layer_idx).source
            k, v = producer._widen(layer.keys, q.dtype), producer._widen(layer.values, q.dtype)
        else:
            k, v = producer._last
        s = self.spec
        head_map = self.plan.head_map or s.kv_head_map
        mask = _prepare_mask(mask, s.mask_kind, k.shape[2])
        spec = _kernel_spec(s, tuple(head_map), k.shape[1], str(q.dtype).replace("torch.", ""),
                            mask is not None)
        if spec is None or (torch.is_grad_enabled() and q.requires_grad) or self._sink is not None:
            # shapes no kernel covers, healing (training needs the differentiable reference), or
            # sink logits (the reference's extra column; no kernel has them yet)
            return reference.attention(q, k, v, kv_head_map=head_map, scale=s.scale, causal=s.causal,
                                       softcap=s.softcap, mask=mask, sink_logits=self._sink)
        return kernels.attention(q, k, v, spec, mask=mask)  # kernels on GPU, reference on CPU

    @property
    def _reference_only(self) -> bool:
        """Sink logits and ALiBi on positions: terms no generated kernel has yet (the reference
        runs them)."""
        return self._sink is not None or (self.plan.positional and self.spec.alibi is not None)

    def _narrow(self, x):
        """What the cache stores of keys/values ``x``: fp8 e4m3 bytes (as uint8, which every cache
        op supports) under ``Quantize(format="fp8")``, else ``x``."""
        if self.plan.kv_dtype is None or x is None:
            return x
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)

    def _widen(self, x, dtype):
        """Stored keys/values back in ``dtype`` (the inverse of :meth:`_narrow`)."""
        if self.plan.kv_dtype is None or x is None:
            return x
        return x.view(torch.float8_e4m3fn).to(dtype)

    def _select(self, k, v):
        if self.plan.keep is None:
            return k, v
        idx = torch.tensor(self.plan.keep, device=k.device)
        return k.index_select(1, idx), v.index_select(1, idx)

    def _forward_positional(self, q, k, v, mask):
        """Window / block-sparse / latent / quantized layers: tokens carry positions; the graph
        mask gives padding.  With a latent (MHC), ``k`` is the K/V projections' input and ``v``
        is None.  Storage (:meth:`_store_positional`) is apart from the attention rule
        (:meth:`_read_positional`)."""
        lat, rule = self.latent, self.plan.quant
        B, Sq = lat.batch_seq(q, k) if lat is not None else (q.shape[0], q.shape[2])
        # decode over a quantized cache: the store is all quantized and the residual all full
        # precision for the newest query, so it reads the packed cache as it is (kernels
        # dequantize in registers; on CPU the op's reference dequantizes and runs SDPA)
        decode = rule is not None and Sq == 1 and not torch.is_grad_enabled()
        step, limit, layer = self._store_positional(k, v, mask, B, Sq, decode)
        return self._read_positional(q, step, limit, layer, decode)

    def _store_positional(self, k, v, mask, B: int, Sq: int, decode: bool):
        """Store this call's tokens (or read a producer's): returns (step, limit, cache layer).
        A step is (keys, values, q_pos, k_pos[, keys_hat, values_hat]): with quantization each
        key/value comes in full precision and as quantized; ``limit``: keys stored so far."""
        lat, rule, producer = self.latent, self.plan.quant, self.producer
        if producer is not None:
            if self._cache is None:
                step, limit = producer._last
                return step, limit, None
            layer = ensure_layer(self._cache, self.layer_idx, source=producer.layer_idx).source
            return None if layer.step is None else tuple(layer.step), layer.get_seq_length(), layer
        valid = _new_tokens_valid(mask, self.spec.mask_kind, B, Sq, self.layer_idx).to(k.device)
        if lat is not None:
            k = lat.compress(k, B, Sq)
            v = k.new_zeros(B, 1, Sq, 0)
        else:
            k, v = self._select(k, v)
            k, v = self._narrow(k), self._narrow(v)
        layer = None
        if self._cache is not None:
            layer = ensure_layer(self._cache, self.layer_idx, ring=self.ring(), quant=rule)
            step = layer.update(k, v, valid, lazy=True) if decode else layer.update(k, v, valid)
            step = None if step is None else tuple(step)
            limit = layer.get_seq_length()
        else:
            pos = token_positions(valid)
            step = (k, v, pos, pos)
            if rule is not None:
                step += (fake_quantize(k, pos, rule.bits, rule.group, rule.keys)[0],
                         fake_quantize(v, pos, rule.bits, rule.group, rule.values)[0] if v.shape[-1] else v)
            limit = Sq
        self._last = (step, limit)
        return step, limit, layer

    def _read_positional(self, q, step, limit, layer, decode: bool):
        """Attention of ``q`` over a stored step under the plan's rule (window, pattern,
        latent, quantized storage): kernels where one applies, else the reference."""
        lat = self.latent
        head_map = tuple(self.plan.head_map or self.spec.kv_head_map)
        if decode and layer is not None:
            out = None if self._reference_only else self._attend_quant(q, layer, layer.last_positions, limit,
                                                                          head_map)
            if out is not None:
                return out
            if step is None:  # no kernel spec fits: the same reading in torch
                k, v, k_pos = layer.current()
                step = (k, v, layer.last_positions, k_pos)
        k, v, q_pos, k_pos = step[:4]
        k, v = self._widen(k, q.dtype), self._widen(v, q.dtype)
        hats = step[4:] if len(step) > 4 else None
        if lat is None:
            return self._attend(q, k, v, q_pos, k_pos, limit, head_map, hats)
        if lat.absorbed:  # attention in latent space: one shared "KV head" of width r
            ql = lat.absorbed_query(q, head_map)
            hats = None if hats is None else (hats[0], hats[0])
            o = self._attend(ql, k, k, q_pos, k_pos, limit, (0,) * len(head_map), hats)
            return lat.absorbed_output(o, head_map, q_pos)
        q = lat.query(q, q_pos)
        if lat.fit is not None and hats is None and not (torch.is_grad_enabled() and q.requires_grad) \
                and kernels.kernel_mode(q.device) != "reference" and not self._reference_only:
            out = self._attend_fused(q, k, q_pos, k_pos, limit, head_map)
            if out is not None:
                return out
        if hats is not None:
            hats = lat.keys_values(hats[0], k_pos)
        k, v = lat.keys_values(k, k_pos)
        return self._attend(q, k, v, q_pos, k_pos, limit, head_map, hats)

    def _block_table(self, limit: int, device):
        """(block table for keys up to ``limit``, block size) of a sparse plan, else (None, None)."""
        pattern = self.plan.pattern
        if pattern is None:
            return None, None
        return pattern.table(-(-limit // pattern.block)).table.to(device), pattern.block

    def _attend_quant(self, q, layer, q_pos, limit, head_map):
        """Decode over the packed cache: generated kernels dequantize in registers (the store is
        all quantized and the residual all full precision for the newest query).  None where no
        kernel applies (the reference then runs)."""
        s, plan, lat, rule = self.spec, self.plan, self.latent, self.plan.quant
        table, block = self._block_table(limit, q.device)
        dtype = str(q.dtype).replace("torch.", "")
        quant = {"bits": rule.bits, "group": rule.group, "keys": rule.keys, "values": rule.values,
                 "unit": rule.unit}
        kq, vq = layer.kq, layer.vq
        residual = (layer.rk, layer.rv, layer.rpos)
        vis = dict(window=plan.window, sinks=plan.sinks, block=block, has_block_mask=table is not None)
        if lat is None:
            spec = _kernel_spec(s, head_map, kq.codes.shape[1], dtype, False, head_dim=q.shape[-1],
                                head_dim_v=q.shape[-1], quant=tuple(quant.items()), **vis)
            if spec is None:
                return None
            return kernels.quant_attention(q, (*kq.tensors(), *vq.tensors()), residual, spec, q_pos,
                                           layer.positions, table)
        if lat.absorbed:
            ql = lat.absorbed_query(q, head_map)
            quant["values"] = rule.keys  # the latent is both keys and values
            spec = _kernel_spec(s, (0,) * len(head_map), 1, dtype, False, head_dim=ql.shape[-1],
                                head_dim_v=ql.shape[-1], quant=tuple(quant.items()), **vis)
            if spec is None:
                return None
            o = kernels.quant_attention(ql, (*kq.tensors(), *kq.tensors()), (layer.rk, layer.rk, layer.rpos),
                                        spec, q_pos, layer.positions, table)
            return lat.absorbed_output(o, head_map, q_pos)
        fit = lat.fit
        if fit is None:
            return None
        ql = lat.query(q, q_pos)
        spec = _kernel_spec(s, head_map, lat.kv_heads, dtype, False, head_dim=lat.head_dim, head_dim_v=lat.head_dim,
                            latent=(lat.rank, fit.rope, fit.norm_eps), quant=tuple(quant.items()), **vis)
        if spec is None or not kernels.ops.latent_fits(spec):
            return None
        return kernels.quant_attention(ql, (*kq.tensors(), *kq.tensors()), (layer.rk, layer.rk, layer.rpos),
                                       spec, q_pos, layer.positions, table, latent=lat.fused_weights(fit, q.dtype))

    def _attend_fused(self, q, c, q_pos, k_pos, limit, head_map):
        """Generated latent kernels: keys/values rebuilt from the latent ``c`` in registers."""
        s, plan, lat = self.spec, self.plan, self.latent
        table, block = self._block_table(limit, q.device)
        fit = lat.fit
        spec = _kernel_spec(s, head_map, lat.kv_heads, str(q.dtype).replace("torch.", ""), False,
                            window=plan.window, sinks=plan.sinks, block=block,
                            has_block_mask=table is not None, head_dim=lat.head_dim,
                            head_dim_v=lat.head_dim, latent=(lat.rank, fit.rope, fit.norm_eps))
        if spec is None or not kernels.ops.latent_fits(spec):
            return None
        return kernels.latent_attention(q, c.to(q.dtype), lat.fused_weights(fit, q.dtype), spec,
                                        q_pos=q_pos, k_pos=k_pos, block_mask=table)

    def _attend(self, q, k, v, q_pos, k_pos, limit, head_map, hats=None):
        s, plan = self.spec, self.plan
        table, block = self._block_table(limit, q.device)
        args = dict(window=plan.window, sinks=plan.sinks, block=block)
        if hats is not None:  # quantized storage: the reference picks full / quantized per pair
            ref = reference.attention if torch.is_grad_enabled() and q.requires_grad else reference.attention_sdpa
            return ref(q, k, v, kv_head_map=head_map, scale=s.scale, causal=s.causal, softcap=s.softcap,
                       q_pos=q_pos, k_pos=k_pos, block_mask=table, k_hat=hats[0], v_hat=hats[1],
                       quant=plan.quant, sink_logits=self._sink, alibi=s.alibi, **args)
        spec = _kernel_spec(s, head_map, k.shape[1], str(q.dtype).replace("torch.", ""), False,
                            has_block_mask=table is not None, head_dim=q.shape[-1],
                            head_dim_v=v.shape[-1], **args)
        if spec is None or (torch.is_grad_enabled() and q.requires_grad) or self._reference_only:
            return reference.attention(q, k, v, kv_head_map=head_map, scale=s.scale, causal=s.causal,
                                       softcap=s.softcap, q_pos=q_pos, k_pos=k_pos, block_mask=table,
                                       sink_logits=self._sink, alibi=s.alibi, **args)
        return kernels.attention(q, k, v, spec, q_pos=q_pos, k_pos=k_pos, block_mask=table)

    def extra_repr(self) -> str:
        s = self.spec
        src = f", reads layer {self.producer.layer_idx}" if self.producer is not None else ""
        p = self.plan
        vis = f", window={p.window}, sinks={p.sinks}" if p.window is not None else ""
        vis += f", pattern={p.pattern}" if p.pattern is not None else ""
        vis += f", latent={p.latent}" if p.latent is not None else ""
        vis += f", quant={p.quant}" if p.quant is not None else ""
        return (f"layer={self.layer_idx}, heads={s.num_heads}, kv_heads={self.stored_heads()}/"
                f"{s.num_kv_heads}, head_dim={s.head_dim}, forms={[f.kind for f in self.forms]}{vis}{src}")


@functools.lru_cache(maxsize=4096)
def stride_order(t) -> tuple[int, ...]:
    """Dims from outermost to innermost in memory (ties keep dim order)."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _kernel_spec(s: CoreSpec, head_map: tuple[int, ...], kv_heads: int, dtype: str, has_mask: bool,
                 window: int | None = None, sinks: int = 0, block: int | None = None,
                 has_block_mask: bool = False, head_dim: int | None = None, head_dim_v: int | None = None,
                 latent: tuple | None = None, quant: tuple | None = None):
    """The kernel spec of a layer's attention (None where no generated kernel applies).
    ``latent``: (rank, rope, norm_eps) of a fused latent decompress; ``quant``: the items of
    ``extra["quant"]`` (packed storage)."""
    extra = {} if latent is None else {"latent": dict(zip(("rank", "rope", "norm_eps"), latent))}
    if quant is not None:
        extra["quant"] = dict(quant)
    try:
        return kernels.KernelSpec(num_heads=s.num_heads, num_kv_heads=kv_heads, head_dim=head_dim or s.head_dim,
                                  head_dim_v=head_dim_v,
                                  kv_head_map=head_map, scale=s.scale, causal=s.causal, softcap=s.softcap,
                                  has_mask=has_mask, dtype=dtype, window=window,
                                  sinks=sinks if window is not None else 0, block=block,
                                  has_block_mask=has_block_mask, extra=extra)
    except kernels.CodegenError:
        return None


def _new_tokens_valid(mask, kind: str, batch: int, sq: int, layer: int) -> torch.Tensor:
    """Which of the ``sq`` new tokens are real (not padding): a token always sees itself, so
    the diagonal of the mask's last ``sq`` columns (the new keys) is True exactly for real ones."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return torch.ones(batch, sq, dtype=torch.bool)
    if mask.shape[-1] < sq:
        raise SiteError(f"layer {layer}: mask has {mask.shape[-1]} key columns for {sq} new tokens")
    m = mask[..., -sq:] if mask.shape[-1] > 1 else mask
    if kind == "bool_drop":
        keep = ~m.bool()
    elif m.dtype == torch.bool:
        keep = m
    else:
        keep = torch.isfinite(m) & (m > torch.finfo(m.dtype).min)
    while keep.dim() < 4:
        keep = keep[None]
    keep = keep[:, :1].expand(batch, 1, sq, sq)[:, 0]
    return keep.diagonal(dim1=-2, dim2=-1).to(torch.bool)


def _prepare_mask(mask, kind: str, k_len: int):
    if mask is None or not isinstance(mask, torch.Tensor):
        return None
    if mask.shape[-1] > k_len:
        mask = mask[..., :k_len]
    elif 1 < mask.shape[-1] < k_len:  # e.g. a bias the graph computed from this call's tokens only
        raise SiteError(f"the attention mask has {mask.shape[-1]} key columns for {k_len} keys")
    if kind == "bool_drop":
        return ~mask.bool()
    return mask


