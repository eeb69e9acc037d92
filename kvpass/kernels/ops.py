"""Launchers for the generated kernels, and the ``kvpass::attention`` custom op.

Which implementation runs (:func:`kernel_mode`):

- ``KVPASS_KERNELS=reference``: the reference's meaning via ``kvpass.semantics.reference.attention_sdpa`` (torch
  SDPA with the visibility as a bool mask; plain ``reference.attention`` where SDPA cannot express it).
- ``KVPASS_KERNELS=triton``: compiled Triton kernels (CUDA tensors).
- ``KVPASS_KERNELS=interpret``: the same generated kernels under the Triton interpreter
  (CPU tensors; slow, for tests).
- unset: CUDA tensors -> ``triton``, anything else -> ``reference``, except decode over a
  quantized cache on CPU, which runs a generated C kernel (:mod:`kvpass.kernels.cpu`; off with
  ``KVPASS_CPU_KERNELS=0`` or an explicit ``KVPASS_KERNELS=reference``).

The op is one graph node for ``torch.export`` / ``torch.compile``: its fake implementation
only allocates the output, and the :class:`KernelSpec` travels as a JSON string argument.

Example:
    >>> import torch
    >>> from kvpass.kernels import KernelSpec, attention
    >>> spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True)
    >>> q = torch.randn(1, 4, 5, 16); k = torch.randn(1, 2, 5, 16); v = torch.randn(1, 2, 5, 16)
    >>> attention(q, k, v, spec).shape
    torch.Size([1, 4, 5, 16])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..semantics import reference
from ..semantics.qformat import QTensor, dequantize
from ..semantics.reference import LatentWeights
from . import cpu
from .generate import interpreting, load, use_interpreter
from .spec import CodegenError, KernelSpec

__all__ = ["attention", "latent_attention", "latent_fits", "quant_attention", "quant_decode", "prefill", "decode",
           "run",
           "kernel_mode", "choose_kind"]

_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("reference", "triton", "interpret")
DECODE_MAX_ROWS = 64  # decode kernel when (max query heads per kv head) * Sq fits one tile


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------
# argument normalisation
# --------------------------------------------------------------------------------------
@dataclass
class _Call:
    """Kernel-ready arguments: int32 positions (or None = default), fp32 additive mask with
    -inf for hidden entries expanded to [B, H, Sq, Sk], int8 block table."""

    q: Tensor  # [B, H, Sq, D]
    k: Tensor  # [B, Hkv, Sk, D]
    v: Tensor  # [B, Hkv, Sk, Dv]
    q_pos: Tensor | None  # [B, Sq] int32
    k_pos: Tensor | None  # [B, Sk] int32
    mask: Tensor | None  # [B, H, Sq, Sk] fp32 (broadcast strides allowed)
    btab: Tensor | None  # [nQB, nKB] int8

    @property
    def contig(self) -> bool:
        return self.q_pos is None


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec) -> None:
    want = _TORCH_DTYPE[spec.dtype]
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise CodegenError(f"q, k, v must be 4-d, got {q.dim()}, {k.dim()}, {v.dim()}")
    B, H, _, D = q.shape
    if (H, D) != (spec.num_heads, spec.head_dim):
        raise CodegenError(f"q is {tuple(q.shape)}, spec wants H={spec.num_heads}, D={spec.head_dim}")
    if spec.latent is not None:  # k (= v) is the latent [B, 1, Sk, r]
        if k.shape[0] != B or k.shape[1] != 1 or k.shape[3] != spec.latent["rank"]:
            raise CodegenError(f"latent {tuple(k.shape)} does not fit q {tuple(q.shape)} and "
                               f"rank {spec.latent['rank']} ([B, 1, Sk, r] expected)")
        if not (q.dtype == k.dtype == want):
            raise CodegenError(f"dtypes q={q.dtype} latent={k.dtype}, spec wants {want}")
        return
    kv_want = (B, spec.num_kv_heads, k.shape[2])
    if tuple(k.shape) != (*kv_want, spec.head_dim) or tuple(v.shape) != (*kv_want, spec.head_dim_v):
        raise CodegenError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)} "
                           f"and Hkv={spec.num_kv_heads}, Dv={spec.head_dim_v}")
    if not (q.dtype == k.dtype == v.dtype == want):
        raise CodegenError(f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}, spec wants {want}")


def _int_positions(pos: Tensor, batch: int, length: int) -> Tensor:
    p = pos.to(torch.int32)
    return (p[None] if p.dim() == 1 else p).expand(batch, length)


def _additive_mask(mask: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """Bool (True = keep) or additive mask -> fp32 additive, -inf where hidden (as reference)."""
    if mask.dtype == torch.bool:
        keep = mask
        add = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    else:
        keep = torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min)
        add = mask.float()
    add = add.masked_fill(~keep, float("-inf"))
    while add.dim() < 4:
        add = add[None]
    return add.expand(shape)


def _normalise(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec, q_pos: Tensor | None,
               k_pos: Tensor | None, mask: Tensor | None, block_mask: Tensor | None) -> _Call:
    _check_shapes(q, k, v, spec)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    if (mask is not None) != spec.has_mask:
        raise CodegenError(f"spec.has_mask={spec.has_mask} but mask is {'not ' * (mask is None)}given")
    if (block_mask is not None) != spec.has_block_mask:
        raise CodegenError(f"spec.has_block_mask={spec.has_block_mask} but block_mask is "
                           f"{'not ' * (block_mask is None)}given")
    if q_pos is not None or k_pos is not None:  # explicit positions: fill the missing one
        dq, dk = reference.default_positions(B, Sq, Sk, q.device)
        q_pos = _int_positions(dq if q_pos is None else q_pos, B, Sq)
        k_pos = _int_positions(dk if k_pos is None else k_pos, B, Sk)
    return _Call(
        q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos,
        mask=None if mask is None else _additive_mask(mask, (B, H, Sq, Sk)),
        btab=None if block_mask is None else block_mask.to(torch.int8).contiguous(),
    )


def _pos_args(c: _Call) -> tuple[list, list[int]]:
    """(tensor args, strides) for positions, graph mask and block table; dummies when unused."""
    dummy = c.q
    qp, kp = (c.q_pos, c.k_pos) if not c.contig else (dummy, dummy)
    qps = [c.q_pos.stride(0), c.q_pos.stride(1)] if not c.contig else [0, 0]
    kps = [c.k_pos.stride(0), c.k_pos.stride(1)] if not c.contig else [0, 0]
    ms = list(c.mask.stride()) if c.mask is not None else [0, 0, 0, 0]
    tensors = [qp, kp, dummy if c.mask is None else c.mask, dummy if c.btab is None else c.btab]
    return tensors, [*c.q.stride(), *c.k.stride(), *c.v.stride(), *qps, *kps, *ms]


def _table_sizes(c: _Call) -> list[int]:
    return [1, 1] if c.btab is None else [c.btab.shape[0], c.btab.shape[1]]


@lru_cache(maxsize=256)
def _head_tables(spec: KernelSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    """int32 ``kv_head_map`` [H] and query heads per kv head [Hkv, GMAX] (-1 padded)."""
    hmap = torch.tensor(spec.kv_head_map, dtype=torch.int32, device=device)
    groups = [list(g) + [-1] * (spec.max_group - len(g)) for g in spec.head_groups]
    return hmap, torch.tensor(groups, dtype=torch.int32, device=device)


def _latent_tensors(spec: KernelSpec, w: LatentWeights | None) -> list[Tensor]:
    """The latent weights as the kernels read them (checked against the spec), or []."""
    if spec.latent is None:
        if w is not None:
            raise CodegenError("latent weights given to a spec without extra['latent']")
        return []
    if w is None:
        raise CodegenError("a latent spec needs its LatentWeights")
    hkv, r, d, dv = spec.num_kv_heads, spec.latent["rank"], spec.head_dim, spec.head_dim_v
    want = {"up_k": (hkv, r, d), "up_kp": (hkv, r, d), "bias_k": (hkv, d), "bias_kp": (hkv, d),
            "up_v": (hkv, r, dv), "bias_v": (hkv, dv), "freq": (hkv, d), "cos_coef": (hkv, d),
            "sin_coef": (hkv, d)}
    out = []
    for name, shape in want.items():
        t = getattr(w, name)
        if tuple(t.shape) != shape:
            raise CodegenError(f"latent {name} is {tuple(t.shape)}, the spec needs {shape}")
        dtype = _TORCH_DTYPE[spec.dtype] if name.startswith("up_") else torch.float32
        out.append(t.to(dtype).contiguous())
    return out


@lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def _mode(q: Tensor, interpret: bool | None) -> bool:
    """Resolve ``interpret`` (default: not CUDA) against how this process imported triton."""
    interpret = q.device.type != "cuda" if interpret is None else interpret
    if interpret:
        use_interpreter()
    elif interpreting():
        raise CodegenError("compiled kernels requested, but triton runs in the interpreter in "
                           "this process (TRITON_INTERPRET=1)")
    return interpret


def _prefill_config(spec: KernelSpec, sq: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill."""
    bm_cap, bn, warps, stages = 128, 64, 4, 3
    d = max(_pow2(spec.head_dim), _pow2(spec.head_dim_v))
    if interpret:
        bm_cap, bn, warps, stages = 64, 32, 4, 1
    elif spec.dtype == "float32" or d > 128:
        bm_cap, bn, warps, stages = 64, 32, 4, 2
    elif d == 128:
        warps = 8
    return min(bm_cap, max(16, _pow2(sq))), bn, warps, stages


