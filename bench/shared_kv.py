"""Shared-KV quality report: fewer KV heads on real models and real text.

Calibration on Persuasion, evaluation on Emma (both bundled, public domain), so they never
overlap.  Decoders: perplexity over held-out chunks; encoders: mean cosine of mean-pooled
sentence embeddings to the original model.  Writes a table to stdout and JSON.

    python bench/shared_kv.py --model minilm-l6 --json bench/results/shared_kv_minilm.json
    python bench/shared_kv.py --model smollm2-135m --kv-heads 1 --json bench/results/shared_kv_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time

from _common import add_quality_args, load_for_quality

import kvpass

VARIANTS = {
    "mean": dict(merge="mean", grouping="contiguous", heal=0),
    "calibrated": dict(merge="calibrated", grouping="contiguous", heal=0),
    "calibrated+heal": dict(merge="calibrated", grouping="contiguous", heal=True),
    "similarity+mean": dict(merge="mean", grouping="similarity", heal=0),
    "similarity+calibrated+heal": dict(merge="calibrated", grouping="similarity", heal=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--kv-heads", type=int, nargs="+", default=None)
    ap.add_argument("--cross-layer", type=int, default=0, help="also run SharedKV(cross_layer=k)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_quality_args(ap, eval_len=512)
    args = ap.parse_args()
    model, tok, calib, score_name, score = load_for_quality(args)
    kv = kvpass.find_sites(model)[0].num_kv_heads
    heads = args.kv_heads or [h for h in (kv // 2, kv // 3, kv // 4, 1) if h >= 1 and kv % h == 0]
    rows = [{"variant": "original", "kv_heads": kv, score_name: score(model),
             "kv_bytes_per_token": kvpass.kv_bytes_per_token(model), "seconds": 0.0}]
    print(_fmt(rows[-1], score_name))
    for n in heads:
        if n >= kv:
            continue
        for name in args.variants:
            v = dict(VARIANTS[name])
            heal = v.pop("heal")
            if heal is True and args.heal_steps is not None:
                heal = args.heal_steps
            t = time.time()
            fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=n, **v), calibration=calib, heal=heal,
                                   heal_lr=args.heal_lr, progress=True)
            if heal:
                name = f"{name} ({heal if heal is not True else 'default'} steps, lr {args.heal_lr:g})"
            rows.append({"variant": name, "kv_heads": n, score_name: score(fast),
                         "kv_bytes_per_token": kvpass.kv_bytes_per_token(fast),
                         "seconds": round(time.time() - t, 1)})
            print(_fmt(rows[-1], score_name), flush=True)
    if args.cross_layer:
        for heal in (0, True):
            t = time.time()
            fast = kvpass.optimize(model, kvpass.SharedKV(cross_layer=args.cross_layer), calibration=calib,
                                   heal=heal if heal is not True or args.heal_steps is None else args.heal_steps)
            rows.append({"variant": f"cross_layer={args.cross_layer}" + ("+heal" if heal else ""), "kv_heads": kv,
                         score_name: score(fast), "kv_bytes_per_token": kvpass.kv_bytes_per_token(fast),
                         "seconds": round(time.time() - t, 1)})
            print(_fmt(rows[-1], score_name), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "calibration": "persuasion",
                                         "evaluation": "emma", "rows": rows}, indent=2))


def _fmt(r, score_name):
    return (f"{r['variant']:<28} kv_heads={r['kv_heads']:<3} {score_name}={r[score_name]:.4f}  "
            f"KV B/tok={r['kv_bytes_per_token']:,}  {r['seconds']}s")


if __name__ == "__main__":
    main()
