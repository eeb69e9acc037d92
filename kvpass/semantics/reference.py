"""The plain-torch meaning of every kvpass attention form.

One function, :func:`attention`, is the reference: rewrites, caches and generated kernels are
all tested against it, and it is the CPU fallback.  A form is a set of *visibility rules*
over absolute token positions plus a *head map*; everything a form changes about storage
(fewer heads, a latent, a ring buffer) happens before keys and values reach this function.

Visibility of key ``j`` for query ``i`` (all must hold)::

    k_pos[j] >= 0                                   # the slot holds a token (ring buffers, padding)
    not causal or k_pos[j] <= q_pos[i]              # causal
    window is None or q_pos[i] - k_pos[j] < window  # sliding window (W tokens incl. itself) ...
                   or k_pos[j] < sinks              # ... plus the first `sinks` tokens
    block_mask is None or block_mask[q_pos[i] // block, k_pos[j] // block]
    mask is None or mask[..., i, j]                 # a graph's own mask (bool keep, or additive)

Rows with no visible key give zeros (never NaN).

A latent (MHC) layer whose keys are rebuilt in the kernel has one more reference,
:func:`latent_keys_values`: the meaning of the fused decompress (+ per-head norm + RoPE) the
generated latent kernels compute; its keys/values then go through :func:`attention`.

Example:
    >>> import torch
    >>> from kvpass.semantics.reference import attention
    >>> q = torch.randn(1, 4, 5, 8); k = torch.randn(1, 2, 5, 8); v = torch.randn(1, 2, 5, 8)
    >>> out = attention(q, k, v, kv_head_map=(0, 0, 1, 1), scale=8 ** -0.5, causal=True)
    >>> out.shape
    torch.Size([1, 4, 5, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import visibility as V

__all__ = ["attention", "attention_sdpa", "visibility", "default_positions", "LatentWeights",
           "latent_keys_values"]


def default_positions(batch: int, q_len: int, k_len: int, device=None) -> tuple[Tensor, Tensor]:
    """Bottom-right aligned positions: the last query sits at the last key. -> ([B,Sq], [B,Sk])"""
    k_pos = torch.arange(k_len, device=device).expand(batch, k_len)
    q_pos = torch.arange(k_len - q_len, k_len, device=device).expand(batch, q_len)
    return q_pos, k_pos


def visibility(
    q_pos: Tensor,  # [B, Sq]
    k_pos: Tensor,  # [B, Sk]
    *,
    causal: bool,
    window: int | None = None,
    sinks: int = 0,
    block_mask: Tensor | None = None,  # [nQB, nKB] bool or int (nonzero = visible)
    block: int | None = None,
) -> Tensor:
    """Boolean [B, 1, Sq, Sk]: which keys each query may see, from positions alone: the
    composition (:func:`kvpass.semantics.visibility.and_masks`) of valid keys, causality, the
    window with its sinks and the block table, as the kernels compose them."""
    if block_mask is not None:
        assert block is not None, "block_mask needs block"
    rule = V.for_layer(causal_=causal, window_=window, sinks=sinks, table=block_mask, block=block)
    return rule(q_pos[:, None, :, None], k_pos[:, None, None, :])


def attention(
    q: Tensor,  # [B, H, Sq, D]
    k: Tensor,  # [B, Hkv, Sk, D]
    v: Tensor,  # [B, Hkv, Sk, Dv]
    *,
    kv_head_map: Sequence[int] | None = None,
    scale: float | None = None,
    causal: bool = False,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    window: int | None = None,
    sinks: int = 0,
    softcap: float | None = None,
    block_mask: Tensor | None = None,
    block: int | None = None,
    mask: Tensor | None = None,
    k_hat: Tensor | None = None,
    v_hat: Tensor | None = None,
    quant=None,
    sink_logits: Tensor | None = None,
    alibi: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Attention of ``q`` over ``k``/``v`` under a form's visibility rules. -> [B, H, Sq, Dv]

    ``alibi`` ([H] slopes): the score of query head ``h`` for the key at position ``p`` gains
    ``alibi[h] · p`` (ALiBi, as BLOOM and MPT add it; a per-query constant, which softmax does
    not see, is left out), so a cache that keeps keys by position recomputes the model's bias.

    ``sink_logits`` ([H], gpt-oss style, or [B, H, Sq, 1] computed per query): one more logit
    per query head joins every row's softmax and its probability is dropped (a key that every
    query sees, with value zero), so a head can attend to "nothing".

    ``kv_head_map[h]`` is the KV head query head ``h`` reads (default: contiguous groups).
    ``mask`` is a graph's own mask, broadcastable to [B, H, Sq, Sk]: bool (True = keep) or
    additive float.  Computation is in fp32; the result has ``q``'s dtype.

    Quantized storage: ``k_hat``/``v_hat`` are the keys/values as stored quantized and
    ``quant`` (a :class:`kvpass.semantics.qformat.QuantRule`) says which pairs see them: query ``i`` reads
    key ``j`` quantized iff ``k_pos[j] < quant.flushed(q_pos[i] + 1)``, else in full precision.
    """
    D = q.shape[-1]
    k, v, q_pos, k_pos = _expand(q, k, v, kv_head_map, q_pos, k_pos)  # [B, H, Sk, D]
    k, v = k.float(), v.float()
    scale = D**-0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    sel = None
    if k_hat is not None:
        k_hat, v_hat, *_ = _expand(q, k_hat, v_hat, kv_head_map, q_pos, k_pos)
        sel = quant.hat_mask(q_pos, k_pos)  # [B, 1, Sq, Sk]
        scores = torch.where(sel, torch.matmul(q.float(), k_hat.float().transpose(-1, -2)) * scale, scores)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    vis = visibility(q_pos, k_pos, causal=causal, window=window, sinks=sinks,
                     block_mask=block_mask, block=block)
    if alibi is not None:
        slopes = torch.as_tensor(alibi, dtype=torch.float32, device=scores.device).view(1, -1, 1, 1)
        scores = scores + slopes * k_pos.to(scores.device, torch.float32)[:, None, None, :]
    if mask is not None:
        if mask.dtype == torch.bool:
            vis = vis & mask
        else:
            scores = scores + mask.float()
            vis = vis & torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min)
    scores = scores.masked_fill(~vis, float("-inf"))
    if sink_logits is not None:  # one more column per head, dropped after the softmax
        col = sink_logits.float()
        col = (col.view(1, -1, 1, 1) if col.dim() == 1 else col).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, col], -1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key -> zeros
    if sel is not None:
        return (torch.matmul(probs * sel, v_hat.float()) + torch.matmul(probs * ~sel, v)).to(q.dtype)
    return torch.matmul(probs, v).to(q.dtype)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    """:func:`attention` (same arguments) computed by ``torch``'s fused SDPA with the visibility
    as a bool mask.

    The same meaning (tests hold it to :func:`attention`), several times faster on CPU for long
    sequences (no fp32 score copies).  Quantized storage (``k_hat``/``v_hat``/``quant``): every
    key and value is given twice, quantized and in full precision, and each query's mask keeps
    the one the rule says it sees.  Softcap and additive masks are not expressible this way:
    :func:`attention` runs then.
    """
    mask = kw.get("mask")
    if (kw.get("softcap") is not None or kw.get("sink_logits") is not None or kw.get("alibi") is not None
            or (mask is not None and mask.dtype != torch.bool)):
        return attention(q, k, v, **kw)
    k_hat, v_hat, quant = kw.pop("k_hat", None), kw.pop("v_hat", None), kw.pop("quant", None)
    sel = None
    if k_hat is not None:  # each key twice, quantized then full precision; each query sees one
        q_pos, k_pos = _positions(q, k, kw.get("q_pos"), kw.get("k_pos"))
        sel = quant.hat_mask(q_pos, k_pos)  # [B, 1, Sq, Sk]
        sel = torch.cat([sel, ~sel], -1)
        k, v = torch.cat([k_hat.to(k.dtype), k], 2), torch.cat([v_hat.to(v.dtype), v], 2)
        kw = dict(kw, q_pos=q_pos, k_pos=torch.cat([k_pos, k_pos], 1))
        if mask is not None:
            mask = torch.cat([mask, mask], -1)
    H, Hkv = q.shape[1], k.shape[1]
    grouped = Hkv != H and _grouped(kw.get("kv_head_map"), H, Hkv)
    if grouped:  # SDPA reads each KV head for its query group itself: no repeated copies
        q_pos, k_pos = _positions(q, k, kw.get("q_pos"), kw.get("k_pos"))
    else:
        k, v, q_pos, k_pos = _expand(q, k, v, kw.get("kv_head_map"), kw.get("q_pos"), kw.get("k_pos"))
    vis = visibility(q_pos, k_pos, causal=kw.get("causal", False), window=kw.get("window"),
                     sinks=kw.get("sinks", 0), block_mask=kw.get("block_mask"), block=kw.get("block"))
    if mask is not None:
        vis = vis & mask
    if sel is not None:
        vis = vis & sel
    scale = kw.get("scale")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sdpa = torch.nn.functional.scaled_dot_product_attention
    k, v = k.to(q.dtype), v.to(q.dtype)
    if bool(vis.all()):  # e.g. a decode step over a full cache: the unmasked kernel is faster
        return sdpa(q, k, v, scale=scale, enable_gqa=grouped)
    anyvis = vis.any(-1, keepdim=True)  # [B, 1|H, Sq, 1]
    vis = vis | ~anyvis  # SDPA gives NaN for empty rows: let them see all, then zero them
    out = sdpa(q, k, v, attn_mask=vis, scale=scale, enable_gqa=grouped)
    return out.masked_fill(~anyvis, 0.0)


