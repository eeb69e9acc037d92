"""Generated Triton kernels equal ``kvpass.semantics.reference.attention``.

Without a GPU the kernels run in the Triton interpreter on CPU.  Triton fixes interpreter vs
compiler when it is imported, so this module sets ``TRITON_INTERPRET=1`` before anything
imports triton (``torch.export`` does).  With CUDA the same tests run the compiled kernels.

Tolerances (outputs compared with ``torch.testing.assert_close``), per storage dtype:

- float32: atol=rtol=2e-5.  Same fp32 math as the reference (``tl.dot`` in "ieee" precision,
  no tf32); only summation order and exp2-with-folded-log2(e) differ (observed <= 1e-6).
- float16: atol=rtol=4e-3.  P is rounded to fp16 (2^-11 relative) before the P@V product,
  as in every flash-attention kernel, and the output is rounded to fp16 (2 ulps ~ 2e-3).
- bfloat16: atol=rtol=2^-6.  Same, with bf16's 8-bit significand: P rounding gives ~2^-9
  relative per weight, the output rounding 1 ulp = 2^-8..2^-7 relative, so two rounding
  events of slack at |out| ~ 1..4 (observed: max |diff| = 1 output ulp).

Latent (MHC) kernels rebuild keys and values per tile from the latent and round them to the
storage dtype, as a cached K/V would be; the reference rounds the same values, but its fp32
sums run in another order, so a rebuilt key/value can land one storage ulp apart.  fp16/bf16
tolerances are doubled for them (one more rounding event); fp32 keeps 2e-5 (the fp32 sums
differ by ~1e-7 relative).
"""

import os
import subprocess
import sys
import textwrap

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # must precede any import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvpass.kernels import CodegenError, KernelSpec, attention, decode, kernel_path, load, prefill, source  # noqa: E402
from kvpass.kernels.generate import interpreting  # noqa: E402
from kvpass.semantics import reference  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 2**-6}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# no shrinking: under the interpreter it takes minutes; the failing example is still printed
FAST = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate])

if not ON_GPU and not interpreting():  # never a silent skip of the kernel tests
    raise RuntimeError("triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it on "
                       "machines without CUDA; was TRITON_INTERPRET=0 set?)")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def ref(q, k, v, spec, q_pos=None, k_pos=None, mask=None, block_mask=None):
    """The reference with a spec's fields."""
    return reference.attention(
        q, k, v, kv_head_map=spec.kv_head_map, scale=spec.scale, causal=spec.causal,
        q_pos=q_pos, k_pos=k_pos, window=spec.window, sinks=spec.sinks, softcap=spec.softcap,
        block_mask=block_mask, block=spec.block, mask=mask)


def check(out, want, dtype: str) -> None:
    assert torch.isfinite(out.float()).all(), "kernel produced NaN/inf"
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def qkv(spec: KernelSpec, B: int, Sq: int, Sk: int, gen: torch.Generator, bshd: bool = False):
    """Random q, k, v of the spec's shapes; ``bshd`` gives non-contiguous [B,S,H,D] views."""
    def rand(h, s, d):
        shape = (B, s, h, d) if bshd else (B, h, s, d)
        t = torch.randn(shape, generator=gen).to(DTYPES[spec.dtype]).to(DEVICE)
        return t.transpose(1, 2) if bshd else t
    return (rand(spec.num_heads, Sq, spec.head_dim), rand(spec.num_kv_heads, Sk, spec.head_dim),
            rand(spec.num_kv_heads, Sk, spec.head_dim_v))


