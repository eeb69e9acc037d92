"""Generated kvpass attention kernels vs PyTorch's SDPA and FlexAttention, in one run.

    python bench/kernel_speed.py bench/results/h200_kernels.json           # CUDA: bf16, < 5 min on an H200
    python bench/kernel_speed.py out.json --tiny                           # CPU: small shapes, interpreter

On a machine without CUDA (and without ``--tiny``) it says so and exits 0.

Per case: milliseconds (``triton.testing.do_bench`` median on CUDA; median of 3 runs on CPU)
of kvpass's generated kernel, of ``scaled_dot_product_attention`` (SDPA: no window or block
table; it runs full causal/bidirectional attention, the work one would otherwise do) and of
FlexAttention (``torch.nn.attention.flex_attention``, compiled, with the *same* mask as a
``BlockMask``).  Columns:

- prefill TFLOP/s from an explicit count of the work each side does: ``4·B·H·D·pairs``,
  ``pairs`` = the visible (query, key) pairs of the form, counted from
  :func:`kvpass.semantics.reference.visibility` (the form's meaning) -- so a window or a block table
  counts only what it keeps.  SDPA's count is its own (full causal/bidirectional) work.
- decode GB/s from the bytes of cache actually read (K and V of the stored heads, or the
  latent plus its per-head weights) plus q and out.
- ``x_flex`` = flex_ms / kvpass_ms, ``x_sdpa`` = sdpa_ms / kvpass_ms (> 1: kvpass faster).
- ``cache_vs_base`` / ``time_vs_base``: for a compressed decode form (fewer heads, latent), its
  cache bytes and time relative to the GQA decode case of the same shape it replaces.

Goals checked against these rows (issue 6): prefill >= 0.9x FlexAttention's TFLOP/s at
head_dim 128, seq >= 4k (dense causal, window, block-sparse); decode >= 70% of HBM bandwidth
at >= 8k context; a compressed form's time falls >= 0.8x as fast as its bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One benchmark shape.  ``kind``: prefill | decode.  ``sparse``: (block, local, global)
    blocks of a Longformer-style table; ``rank``: an MHC latent (decode) of that rank with
    RoPE and a k-norm; ``base``: the name of the uncompressed case this one replaces."""

    name: str
    kind: str
    B: int
    H: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    causal: bool = True
    window: int | None = None
    sinks: int = 0
    sparse: tuple[int, int, int] | None = None
    rank: int | None = None
    base: str | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)


FULL = [
    Case("prefill-d128-4k-causal", "prefill", 4, 32, 8, 4096, 4096, 128),
    Case("prefill-d128-16k-causal", "prefill", 1, 32, 8, 16384, 16384, 128),
    Case("prefill-d64-8k-causal", "prefill", 4, 16, 4, 8192, 8192, 64),
    Case("prefill-d128-bidir-4k", "prefill", 4, 16, 16, 4096, 4096, 128, causal=False),
    Case("prefill-d128-8k-window1024-sinks4", "prefill", 2, 32, 8, 8192, 8192, 128, window=1024, sinks=4),
    Case("prefill-d128-32k-window4096", "prefill", 1, 32, 8, 32768, 32768, 128, window=4096),
    Case("prefill-d128-8k-blocksparse", "prefill", 2, 32, 8, 8192, 8192, 128, sparse=(128, 3, 1)),
    Case("decode-d128-8k-gqa4", "decode", 16, 32, 8, 1, 8192, 128),
    Case("decode-d128-32k-gqa4", "decode", 4, 32, 8, 1, 32768, 128),
    Case("decode-d64-16k-gqa4", "decode", 16, 16, 4, 1, 16384, 64),
    Case("decode-d128-32k-shared-kv2", "decode", 4, 32, 2, 1, 32768, 128, base="decode-d128-32k-gqa4"),
    Case("decode-d128-32k-window4096", "decode", 4, 32, 8, 1, 32768, 128, window=4096,
         base="decode-d128-32k-gqa4"),
    Case("decode-d64-16k-latent96", "decode", 16, 16, 4, 1, 16384, 64, rank=128,
         base="decode-d64-16k-gqa4"),
]

TINY = [
    Case("tiny-prefill-causal", "prefill", 1, 2, 1, 40, 40, 32),
    Case("tiny-prefill-window", "prefill", 1, 2, 1, 40, 40, 32, window=8, sinks=2),
    Case("tiny-prefill-blocksparse", "prefill", 1, 2, 1, 64, 64, 32, sparse=(16, 1, 1)),
    Case("tiny-decode", "decode", 1, 4, 2, 1, 100, 32, causal=False),
    Case("tiny-decode-latent", "decode", 1, 4, 2, 1, 100, 32, rank=24, base="tiny-decode"),
]


