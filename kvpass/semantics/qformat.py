"""Quantized KV storage: the plain-torch meaning of :class:`kvpass.Quantize`.

Format (asymmetric, min/max, like KIVI):

- A *group* of values shares a ``scale`` and a ``zero`` (the group's minimum):
  ``code = clamp(round((x - zero) / scale), 0, 2**bits - 1)``, ``x̂ = code · scale + zero``.
  ``axis="token"``: a group is ``group`` consecutive channels of one token (per-token
  quantization; ``group`` divides the stored width).  ``axis="channel"``: a group is one channel
  over ``group`` consecutive token positions (per-channel: keys' outliers live in channels).
- ``scale`` and ``zero`` are stored in the cache's dtype, ``scale`` rounded *up* and ``zero``
  rounded *down* into it, so every value stays inside the group's grid: the error is at most
  half a step, ``|x - x̂| ≤ scale / 2`` (plus the rounding of ``code · scale + zero`` itself).
- Codes are packed little-end first into bytes: element ``d`` of a row is bits
  ``[(d % per)·bits, (d % per + 1)·bits)`` of byte ``d // per``, ``per = 8 // bits``.

When a token is quantized is part of the meaning (see :class:`QuantRule`): tokens are flushed
from a full-precision *residual* in units of ``unit`` positions (``group`` for per-channel
keys, else 1) once at least ``residual`` newer tokens exist.  A query at position ``i`` sees
key/value ``j`` quantized iff ``j < flushed(i + 1)``; generation token by token and one
prefill then see exactly the same values.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 8, 64)
    >>> q = quantize(x, bits=4, group=64, axis="token")
    >>> q.codes.shape, q.codes.dtype, q.scale.shape
    (torch.Size([2, 3, 8, 32]), torch.uint8, torch.Size([2, 3, 8, 1]))
    >>> bool(((dequantize(q) - x).abs() <= q.scale_of_each() / 2 + 1e-6).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["QTensor", "QuantRule", "quantize", "dequantize", "pack", "unpack", "fake_quantize",
           "BITS", "AXES"]

BITS = (8, 4, 2)
AXES = ("token", "channel")


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., D] (values < 2**bits) -> packed uint8 [..., D·bits/8].

    >>> pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4)
    tensor([[33, 67]], dtype=torch.uint8)
    """
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    c = codes.to(torch.int32).unflatten(-1, (-1, per))
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack`: uint8 [..., D·bits/8] -> uint8 codes [..., D]."""
    per = 8 // bits
    if per == 1:
        return packed
    low = (1 << bits) - 1  # one plain op per code in the byte: faster on CPU than a broadcast shift
    return torch.stack([(packed >> (i * bits)) & low if i else packed & low for i in range(per)], -1).flatten(-2)


class QTensor(NamedTuple):
    """Packed codes [..., S, D·bits/8] plus ``scale``/``zero``: [..., S, D/group] (token axis)
    or [..., S/group, D] (channel axis), in the source dtype."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group: int
    axis: str

    def scale_of_each(self) -> Tensor:
        """The scale of every element, [..., S, D] (for bounds)."""
        if self.axis == "token":
            return self.scale.repeat_interleave(self.group, dim=-1)
        return self.scale.repeat_interleave(self.group, dim=-2)


def _round_into(t: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``t`` (fp32) stored in ``dtype``, rounded up (or down) so the stored value bounds ``t``."""
    c = t.to(dtype)
    if dtype == t.dtype:
        return c
    off = c.float() < t if up else c.float() > t
    if bool(off.any()):
        toward = torch.full_like(c, float("inf") if up else float("-inf"))
        c = torch.where(off, torch.nextafter(c, toward), c)
    return c


def quantize(x: Tensor, bits: int, group: int, axis: str) -> QTensor:
    """Quantize ``x`` [..., S, D] in groups (see the module docstring).

    ``axis="token"``: ``group`` must divide D; ``axis="channel"``: ``group`` must divide S.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits} not in {BITS}")
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} not in {AXES}")
    S, D = x.shape[-2], x.shape[-1]
    if axis == "token":
        if D % group:
            raise ValueError(f"group={group} does not divide the width {D}")
        xg = x.float().unflatten(-1, (D // group, group))  # [..., S, D/g, g]
        red = -1
    else:
        if S % group:
            raise ValueError(f"group={group} does not divide the {S} positions")
        xg = x.float().unflatten(-2, (S // group, group))  # [..., S/g, g, D]
        red = -2
    mn, mx = xg.amin(red), xg.amax(red)
    levels = (1 << bits) - 1
    zero = _round_into(mn, x.dtype, up=False)
    scale = _round_into((mx - zero.float()) / levels, x.dtype, up=True)
    sz, zz = scale.float().unsqueeze(red), zero.float().unsqueeze(red)
    safe = torch.where(sz > 0, sz, torch.ones_like(sz))
    codes = torch.round((xg - zz) / safe).clamp_(0, levels).to(torch.uint8)
    codes = codes.flatten(-2, -1) if axis == "token" else codes.flatten(-3, -2)
    return QTensor(pack(codes, bits), scale, zero, bits, group, axis)


def dequantize(q: QTensor, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """``code · scale + zero`` in fp32, returned in ``dtype`` (default: the scale's dtype).
    ``out``: an fp32 tensor of the result's shape to write into (e.g. a slice of a larger one)."""
    codes = unpack(q.codes, q.bits).float()
    scale, zero = q.scale.float(), q.zero.float()
    shape = codes.shape
    if codes.numel() == 0:
        return codes.to(dtype or q.scale.dtype) if out is None else out
    if q.axis == "token":  # groups as a broadcast axis (no repeated scale copies)
        dim, scale, zero = -1, scale[..., None], zero[..., None]
    else:
        dim, scale, zero = -2, scale[..., None, :], zero[..., None, :]
    codes = codes.unflatten(dim, (-1, q.group))
    if out is not None:
        torch.addcmul(zero, codes, scale, out=out.unflatten(dim, (-1, q.group)))
        return out
    return torch.addcmul(zero, codes, scale).reshape(shape).to(dtype or q.scale.dtype)


@dataclass(frozen=True)
class QuantRule:
    """When tokens are quantized, and how (one per layer; the keys' and values' formats).

    ``unit``: tokens are flushed from the full-precision residual in units of ``unit``
    positions (aligned to multiples of ``unit``); ``residual``: at least this many newest
    tokens stay in full precision.  After ``n`` tokens, positions below :meth:`flushed` (n) are
    stored quantized.
    """

    bits: int
    group: int
    keys: str = "channel"   # axis of the keys' groups
    values: str = "token"   # axis of the values' groups
    residual: int = 0

    @property
    def unit(self) -> int:
        return self.group if "channel" in (self.keys, self.values) else 1

    @property
    def buffer(self) -> int:
        """Slots of the full-precision residual buffer (most tokens ever unflushed)."""
        return self.unit - 1 + self.residual

    def flushed(self, n: Tensor | int):
        """Number of leading positions stored quantized after ``n`` tokens (a multiple of unit)."""
        if isinstance(n, int):
            return max(n - self.residual, 0) // self.unit * self.unit
        return (n - self.residual).clamp(min=0) // self.unit * self.unit

    def hat_mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """[B, 1, Sq, Sk] bool: query i sees key j quantized (``k_pos[j] < flushed(q_pos[i] + 1)``)."""
        return k_pos[:, None, None, :] < self.flushed(q_pos[:, None, :, None] + 1)

    def slot_bytes(self, parts, elem: int) -> float:
        """Bytes one quantized slot holds (codes, its share of scales/zeros, 8-byte position).
        ``parts``: [(heads, width)] of keys then values (width 0: absent); ``elem``: dtype size."""
        out = 8.0
        for (heads, width), axis in zip(parts, (self.keys, self.values)):
            if not width:
                continue
            out += heads * width * self.bits / 8
            out += 2 * heads * elem * (width / self.group if axis == "token" else width / self.unit)
        return out

    def buffer_bytes(self, parts, elem: int) -> int:
        """Bytes of the full-precision residual buffer (values, keys and a position per slot)."""
        return self.buffer * (sum(h * w for h, w in parts) * elem + 8)

    def check_width(self, width: int, what: str) -> str | None:
        """Why ``width`` stored values per head cannot take this format (None if they can)."""
        if width and "token" in (self.keys, self.values) and width % self.group:
            return (f"{what} has {width} values per head, not a multiple of group={self.group} "
                    "(per-token groups split a head's values); choose a group dividing it")
        if width * self.bits % 8:
            return f"{what} has {width} values per head; {self.bits}-bit codes need a multiple of {8 // self.bits}"
        return None


def fake_quantize(x: Tensor, pos: Tensor, bits: int, group: int, axis: str, base: Tensor | None = None
                  ) -> tuple[Tensor, QTensor | None, Tensor | None]:
    """What each token of ``x`` [B, H, S, D] becomes once quantized, and the quantized form.

    Tokens are grouped by *position* (``pos`` [B, S]; -1 = padding): for the channel axis a
    group is ``group`` consecutive positions from ``base`` [B] (a multiple of ``group``; default
    0).  -> (x̂ [B, H, S, D] in x's dtype, QTensor over the local index ``pos - base`` (channel
    axis; None for the token axis), ``local`` [B, S] index of each token in it (-1 padding)).
    A group still incomplete (positions not all present) is quantized over what is there; the
    rule never lets a query see such a token quantized.
    """
    if axis == "token":
        return dequantize(quantize(x, bits, group, axis), x.dtype), None, None
    B, H, S, D = x.shape
    base = torch.zeros(B, dtype=torch.long, device=x.device) if base is None else base
    local = torch.where(pos >= 0, pos - base[:, None], torch.full_like(pos, -1))
    n = int(local.max().item()) + 1 if local.numel() else 0
    n = max(-(-n // group) * group, group)
    buf = x.new_zeros(B, H, n + 1, D)  # slot n: sink for padding and tokens below base
    idx = torch.where(local >= 0, local, torch.full_like(local, n))
    buf.scatter_(2, idx[:, None, :, None].expand(B, H, S, D), x)
    valid = torch.zeros(B, n + 1, dtype=torch.bool, device=x.device)
    valid.scatter_(1, idx, True)
    valid = valid[:, :n]
    buf = buf[:, :, :n]
    # fill each group's empty positions with one of its present values, so min/max ignore them
    vg = valid.view(B, n // group, group)
    first = torch.where(vg, torch.arange(group, device=x.device), group).amin(-1).clamp(max=group - 1)
    fill_idx = (torch.arange(n // group, device=x.device) * group)[None] + first  # [B, n/g]
    fill = buf.gather(2, fill_idx.repeat_interleave(group, 1)[:, None, :, None].expand(B, H, n, D))
    buf = torch.where(valid[:, None, :, None], buf, fill)
    qt = quantize(buf, bits, group, axis)
    hat = dequantize(qt, x.dtype)
    out = hat.gather(2, idx.clamp(max=n - 1)[:, None, :, None].expand(B, H, S, D))
    out = torch.where((local >= 0)[:, None, :, None], out, x)
    return out, qt, local
