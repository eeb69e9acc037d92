"""Generated kvpass attention kernels vs ``torch.nn.functional.scaled_dot_product_attention``.

Reports per case: milliseconds (median of ``triton.testing.do_bench`` on CUDA, of a few
``perf_counter`` runs on CPU), TFLOP/s from the formula ``4 * B * H * Sq * Sk * D`` (halved
for causal prefill, where Sq == Sk; windowed cases are reported with the same nominal
formula), GB/s for decode (bytes of K and V read plus q and out), the ratio
``sdpa_ms / kvpass_ms`` (> 1: kvpass faster) and the largest |kvpass - sdpa| where both
compute the same thing.

Usage::

    python bench/attention_kernels.py results.json            # CUDA, full shapes
    python bench/attention_kernels.py results.json --tiny     # CPU, Triton interpreter

H200 reference points (DESIGN.md section 5): ~989 TFLOP/s dense bf16, 4.8 TB/s HBM; FA2
forward ~335-370 TFLOP/s, decode kernels should reach 70-85% of bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One benchmark shape; ``kind`` is "prefill" or "decode"."""

    name: str
    kind: str
    B: int
    H: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    causal: bool = False
    window: int | None = None


FULL = [
    Case("prefill-llama-gqa4-d128", "prefill", 4, 32, 8, 4096, 4096, 128, causal=True),
    Case("prefill-mha-d128-bidir", "prefill", 4, 16, 16, 2048, 2048, 128),
    Case("prefill-smollm-d64", "prefill", 8, 9, 3, 4096, 4096, 64, causal=True),
    Case("prefill-gemma-d256-window512", "prefill", 2, 4, 1, 8192, 8192, 256, causal=True,
         window=512),
    Case("decode-gqa4-8k", "decode", 16, 32, 8, 1, 8192, 128),
    Case("decode-gqa4-32k", "decode", 4, 32, 8, 1, 32768, 128),
    Case("decode-mha-4k", "decode", 32, 16, 16, 1, 4096, 128),
    Case("decode-shared-kv-gqa32-32k", "decode", 4, 32, 1, 1, 32768, 128),
]

TINY = [
    Case("tiny-prefill-causal", "prefill", 1, 2, 1, 40, 40, 32, causal=True),
    Case("tiny-prefill-window", "prefill", 1, 2, 1, 40, 40, 32, causal=True, window=8),
    Case("tiny-decode", "decode", 1, 4, 2, 1, 100, 32),
]


def flops(c: Case) -> float:
    """4 B H Sq Sk D (QK^T and PV, 2 flops per MAC), halved for causal prefill."""
    f = 4.0 * c.B * c.H * c.Sq * c.Sk * c.D
    return f / 2 if c.causal and c.Sq == c.Sk else f


def bytes_moved(c: Case, elem: int) -> float:
    """K and V read once per kv head, q read and out written once."""
    return elem * (2 * c.B * c.Hkv * c.Sk * c.D + 2 * c.B * c.H * c.Sq * c.D)


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


def run_case(c: Case, device: str, dtype, bench) -> dict:
    import torch
    import torch.nn.functional as F

    from kvpass.codegen import KernelSpec, decode, prefill

    torch.manual_seed(0)
    q = torch.randn(c.B, c.H, c.Sq, c.D, device=device, dtype=dtype)
    k = torch.randn(c.B, c.Hkv, c.Sk, c.D, device=device, dtype=dtype)
    v = torch.randn(c.B, c.Hkv, c.Sk, c.D, device=device, dtype=dtype)
    spec = KernelSpec(num_heads=c.H, num_kv_heads=c.Hkv, head_dim=c.D, causal=c.causal,
                      window=c.window, dtype=str(dtype).removeprefix("torch."))
    kernel = prefill if c.kind == "prefill" else decode

    def ours():
        return kernel(q, k, v, spec)

    def sdpa():  # no sliding window in SDPA: its causal attention is what one would run
        return F.scaled_dot_product_attention(q, k, v, is_causal=c.causal and c.kind == "prefill",
                                              enable_gqa=c.H != c.Hkv)

    ms, sdpa_ms = bench(ours), bench(sdpa)
    same = c.window is None
    row = asdict(c) | {
        "kvpass_ms": ms, "sdpa_ms": sdpa_ms, "speedup_vs_sdpa": sdpa_ms / ms,
        "flops": flops(c), "kvpass_tflops": flops(c) / ms / 1e9,
        "sdpa_tflops": flops(c) / sdpa_ms / 1e9,
        "max_abs_diff_vs_sdpa": (ours() - sdpa()).abs().max().item() if same else None,
    }
    if c.kind == "decode":
        nbytes = bytes_moved(c, q.element_size())
        row |= {"bytes": nbytes, "kvpass_gbps": nbytes / ms / 1e6, "sdpa_gbps": nbytes / sdpa_ms / 1e6}
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument("--tiny", action="store_true", help="small shapes, CPU + Triton interpreter")
    ap.add_argument("--only", default="", help="run cases whose name contains this")
    args = ap.parse_args(argv)
    if args.tiny:  # triton fixes interpreter vs compiler at import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --tiny")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    bench = timer(device)
    rows = []
    for c in TINY if args.tiny else FULL:
        if args.only not in c.name:
            continue
        row = run_case(c, device, dtype, bench)
        rows.append(row)
        print(f"{c.name:32s} kvpass {row['kvpass_ms']:9.3f} ms  sdpa {row['sdpa_ms']:9.3f} ms  "
              f"x{row['speedup_vs_sdpa']:.2f}  {row['kvpass_tflops']:7.1f} TFLOP/s"
              + (f"  {row['kvpass_gbps']:7.0f} GB/s" if "kvpass_gbps" in row else ""), flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    meta = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "tiny": args.tiny}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
