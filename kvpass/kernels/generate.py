"""Triton source text for a :class:`KernelSpec`, cached on disk and loaded with importlib.

Two kinds of source per spec:

- ``"prefill"``: flash-attention forward, one program per (q block, batch x q head):
  online softmax in the log2 domain, fp32 accumulation.  Kernel ``attn_prefill``.
- ``"decode"``: split-K flash-decoding, one program per (split, kv head, batch); the rows of
  a program are all (query head, query) pairs reading that kv head, so each KV tile is read
  once per group.  Kernel ``attn_decode_split`` writes partial (m, l, acc); kernel
  ``attn_decode_reduce`` combines the splits.

Everything the spec fixes is written into the text as a literal (head counts, head size,
scale, window, sinks, softcap, head map kind, dtype) and code a spec does not need is not
emitted.  What varies per call is a ``tl.constexpr`` argument:

- ``POS_CONTIG``: positions are the default ones (``k_pos[j] = j``, queries bottom-right
  aligned, see ``reference.default_positions``), signalled by passing no position arrays.
  Then positions are computed, not loaded, and the KV loop runs only over tiles that
  causal/window/sinks allow (whole-tile skipping by loop bounds).  With explicit positions
  (ring buffers, padding) every tile's ``k_pos`` is read and a tile is skipped when its
  position bounds (min/max of the tile's valid slots) show that no pair can be visible.
- ``UPCAST``: the Triton interpreter computes ``tl.dot`` on bf16 as integers (numpy stores
  bf16 as uint16), so interpreted bf16 kernels upcast dot operands to fp32 -- the same
  values, products and fp32 accumulation as a bf16 MMA.  Always False on GPUs.
- ``BLOCK_M`` / ``BLOCK_N``: tile sizes chosen by the launcher.

Inside a visited tile the per-element mask is only computed when the tile is not *full*
(every pair of valid rows/columns visible, decided from the tiles' position bounds and, for
block tables, the table entries at the tile's corners).

Example:
    >>> from kvpass.kernels.spec import KernelSpec
    >>> text = source(KernelSpec(num_heads=2, num_kv_heads=1, head_dim=64, causal=True))
    >>> "def attn_prefill(" in text and "WINDOW" not in text
    True
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
import threading
from pathlib import Path
from types import ModuleType

from ..semantics import visibility as V
from .spec import KNOWN_EXTRA, CodegenError, KernelSpec

__all__ = ["source", "load", "kernel_path", "cache_dir", "interpreting", "use_interpreter",
           "KINDS", "CODEGEN_VERSION"]

CODEGEN_VERSION = 3  # 3: visibility built from kvpass.semantics.visibility rules
KINDS = ("prefill", "decode")
_LOG2E = 1.4426950408889634
_TL_DTYPE = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# --------------------------------------------------------------------------------------
# source text
# --------------------------------------------------------------------------------------
def source(spec: KernelSpec, kind: str = "prefill") -> str:
    """The Triton module text for ``spec`` and ``kind`` ("prefill" | "decode").

    Pure and deterministic: equal specs give identical text.
    """
    if kind not in KINDS:
        raise CodegenError(f"kind={kind!r} not in {KINDS}")
    unknown = set(spec.extra) - KNOWN_EXTRA
    if unknown:
        raise CodegenError(f"KernelSpec.extra keys {sorted(unknown)} are not implemented")
    if spec.quant is not None and kind == "prefill":
        raise CodegenError("quantized storage has decode kernels only: a prefill's queries each see "
                           "the cache at their own step (kvpass.semantics.qformat.QuantRule), which the reference "
                           "computes")
    body = _prefill_kernel(spec) if kind == "prefill" else _decode_kernels(spec)
    return _header(spec, kind) + _helpers(spec) + body


def _header(spec: KernelSpec, kind: str) -> str:
    consts = {
        "H": spec.num_heads, "HKV": spec.num_kv_heads, "D": spec.head_dim,
        "DV": spec.head_dim_v, "BLOCK_D": _pow2(spec.head_dim),
        "BLOCK_DV": _pow2(spec.head_dim_v), "BIG": 1 << 30, "LOG2E": _LOG2E,
    }
    if spec.softcap is None:
        consts["QK_SCALE"] = spec.scale * _LOG2E
    else:
        consts["CAP_IN"] = spec.scale / spec.softcap
        consts["CAP_OUT"] = spec.softcap * _LOG2E
    if spec.window is not None:
        consts["WINDOW"] = spec.window
        consts["SINKS"] = spec.sinks
    if spec.has_block_mask:
        consts["BLK"] = spec.block
    if spec.group_size is not None:
        consts["GROUP"] = spec.group_size
    consts["GMAX"] = spec.max_group
    lat = spec.latent
    if lat is not None:
        consts["R"] = lat["rank"]
        consts["BLOCK_R"] = max(16, _pow2(lat["rank"]))
        if lat["norm_eps"] is not None:
            consts["EPS"] = float(lat["norm_eps"])
    qz = spec.quant
    if qz is not None:
        consts.update(BITS=qz["bits"], PER=8 // qz["bits"], QMASK=(1 << qz["bits"]) - 1,
                      QGROUP=qz["group"], UNIT=qz["unit"])
    lines = [
        "# Generated by kvpass.kernels -- do not edit; regenerated from the spec below.",
        f"# kind: {kind}  codegen version: {CODEGEN_VERSION}  key: {spec.key()}",
        f"# spec: {spec.to_json()}",
        "import triton",
        "import triton.language as tl",
        "",
        *(f"{k} = tl.constexpr({v!r})" for k, v in consts.items()),
        "", "",
    ]
    return "\n".join(lines)


def _helpers(spec: KernelSpec) -> str:
    if spec.softcap is None:
        return ""
    return _dedent('''
        @triton.jit
        def _tanh(x):
            # tanh without libdevice (the interpreter has none): sign(x)(1-e)/(1+e), e=exp(-2|x|)
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            return tl.where(x < 0, -t, t)
    ''')


def _dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n") + "\n\n"


def _code(*chunks: str) -> str:
    """Dedent each chunk, drop blank lines, join: the generator's unit of text."""
    lines = []
    for c in chunks:
        lines += [ln for ln in textwrap.dedent(c).splitlines() if ln.strip()]
    return "\n".join(lines) + "\n"