def prefill(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec, q_pos: Tensor | None = None,
            k_pos: Tensor | None = None, mask: Tensor | None = None,
            block_mask: Tensor | None = None, *, interpret: bool | None = None,
            block_m: int | None = None, block_n: int | None = None,
            latent: LatentWeights | None = None) -> Tensor:
    """Run the generated flash-attention forward kernel. -> [B, H, Sq, Dv]

    ``interpret`` defaults to ``q.device.type != "cuda"``.  ``q_pos``/``k_pos`` None means
    default positions (loop bounds skip invisible tiles; no position loads).  ``block_m`` /
    ``block_n`` (powers of two >= 16) override the tile sizes (tests, tuning).  A latent spec
    takes the latent as ``k`` and ``v`` and its weights as ``latent``.
    """
    interpret = _mode(q, interpret)
    c = _normalise(q, k, v, spec, q_pos, k_pos, mask, block_mask)
    lat = _latent_tensors(spec, latent)
    B, H, Sq, _ = q.shape
    out = q.new_empty(B, H, Sq, spec.head_dim_v)
    if out.numel() == 0 or k.shape[2] == 0:
        return out.zero_()
    bm, bn, warps, stages = _prefill_config(spec, Sq, interpret)
    bm, bn = block_m or bm, block_n or bn
    hmap, _ = _head_tables(spec, q.device)
    tensors, strides = _pos_args(c)
    kernel = load(spec, "prefill").attn_prefill
    kernel[(_cdiv(Sq, bm), B * H)](
        q, k, v, out, *tensors, hmap, *lat, *strides, *out.stride(), Sq, k.shape[2], *_table_sizes(c),
        POS_CONTIG=c.contig, UPCAST=interpret and spec.dtype == "bfloat16",
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return out


def _decode_config(spec: KernelSpec, sq: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for decode: rows = query heads per kv head x queries."""
    bn = 32 if interpret or max(spec.head_dim, spec.head_dim_v) > 128 else 64
    return max(16, _pow2(spec.max_group * sq)), bn


def _num_splits(c: _Call, n_tiles: int, interpret: bool, num_splits: int | None,
                hkv: int) -> tuple[int, int]:
    """(splits, tiles per split): about two programs per SM on GPUs."""
    B, Hkv = c.k.shape[0], hkv
    if num_splits is None:
        num_splits = 4 if interpret else _cdiv(2 * _sm_count(c.q.device), B * Hkv)
    tps = _cdiv(n_tiles, max(1, min(num_splits, n_tiles)))
    return _cdiv(n_tiles, tps), tps


def _split_buffers(spec: KernelSpec, B: int, H: int, Sq: int, nsplit: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 partial (m, l, acc) of every split, written by ``attn_decode_split``."""
    f32 = dict(dtype=torch.float32, device=device)
    return (torch.empty(B, H, Sq, nsplit, **f32), torch.empty(B, H, Sq, nsplit, **f32),
            torch.empty(B, H, Sq, nsplit, _pow2(spec.head_dim_v), **f32))


def _reduce(mod, mp: Tensor, lp: Tensor, accp: Tensor, out: Tensor, nsplit: int) -> None:
    """Combine the splits into ``out`` [B, H, Sq, Dv] (``attn_decode_reduce``)."""
    B, H, Sq, _ = out.shape
    mod.attn_decode_reduce[(B * H * Sq,)](
        mp, lp, accp, out, *out.stride(), Sq, nsplit, BLOCK_S=max(2, _pow2(nsplit)), num_warps=4,
    )


def decode(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec, q_pos: Tensor | None = None,
           k_pos: Tensor | None = None, mask: Tensor | None = None,
           block_mask: Tensor | None = None, *, interpret: bool | None = None,
           num_splits: int | None = None, block_n: int | None = None,
           latent: LatentWeights | None = None) -> Tensor:
    """Run the generated split-K decode kernels (small Sq). -> [B, H, Sq, Dv]

    Each split reduces ``tiles per split`` KV tiles for all query heads of one kv head; a
    second kernel combines the splits.  ``num_splits`` / ``block_n`` override the heuristics.
    """
    interpret = _mode(q, interpret)
    c = _normalise(q, k, v, spec, q_pos, k_pos, mask, block_mask)
    lat = _latent_tensors(spec, latent)
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    out = q.new_empty(B, H, Sq, spec.head_dim_v)
    if out.numel() == 0 or Sk == 0:
        return out.zero_()
    bm, bn = _decode_config(spec, Sq, interpret)
    bn = block_n or bn
    nsplit, tps = _num_splits(c, _cdiv(Sk, bn), interpret, num_splits, spec.num_kv_heads)
    mp, lp, accp = _split_buffers(spec, B, H, Sq, nsplit, q.device)
    _, groups = _head_tables(spec, q.device)
    tensors, strides = _pos_args(c)
    mod = load(spec, "decode")
    mod.attn_decode_split[(nsplit, spec.num_kv_heads, B)](
        q, k, v, *tensors, groups, mp, lp, accp, *lat, *strides, Sq, Sk, *_table_sizes(c), tps, nsplit,
        POS_CONTIG=c.contig, UPCAST=interpret and spec.dtype == "bfloat16",
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
    )
    _reduce(mod, mp, lp, accp, out, nsplit)
    return out


def choose_kind(spec: KernelSpec, sq: int) -> str:
    """"decode" when all query rows of one kv head fit one tile, else "prefill"."""
    return "decode" if spec.max_group * sq <= DECODE_MAX_ROWS else "prefill"


def run(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec, q_pos: Tensor | None = None,
        k_pos: Tensor | None = None, mask: Tensor | None = None,
        block_mask: Tensor | None = None, *, interpret: bool | None = None,
        latent: LatentWeights | None = None) -> Tensor:
    """Generated kernels, kind by :func:`choose_kind` (no custom op, no dispatch)."""
    fn = decode if choose_kind(spec, q.shape[2]) == "decode" else prefill
    return fn(q, k, v, spec, q_pos, k_pos, mask, block_mask, interpret=interpret, latent=latent)


# --------------------------------------------------------------------------------------
# dispatch + custom op
# --------------------------------------------------------------------------------------
def kernel_mode(device: torch.device) -> str:
    """``$KVPASS_KERNELS`` if set (reference | triton | interpret), else by device."""
    mode = os.environ.get("KVPASS_KERNELS", "").strip().lower()
    if mode and mode not in MODES:
        raise CodegenError(f"KVPASS_KERNELS={mode!r} not in {MODES}")
    return mode or ("triton" if device.type == "cuda" else "reference")


def _reference(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec, q_pos: Tensor | None,
               k_pos: Tensor | None, mask: Tensor | None, block_mask: Tensor | None) -> Tensor:
    return reference.attention_sdpa(  # the reference's meaning, computed by torch's fused SDPA
        q, k, v, kv_head_map=spec.kv_head_map, scale=spec.scale, causal=spec.causal,
        q_pos=q_pos, k_pos=k_pos, window=spec.window, sinks=spec.sinks, softcap=spec.softcap,
        block_mask=None if block_mask is None else block_mask.bool(), block=spec.block,
        mask=mask,
    )


@lru_cache(maxsize=1024)
def _spec(spec_json: str) -> KernelSpec:
    return KernelSpec.from_json(spec_json)


_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? q_pos, Tensor? k_pos, Tensor? mask, "
           "Tensor? block_mask, str spec_json) -> Tensor")


@torch.library.custom_op("kvpass::attention", mutates_args=(), schema=_SCHEMA)
def _attention_op(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor | None, k_pos: Tensor | None,
                  mask: Tensor | None, block_mask: Tensor | None, spec_json: str) -> Tensor:
    spec = _spec(spec_json)
    mode = kernel_mode(q.device)
    if mode == "reference":
        return _reference(q, k, v, spec, q_pos, k_pos, mask, block_mask)
    if mode == "triton" and q.device.type != "cuda":
        raise CodegenError("KVPASS_KERNELS=triton needs CUDA tensors (use 'interpret' on CPU)")
    return run(q, k, v, spec, q_pos, k_pos, mask, block_mask, interpret=mode == "interpret")


@_attention_op.register_fake
def _attention_fake(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor | None, k_pos: Tensor | None,
                    mask: Tensor | None, block_mask: Tensor | None, spec_json: str) -> Tensor:
    spec = _spec(spec_json)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], spec.head_dim_v)