@st.composite
def head_maps(draw) -> tuple[int, int, tuple[int, ...]]:
    """(H, Hkv, map): group sizes 1..8; contiguous, shuffled or arbitrary maps."""
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 8))
    H = hkv * group
    kind = draw(st.sampled_from(["contiguous", "shuffled", "arbitrary"]))
    hmap = [h // group for h in range(H)]
    if kind == "shuffled":
        hmap = draw(st.permutations(hmap))
    elif kind == "arbitrary":
        hmap = draw(st.lists(st.integers(0, hkv - 1), min_size=H, max_size=H))
    return H, hkv, tuple(hmap)


@st.composite
def specs(draw, sk: int, bn: int = 32, dtypes=tuple(DTYPES),
          dims=(16, 32, 64, 80, 128, 256)) -> KernelSpec:
    """Random spec for key length ``sk`` and KV tile ``bn``: windows below and above the
    length and around tile boundaries, 0..4 sinks, softcap, block tables, graph masks."""
    H, hkv, hmap = draw(head_maps())
    near_tiles = st.sampled_from([1, bn - 1, bn, bn + 1, 2 * bn - 1, 2 * bn + 2])
    window = draw(st.one_of(st.none(), near_tiles, st.integers(1, sk + 8)))
    has_table = draw(st.booleans())
    return KernelSpec(
        num_heads=H, num_kv_heads=hkv, kv_head_map=hmap, head_dim=draw(st.sampled_from(dims)),
        causal=draw(st.booleans()), window=window,
        sinks=draw(st.integers(0, 4)) if window else 0,
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        block=draw(st.sampled_from([8, 16, 32, 64])) if has_table else None,
        has_block_mask=has_table, has_mask=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
    )


def extras(draw, spec: KernelSpec, B: int, Sq: int, Sk: int, gen: torch.Generator):
    """(mask, block_mask) the spec asks for: bool or additive mask, random block table."""
    mask = block_mask = None
    if spec.has_mask:
        heads = draw(st.sampled_from([1, spec.num_heads]))
        keep = torch.rand(B, heads, Sq, Sk, generator=gen) > 0.2
        if draw(st.booleans()):
            mask = keep
        else:  # additive: finite biases, -inf where hidden
            mask = torch.randn(B, heads, Sq, Sk, generator=gen).masked_fill(~keep, float("-inf"))
        mask = mask.to(DEVICE)
    if spec.has_block_mask:
        n = -(-max(Sk, Sq) // spec.block)
        nq, nk = draw(st.integers(1, n + 1)), draw(st.integers(1, n + 1))
        block_mask = (torch.rand(nq, nk, generator=gen) > 0.4).to(DEVICE)
    return mask, block_mask


def scrambled_positions(B: int, Sq: int, Sk: int, gen: torch.Generator):
    """Ring-buffer-like cache: slots hold a permutation of recent positions, some empty (-1);
    queries sit after the newest key or anywhere (rows with nothing visible included)."""
    start = int(torch.randint(0, 50, (1,), generator=gen))
    k_pos = torch.stack([torch.randperm(Sk, generator=gen) + start for _ in range(B)])
    k_pos[torch.rand(B, Sk, generator=gen) < 0.15] = -1
    q_pos = torch.randint(-2, start + Sk + 3, (B, Sq), generator=gen)
    return q_pos.to(DEVICE), k_pos.to(DEVICE)


POSITIONS = ["default", "offset", "scrambled"]


def positions(kind: str, B: int, Sq: int, Sk: int, gen: torch.Generator):
    """None (default positions: loop-bound path), explicit shifted contiguous positions
    (loaded path, same geometry), or a scrambled ring buffer."""
    if kind == "default":
        return None, None
    if kind == "offset":
        k_pos = torch.arange(Sk, device=DEVICE).expand(B, Sk) + 5
        return torch.arange(Sk - Sq, Sk, device=DEVICE).expand(B, Sq) + 5, k_pos
    return scrambled_positions(B, Sq, Sk, gen)


# --------------------------------------------------------------------------------------
# kernels == reference
# --------------------------------------------------------------------------------------
@FAST
@given(data=st.data(), sk=st.sampled_from([70, 33, 7, 1, 31]), seed=st.integers(0, 2**16))
def test_prefill_matches_reference(data, sk, seed):
    gen = torch.Generator().manual_seed(seed)
    bm, bn = data.draw(st.sampled_from([16, 32])), data.draw(st.sampled_from([16, 32]))
    spec = data.draw(specs(sk, bn))
    sq = data.draw(st.sampled_from(sorted({1, max(1, sk // 2), sk, sk + 3})))
    q, k, v = qkv(spec, 1, sq, sk, gen, bshd=data.draw(st.booleans()))
    q_pos, k_pos = positions(data.draw(st.sampled_from(POSITIONS)), 1, sq, sk, gen)
    mask, block_mask = extras(data.draw, spec, 1, sq, sk, gen)
    out = prefill(q, k, v, spec, q_pos, k_pos, mask, block_mask, block_m=bm, block_n=bn)
    check(out, ref(q, k, v, spec, q_pos, k_pos, mask, block_mask), spec.dtype)


@FAST
@given(data=st.data(), sk=st.sampled_from([100, 40, 7, 1]), seed=st.integers(0, 2**16))
def test_decode_matches_reference(data, sk, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = data.draw(st.sampled_from([16, 32]))
    spec = data.draw(specs(sk, bn))
    sq = data.draw(st.integers(1, 3))
    B = data.draw(st.integers(1, 2))
    q, k, v = qkv(spec, B, sq, sk, gen)
    q_pos, k_pos = positions(data.draw(st.sampled_from(POSITIONS)), B, sq, sk, gen)
    mask, block_mask = extras(data.draw, spec, B, sq, sk, gen)
    splits = data.draw(st.integers(1, 5))
    out = decode(q, k, v, spec, q_pos, k_pos, mask, block_mask, num_splits=splits, block_n=bn)
    check(out, ref(q, k, v, spec, q_pos, k_pos, mask, block_mask), spec.dtype)


# --------------------------------------------------------------------------------------
# latent (MHC) kernels == reference.latent_keys_values + reference.attention
# --------------------------------------------------------------------------------------
def latent_weights(hkv: int, r: int, d: int, pairing: str, norm: bool, gen: torch.Generator):
    """Random LatentWeights with a RoPE pairing: rotate-half, interleaved, partial (rotate-half
    on the first half of the dims only) or none; a norm's weight folded into the coefficients."""
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if pairing == "half":
        rot, partner = d, torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])
    elif pairing == "interleaved":
        rot, partner = d, torch.arange(d) ^ 1
    elif pairing == "partial":
        rot = d // 2
        partner = torch.cat([torch.arange(rot // 2, rot), torch.arange(rot // 2), torch.arange(rot, d)])
    else:
        rot, partner = 0, torch.arange(d)
    pair_id = torch.minimum(torch.arange(d), partner)
    base = 1.0 / 10000 ** (pair_id.float() / max(d, 1))
    freq = torch.where(torch.arange(d) < rot, base, torch.zeros(d))[None].expand(hkv, d).contiguous()
    w = rnd(hkv, d).abs() + 0.5  # norm weight x rope amplitude
    sign = torch.where(torch.arange(d) < partner, -1.0, 1.0)
    sin_coef = torch.where(torch.arange(d) < rot, sign * w[:, partner], torch.zeros(d))
    up_k = rnd(hkv, r, d) / r ** 0.5
    bias_k = rnd(hkv, d) * 0.3
    return reference.LatentWeights(
        up_k, up_k[:, :, partner].contiguous(), bias_k, bias_k[:, partner].contiguous(),
        rnd(hkv, r, d) / r ** 0.5, rnd(hkv, d) * 0.3, freq, w, sin_coef)


@FAST
@given(data=st.data(), sk=st.sampled_from([70, 33, 7, 1]), seed=st.integers(0, 2**16))
def test_latent_kernels_match_reference(data, sk, seed):
    """Fused decompress (+ norm + RoPE of any pairing) inside prefill and decode kernels, with
    windows/sinks/block tables and ring-buffer positions, equals the reference."""
    gen = torch.Generator().manual_seed(seed)
    kind = data.draw(st.sampled_from(["prefill", "decode"]))
    bn = data.draw(st.sampled_from([16, 32]))
    base = data.draw(specs(sk, bn, dims=(16, 32, 64, 80)))
    r = data.draw(st.sampled_from([1, 8, 24, 40, 96]))
    pairing = data.draw(st.sampled_from(["half", "interleaved", "partial", "none"]))
    norm = data.draw(st.booleans())
    eps = 1e-6 if norm else None
    spec = base.replace(has_mask=False, head_dim_v=base.head_dim,
                        extra={"latent": {"rank": r, "rope": pairing != "none", "norm_eps": eps}})
    hkv, d = spec.num_kv_heads, spec.head_dim
    w = latent_weights(hkv, r, d, pairing, norm, gen)
    sq = data.draw(st.integers(1, 3)) if kind == "decode" else data.draw(st.sampled_from([1, sk, sk + 3]))
    B = data.draw(st.integers(1, 2))
    q = torch.randn(B, spec.num_heads, sq, d, generator=gen).to(DTYPES[spec.dtype]).to(DEVICE)
    c = torch.randn(B, 1, sk, r, generator=gen).to(DTYPES[spec.dtype]).to(DEVICE)
    w = reference.LatentWeights(*(t.to(DEVICE) for t in w))
    q_pos, k_pos = positions(data.draw(st.sampled_from(POSITIONS)), B, sq, sk, gen)
    _, block_mask = extras(data.draw, spec, B, sq, sk, gen)
    kp = k_pos if k_pos is not None else reference.default_positions(B, sq, sk, DEVICE)[1]
    k, v = reference.latent_keys_values(c, kp, w, eps)
    want = ref(q, k, v, spec, q_pos, k_pos, None, block_mask)
    fn = prefill if kind == "prefill" else decode
    out = fn(q, c, c, spec, q_pos, k_pos, None, block_mask, block_n=bn, latent=w)
    tol = TOL[spec.dtype] * (1 if spec.dtype == "float32" else 2)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


def test_latent_op_dispatch_and_errors(monkeypatch):
    """``kvpass::latent_attention``: reference and interpreted kernels agree; a spec without
    its weights, or a latent of the wrong rank, is refused."""
    from kvpass.kernels import latent_attention
    gen = torch.Generator().manual_seed(3)
    spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True,
                      extra={"latent": {"rank": 12, "rope": True, "norm_eps": 1e-6}})
    w = latent_weights(2, 12, 16, "half", True, gen)
    q, c = torch.randn(1, 4, 9, 16, generator=gen), torch.randn(1, 1, 9, 12, generator=gen)
    outs = {}
    for mode in ["reference", "interpret"]:
        monkeypatch.setenv("KVPASS_KERNELS", mode)
        outs[mode] = latent_attention(q, c, w, spec)
    check(outs["interpret"], outs["reference"], "float32")
    with pytest.raises(CodegenError, match="LatentWeights"):
        prefill(q, c, c, spec)
    with pytest.raises(CodegenError, match="rank 12"):
        prefill(q, c[..., :8], c[..., :8], spec, latent=w)
    assert "tl.cos" in source(spec, "decode") and "tl.cos" not in source(spec.replace(
        extra={"latent": {"rank": 12, "rope": False, "norm_eps": None}}), "decode")


# --------------------------------------------------------------------------------------
# quantized storage: decode kernels dequantize in registers == quant.dequantize + reference
# --------------------------------------------------------------------------------------
@FAST
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_quant_decode_matches_reference(data, seed):
    """Packed int8/int4/int2 codes with per-token or per-channel scales (and the latent of an
    MHC layer), read and dequantized inside the split-K decode kernel, then the full-precision
    residual, equal ``kvpass.semantics.qformat.dequantize`` + the reference -- with head maps, windows,
    sinks, block tables, ring-buffer positions and empty slots."""
    from kvpass.kernels import quant_decode
    from kvpass.semantics.qformat import dequantize, quantize

    gen = torch.Generator().manual_seed(seed)
    bits = data.draw(st.sampled_from([8, 4, 2]))
    kax, vax = data.draw(st.sampled_from(["token", "channel"])), data.draw(st.sampled_from(["token", "channel"]))
    unit = data.draw(st.sampled_from([1, 4, 16])) if "channel" in (kax, vax) else 1
    bn = data.draw(st.sampled_from([16, 32]))
    base = data.draw(specs(64, bn, dims=(16, 32, 64, 80, 128)))
    latent = data.draw(st.booleans())
    d = base.head_dim
    r = data.draw(st.sampled_from([16, 48])) if latent else None
    width = r or d
    group = data.draw(st.sampled_from([g for g in (8, 16, 32, width) if width % g == 0]))
    if "channel" in (kax, vax):
        unit = group
    lat = {"latent": {"rank": r, "rope": True, "norm_eps": None}} if latent else {}
    spec = base.replace(has_mask=False, head_dim_v=d, extra={
        **lat, "quant": {"bits": bits, "group": group, "keys": kax, "values": vax, "unit": unit}})
    B = data.draw(st.integers(1, 2))
    sk = unit * data.draw(st.integers(0, 5)) + (0 if unit > 1 else data.draw(st.integers(0, 7)))
    sr = data.draw(st.integers(0 if sk else 1, 6))
    dt = DTYPES[spec.dtype]
    hkv = 1 if latent else spec.num_kv_heads
    kf = torch.randn(B, hkv, sk, width, generator=gen).to(dt)
    vf = torch.randn(B, hkv, sk, 0 if latent else d, generator=gen).to(dt)
    kq = quantize(kf, bits, group if kax == "token" else unit, kax)
    vq = quantize(vf, bits, group if vax == "token" else unit, vax) if not latent else kq
    rk = torch.randn(B, hkv, sr, width, generator=gen).to(dt)
    rv = torch.randn(B, hkv, sr, 0 if latent else d, generator=gen).to(dt) if not latent else rk
    q = torch.randn(B, spec.num_heads, 1, d, generator=gen).to(dt)
    q_pos, k_all = scrambled_positions(B, 1, sk + sr, gen)
    k_pos, rpos = k_all[:, :sk], k_all[:, sk:]
    _, block_mask = extras(data.draw, spec, B, 1, sk + sr + 60, gen)
    keys = torch.cat([dequantize(kq, dt), rk], 2)
    w = None
    if latent:
        w = latent_weights(spec.num_kv_heads, r, d, "half", False, gen)
        w = reference.LatentWeights(*(t.to(DEVICE) for t in w))
        kk, vv = reference.latent_keys_values(keys, k_all, w, None)
    else:
        kk, vv = keys, torch.cat([dequantize(vq, dt), rv], 2)
    want = ref(q, kk, vv, spec, q_pos, k_all, None, block_mask)
    out = quant_decode(q, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, rk, rv, rpos, spec,
                       q_pos, k_pos, block_mask, latent=w, num_splits=data.draw(st.integers(1, 4)), block_n=bn)
    tol = TOL[spec.dtype] * (1 if spec.dtype == "float32" else 2)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)


def test_quant_spec_errors():
    spec = KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16, causal=True,
                      extra={"quant": {"bits": 4, "group": 16, "keys": "channel", "values": "token", "unit": 16}})
    with pytest.raises(CodegenError, match="decode kernels only"):
        source(spec, "prefill")
    assert "QMASK" in source(spec, "decode") and ">> " in source(spec, "decode")
    assert ">> " not in source(spec.replace(extra={"quant": dict(spec.quant, bits=8)}), "decode")
    with pytest.raises(CodegenError, match="quant bits"):
        spec.replace(extra={"quant": dict(spec.quant, bits=3)})


# Forms at shapes whose tile edges meet the rules' edges: 32-row query blocks and 16-key
# tiles over 65 positions give q_hi - k_lo = 15, q_lo - k_hi = 17, and a last query block
# whose causal edge (q_hi = 64; decode: 96) is the first key of a tile.
FORMS = {
    "full": {},
    "causal": dict(causal=True),
    "window15": dict(window=15),
    "causal_window18_sinks3": dict(causal=True, window=18, sinks=3),
    "window33_sinks2_d80": dict(window=33, sinks=2, head_dim=80),
    "causal_blocks16": dict(causal=True, block=16, has_block_mask=True),
    "blocks8_window40": dict(block=8, has_block_mask=True, window=40),
    "softcap_mask_headmap": dict(causal=True, softcap=5.0, has_mask=True, num_heads=4,
                                 num_kv_heads=2, kv_head_map=(1, 0, 0, 1)),
}


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("form", FORMS)
def test_forms_grid(form, kind, pos):
    gen = torch.Generator().manual_seed(7)
    spec = KernelSpec(**(dict(num_heads=2, num_kv_heads=1, head_dim=16) | FORMS[form]))
    sq, sk = (65, 65) if kind == "prefill" else (2, 97)
    q, k, v = qkv(spec, 1, sq, sk, gen)
    q_pos, k_pos = positions(pos, 1, sq, sk, gen)
    mask = block_mask = None
    if spec.has_mask:
        mask = torch.randn(1, spec.num_heads, sq, sk, generator=gen).to(DEVICE)
        mask[..., ::3] = float("-inf")
    if spec.has_block_mask:
        block_mask = (torch.rand(24, 24, generator=gen) > 0.35).to(DEVICE)
    if kind == "prefill":
        out = prefill(q, k, v, spec, q_pos, k_pos, mask, block_mask, block_m=32, block_n=16)
    else:
        out = decode(q, k, v, spec, q_pos, k_pos, mask, block_mask, num_splits=3, block_n=16)
    check(out, ref(q, k, v, spec, q_pos, k_pos, mask, block_mask), spec.dtype)


def block_table(pattern: str, gen: torch.Generator) -> torch.Tensor:
    """8x8 tables set only at / only off the corners of 3x3 groups; 3x3 random tables (fewer
    blocks than positions reach, so lookups clamp) sparse or dense."""
    if pattern in ("corners_only", "middle_only"):
        i = torch.arange(8)
        middle = (i[:, None] % 3 == 1) | (i[None, :] % 3 == 1)
        table = ~middle if pattern == "corners_only" else middle
    else:
        table = torch.rand(3, 3, generator=gen) < (0.25 if pattern == "sparse" else 0.75)
    return table.to(DEVICE)


@pytest.mark.parametrize("pattern", ["corners_only", "middle_only", "sparse", "dense"])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("pos", ["default", "offset"])
def test_block_table_tiles(pattern, block, pos):
    """Whole-tile decisions from a block table: 32-wide tiles at offset 8 span 3x3 table
    blocks of 16 (not decidable by corners) or 2x2 blocks of 32 (decided by corners)."""
    gen = torch.Generator().manual_seed(5 + block)
    spec = KernelSpec(num_heads=1, num_kv_heads=1, head_dim=16, block=block, has_block_mask=True)
    table = block_table(pattern, gen)
    sq, sk = 64, 72  # default positions: queries at 8..71
    q, k, v = qkv(spec, 1, sq, sk, gen)
    q_pos = k_pos = None
    if pos == "offset":
        q_pos = torch.arange(8, 72, device=DEVICE)[None]
        k_pos = torch.arange(8, 80, device=DEVICE)[None]
    out = prefill(q, k, v, spec, q_pos, k_pos, block_mask=table, block_m=32, block_n=32)
    check(out, ref(q, k, v, spec, q_pos, k_pos, block_mask=table), spec.dtype)


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_rows_with_nothing_visible_are_zero(kind):
    """Causal queries before every key, a mask hiding a whole row, an all-zero block table."""
    gen = torch.Generator().manual_seed(0)
    spec = KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16, causal=True, block=8,
                      has_block_mask=True, has_mask=True)
    sq, sk = 3, 20
    q, k, v = qkv(spec, 1, sq, sk, gen)
    q_pos = torch.tensor([[2, 30, 31]], device=DEVICE)  # row 0 sees nothing (keys 10..29)
    k_pos = torch.arange(10, 30, device=DEVICE)[None]
    mask = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=DEVICE)
    mask[..., 1, :] = False  # row 1 hidden by the graph mask
    table = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
    table[3] = False  # row 2 (position 31 -> block 3) hidden by the block table
    fn = prefill if kind == "prefill" else decode
    out = fn(q, k, v, spec, q_pos, k_pos, mask, table)
    assert torch.isfinite(out).all()
    assert (out == 0).all()
    check(out, ref(q, k, v, spec, q_pos, k_pos, mask, table), spec.dtype)


def test_decode_ring_buffer_window_sinks():
    """A full ring buffer of W + S slots after wrap-around: positions rotated in place."""
    gen = torch.Generator().manual_seed(1)
    spec = KernelSpec(num_heads=6, num_kv_heads=2, head_dim=64, causal=True, window=24,
                      sinks=4, dtype="bfloat16")
    slots, newest = 28, 100
    ring = torch.arange(newest - 23, newest + 1)  # the window, stored rotated
    k_pos = torch.cat([torch.arange(4), ring.roll(7)])[None].to(DEVICE)
    q_pos = torch.tensor([[newest]], device=DEVICE)
    q, k, v = qkv(spec, 1, 1, slots, gen)
    out = decode(q, k, v, spec, q_pos, k_pos, num_splits=3)
    check(out, ref(q, k, v, spec, q_pos, k_pos), spec.dtype)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_awkward_lengths_slow(data, seed):
    """232 keys (not a block multiple), up to D=256, prefill and decode."""
    gen = torch.Generator().manual_seed(seed)
    spec = data.draw(specs(232, dims=(80, 128, 256)))
    q, k, v = qkv(spec, 1, 232, 232, gen)
    mask, block_mask = extras(data.draw, spec, 1, 232, 232, gen)
    check(prefill(q, k, v, spec, mask=mask, block_mask=block_mask),
          ref(q, k, v, spec, mask=mask, block_mask=block_mask), spec.dtype)
    qd = q[:, :, -2:]
    md = None if mask is None else mask[..., -2:, :]
    check(decode(qd, k, v, spec, mask=md, block_mask=block_mask),
          ref(qd, k, v, spec, mask=md, block_mask=block_mask), spec.dtype)


# --------------------------------------------------------------------------------------
# the custom op
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reference", "interpret"])
def test_op_dispatch(monkeypatch, mode):
    if ON_GPU and mode == "interpret":
        pytest.skip("compiled triton in this process")
    monkeypatch.setenv("KVPASS_KERNELS", mode)
    gen = torch.Generator().manual_seed(2)
    spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=32, kv_head_map=(1, 0, 0, 1),
                      causal=True, window=6, sinks=1)
    for sq in (9, 1):  # prefill and decode kinds
        q, k, v = qkv(spec, 1, sq, 9, gen)
        check(attention(q, k, v, spec), ref(q, k, v, spec), spec.dtype)


def test_op_rejects_bad_inputs():
    spec = KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16)
    q, k, v = qkv(spec, 1, 3, 3, torch.Generator().manual_seed(0))
    with pytest.raises(CodegenError, match="dtypes"):
        prefill(q.half(), k, v, spec)
    with pytest.raises(CodegenError, match="has_mask"):
        prefill(q, k, v, spec, mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_export_sees_one_node(monkeypatch):
    monkeypatch.setenv("KVPASS_KERNELS", "reference")
    spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True, has_mask=True)

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return attention(q, k, v, spec, mask=mask) * 2

    q, k, v = qkv(spec, 1, 5, 5, torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 5, 5)
    ep = torch.export.export(Attn(), (q.cpu(), k.cpu(), v.cpu(), mask))
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.kvpass.attention.default]
    assert len(nodes) == 1
    assert KernelSpec.from_json(nodes[0].args[-1]) == spec
    torch.testing.assert_close(ep.module()(q.cpu(), k.cpu(), v.cpu(), mask),
                               2 * ref(q.cpu(), k.cpu(), v.cpu(), spec, mask=mask))


def test_compile_sees_one_node(monkeypatch):
    monkeypatch.setenv("KVPASS_KERNELS", "reference")
    spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=16, causal=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    fn = torch.compile(lambda q, k, v: attention(q, k, v, spec) + 1, backend=backend,
                       fullgraph=True)
    q, k, v = qkv(spec, 1, 5, 5, torch.Generator().manual_seed(4))
    fn(q.cpu(), k.cpu(), v.cpu())
    assert [t for t in graphs[0] if "kvpass" in str(t)] == [torch.ops.kvpass.attention]


# --------------------------------------------------------------------------------------
# spec, source text, caching
# --------------------------------------------------------------------------------------
def test_spec_json_and_key():
    spec = KernelSpec(num_heads=9, num_kv_heads=3, head_dim=64, causal=True, window=512, sinks=4)
    assert spec.kv_head_map == (0, 0, 0, 1, 1, 1, 2, 2, 2) and spec.scale == 0.125
    assert KernelSpec.from_json(spec.to_json()) == spec
    assert spec.key() == KernelSpec.from_json(spec.to_json()).key()
    # the key is a stable name across processes and versions of this file
    assert KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16).key() == (
        "077d57d3cf307cb6e7e8f113424711b935ca051724a37226bcec3945bb311ff7")
    assert spec.key() != spec.replace(sinks=3).key()
    assert spec.replace(kv_head_map=(2, 1, 0) * 3).group_size is None
    assert spec.head_groups == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
    hash(spec)  # usable as a dict key


