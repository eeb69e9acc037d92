"""MHC quality report: one low-rank latent per token instead of K and V, on real models and text.

Calibration on Persuasion, evaluation on Emma (both bundled, public domain): never the same
text.  Decoders: perplexity of held-out chunks; encoders (MiniLM, absorbed latent form): mean
cosine of mean-pooled sentence embeddings to the original model.  Ratios are of the layer's
K/V values (``rank = 2·Hkv·D / ratio``); the measured cache bytes per token (latent + one
int64 position per token and layer) are reported next to them.  The model is captured once
(``optimize(model)``) and every variant re-plans that capture.

    python bench/mhc.py --model smollm2-135m --json bench/results/mhc_smollm2.json
    python bench/mhc.py --model minilm-l6 --ratios 4 8 --json bench/results/mhc_minilm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import add_quality_args, load_for_quality

import kvpass

VARIANTS = {  # name -> (MHC options, heal)
    "svd": (dict(method="svd"), 0),
    "whitened": (dict(method="whitened"), 0),
    "whitened+alloc": (dict(method="whitened", allocate=True), 0),
    "whitened+alloc+refit": (dict(method="whitened", allocate=True, refit=True), 0),
    "whitened+alloc+refit+heal": (dict(method="whitened", allocate=True, refit=True), True),
    "whitened+refit": (dict(method="whitened", refit=True), 0),
    "whitened+refit+heal": (dict(method="whitened", refit=True), True),
    "separate+alloc": (dict(method="whitened", joint=False, allocate=True), 0),
    "whitened+alloc+heal": (dict(method="whitened", allocate=True), True),
    "aware": (dict(method="aware"), 0),
    "aware+alloc": (dict(method="aware", allocate=True), 0),
    "aware+alloc+heal": (dict(method="aware", allocate=True), True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS)[:5], choices=list(VARIANTS))
    ap.add_argument("--allocation-from", type=Path, default=None,
                    help="reuse the allocation of a row of this JSON (same model and ratio) instead of "
                         "measuring it again (~20 min per ratio on SmolLM2 on 2 CPU cores)")
    add_quality_args(ap, eval_len=1024)
    args = ap.parse_args()
    model, tok, calib, score_name, score = load_for_quality(args)
    t = time.time()
    base = kvpass.optimize(model)  # captured once; each variant below re-plans it
    print(f"capture: {time.time() - t:.0f}s", flush=True)
    orig_bytes = kvpass.kv_bytes_per_token(model)
    rows = [{"variant": "original", "ratio": 1.0, score_name: score(model), "kv_bytes_per_token": orig_bytes,
             "cache_ratio": 1.0, "seconds": 0.0}]
    print(_fmt(rows[-1], score_name), flush=True)
    layer_of = {s.name: s.layer for s in base._kvpass.sites}
    for ratio in args.ratios:
        allocated = _allocation_from(args.allocation_from, ratio) if args.allocation_from else None
        # ranks of the first allocate=True variant: later ones reuse them
        for name in args.variants:
            opts, heal = VARIANTS[name]
            if heal is True and args.heal_steps is not None:
                heal = args.heal_steps
            t = time.time()
            policy = kvpass.MHC(ratio=ratio, **opts)
            if opts.get("allocate") and allocated is not None:  # same measurement, not repeated
                fixed = {k: v for k, v in opts.items() if k != "allocate"}
                policy = kvpass.Policy(default=kvpass.MHC(ratio=ratio, **fixed), layers={
                    layer_of[n]: kvpass.MHC(rank=r if isinstance(r, int) else sum(r), **fixed)
                    for n, r in allocated.items()})
                if not opts.get("joint", True):
                    raise SystemExit("reusing a joint=False allocation needs per-K/V ranks; run it alone")
            fast = kvpass.optimize(base, policy, calibration=calib, tokenizer=tok,
                                   heal=heal, heal_lr=args.heal_lr, progress=True)
            b = kvpass.kv_bytes_per_token(fast)
            row = {"variant": name, "ratio": ratio, score_name: score(fast), "kv_bytes_per_token": b,
                   "cache_ratio": round(orig_bytes / b, 3), "seconds": round(time.time() - t, 1)}
            alloc = fast._kvpass.allocation
            if alloc and allocated is None:
                allocated = alloc["ranks"]
            if allocated is not None and opts.get("allocate"):
                row["allocation"] = {k: list(v) if isinstance(v, tuple) else v for k, v in allocated.items()}
            if alloc:
                row["allocation"] = {k: list(v) if isinstance(v, tuple) else v for k, v in alloc["ranks"].items()}
                row["damage"] = alloc["damage"]
            if fast._kvpass.heal:
                row["heal_loss"] = {k: [round(a, 5), round(b_, 5)] for k, (a, b_) in fast._kvpass.heal.items()}
            rows.append(row)
            print(_fmt(row, score_name), flush=True)
            if args.json:
                _write(args, rows)
            del fast


def _allocation_from(path: Path, ratio: float) -> dict | None:
    for row in json.loads(path.read_text())["rows"]:
        if row.get("ratio") == ratio and "allocation" in row:
            return row["allocation"]
    raise SystemExit(f"{path}: no row with ratio {ratio:g} and an allocation")


def _write(args, rows) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    args.json.write_text(json.dumps({"command": command, "model": args.model, "calibration": "persuasion",
                                     "evaluation": "emma", "eval_len": args.eval_len, "eval_chunks": args.eval_chunks,
                                     "rows": rows}, indent=2))


def _fmt(r, score_name):
    return (f"{r['variant']:<28} ratio={r['ratio']:<4g} {score_name}={r[score_name]:.4f}  "
            f"KV B/tok={r['kv_bytes_per_token']:,} ({r['cache_ratio']}x smaller)  {r['seconds']}s")


if __name__ == "__main__":
    main()