def attention(q: Tensor, k: Tensor, v: Tensor, spec: KernelSpec, q_pos: Tensor | None = None,
              k_pos: Tensor | None = None, mask: Tensor | None = None,
              block_mask: Tensor | None = None) -> Tensor:
    """Attention of a kvpass form as one ``kvpass::attention`` op. -> [B, H, Sq, Dv]

    Args:
        q: [B, H, Sq, D]; k: [B, Hkv, Sk, D]; v: [B, Hkv, Sk, Dv], all of ``spec.dtype``.
        spec: the kernel spec (head map, scale, visibility rules).
        q_pos, k_pos: int positions [B, Sq] / [B, Sk] (``k_pos < 0`` = empty slot); None =
            default bottom-right aligned positions (``reference.default_positions``).
        mask: graph mask broadcastable to [B, H, Sq, Sk], bool keep or additive (needs
            ``spec.has_mask``).
        block_mask: [nQB, nKB] bool/int table indexed by ``pos // spec.block`` (needs
            ``spec.has_block_mask``).

    The implementation is chosen by :func:`kernel_mode`; all equal ``kvpass.semantics.reference``.
    """
    if _eager_cpu(q):  # the op's dispatch costs ~0.1 ms a call; traced graphs keep the op
        return _reference(q, k, v, spec, q_pos, k_pos, mask, block_mask)
    return torch.ops.kvpass.attention(q, k, v, q_pos, k_pos, mask, block_mask, spec.to_json())


