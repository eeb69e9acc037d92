"""Lowering: swap each attention site's owning module for a :class:`KVAttention`.

The owning module's own call is captured (``torch.export`` of that module with the inputs
it received in a sample forward), its attention core found again in that graph, and replaced
by a :class:`KVCore` node that receives ``q``, ``k_pre`` and ``v_pre`` (keys/values before head
repetition) and the raw mask.  Everything else of the module — projections, norms, RoPE,
output projection, anything model-specific — runs as traced.  The KVCore owns the cache
traffic and calls the form's attention (the reference on CPU, generated kernels on GPU).

:class:`KVAttention` adopts the original module's children and parameters under the same
names, so ``state_dict`` keys and ``save_pretrained`` are unchanged.

Capturing is the cost of lowering (``torch.export`` of one attention module: ~0.5 s; 30 layers
of SmolLM2 were 15 of optimize's 23 s).  A layer whose traced code is the same as an earlier
layer's reuses that layer's capture with its own parameters bound in (:class:`CaptureReuse`).
"The same" is decided on the *whole model's* graph, which traced every layer: the nodes the
two modules ran (from ``nn_module_stack``) must be the same ops with the same literal
arguments and the same dataflow, reading the same-named parameters of each module and no
tensor constants, and the two calls must have the same keys, tensor dtypes/shapes and
non-tensor values.  Python branches on a layer's attributes (a per-layer scale, a window
flag) show up as different ops or literals there, so such layers are captured on their own.
The reused graph is then run on the layer's own call and must reproduce the module's output,
else the layer is captured after all.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import codegen, reference
from . import graphutil as gu
from .blocks import SparsePattern
from .cache import RingSpec, ensure_layer, find_caches, token_positions
from .capture import Captured, bind_call, capture_call
from .errors import SiteError
from .policy import Form
from .quant import QuantRule, fake_quantize
from .sites import AttentionSite, find_sites_in

__all__ = ["CoreSpec", "LayerPlan", "KVCore", "KVAttention", "lower_site", "record_calls", "CaptureReuse"]


@dataclass(frozen=True)
class CoreSpec:
    """What the attention core needs at run time (from the site)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_head_map: tuple[int, ...]
    scale: float
    causal: bool
    softcap: float | None
    mask_kind: str
    alibi: tuple[float, ...] | None = None  # ALiBi slopes: positional layers add slope · key position

    @classmethod
    def of(cls, site: AttentionSite) -> CoreSpec:
        return cls(site.num_heads, site.num_kv_heads, site.head_dim, site.kv_head_map, site.scale,
                   site.causal, site.softcap, site.nodes.mask_kind if site.nodes else "none",
                   getattr(site, "alibi", None))