@pytest.mark.parametrize("bad", [
    dict(head_dim=8), dict(head_dim=300), dict(kv_head_map=(0, 5)), dict(window=0),
    dict(sinks=-1), dict(softcap=0.0), dict(has_block_mask=True), dict(dtype="int8"),
])
def test_spec_validation(bad):
    fields = dict(num_heads=2, num_kv_heads=1, head_dim=16) | bad
    with pytest.raises(CodegenError):
        KernelSpec(**fields)


def test_unknown_extra_is_refused():
    spec = KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16, extra={"latent_rank": 8})
    with pytest.raises(CodegenError, match="latent_rank"):
        source(spec)


def test_source_is_specialised():
    plain = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=64)
    text = source(plain)
    assert source(plain) == text and source(KernelSpec.from_json(plain.to_json())) == text
    assert source(plain.replace(causal=True)) != text
    for absent in ("WINDOW", "SINKS", "_tanh", "BTAB + qb", "m_row", "HMAP + h", "offs_d[None, :] < D"):
        assert absent not in text, absent
    rich = plain.replace(kv_head_map=(1, 0, 0, 1), head_dim=80, window=8, sinks=2, softcap=9.0,
                         block=16, has_block_mask=True, has_mask=True)
    text = source(rich)
    for present in ("WINDOW", "SINKS", "_tanh", "BTAB + qb", "m_row", "HMAP + h", "offs_d[None, :] < D"):
        assert present in text, present
    assert "HGROUPS" in source(rich, "decode")