def _eager_cpu(q: Tensor) -> bool:
    """A plain CPU tensor outside any tracing (not fake, not compiling), reference mode: the
    op's implementation can be called directly."""
    return (type(q) is torch.Tensor and q.device.type == "cpu" and not torch.compiler.is_compiling()
            and kernel_mode(q.device) == "reference")


_LATENT_SCHEMA = ("(Tensor q, Tensor c, Tensor up_k, Tensor up_kp, Tensor bias_k, Tensor bias_kp, "
                  "Tensor up_v, Tensor bias_v, Tensor freq, Tensor cos_coef, Tensor sin_coef, "
                  "Tensor? q_pos, Tensor? k_pos, Tensor? block_mask, str spec_json) -> Tensor")


@torch.library.custom_op("kvpass::latent_attention", mutates_args=(), schema=_LATENT_SCHEMA)
def _latent_op(q: Tensor, c: Tensor, up_k: Tensor, up_kp: Tensor, bias_k: Tensor, bias_kp: Tensor,
               up_v: Tensor, bias_v: Tensor, freq: Tensor, cos_coef: Tensor, sin_coef: Tensor,
               q_pos: Tensor | None, k_pos: Tensor | None, block_mask: Tensor | None,
               spec_json: str) -> Tensor:
    spec = _spec(spec_json)
    w = LatentWeights(up_k, up_kp, bias_k, bias_kp, up_v, bias_v, freq, cos_coef, sin_coef)
    mode = kernel_mode(q.device)
    if mode == "reference":
        if k_pos is None:
            q_pos, k_pos = reference.default_positions(q.shape[0], q.shape[2], c.shape[2], q.device)
        k, v = reference.latent_keys_values(c, k_pos, w, spec.latent["norm_eps"])
        return _reference(q, k, v, spec.replace(extra={}), q_pos, k_pos, None, block_mask)
    if mode == "triton" and q.device.type != "cuda":
        raise CodegenError("KVPASS_KERNELS=triton needs CUDA tensors (use 'interpret' on CPU)")
    return run(q, c, c, spec, q_pos, k_pos, None, block_mask, interpret=mode == "interpret", latent=w)