def _grouped(kv_head_map, H: int, Hkv: int) -> bool:
    """Whether query head h reads KV head h // (H / Hkv) (SDPA's ``enable_gqa`` layout)."""
    if H % Hkv:
        return False
    g = H // Hkv
    return kv_head_map is None or all(int(m) == h // g for h, m in enumerate(kv_head_map))


def _positions(q: Tensor, k: Tensor, q_pos, k_pos) -> tuple[Tensor, Tensor]:
    """``q_pos``/``k_pos``, the defaults (:func:`default_positions`) filled in where None."""
    if q_pos is None or k_pos is None:
        dq, dk = default_positions(q.shape[0], q.shape[2], k.shape[2], q.device)
        q_pos = dq if q_pos is None else q_pos
        k_pos = dk if k_pos is None else k_pos
    return q_pos, k_pos


def _expand(q: Tensor, k: Tensor, v: Tensor, kv_head_map, q_pos, k_pos):
    """K/V repeated to the query heads by ``kv_head_map``, and positions (defaults filled)."""
    H, Hkv = q.shape[1], k.shape[1]
    if kv_head_map is None:
        kv_head_map = [h * Hkv // H for h in range(H)]
    idx = torch.as_tensor(list(kv_head_map), device=q.device, dtype=torch.long)
    q_pos, k_pos = _positions(q, k, q_pos, k_pos)
    return k.index_select(1, idx), v.index_select(1, idx), q_pos, k_pos


class LatentWeights(NamedTuple):
    """The per-KV-head weights of a fused latent decompress (see :func:`latent_keys_values`).

    ``up_k``/``up_kp`` [Hkv, r, D] (``up_kp``: columns of each head permuted by the RoPE
    partner map, so ``c · up_kp`` is the partner dimension of ``c · up_k``), ``bias_k``/``bias_kp``
    [Hkv, D] (fp32), ``up_v`` [Hkv, r, Dv], ``bias_v`` [Hkv, Dv] (fp32), ``freq``/``cos_coef``/
    ``sin_coef`` [Hkv, D] (fp32; a dimension without rotation has freq 0 and sin_coef 0).
    """

    up_k: Tensor
    up_kp: Tensor
    bias_k: Tensor
    bias_kp: Tensor
    up_v: Tensor
    bias_v: Tensor
    freq: Tensor
    cos_coef: Tensor
    sin_coef: Tensor


def latent_keys_values(c: Tensor, k_pos: Tensor, w: LatentWeights,
                       norm_eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Keys and values rebuilt from a latent cache, as the fused latent kernels do.

    With ``y = c·up_k + bias_k`` and ``y' = c·up_kp + bias_kp`` (per KV head, dimension ``d``),
    ``θ = k_pos · freq_d`` and ``ρ = rsqrt(mean_d y² + norm_eps)`` (1 without a norm)::

        k_d = (cos_coef_d · cos θ · y_d + sin_coef_d · sin θ · y'_d) · ρ
        v   = c·up_v + bias_v

    This is RoPE of any pairing (rotate-half, interleaved, partial: ``y'`` is the partner
    dimension, ``sin_coef`` its sign and scale) after an optional RMS norm over the head
    (its weight folded into the coefficients).  fp32 math; results in ``c``'s dtype.

    Args:
        c: [B, 1, S, r] latents; k_pos: [B, S] int positions (negative = empty slot: any value).

    Example (rank = head size, identity up-projections, no rotation: k = v = c):
        >>> import torch
        >>> eye = torch.eye(4)[None]; z = torch.zeros(1, 4)
        >>> w = LatentWeights(eye, eye, z, z, eye, z, z, torch.ones(1, 4), z)
        >>> c = torch.randn(2, 1, 3, 4)
        >>> k, v = latent_keys_values(c, torch.arange(3).expand(2, 3), w)
        >>> torch.equal(k[:, 0], c[:, 0]) and torch.equal(v[:, 0], c[:, 0])
        True
    """
    cf = c[:, 0].float()  # [B, S, r]
    y = torch.einsum("bsr,hrd->bhsd", cf, w.up_k.float()) + w.bias_k.float()[None, :, None]
    ang = k_pos.clamp(min=0).to(torch.float32)[:, None, :, None] * w.freq.float()[None, :, None]
    k = y * w.cos_coef.float()[None, :, None] * torch.cos(ang)
    if bool((w.sin_coef != 0).any()):
        yp = torch.einsum("bsr,hrd->bhsd", cf, w.up_kp.float()) + w.bias_kp.float()[None, :, None]
        k = k + yp * w.sin_coef.float()[None, :, None] * torch.sin(ang)
    if norm_eps is not None:
        k = k * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm_eps)
    v = torch.einsum("bsr,hrd->bhsd", cf, w.up_v.float()) + w.bias_v.float()[None, :, None]
    return k.to(c.dtype), v.to(c.dtype)