def _indent(text: str, n: int) -> str:
    return textwrap.indent(_code(text), " " * n)


def _dmask(spec: KernelSpec, axis: str) -> str:
    """Load mask term for the padded head dim (empty when D is a power of two)."""
    if _pow2(spec.head_dim) == spec.head_dim:
        return ""
    return f" & (offs_d{axis} < D)"


def _dvmask(spec: KernelSpec, axis: str) -> str:
    if _pow2(spec.head_dim_v) == spec.head_dim_v:
        return ""
    return f" & (offs_dv{axis} < DV)"


# -- the KV-tile loop shared by prefill and decode --------------------------------------
_BOUNDS_CONTIG = """
    kp = tl.where(col_ok, offs_n, -1)
    k_lo = tile * BLOCK_N
    k_hi = tl.minimum(k_lo + BLOCK_N, SK) - 1
    full = k_lo + BLOCK_N <= SK
"""

_BOUNDS_LOADED = """
    kp = tl.load(kp_base + offs_n * skpn, mask=col_ok, other=-1)
    k_lo = tl.min(tl.where(kp >= 0, kp, BIG), 0)
    k_hi = tl.max(kp, 0)
    full = tl.min(kp, 0) >= 0
    visit = k_hi >= 0
"""

def _rule(spec: KernelSpec, with_valid: bool):
    """The spec's visibility rule (:mod:`kvpass.semantics.visibility`): the same composition
    the reference evaluates, here turned into Triton."""
    return V.for_layer(causal_=spec.causal, window_=spec.window, sinks=spec.sinks if spec.window is not None else 0,
                       has_blocks=spec.has_block_mask, block=spec.block, with_valid=with_valid)