@_latent_op.register_fake
def _latent_fake(q, c, up_k, up_kp, bias_k, bias_kp, up_v, bias_v, freq, cos_coef, sin_coef,
                 q_pos, k_pos, block_mask, spec_json):
    spec = _spec(spec_json)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], spec.head_dim_v)


LATENT_WEIGHT_BYTES = 96 * 1024  # per-program latent weights the kernels hold (smem budget)


def latent_fits(spec: KernelSpec) -> bool:
    """Whether a latent spec's per-KV-head weights (``up_k``, ``up_kp``, ``up_v`` tiles of
    ``BLOCK_R x BLOCK_D``) fit the on-chip budget the generated kernels assume.  They are held
    for the whole KV loop: rank 96 x head_dim 64 in bf16 is 48 KiB (compiled for sm_90: 80 KiB
    shared in prefill); rank 512 x 128 would need 384 KiB, more than an H100/H200 SM has, so
    such layers decompress in torch instead (a rank-chunked kernel is future work)."""
    lat = spec.latent
    elem = 4 if spec.dtype == "float32" else 2
    block_r = max(16, _pow2(lat["rank"]))
    held = block_r * (_pow2(spec.head_dim) * (2 if lat["rope"] else 1) + _pow2(spec.head_dim_v))
    return held * elem <= LATENT_WEIGHT_BYTES


