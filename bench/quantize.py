"""Quantized KV storage on SmolLM2-135M: perplexity and cache bytes, alone and composed.

One run compares the original model with int8 / int4 / int2 storage (per-token vs per-channel
keys, with and without a full-precision residual), and with the quantization composed with the
best window (``Window(512, sinks=4)``) and MHC settings, on held-out text (*Emma*).  Cache
bytes are ``kvpass.kv_cache_bytes`` at the chunk length (tests hold it equal to the bytes the
cache tensors really hold), reported for the bf16 cache a deployment keeps (scales and zeros
in bf16 too) and for the fp32 cache this CPU run holds.  MHC is calibrated on *Persuasion*.

    python bench/quantize.py --json bench/results/quantize_smollm2.json --plot bench/results/quantize_smollm2.png
    python bench/quantize.py --table bench/results/quantize_smollm2.json   # the README's markdown table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text, token_chunks
from kvpass.eval.perplexity import perplexity

Q = kvpass.Quantize
W512 = kvpass.Window(512, sinks=4)


def policies() -> dict[str, object]:
    """Most informative first, so a partial run still answers the goals."""
    return {
        "int8 g64, keys per channel": Q(bits=8, group=64),
        "int4 g64, keys per token": Q(bits=4, group=64, keys="per_token"),
        "int4 g64, keys per channel": Q(bits=4, group=64),
        "window 512+4": W512,
        "window 512+4 + int4 g64 per channel": [W512, Q(bits=4, group=64)],
        "int8 g64, keys per token": Q(bits=8, group=64, keys="per_token"),
        "int4 g32, keys per channel": Q(bits=4, group=32),
        "int4 g64, keys per channel, residual 128": Q(bits=4, group=64, residual=128),
        "int2 g32, keys per token": Q(bits=2, group=32, keys="per_token"),
        "int2 g32, keys per channel": Q(bits=2, group=32),
        "int2 g32, keys per channel, residual 128": Q(bits=2, group=32, residual=128),
        "window 512+4 + int8 g64 per channel": [W512, Q(bits=8, group=64)],
        "window 512+4 + int2 g32 per channel, residual 128": [W512, Q(bits=2, group=32, residual=128)],
    }


MHC_ROWS = {
    "MHC 2x (whitened)": None,
    "MHC 2x + int8 g64 per channel": Q(bits=8, group=64),
    "MHC 2x + int4 g64 per channel": Q(bits=4, group=64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--len", type=int, default=2048, help="evaluation chunk length (tokens)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--calib-chunks", type=int, default=16, help="MHC calibration: chunks of 256 tokens")
    ap.add_argument("--no-mhc", action="store_true", help="skip the MHC rows (calibration takes minutes)")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of row labels to run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print a markdown table of an earlier JSON and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    torch.manual_seed(0)
    model, tok = models.load(args.model)
    chunks = token_chunks(tok, load_text("eval"), args.len, args.chunks)
    out = {"model": args.model, "text": "emma (held out)", "len": args.len, "chunks": len(chunks), "rows": []}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))

    def row(label, fast, policy, t0):
        r = {"label": label, "policy": None if policy is None else kvpass.Policy.of(policy).to_dict(),
             "ppl": perplexity(fast, chunks, batch_size=1, progress=False),
             "cache_bf16": kvpass.kv_cache_bytes(fast, args.len, dtype=torch.bfloat16),
             "cache_fp32": kvpass.kv_cache_bytes(fast, args.len, dtype=torch.float32)}
        r["seconds"] = round(time.time() - t0, 1)
        if out["rows"]:
            base = out["rows"][0]
            r["ppl_change"] = r["ppl"] / base["ppl"] - 1
            r["cache_ratio_bf16"] = r["cache_bf16"] / base["cache_bf16"]
            r["cache_ratio_fp32"] = r["cache_fp32"] / base["cache_fp32"]
        out["rows"].append(r)
        save()
        print(_fmt(r), flush=True)

    row("original", model, None, time.time())
    lowered = kvpass.optimize(model, kvpass.Full())
    for label, policy in policies().items():
        if args.only and not any(s in label for s in args.only):
            continue
        t0 = time.time()
        row(label, kvpass.retarget(lowered, policy), policy, t0)
    if not args.no_mhc and (not args.only or any(any(s in k for s in args.only) for k in MHC_ROWS)):
        t0 = time.time()
        calib = token_chunks(tok, load_text("calibration"), 256, args.calib_chunks)
        mhc = kvpass.MHC(ratio=2)
        small = kvpass.optimize(model, mhc, calibration=calib, tokenizer=tok, progress=True)
        out["mhc_calibration_seconds"] = round(time.time() - t0, 1)
        for label, quant in MHC_ROWS.items():
            policy = mhc if quant is None else [mhc, quant]
            t0 = time.time()
            row(label, kvpass.retarget(small, policy), policy, t0)
    if args.plot:
        _plot(out, args.plot)


def table(out: dict) -> str:
    """Markdown rows of a result JSON (what the README shows)."""
    lines = [f"| policy | ppl ({out['len']}-token chunks) | change | cache bf16 | cache fp32 |",
             "|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r.get('ppl_change', 0.0) * 100:+.2f}% | "
                     f"{r.get('cache_ratio_bf16', 1.0):.3f}× | {r.get('cache_ratio_fp32', 1.0):.3f}× |")
    return "\n".join(lines)


def _fmt(r: dict) -> str:
    ch = r.get("ppl_change", 0.0) * 100
    return (f"{r['label']:<52} ppl {r['ppl']:8.3f} ({ch:+6.2f}%)  cache bf16 {r.get('cache_ratio_bf16', 1.0):.3f}x"
            f"  fp32 {r.get('cache_ratio_fp32', 1.0):.3f}x  [{r['seconds']} s]")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in out["rows"]:
        x, y = r.get("cache_ratio_bf16", 1.0), r.get("ppl_change", 0.0) * 100
        ax.scatter(x, y, s=20)
        ax.annotate(r["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"KV cache at {out['len']} tokens / original (bf16 cache)")
    ax.set_ylabel(f"perplexity change, % (held-out {out['len']}-token chunks)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(f"{out['model']}: quantized KV storage")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print("plot:", path)


if __name__ == "__main__":
    main()