def _tile_classify(spec: KernelSpec, skip: bool) -> str:
    """Tile tests on position bounds: `visit` (some pair may be visible), `full` (all are).
    ``skip``: the loop may meet tiles its bounds did not rule out (``visit`` is tested); a
    block table always tests ``visit`` (it rules out tiles inside any bounds)."""
    rule = _rule(spec, with_valid=False)
    if rule is None:
        return ""
    out = [rule.tile_setup] if rule.tile_setup else []
    if (skip or spec.has_block_mask) and rule.visit is not None:
        out += [f"visit = visit & ({rule.visit})"]
    if rule.full is None:
        raise CodegenError(f"visibility rule {rule.name} has no full-tile test")
    out += [f"full = full & ({rule.full})"]
    return _code(*out)


def _element_mask(spec: KernelSpec) -> str:
    rule = _rule(spec, with_valid=True)
    expr = rule.element.replace("QP", "qp[:, None]").replace("KP", "kp[None, :]")
    return _code(*([rule.element_setup] if rule.element_setup else []), f"vis = {expr}",
                 's = tl.where(vis, s, float("-inf"))')


def _dequant(spec: KernelSpec, part: str, rows: str, cols: str, mask: str) -> str:
    """Load a quantized tile in registers: codes unpacked by shifts, ``code * scale + zero``.

    ``part``: "k" or "v" (base pointers ``{part}_base``, ``{part}s_base``, ``{part}z_base`` and
    strides ``s{part}n``/``s{part}d``, ``s{part}sn``/``s{part}sd``); ``rows``/``cols``: the token and
    channel index expressions broadcast to the tile's shape (e.g. ``offs_n[None, :]``)."""
    qz = spec.quant
    axis = qz["keys"] if part == "k" else qz["values"]
    if axis == "token":
        srow, scol = rows, f"({cols} // QGROUP)"
    else:
        srow, scol = f"({rows} // UNIT)", cols
    lines = [f"{part}c = tl.load({part}_base + {rows} * s{part}n + ({cols} // PER) * s{part}d, mask={mask}, other=0)"]
    if qz["bits"] != 8:
        lines += [f"{part}c = ({part}c >> (({cols} % PER) * BITS)) & QMASK  # unpack"]
    lines += [
        f"{part}sc = tl.load({part}s_base + {srow} * s{part}sn + {scol} * s{part}sd, mask={mask}, other=0.0)",
        f"{part}zr = tl.load({part}z_base + {srow} * s{part}sn + {scol} * s{part}sd, mask={mask}, other=0.0)",
        f"{part}q = ({part}c.to(tl.float32) * {part}sc.to(tl.float32) + {part}zr.to(tl.float32))"
        f".to({_TL_DTYPE[spec.dtype]})",
    ]
    return "\n".join(lines) + "\n"