def latent_attention(q: Tensor, c: Tensor, w: LatentWeights, spec: KernelSpec,
                     q_pos: Tensor | None = None, k_pos: Tensor | None = None,
                     block_mask: Tensor | None = None) -> Tensor:
    """Attention over a latent (MHC) cache as one ``kvpass::latent_attention`` op. -> [B, H, Sq, Dv]

    ``c`` [B, 1, Sk, r] is the cache; keys and values are rebuilt from it inside the kernel
    (:func:`kvpass.semantics.reference.latent_keys_values`, the meaning; ``spec.latent`` says rank, RoPE,
    norm).  Other arguments as :func:`attention` (no graph mask: latent layers are positional).

    Example (exact: rank = Hkv·D, identity up-projections, no rotation):
        >>> import torch
        >>> from kvpass.semantics.reference import LatentWeights, attention as ref
        >>> spec = KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16, causal=True,
        ...                   extra={"latent": {"rank": 16, "rope": False, "norm_eps": None}})
        >>> eye = torch.eye(16)[None]; z = torch.zeros(1, 16)
        >>> w = LatentWeights(eye, eye, z, z, eye, z, z, torch.ones(1, 16), z)
        >>> q = torch.randn(1, 2, 5, 16); c = torch.randn(1, 1, 5, 16)
        >>> torch.allclose(latent_attention(q, c, w, spec), ref(q, c, c, causal=True, scale=0.25))
        True
    """
    return torch.ops.kvpass.latent_attention(q, c, *w, q_pos, k_pos, block_mask, spec.to_json())