def test_source_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))
    spec = KernelSpec(num_heads=2, num_kv_heads=1, head_dim=32, sinks=0, window=3,
                      extra={})
    path = kernel_path(spec, "decode")
    assert path == tmp_path / "kernels" / f"{spec.key()}_decode.py"
    mod = load(spec, "decode")
    assert path.read_text() == source(spec, "decode")
    assert load(spec, "decode") is mod  # in-process cache
    assert hasattr(mod, "attn_decode_split") and hasattr(mod, "attn_decode_reduce")


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the GPU run compiles for real")
def test_compiles_for_sm90(tmp_path):
    """The same source compiles for Hopper with triton's own ptxas (no GPU needed); runs in a
    fresh process because this one imported triton for the interpreter."""
    code = textwrap.dedent("""
        from kvpass.kernels import KernelSpec
        from kvpass.kernels.aot import compile_for
        spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=80, kv_head_map=(1, 0, 1, 0),
                          causal=True, window=16, sinks=2, softcap=30.0, block=64,
                          has_block_mask=True, has_mask=True, dtype="bfloat16")
        print(compile_for(spec, "prefill", pos_contig=True, block_m=128))
        print(compile_for(spec, "decode", pos_contig=False, block_m=16))
        lat = KernelSpec(num_heads=9, num_kv_heads=3, head_dim=64, causal=True, dtype="bfloat16",
                         extra={"latent": {"rank": 96, "rope": True, "norm_eps": 1e-6}})
        print(compile_for(lat, "prefill", pos_contig=False, block_m=64))
        print(compile_for(lat, "decode", pos_contig=False, block_m=16))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["KVPASS_CACHE"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "attn_prefill" in res.stdout and "attn_decode_reduce" in res.stdout


@pytest.mark.skipif(ON_GPU, reason="--tiny runs the interpreter; this process compiles")
def test_bench_tiny(tmp_path):
    """bench/kernel_speed.py --tiny runs here (CPU, interpreter) and writes its JSON: every side
    (kvpass, SDPA, FlexAttention with the same block mask) equals the reference, work is
    counted from the visible pairs, the latent row is compared with the case it replaces."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "kernel_speed.py"
    mspec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(mspec)
    sys.modules[mspec.name] = bench  # dataclasses look their module up
    mspec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main([str(out), "--tiny", "--only", "decode-latent"])  # runs its base case too
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"tiny-decode", "tiny-decode-latent"}
    for r in rows.values():
        assert r["max_abs_diff_vs_reference"] < 1e-4 and r["flex_max_abs_diff_vs_reference"] < 1e-4
        assert r["visible_pairs"] == 100 and r["kvpass_gbps"] > 0
    lat = rows["tiny-decode-latent"]
    assert lat["cache_vs_base"] < 1 and lat["time_vs_base"] > 0
    c = bench.Case("x", "prefill", 1, 1, 1, 40, 40, 16, window=8, sinks=2)
    # causal window 8 + 2 sinks over 40 tokens: rows 0..7 see i+1, later rows 8 + min(2, i-7)
    assert bench.visible_pairs(c) == sum(i + 1 if i < 8 else 8 + min(2, i - 7) for i in range(40))