def _tile_math(spec: KernelSpec, residual: bool = False) -> str:
    """Scores, element mask (non-full tiles only), online-softmax update of m_i, l_i, acc.

    ``residual``: the tile comes from a quantized layer's full-precision residual buffer
    (bases ``rk_base``/``rv_base``), else from the cache as the spec stores it."""
    dt = _TL_DTYPE[spec.dtype]
    prec = ', input_precision="ieee"' if spec.dtype == "float32" else ""  # no tf32
    up = spec.dtype == "bfloat16"
    lat = spec.latent
    quant = spec.quant is not None and not residual
    kb, vb = ("rk_base", "rv_base") if residual else ("k_base", "v_base")
    kn, kd, vn, vd = ("srkn", "srkd", "srvn", "srvd") if residual else ("skn", "skd", "svn", "svd")
    if lat is None:
        kmask = f'col_ok[None, :]{_dmask(spec, "[:, None]")}'
        if quant:
            out = [_dequant(spec, "k", "offs_n[None, :]", "offs_d[:, None]", kmask),
                   "kt = kq  # [BLOCK_D, BLOCK_N], dequantized in registers"]
        else:
            out = [f"""
                kt = tl.load({kb} + offs_n[None, :] * {kn} + offs_d[:, None] * {kd},
                             mask={kmask}, other=0.0)  # [BLOCK_D, BLOCK_N]
            """]
        out += ["if UPCAST:\n    kt = kt.to(tl.float32)"] if up else []
    else:
        out = [_latent_keys(spec, residual)]
    out += [f"s = tl.dot(q, kt{prec})  # [BLOCK_M, BLOCK_N] fp32"]
    if spec.softcap is None:
        out += ["s = s * QK_SCALE  # log2 domain"]
    else:
        out += ["s = _tanh(s * CAP_IN) * CAP_OUT  # softcap, log2 domain"]
    if spec.has_mask:
        out += ["""
            s = s + tl.load(m_row[:, None] + offs_n[None, :] * smn,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0) * LOG2E
        """]
    out += ["if not full:\n" + _indent(_element_mask(spec), 4)]
    out += ["""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
    """]
    if lat is None:
        vmask = f'col_ok[:, None]{_dvmask(spec, "[None, :]")}'
        if quant:
            out += [_dequant(spec, "v", "offs_n[:, None]", "offs_dv[None, :]", vmask),
                    "v = vq  # [BLOCK_N, BLOCK_DV]"]
        else:
            out += [f"""
                v = tl.load({vb} + offs_n[:, None] * {vn} + offs_dv[None, :] * {vd},
                            mask={vmask}, other=0.0)  # [BLOCK_N, BLOCK_DV]
            """]
    else:
        out += [f"v = (tl.dot(ct, uv{prec}) + bv[None, :]).to({dt})  # decompressed in registers"]
    out += [] if spec.dtype == "float32" else [f"p = p.to({dt})  # as the MMA's A operand"]
    out += ["if UPCAST:\n    p = p.to(tl.float32)\n    v = v.to(tl.float32)"] if up else []
    out += [f"acc = acc * alpha[:, None] + tl.dot(p, v{prec})", "m_i = m_new"]
    return _code(*out)


def _latent_keys(spec: KernelSpec, residual: bool = False) -> str:
    """Keys of one tile rebuilt from the latent (``reference.latent_keys_values``)."""
    lat = spec.latent
    dt = _TL_DTYPE[spec.dtype]
    prec = ', input_precision="ieee"' if spec.dtype == "float32" else ""
    cmask = "col_ok[:, None] & (offs_r[None, :] < R)"
    if spec.quant is not None and not residual:
        out = [_dequant(spec, "k", "offs_n[:, None]", "offs_r[None, :]", cmask),
               "ct = kq  # [BLOCK_N, BLOCK_R], dequantized in registers"]
    else:
        kb, kn, kd = ("rk_base", "srkn", "srkd") if residual else ("k_base", "skn", "skd")
        out = [f"""
            ct = tl.load({kb} + offs_n[:, None] * {kn} + offs_r[None, :] * {kd},
                         mask={cmask}, other=0.0)  # [BLOCK_N, BLOCK_R]
        """]
    out += ["if UPCAST:\n    ct = ct.to(tl.float32)"] if spec.dtype == "bfloat16" else []
    out += [f"y = tl.dot(ct, uk{prec}) + bk[None, :]  # [BLOCK_N, BLOCK_D] fp32"]
    if lat["rope"]:
        out += [f"""
            yp = tl.dot(ct, ukp{prec}) + bkp[None, :]  # partner dimensions
            ang = kp.to(tl.float32)[:, None] * frq[None, :]
            kf = y * ca[None, :] * tl.cos(ang) + yp * sb[None, :] * tl.sin(ang)
        """]
    else:
        out += ["kf = y * ca[None, :]"]
    if lat["norm_eps"] is not None:
        out += ["kf = kf * (1.0 / tl.sqrt(tl.sum(y * y, 1) / D + EPS))[:, None]  # per-head RMS norm"]
    out += [f"kt = tl.trans(kf.to({dt}))  # [BLOCK_D, BLOCK_N], as a cached key would be"]
    out += ["if UPCAST:\n    kt = kt.to(tl.float32)"] if spec.dtype == "bfloat16" else []
    return _code(*out)