# --------------------------------------------------------------------------------------
# quantized storage (decode)
# --------------------------------------------------------------------------------------
def _quant_reference(q, kc, ks, kz, vc, vs, vz, rk, rv, rpos, q_pos, k_pos, block_mask, latent, spec):
    """The meaning: the store dequantized (``kvpass.semantics.qformat.dequantize``), then the residual, in
    full precision; plain attention over both (decode: the query sees the store quantized)."""
    qz = spec.quant
    dt = _TORCH_DTYPE[spec.dtype]

    def deq(codes, scale, zero, axis, rest):  # the store, then the residual, in one buffer
        g = qz["group"] if axis == "token" else qz["unit"]
        qt = QTensor(codes, scale, zero, qz["bits"], g, axis)
        n = codes.shape[2]
        if dt != torch.float32:
            return torch.cat([dequantize(qt, dt), rest.to(dt)], 2)
        buf = torch.empty(*rest.shape[:2], n + rest.shape[2], codes.shape[3] * 8 // qz["bits"], device=rest.device)
        dequantize(qt, out=buf[:, :, :n])
        buf[:, :, n:] = rest
        return buf

    k = deq(kc, ks, kz, qz["keys"], rk)
    kp = torch.cat([k_pos, rpos], 1)
    base = spec.replace(extra={})
    if spec.latent is not None:
        w = LatentWeights(*latent)
        kk, vv = reference.latent_keys_values(k, kp, w, spec.latent["norm_eps"])
        return _reference(q, kk, vv, base, q_pos, kp, None, block_mask)
    v = deq(vc, vs, vz, qz["values"], rv)
    return _reference(q, k, v, base, q_pos, kp, None, block_mask)


def quant_decode(q: Tensor, kc: Tensor, ks: Tensor, kz: Tensor, vc: Tensor, vs: Tensor, vz: Tensor,
                 rk: Tensor, rv: Tensor, rpos: Tensor, spec: KernelSpec, q_pos: Tensor, k_pos: Tensor,
                 block_mask: Tensor | None = None, *, latent: LatentWeights | None = None,
                 interpret: bool | None = None, num_splits: int | None = None,
                 block_n: int | None = None) -> Tensor:
    """Split-K decode over a quantized cache (``spec.quant``): packed codes ``kc``/``vc`` with
    scales and zeros, dequantized in registers, then the full-precision residual ``rk``/``rv``
    (positions ``rpos``) in the last split.  -> [B, H, Sq, Dv]"""
    interpret = _mode(q, interpret)
    qz = spec.quant
    if qz is None:
        raise CodegenError("quant_decode needs a spec with extra['quant']")
    B, H, Sq, _ = q.shape
    width = spec.latent["rank"] if spec.latent is not None else spec.head_dim
    hkv = 1 if spec.latent is not None else spec.num_kv_heads
    if kc.dtype != torch.uint8 or tuple(kc.shape[:2]) != (B, hkv) or kc.shape[3] * 8 != width * qz["bits"]:
        raise CodegenError(f"key codes {tuple(kc.shape)} {kc.dtype} do not fit the spec "
                           f"(uint8 [B={B}, {hkv}, Sk, {width * qz['bits'] // 8}])")
    if (block_mask is not None) != spec.has_block_mask:
        raise CodegenError(f"spec.has_block_mask={spec.has_block_mask} but block_mask is "
                           f"{'not ' * (block_mask is None)}given")
    c = _Call(q=q, k=kc, v=vc, q_pos=_int_positions(q_pos, B, Sq), k_pos=_int_positions(k_pos, B, kc.shape[2]),
              mask=None, btab=None if block_mask is None else block_mask.to(torch.int8).contiguous())
    rpos32 = _int_positions(rpos, B, rk.shape[2])
    lat = _latent_tensors(spec, latent)
    Sk, SR = kc.shape[2], rk.shape[2]
    out = q.new_empty(B, H, Sq, spec.head_dim_v)
    if out.numel() == 0 or Sk + SR == 0:
        return out.zero_()
    bm, bn = _decode_config(spec, Sq, interpret)
    bn = block_n or bn
    nsplit, tps = _num_splits(c, max(1, _cdiv(Sk, bn)), interpret, num_splits, hkv)
    mp, lp, accp = _split_buffers(spec, B, H, Sq, nsplit, q.device)
    _, groups = _head_tables(spec, q.device)
    tensors, strides = _pos_args(c)
    ks, kz, vs, vz = (t.contiguous() for t in (ks, kz, vs, vz))
    rk, rv = rk.to(q.dtype), rv.to(q.dtype)
    quant_args = [ks, kz, vs, vz, rk, rv, rpos32, *ks.stride(), *vs.stride(), *rk.stride(), *rv.stride(),
                  *rpos32.stride(), SR]
    mod = load(spec, "decode")
    mod.attn_decode_split[(nsplit, spec.num_kv_heads, B)](
        q, kc, vc, *tensors, groups, mp, lp, accp, *lat, *quant_args, *strides, Sq, Sk, *_table_sizes(c),
        tps, nsplit, POS_CONTIG=False, UPCAST=interpret and spec.dtype == "bfloat16",
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2,
    )
    _reduce(mod, mp, lp, accp, out, nsplit)
    return out


_QUANT_SCHEMA = ("(Tensor q, Tensor kc, Tensor ks, Tensor kz, Tensor vc, Tensor vs, Tensor vz, Tensor rk, "
                 "Tensor rv, Tensor rpos, Tensor q_pos, Tensor k_pos, Tensor? block_mask, Tensor[] latent, "
                 "str spec_json) -> Tensor")


@torch.library.custom_op("kvpass::quant_attention", mutates_args=(), schema=_QUANT_SCHEMA)
def _quant_op(q, kc, ks, kz, vc, vs, vz, rk, rv, rpos, q_pos, k_pos, block_mask, latent, spec_json):
    spec = _spec(spec_json)
    mode = kernel_mode(q.device)
    if mode == "reference":
        out = cpu.quant_decode(q, kc, ks, kz, vc, vs, vz, rk, rv, rpos, spec, q_pos, k_pos) if cpu.enabled() else None
        if out is not None:  # the generated C kernel, where one applies (CPU, fp32, ...)
            return out
        return _quant_reference(q, kc, ks, kz, vc, vs, vz, rk, rv, rpos, q_pos, k_pos, block_mask, latent, spec)
    if mode == "triton" and q.device.type != "cuda":
        raise CodegenError("KVPASS_KERNELS=triton needs CUDA tensors (use 'interpret' on CPU)")
    return quant_decode(q, kc, ks, kz, vc, vs, vz, rk, rv, rpos, spec, q_pos, k_pos, block_mask,
                        latent=LatentWeights(*latent) if latent else None, interpret=mode == "interpret")


@_quant_op.register_fake
def _quant_fake(q, kc, ks, kz, vc, vs, vz, rk, rv, rpos, q_pos, k_pos, block_mask, latent, spec_json):
    spec = _spec(spec_json)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], spec.head_dim_v)