@dataclass(frozen=True)
class LayerPlan:
    """How one layer stores and reads its cache (what the passes decided).

    ``keep``: the heads of ``k_pre``/``v_pre`` that are stored (None: all);
    ``head_map[h]``: which stored head query head ``h`` reads (None: the site's map);
    ``window``/``sinks``: each query sees its last ``window`` tokens and the first ``sinks``;
    ``pattern``: a block-sparse pattern; ``latent``: the rank of an MHC latent cached instead
    of keys and values (the weights live in ``KVCore.latent``); ``quant``: the stored values
    are quantized (:class:`~kvpass.quant.QuantRule`).  With any of these the layer is
    *positional*: visibility comes from token positions (the graph's mask only says which
    tokens are padding) and the cache is a :class:`~kvpass.cache.KVRingLayer` (or
    :class:`~kvpass.cache.KVQuantLayer`) storing one position per slot.
    """

    keep: tuple[int, ...] | None = None
    head_map: tuple[int, ...] | None = None
    window: int | None = None
    sinks: int = 0
    pattern: SparsePattern | None = None
    latent: int | None = None
    quant: QuantRule | None = None

    def kept_window(self, model_window: int | None) -> int | None:
        """The window a positional form reads: its own, none under a sparse pattern, else the
        model's own sliding window (visibility comes from positions, so it must be here)."""
        return self.window if self.window is not None or self.pattern is not None else model_window

    @property
    def positional(self) -> bool:
        return (self.window is not None or self.pattern is not None or self.latent is not None
                or self.quant is not None)

    def ring(self) -> RingSpec | None:
        """The cache layout (None: the plain full cache)."""
        if self.window is not None:
            spec = RingSpec(pinned=self.sinks, ring=self.window)
        elif self.pattern is not None:
            spec = self.pattern.ring()
        elif self.positional:
            return RingSpec()  # keep every token, with its position
        else:
            return None
        if self.quant is None or spec.ring is None:
            return spec
        # quantized slots hold whole units: align both parts, and keep one unit more, since the
        # tokens still visible start anywhere inside a unit
        u = self.quant.unit
        up = -(-spec.pinned // u) * u
        ring = -(-spec.ring // u) * u + (u if u > 1 else 0)
        return RingSpec(pinned=up, ring=ring, block=spec.block)


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
        self.latent = None  # a kvpass.latent.Latent (MHC), registered when set
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
        size = torch.empty((), dtype=dtype).element_size()
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
        """``sink_logits``: the model's per-head sink logits ([H], gpt-oss), when it has them."""
        self.__dict__["_sink"] = sink_logits  # not Module.__setattr__: a Parameter must not register
        try:
            out = self._forward(q, k, v, mask)
        finally:
            self.__dict__["_sink"] = None
        order = self.out_order
        if (order is not None and not torch.compiler.is_compiling() and out.dim() == len(order)
                and _stride_order(out) != order):
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
            if self._cache is not None:
                k, v = ensure_layer(self._cache, self.layer_idx).update(k, v)
            self._last = (k, v)
        elif self._cache is not None:
            layer = ensure_layer(self._cache, self.layer_idx, source=producer.layer_idx).source
            k, v = layer.keys, layer.values
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
        return codegen.attention(q, k, v, spec, mask=mask)  # kernels on GPU, reference on CPU

    @property
    def _reference_only(self) -> bool:
        """Sink logits and ALiBi on positions: terms no generated kernel has yet (the reference
        runs them)."""
        return self._sink is not None or (self.plan.positional and self.spec.alibi is not None)

    def _select(self, k, v):
        if self.plan.keep is None:
            return k, v
        idx = torch.tensor(self.plan.keep, device=k.device)
        return k.index_select(1, idx), v.index_select(1, idx)

    def _forward_positional(self, q, k, v, mask):
        """Window / block-sparse / latent / quantized layers: tokens carry positions; the graph
        mask gives padding.  With a latent (MHC), ``k`` is the K/V projections' input and ``v``
        is None.  A step is (keys, values, q_pos, k_pos[, keys_hat, values_hat]): with
        quantization each key/value comes in full precision and as quantized, and
        ``plan.quant`` says which one each query sees."""
        lat, rule = self.latent, self.plan.quant
        B, Sq = lat.batch_seq(q, k) if lat is not None else (q.shape[0], q.shape[2])
        producer = self.producer
        # decode over a quantized cache: the store is all quantized and the residual all full
        # precision for the newest query, so it reads the packed cache as it is (kernels
        # dequantize in registers; on CPU the op's reference dequantizes and runs SDPA)
        decode = rule is not None and Sq == 1 and not torch.is_grad_enabled()
        if producer is None:
            valid = _new_tokens_valid(mask, self.spec.mask_kind, B, Sq, self.layer_idx).to(k.device)
            if lat is not None:
                k = lat.compress(k, B, Sq)
                v = k.new_zeros(B, 1, Sq, 0)
            else:
                k, v = self._select(k, v)
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
        elif self._cache is not None:
            layer = ensure_layer(self._cache, self.layer_idx, source=producer.layer_idx).source
            step = None if layer.step is None else tuple(layer.step)
            limit = layer.get_seq_length()
        else:
            step, limit = producer._last
            layer = None
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
                and codegen.kernel_mode(q.device) != "reference" and not self._reference_only:
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
            return codegen.quant_attention(q, (*kq.tensors(), *vq.tensors()), residual, spec, q_pos,
                                           layer.positions, table)
        if lat.absorbed:
            ql = lat.absorbed_query(q, head_map)
            quant["values"] = rule.keys  # the latent is both keys and values
            spec = _kernel_spec(s, (0,) * len(head_map), 1, dtype, False, head_dim=ql.shape[-1],
                                head_dim_v=ql.shape[-1], quant=tuple(quant.items()), **vis)
            if spec is None:
                return None
            o = codegen.quant_attention(ql, (*kq.tensors(), *kq.tensors()), (layer.rk, layer.rk, layer.rpos),
                                        spec, q_pos, layer.positions, table)
            return lat.absorbed_output(o, head_map, q_pos)
        fit = lat.fit
        if fit is None:
            return None
        ql = lat.query(q, q_pos)
        spec = _kernel_spec(s, head_map, lat.kv_heads, dtype, False, head_dim=lat.head_dim, head_dim_v=lat.head_dim,
                            latent=(lat.rank, fit.rope, fit.norm_eps), quant=tuple(quant.items()), **vis)
        if spec is None or not codegen.ops.latent_fits(spec):
            return None
        return codegen.quant_attention(ql, (*kq.tensors(), *kq.tensors()), (layer.rk, layer.rk, layer.rpos),
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
        if spec is None or not codegen.ops.latent_fits(spec):
            return None
        return codegen.latent_attention(q, c.to(q.dtype), lat.fused_weights(fit, q.dtype), spec,
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
        return codegen.attention(q, k, v, spec, q_pos=q_pos, k_pos=k_pos, block_mask=table)

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
def _stride_order(t) -> tuple[int, ...]:
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
        return codegen.KernelSpec(num_heads=s.num_heads, num_kv_heads=kv_heads, head_dim=head_dim or s.head_dim,
                                  head_dim_v=head_dim_v,
                                  kv_head_map=head_map, scale=s.scale, causal=s.causal, softcap=s.softcap,
                                  has_mask=has_mask, dtype=dtype, window=window,
                                  sinks=sinks if window is not None else 0, block=block,
                                  has_block_mask=has_block_mask, extra=extra)
    except codegen.CodegenError:
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


_LEAVES = (torch.Tensor, int, float, bool, str, type(None))


def _leaf_paths(obj, prefix: str, out: dict) -> bool:
    """``out[path] = leaf`` for every leaf of nested dicts/tuples/lists, each path spelled as
    ``pytree.keystr`` spells it (``['key'][0]``); ~15x cheaper than pytree's walk on a decode
    step.  False if ``obj`` holds anything else (the caller then asks pytree)."""
    t = type(obj)
    if t is dict or isinstance(obj, Mapping):
        return all(_leaf_paths(v, f"{prefix}[{k!r}]", out) for k, v in obj.items())
    if t is tuple or t is list:
        return all(_leaf_paths(v, f"{prefix}[{i}]", out) for i, v in enumerate(obj))
    if isinstance(obj, _LEAVES):
        out[prefix] = obj
        return True
    return False


class KVAttention(nn.Module):
    """kvpass's replacement for an attention module: same call signature, same parameters."""

    def __init__(self, original: nn.Module, gm: fx.GraphModule, cap: Captured, core: KVCore,
                 site: AttentionSite, local: AttentionSite):
        super().__init__()
        for k, val in vars(original).items():
            if not k.startswith("_") and k != "training":
                object.__setattr__(self, k, val)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.kv_core = core
        self._graph = [gm]  # not a registered child: parameters stay under their own names
        self._forward_of = original.forward
        self._paths = cap.input_paths
        self._out_spec = cap.out_spec
        self._writes = cap.writes  # the graph also returns what the module stores into mapping args
        self._consts = dict(zip(cap.input_paths, pytree.tree_leaves(cap.sample)))
        self.site = dataclasses.replace(site, nodes=None)  # the facts, without graph handles
        n = local.nodes  # nodes of our own graph that passes rewire (MHC), by name (deepcopy-safe)
        self._handles = {k: None if v is None else v.name for k, v in (
            ("q", n.q), ("k_pre", n.k_pre), ("v_pre", n.v_pre), ("q_proj", n.q_proj),
            ("k_proj", n.k_proj), ("v_proj", n.v_proj))}
        self.training = original.training

    def forward(self, *args, **kwargs):
        flat = bind_call(self, args, kwargs)
        caches = find_caches(flat)
        flat = {k: (None if any(v is c for c in caches) else v) for k, v in flat.items()}
        got = {}
        if not _leaf_paths(flat, "", got):  # containers beyond dict/tuple/list: pytree's own walk
            got = {pytree.keystr(p): v for p, v in pytree.tree_flatten_with_path(flat)[0]}
        leaves = []
        for path in self._paths:
            sample = self._consts[path]
            if path not in got:
                if isinstance(sample, torch.Tensor):
                    raise SiteError(f"{self.site.name}: call lacks input {path} it was traced with")
                leaves.append(sample)
            else:
                leaves.append(got[path] if isinstance(sample, torch.Tensor) else sample)
        self.kv_core._cache = caches[0] if caches else None
        try:
            out = self._graph[0](*leaves)
        finally:
            self.kv_core._cache = None
        out = pytree.tree_unflatten(list(out), self._out_spec)
        if not self._writes:
            return out
        out, writes = out
        for name, items in writes.items():  # stores into the caller's containers, as the module did
            if items and isinstance(flat.get(name), Mapping):
                flat[name].update(items)
        return out

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._graph[0]

    def handles(self) -> dict[str, fx.Node | None]:
        """The site's nodes in this module's graph: q, k_pre, v_pre and the projections."""
        nodes = {n.name: n for n in self.graph_module.graph.nodes}
        return {k: nodes.get(v) if v is not None else None for k, v in self._handles.items()}

    def core_call(self) -> fx.Node:
        """The graph node calling ``kv_core`` (args: q, k, v, mask)."""
        return next(n for n in self.graph_module.graph.nodes if n.op == "call_module" and n.target == "kv_core")

    def sample_leaves(self) -> list:
        """The graph inputs of the sample call the module was captured with."""
        return [self._consts[p] for p in self._paths]

    def remove_unused_parameters(self) -> list[str]:
        """After a pass cut nodes from the graph: drop children whose parameters nothing reads
        any more.  Returns the removed parameter names."""
        gm = self.graph_module
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        used = {gu.fqn(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        removed = []
        for name, child in list(self.named_children()):
            names = [f"{name}.{p}" for p, _ in child.named_parameters()]
            if name != "kv_core" and names and not any(n in used for n in names):
                delattr(self, name)
                removed += names
        return removed

    def drop_kv_inputs(self) -> list[str]:
        """Stop computing keys/values (a cross-layer consumer): cut them from the graph and
        remove parameters nothing reads any more.  Returns the removed parameter names."""
        call = self.core_call()
        call.args = (call.args[0], None, None, *call.args[3:])
        return self.remove_unused_parameters()


def record_calls(model: nn.Module, names: list[str], run) -> dict[str, dict]:
    """Run ``run()`` once and record the flat keyword call of each named module (its first
    call); ``calls.counts[name]``: how many times the forward called it."""
    calls = _Calls()
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m, args, kwargs, name=name):
            calls.counts[name] = calls.counts.get(name, 0) + 1
            if name not in calls:
                flat = bind_call(m, args, kwargs)
                cs = find_caches(flat)
                # mapping arguments as they are at this call (later layers may store into them)
                calls[name] = {k: (None if any(v is c for c in cs) else dict(v) if isinstance(v, Mapping) else v)
                               for k, v in flat.items()}

        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return calls


class _Calls(dict):
    """Recorded calls by module name, with ``counts``: calls per module in one forward."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}


class _NoReuse(Exception):
    pass


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(m.named_parameters(remove_duplicate=False), m.named_buffers(remove_duplicate=False)))


def _fetch(gm: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), gm)


class CaptureReuse:
    """Captures of attention modules by the signature of their traced code (module
    docstring), for :func:`lower_site` to reuse across layers.  ``hits`` counts reuses."""

    def __init__(self):
        self._by_sig: dict = {}
        self.hits = 0

    @staticmethod
    def signature(site: AttentionSite, original: nn.Module, call: dict):
        """What decides that two layers trace the same graph (None: cannot tell, capture)."""
        nodes = site.nodes
        if nodes is None or nodes.captured is None:
            return None
        gm = nodes.captured.module
        own = {id(t): k for k, t in _tensors(original).items()}

        def inside(n):
            stack = n.meta.get("nn_module_stack")
            if not stack:
                return False
            path = str(list(stack.values())[-1][0]).removeprefix("kvroot.")
            return path == site.name or path.startswith(site.name + ".")

        body = [n for n in gm.graph.nodes if n.op == "call_function" and inside(n)]
        index = {n: i for i, n in enumerate(body)}
        ext: dict = {}

        def norm(a):
            if isinstance(a, fx.Node):
                if a in index:
                    return ("in", index[a])
                if a.op == "get_attr":
                    name = own.get(id(_fetch(gm, a.target)))
                    if name is None:  # a tensor constant or another module's tensor
                        raise _NoReuse
                    return ("param", name)
                return ("ext", ext.setdefault(a, len(ext)))
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, tuple(norm(x) for x in a))
            if isinstance(a, dict):
                return ("dict", tuple((k, norm(v)) for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))))
            if isinstance(a, torch.Tensor):
                raise _NoReuse
            return ("lit", type(a).__name__, repr(a))

        def arg(v):
            if isinstance(v, torch.Tensor):
                return ("t", str(v.dtype), tuple(v.shape))
            if isinstance(v, (int, float, bool, str, type(None))):
                return ("v", repr(v))
            if isinstance(v, (list, tuple)):
                return (type(v).__name__, tuple(arg(x) for x in v))
            if isinstance(v, dict):
                return ("dict", tuple((str(k), arg(x)) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))))
            raise _NoReuse

        try:
            code = tuple((str(n.target), norm(n.args), norm(n.kwargs)) for n in body)
            inputs = tuple((k, arg(v)) for k, v in sorted(call.items()))
        except _NoReuse:
            return None
        if not body:
            return None
        return type(original), inputs, code

    def lookup(self, sig, original: nn.Module, call: dict) -> Captured | None:
        """A capture of ``original(**call)`` from an earlier layer of signature ``sig``."""
        hit = self._by_sig.get(sig) if sig is not None else None
        if hit is None or any(isinstance(v, Mapping) for v in call.values()):
            return None  # (a call with state containers: the check below would store into them)
        pristine, first, paths, out_spec = hit
        rel = {id(t): k for k, t in _tensors(first).items()}
        mine = _tensors(original)
        memo = {}
        for t in _tensors(pristine).values():
            k = rel.get(id(t))
            if k is None or k not in mine or mine[k].shape != t.shape or mine[k].dtype != t.dtype:
                return None
            memo[id(t)] = mine[k]
        leaves_with_paths, _ = pytree.tree_flatten_with_path(call)
        if [pytree.keystr(p) for p, _ in leaves_with_paths] != paths:
            return None
        gm = copy.deepcopy(pristine, memo)
        leaves = [v for _, v in leaves_with_paths]
        cap = Captured(gm, paths, out_spec, sample=call)
        try:
            with torch.no_grad():
                from .capture import sample_env

                cap.env = sample_env(gm, leaves)
                want = pytree.tree_leaves(original(**call))
            got = pytree.tree_leaves(pytree.tree_unflatten(list(gm(*leaves)), out_spec))
        except Exception:  # noqa: BLE001 - anything odd: capture this layer on its own
            return None
        same = len(got) == len(want) and all(
            (torch.allclose(a, b, atol=1e-6, rtol=1e-5) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
             and a.shape == b.shape else a is None and b is None) for a, b in zip(got, want))
        if not same:
            return None
        self.hits += 1
        return cap

    def store(self, sig, original: nn.Module, cap: Captured) -> None:
        if sig is None or sig in self._by_sig:
            return
        memo = {id(t): t for t in _tensors(cap.module).values()}  # parameters shared, not copied
        self._by_sig[sig] = (copy.deepcopy(cap.module, memo), original, list(cap.input_paths), cap.out_spec)


def lower_site(model: nn.Module, site: AttentionSite, call: dict, forms: tuple[Form, ...],
               reuse: CaptureReuse | None = None, layers: tuple[int, ...] | None = None) -> KVAttention:
    """Capture the site's owning module, swap its core for a KVCore, install the result.
    ``reuse``: captures shared across layers that trace the same code (module docstring).
    ``layers``: the layers a module called once per layer runs (default: the site's own)."""
    original = model.get_submodule(site.name)
    sig = reuse.signature(site, original, call) if reuse is not None else None
    cap = reuse.lookup(sig, original, call) if sig is not None else None
    if cap is None:
        with torch.no_grad():
            cap = capture_call(original, call)
        if reuse is not None:
            reuse.store(sig, original, cap)
    found = find_sites_in(cap, probe_windows=False)
    if len(found) != 1:
        why = getattr(found, "passed", [])
        raise SiteError(f"{site.name}: expected one attention core in the module's own graph, "
                        f"found {len(found)}" + (f" (passed over: {why[0]})" if why else ""))
    local = found[0]
    core = KVCore(CoreSpec.of(local), forms, site.layer)
    core.layers = tuple(layers or (site.layer,))
    gm = _rewrite(cap, local, core)
    new = KVAttention(original, gm, cap, core, site, local)
    parent, _, leaf = site.name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return new


def _rewrite(cap: Captured, site: AttentionSite, core: KVCore) -> fx.GraphModule:
    return replace_cores(cap, [(site, core, "kv_core")])


def replace_cores(cap: Captured, swaps: list[tuple[AttentionSite, KVCore, str]]) -> fx.GraphModule:
    """Replace each site's attention core in ``cap``'s graph by a call of its KVCore
    (registered as submodule ``name``) on ``(q, k_pre, v_pre, mask)``; returns the module."""
    gm = cap.module
    g = gm.graph
    for site, core, name in swaps:
        n = site.nodes
        gm.add_submodule(name, core)
        val = n.out.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                core.out_order = _stride_order(val)
            except Exception:  # noqa: BLE001 - symbolic strides that can't be ordered: leave as is
                core.out_order = None
        with g.inserting_before(n.out):
            sinks = () if n.sinks is None else (n.sinks,)
            new = g.call_module(name, (n.q, n.k_pre, n.v_pre, n.mask, *sinks))
        new.meta = dict(n.out.meta)
        n.out.replace_all_uses_with(new)
        out = g.output_node()
        out.args = fx.node.map_arg(out.args, lambda a, inner=n.inner: None if a in inner else a)
        for node in reversed(list(g.nodes)):  # the old core (DCE keeps SDPA: it may be random)
            if node in n.inner and not node.users:
                g.erase_node(node)
    g.eliminate_dead_code()
    g.lint()
    for node in g.nodes:  # fake-tensor metadata is not needed to run, and can't be deep-copied
        for key in ("val", "example_value", "tensor_meta", "unbacked_bindings"):
            node.meta.pop(key, None)
    gm.recompile()
    return gm