def _latent_setup(spec: KernelSpec) -> str:
    """Per-program loads of the latent weights of this program's KV head."""
    dt = _TL_DTYPE[spec.dtype]
    up = spec.dtype == "bfloat16"
    rd = "(offs_r[:, None] < R)" + _dmask(spec, "[None, :]")
    rdv = "(offs_r[:, None] < R)" + _dvmask(spec, "[None, :]")
    dm = "" if _pow2(spec.head_dim) == spec.head_dim else ", mask=offs_d < D, other=0.0"
    dvm = "" if _pow2(spec.head_dim_v) == spec.head_dim_v else ", mask=offs_dv < DV, other=0.0"
    out = [f"""
        offs_r = tl.arange(0, BLOCK_R)
        kvh64 = kvh.to(tl.int64)
        w_rd = kvh64 * (R * D) + offs_r[:, None] * D + offs_d[None, :]
        w_d = kvh64 * D + offs_d
        uk = tl.load(UK + w_rd, mask={rd}, other=0.0)  # [BLOCK_R, BLOCK_D] ({dt})
        bk = tl.load(BK + w_d{dm})
        ca = tl.load(CA + w_d{dm})
        uv = tl.load(UV + kvh64 * (R * DV) + offs_r[:, None] * DV + offs_dv[None, :], mask={rdv}, other=0.0)
        bv = tl.load(BV + kvh64 * DV + offs_dv{dvm})
    """]
    if spec.latent["rope"]:
        out += [f"""
            ukp = tl.load(UKP + w_rd, mask={rd}, other=0.0)
            bkp = tl.load(BKP + w_d{dm})
            frq = tl.load(FRQ + w_d{dm})
            sb = tl.load(SB + w_d{dm})
        """]
    if up:
        names = ["uk", "uv"] + (["ukp"] if spec.latent["rope"] else [])
        out += ["if UPCAST:\n" + "".join(f"    {n} = {n}.to(tl.float32)\n" for n in names)]
    return _code(*out)


def _contig_range(spec: KernelSpec) -> str:
    """Default positions: the tiles [b0, b1) (and sink tiles [ts, ts + n_a)) worth visiting."""
    out = ["hi = tl.minimum(SK, q_hi + 1)" if spec.causal else "hi = SK"]
    out += ["b1 = tl.minimum(te, tl.cdiv(hi, BLOCK_N))"]
    if spec.window is None:
        return _code(*out, "b0 = ts")
    out += ["lo = tl.maximum(q_lo - (WINDOW - 1), 0)", "b0 = tl.maximum(ts, lo // BLOCK_N)"]
    if spec.sinks:
        out += ["a1 = tl.minimum(tl.minimum(te, tl.cdiv(hi, BLOCK_N)), "
                "tl.minimum(lo // BLOCK_N, tl.cdiv(SINKS, BLOCK_N)))",
                "n_a = tl.maximum(a1 - ts, 0)  # sink tiles [ts, ts + n_a)"]
    return _code(*out)


def _kv_loops(spec: KernelSpec) -> str:
    """Both loop variants over KV tiles [ts, te): default positions / loaded positions."""
    sinks = spec.window is not None and spec.sinks > 0
    math = _tile_math(spec)
    head = "offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)\ncol_ok = offs_n < SK"
    if spec.has_block_mask:  # the table can still rule out tiles inside the loop bounds
        contig_body = _code(head, _BOUNDS_CONTIG, "visit = k_hi >= 0",
                            _tile_classify(spec, skip=False), "if visit:\n" + _indent(math, 4))
    else:
        contig_body = _code(head, _BOUNDS_CONTIG, _tile_classify(spec, skip=False), math)
    loaded_body = _code(head, _BOUNDS_LOADED, _tile_classify(spec, skip=True),
                        "if visit:\n" + _indent(math, 4))
    if sinks:
        contig_loop = ("for t in range(0, n_a + tl.maximum(b1 - b0, 0)):\n"
                       "    tile = tl.where(t < n_a, ts + t, b0 + (t - n_a))")
    else:
        contig_loop = "for tile in range(b0, b1):"
    init = _code(
        'm_i = tl.full([BLOCK_M], float("-inf"), tl.float32)',
        "l_i = tl.zeros([BLOCK_M], tl.float32)",
        "acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)",
    )
    return (init + "if POS_CONTIG:\n" + _indent(_contig_range(spec), 4) + _indent(contig_loop, 4)
            + _indent(contig_body, 8) + "else:\n    for tile in range(ts, te):\n"
            + _indent(loaded_body, 8))