def quant_attention(q: Tensor, store: tuple[Tensor, ...], residual: tuple[Tensor, Tensor, Tensor],
                    spec: KernelSpec, q_pos: Tensor, k_pos: Tensor, block_mask: Tensor | None = None,
                    latent: LatentWeights | None = None) -> Tensor:
    """Decode attention over a quantized cache as one ``kvpass::quant_attention`` op.

    ``store``: (key codes, key scales, key zeros, value codes, value scales, value zeros) as
    :class:`kvpass.runtime.cache.KVQuantLayer` holds them, ``k_pos`` their positions; ``residual``:
    (keys, values, positions) kept in full precision.  Every stored token is read quantized and
    every residual token in full precision -- the rule's meaning for the newest query
    (:class:`kvpass.semantics.qformat.QuantRule`).  With a latent spec the "keys" are the latent and
    ``latent`` its weights (value tensors are then unused placeholders).
    """
    if _eager_cpu(q) and cpu.enabled():  # the C kernel without the op's dispatch (~0.2 ms a call)
        out = cpu.quant_decode(q, *store, *residual, spec, q_pos, k_pos)  # None: the spec needs the op
        if out is not None:
            return out
    lat = list(latent) if latent is not None else []
    return torch.ops.kvpass.quant_attention(q, *store, *residual, q_pos, k_pos, block_mask, lat,
                                            spec.to_json())