# --------------------------------------------------------------------------------------
# work and bytes
# --------------------------------------------------------------------------------------
def block_table(c: Case):
    """[nB, nB] bool Longformer-style table: ``local`` blocks back, ``global`` first blocks
    seen by all and seeing all; causal cases keep the lower triangle."""
    import torch

    block, local, glob = c.sparse
    n = -(-c.Sk // block)
    qb, kb = torch.arange(n)[:, None], torch.arange(n)[None, :]
    t = ((qb - kb).abs() < local) | (kb < glob) | (qb < glob)
    return t & (kb <= qb) if c.causal else t


def visible_pairs(c: Case, device="cpu") -> int:
    """Visible (query, key) pairs of the form, from the reference's own rule (rows chunked)."""
    import torch

    from kvpass.semantics import reference

    table = block_table(c).to(device) if c.sparse else None
    k_pos = torch.arange(c.Sk, device=device)[None]
    total = 0
    for start in range(0, c.Sq, 1024):
        q_pos = torch.arange(c.Sk - c.Sq + start, c.Sk - c.Sq + min(c.Sq, start + 1024), device=device)[None]
        vis = reference.visibility(q_pos, k_pos, causal=c.causal, window=c.window, sinks=c.sinks,
                                   block_mask=table, block=c.sparse[0] if c.sparse else None)
        total += int(vis.sum())
    return total


def sdpa_pairs(c: Case) -> int:
    """Pairs SDPA computes: everything, or the causal triangle (aligned bottom-right)."""
    if not c.causal or c.kind == "decode":
        return c.Sq * c.Sk
    return sum(min(c.Sk, c.Sk - c.Sq + i + 1) for i in range(c.Sq))


def cache_bytes(c: Case, elem: int) -> int:
    """Cache bytes a decode step reads: the latent (+ per-head weights), or K and V; a
    window reads only its last W + sinks slots."""
    if c.rank is not None:
        weights = c.Hkv * c.rank * c.D * 3 * elem + c.Hkv * c.D * 6 * 4
        return c.B * c.Sk * c.rank * elem + weights
    slots = min(c.Sk, c.window + c.sinks) if c.window else c.Sk
    return 2 * c.B * c.Hkv * slots * c.D * elem


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def timer(device: str):
    """ms of a callable: triton's do_bench on CUDA, median of 3 runs elsewhere."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100)

    def cpu(fn) -> float:
        fn()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(runs)

    return cpu


def _latent_inputs(c: Case, device, dtype, gen):
    import torch

    from kvpass.semantics.reference import LatentWeights

    d, r, hkv = c.D, c.rank, c.Hkv
    part = torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    up_k = rnd(hkv, r, d) / r ** 0.5
    freq = (1.0 / 10000 ** (torch.arange(d // 2).float() / (d // 2))).repeat(2)[None].expand(hkv, d)
    ca = torch.ones(hkv, d)
    sb = torch.where(torch.arange(d) < d // 2, -1.0, 1.0)[None].expand(hkv, d)
    bk = torch.zeros(hkv, d, device=device)
    w = LatentWeights(up_k.to(dtype), up_k[:, :, part].to(dtype), bk, bk, (rnd(hkv, r, d) / r ** 0.5).to(dtype),
                      bk, freq.to(device).contiguous(), ca.to(device), sb.to(device).contiguous())
    return w


def _flex(c: Case, q, k, v, device, compiled: bool):
    """FlexAttention with the case's mask as a BlockMask (None where it needs CUDA and none)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    off = c.Sk - c.Sq
    table = block_table(c).to(device) if c.sparse else None

    def mask_mod(b, h, qi, kj):
        qp = qi + off
        keep = kj >= 0
        if c.causal:
            keep = keep & (kj <= qp)
        if c.window:
            keep = keep & ((qp - kj < c.window) | (kj < c.sinks))
        if table is not None:
            keep = keep & table[qp // c.sparse[0], kj // c.sparse[0]]
        return keep

    bm = create_block_mask(mask_mod, None, None, c.Sq, c.Sk, device=device)
    fn = torch.compile(flex_attention) if compiled else flex_attention
    gqa = c.H != c.Hkv
    return lambda: fn(q, k, v, block_mask=bm, enable_gqa=gqa)


def run_case(c: Case, device: str, dtype, bench, base_rows: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from kvpass.kernels import KernelSpec, decode, prefill
    from kvpass.semantics import reference

    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    q = rnd(c.B, c.H, c.Sq, c.D)
    table = block_table(c).to(device) if c.sparse else None
    latent = None
    extra = {}
    if c.rank is not None:
        extra = {"latent": {"rank": c.rank, "rope": True, "norm_eps": 1e-6}}
        latent = _latent_inputs(c, device, dtype, gen)
        k = v = rnd(c.B, 1, c.Sk, c.rank)  # the latent cache
    else:
        k, v = rnd(c.B, c.Hkv, c.Sk, c.D), rnd(c.B, c.Hkv, c.Sk, c.D)
    spec = KernelSpec(num_heads=c.H, num_kv_heads=c.Hkv, head_dim=c.D, causal=c.causal,
                      window=c.window, sinks=c.sinks if c.window else 0,
                      block=c.sparse[0] if c.sparse else None, has_block_mask=c.sparse is not None,
                      dtype=str(dtype).removeprefix("torch."), extra=extra)
    kernel = prefill if c.kind == "prefill" else decode

    def ours():
        return kernel(q, k, v, spec, block_mask=table, latent=latent)

    if latent is not None:  # the others attend over the decompressed keys/values
        kk, vv = reference.latent_keys_values(k, torch.arange(c.Sk, device=device)[None].expand(c.B, c.Sk),
                                              latent, 1e-6)
    else:
        kk, vv = k, v

    def sdpa():
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=c.causal and c.kind == "prefill",
                                              enable_gqa=c.H != c.Hkv)

    flex = None
    try:
        flex = _flex(c, q, kk, vv, device, compiled=device == "cuda")
    except Exception as e:  # noqa: BLE001 -- reported, the row still has the other sides
        extra_err = f"{type(e).__name__}: {e}"[:200]
    ms, sdpa_ms = bench(ours), bench(sdpa)
    flex_ms = bench(flex) if flex is not None else None
    want = reference.attention(q, kk, vv, causal=c.causal, window=c.window, sinks=c.sinks if c.window else 0,
                               block_mask=table, block=c.sparse[0] if c.sparse else None) \
        if c.Sq * c.Sk <= 1 << 24 or c.kind == "decode" else None
    pairs = visible_pairs(c, device)
    f = 4.0 * c.B * c.H * c.D * pairs
    f_sdpa = 4.0 * c.B * c.H * c.D * sdpa_pairs(c)
    row = {k_: v_ for k_, v_ in asdict(c).items() if k_ != "extra"} | {
        "visible_pairs": pairs, "kvpass_ms": ms, "sdpa_ms": sdpa_ms, "flex_ms": flex_ms,
        "x_sdpa": sdpa_ms / ms, "x_flex": flex_ms / ms if flex_ms else None,
        "kvpass_tflops": f / ms / 1e9, "sdpa_tflops": f_sdpa / sdpa_ms / 1e9,
        "flex_tflops": f / flex_ms / 1e9 if flex_ms else None,
        "max_abs_diff_vs_reference": (ours().float() - want.float()).abs().max().item() if want is not None else None,
    }
    if flex is None:
        row["flex_error"] = extra_err
    elif want is not None:  # FlexAttention was given the same mask
        row["flex_max_abs_diff_vs_reference"] = (flex().float() - want.float()).abs().max().item()
    if c.kind == "decode":
        elem = q.element_size()
        nbytes = cache_bytes(c, elem) + 2 * c.B * c.H * c.Sq * c.D * elem
        row |= {"bytes": nbytes, "kvpass_gbps": nbytes / ms / 1e6}
        if c.base in base_rows:
            b = base_rows[c.base]
            row |= {"cache_vs_base": nbytes / b["bytes"], "time_vs_base": ms / b["kvpass_ms"]}
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for the columns.")
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="small shapes, CPU + Triton interpreter")
    ap.add_argument("--only", default="", help="run cases whose name contains this")
    args = ap.parse_args(argv)
    if args.tiny:  # triton fixes interpreter vs compiler at import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/kernel_speed.py measures GPU kernels and needs CUDA; none here (use --tiny to "
              "run small shapes on CPU under the Triton interpreter). Nothing measured.")
        return
    dtype = torch.float32 if args.tiny else torch.bfloat16
    bench = timer(device)
    rows, by_name = [], {}
    cases = TINY if args.tiny else FULL
    for c in cases:
        if args.only not in c.name and not any(args.only in x.name and x.base == c.name for x in cases):
            continue
        row = run_case(c, device, dtype, bench, by_name)
        rows.append(row)
        by_name[c.name] = row
        flex = f"flex {row['flex_ms']:8.3f} ms x{row['x_flex']:.2f}" if row["flex_ms"] else "flex -"
        line = (f"{c.name:36s} kvpass {row['kvpass_ms']:8.3f} ms  sdpa {row['sdpa_ms']:8.3f} ms "
                f"x{row['x_sdpa']:.2f}  {flex}  {row['kvpass_tflops']:7.1f} TFLOP/s")
        if "kvpass_gbps" in row:
            line += f"  {row['kvpass_gbps']:7.0f} GB/s"
        if "time_vs_base" in row:
            line += f"  bytes x{row['cache_vs_base']:.2f} time x{row['time_vs_base']:.2f}"
        print(line, flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    meta = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "tiny": args.tiny,
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