def _residual_loop(spec: KernelSpec) -> str:
    """A quantized layer's full-precision residual (the newest tokens): read by the last split,
    after its share of the quantized slots, with plain loads."""
    head = _code("""
        offs_n = rt * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < SR
    """, _BOUNDS_LOADED.replace("kp_base", "rp_base").replace("skpn", "srpn"))
    body = _code(head, _tile_classify(spec, skip=True), "if visit:\n" + _indent(_tile_math(spec, True), 4))
    return "if split == NSPLIT - 1:\n    for rt in range(0, tl.cdiv(SR, BLOCK_N)):\n" + _indent(body, 8)


# -- kernels ----------------------------------------------------------------------------
_POS_ARGS = """
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sqpb, sqpm, skpb, skpn,
    smb, smh, smm, smn,
"""


def _q_load(spec: KernelSpec) -> str:
    up = "if UPCAST:\n    q = q.to(tl.float32)\n" if spec.dtype == "bfloat16" else ""
    return (f"q_row = b64 * sqb + h64 * sqh + qi * sqm  # [BLOCK_M] (h64 is per row in decode)\n"
            f"q = tl.load(Q + q_row[:, None] + offs_d[None, :] * sqd,\n"
            f"            mask=row_ok[:, None]{_dmask(spec, '[None, :]')}, other=0.0)"
            "  # [BLOCK_M, BLOCK_D]\n" + up)


def _common_bases(spec: KernelSpec) -> str:
    if spec.latent is None:
        s = """
            offs_d = tl.arange(0, BLOCK_D)
            offs_dv = tl.arange(0, BLOCK_DV)
            k_base = K + b64 * skb + kvh.to(tl.int64) * skh
            v_base = V + b64 * svb + kvh.to(tl.int64) * svh
            kp_base = KPOS + b64 * skpb
        """
    else:  # K is the latent [B, 1, Sk, R]: one stored "head" for every kv head
        s = """
            offs_d = tl.arange(0, BLOCK_D)
            offs_dv = tl.arange(0, BLOCK_DV)
            k_base = K + b64 * skb
            kp_base = KPOS + b64 * skpb
        """
        s = _code(s, _latent_setup(spec))
    if spec.quant is not None:
        head = "" if spec.latent is not None else " + kvh.to(tl.int64) * sksh"
        rhead = "" if spec.latent is not None else " + kvh.to(tl.int64) * srkh"
        s = _code(s, f"""
            ks_base = KS + b64 * sksb{head}  # scales / zeros of the quantized keys
            kz_base = KZ + b64 * sksb{head}
            rk_base = RK + b64 * srkb{rhead}  # the full-precision residual
            rp_base = RPOS + b64 * srpb
        """)
        if spec.latent is None:
            s = _code(s, """
                vs_base = VS + b64 * svsb + kvh.to(tl.int64) * svsh
                vz_base = VZ + b64 * svsb + kvh.to(tl.int64) * svsh
                rv_base = RV + b64 * srvb + kvh.to(tl.int64) * srvh
            """)
    if not spec.has_mask:
        return _code(s)
    return _code(s, "m_row = MASK + b64 * smb + h64 * smh + qi * smm  # [BLOCK_M] row pointers")


def _positions(contig_lo: str, contig_hi: str) -> str:
    return f"""
        if POS_CONTIG:
            qp = qi + (SK - SQ)
            q_lo = {contig_lo}
            q_hi = {contig_hi}
        else:
            qp = tl.load(QPOS + b64 * sqpb + qi * sqpm, mask=row_ok, other=0)
            q_lo = tl.min(tl.where(row_ok, qp, BIG), 0)
            q_hi = tl.max(tl.where(row_ok, qp, -BIG), 0)
    """


def _latent_args(spec: KernelSpec) -> str:
    out = "" if spec.latent is None else "    UK, UKP, BK, BKP, UV, BV, FRQ, CA, SB,\n"
    if spec.quant is not None:
        out += ("    KS, KZ, VS, VZ, RK, RV, RPOS,\n"
                "    sksb, sksh, sksn, sksd, svsb, svsh, svsn, svsd,\n"
                "    srkb, srkh, srkn, srkd, srvb, srvh, srvn, srvd, srpb, srpn, SR,\n")
    return out


def _prefill_kernel(spec: KernelSpec) -> str:
    kvh = "h // GROUP" if spec.group_size is not None else "tl.load(HMAP + h)"
    dt = _TL_DTYPE[spec.dtype]
    setup = f"""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = {kvh}
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        qi = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
        row_ok = qi < SQ
    """
    pos = _positions("pid_m * BLOCK_M + (SK - SQ)",
                     "tl.minimum(pid_m * BLOCK_M + BLOCK_M, SQ) - 1 + (SK - SQ)")
    epilogue = f"""
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key -> zeros
        o_ptrs = O + b64 * sob + h64 * soh + qi[:, None] * som + offs_dv[None, :] * sod
        tl.store(o_ptrs, out.to({dt}), mask=row_ok[:, None]{_dvmask(spec, '[None, :]')})
    """
    body = (textwrap.dedent(setup) + textwrap.dedent(pos) + _common_bases(spec)
            + _q_load(spec) + "ts = 0\nte = tl.cdiv(SK, BLOCK_N)\n" + _kv_loops(spec)
            + textwrap.dedent(epilogue))
    return (
        "@triton.jit\n"
        "def attn_prefill(\n"
        "    Q, K, V, O, QPOS, KPOS, MASK, BTAB, HMAP,\n" + _latent_args(spec)
        + _POS_ARGS.strip("\n") + "\n"
        "    sob, soh, som, sod,\n"
        "    SQ, SK, NQB, NKB,\n"
        "    POS_CONTIG: tl.constexpr, UPCAST: tl.constexpr,\n"
        "    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,\n"
        "):\n"
        '    """Flash-attention forward: program (q block, batch * H + q head)."""\n'
        + _indent(body, 4) + "\n\n"
    )


def _decode_kernels(spec: KernelSpec) -> str:
    if spec.group_size is not None:
        heads = "h = kvh * GROUP + slot\nrow_ok = slot < GROUP\n"
    else:
        heads = ("row_ok = slot < GMAX\n"
                 "h = tl.load(HGROUPS + kvh * GMAX + slot, mask=row_ok, other=-1)\n"
                 "row_ok = row_ok & (h >= 0)\n"
                 "h = tl.maximum(h, 0)\n")
    setup = """
        split = tl.program_id(0)
        kvh = tl.program_id(1)
        b = tl.program_id(2)
        b64 = b.to(tl.int64)
        r = tl.arange(0, BLOCK_M)  # rows = (query head slot, query) pairs of this kv head
        slot = r // SQ
        qi = r % SQ
    """
    pos = _positions("SK - SQ", "SK - 1")
    loop = "ts = split * TPS\nte = tl.minimum(ts + TPS, tl.cdiv(SK, BLOCK_N))\n"
    store = """
        part = ((b64 * H + h) * SQ + qi) * NSPLIT + split  # [BLOCK_M] partial-row index
        tl.store(MP + part, m_i, mask=row_ok)
        tl.store(LP + part, l_i, mask=row_ok)
        tl.store(ACCP + part[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
    """
    body = (textwrap.dedent(setup) + heads + "h64 = h.to(tl.int64)\n" + textwrap.dedent(pos)
            + _common_bases(spec) + _q_load(spec) + loop + _kv_loops(spec)
            + (_residual_loop(spec) if spec.quant is not None else "") + textwrap.dedent(store))
    split_kernel = (
        "@triton.jit\n"
        "def attn_decode_split(\n"
        "    Q, K, V, QPOS, KPOS, MASK, BTAB, HGROUPS, MP, LP, ACCP,\n" + _latent_args(spec)
        + _POS_ARGS.strip("\n") + "\n"
        "    SQ, SK, NQB, NKB, TPS, NSPLIT,\n"
        "    POS_CONTIG: tl.constexpr, UPCAST: tl.constexpr,\n"
        "    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,\n"
        "):\n"
        '    """Split-K decode: program (split, kv head, batch) -> partial (m, l, acc)."""\n'
        + _indent(body, 4) + "\n\n"
    )
    return split_kernel + _reduce_kernel(spec)


def _reduce_kernel(spec: KernelSpec) -> str:
    dt = _TL_DTYPE[spec.dtype]
    dvmask = "" if _pow2(spec.head_dim_v) == spec.head_dim_v else ", mask=offs_dv < DV"
    return _dedent(f'''
        @triton.jit
        def attn_decode_reduce(
            MP, LP, ACCP, O,
            sob, soh, som, sod,
            SQ, NSPLIT,
            BLOCK_S: tl.constexpr,
        ):
            """Combine the splits of one (batch, q head, query) row."""
            row = tl.program_id(0)
            qi = row % SQ
            h = (row // SQ) % H
            b = row // (SQ * H)
            offs_s = tl.arange(0, BLOCK_S)
            offs_dv = tl.arange(0, BLOCK_DV)
            s_ok = offs_s < NSPLIT
            part = row.to(tl.int64) * NSPLIT + offs_s
            m = tl.load(MP + part, mask=s_ok, other=float("-inf"))
            l = tl.load(LP + part, mask=s_ok, other=0.0)
            acc = tl.load(ACCP + part[:, None] * BLOCK_DV + offs_dv[None, :],
                          mask=s_ok[:, None], other=0.0)
            m_max = tl.max(m, 0)
            w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
            l_sum = tl.sum(w * l, 0)
            out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
            o_ptr = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + qi * som + offs_dv * sod
            tl.store(o_ptr, out.to({dt}){dvmask})
    ''')


# --------------------------------------------------------------------------------------
# disk + in-process cache, loading
# --------------------------------------------------------------------------------------
_MODULES: dict[tuple[str, str, bool], ModuleType] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """``$KVPASS_CACHE/kernels`` if set, else ``~/.cache/kvpass/kernels``."""
    root = os.environ.get("KVPASS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "kvpass"
    return base / "kernels"


def kernel_path(spec: KernelSpec, kind: str = "prefill") -> Path:
    """Where the source for (spec, kind) lives on disk: ``<cache_dir>/<key>_<kind>.py``."""
    return cache_dir() / f"{spec.key()}_{kind}.py"


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: concurrent writers of the same text are harmless


def interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter.

    Triton decides at ``import triton``: its own library functions (``tl.max``, ``tl.cdiv``)
    are decorated then, from ``TRITON_INTERPRET``, and interpreted kernels can only call
    interpreted ones.  So the mode is per process; see :func:`use_interpreter`.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction)


def use_interpreter() -> None:
    """Switch this process to the Triton interpreter; must run before triton is imported.

    Raises ``CodegenError`` if triton was already imported for compiled kernels (note that
    ``torch.export``/``torch.compile`` import triton): set ``TRITON_INTERPRET=1`` (or
    ``KVPASS_KERNELS=interpret``) before the process imports it.
    """
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    if not interpreting():
        raise CodegenError("triton was imported without TRITON_INTERPRET=1, so its kernels "
                           "cannot be interpreted in this process; set TRITON_INTERPRET=1 "
                           "(or KVPASS_KERNELS=interpret) before triton is imported")


def load(spec: KernelSpec, kind: str = "prefill") -> ModuleType:
    """Generate (or reuse) the source, write it to :func:`kernel_path`, import it.

    The kernels are compiled or interpreted as this process's triton is (see
    :func:`interpreting`).  Modules are cached in-process by (key, kind, mode).
    """
    interp = interpreting()
    cache_key = (spec.key(), kind, interp)
    with _LOCK:
        mod = _MODULES.get(cache_key)
        if mod is not None:
            return mod
        path = kernel_path(spec, kind)
        _write_if_changed(path, source(spec, kind))
        name = f"kvpass_kernels_{spec.key()[:16]}_{kind}{'_interp' if interp else ''}"
        mspec = importlib.util.spec_from_file_location(name, path)
        assert mspec is not None and mspec.loader is not None
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod  # inspect.getsource (used by triton.jit) looks modules up
        mspec.loader.exec_module(mod)
        _MODULES[cache_key] = mod
        return mod
