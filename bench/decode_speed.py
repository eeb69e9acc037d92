"""Decode speed and cache size of a budget policy against the original, at long contexts.

One run, both sides: the original model (Hugging Face's own attention and cache), the same
model through kvpass with ``Full()`` (kvpass's attention and cache, nothing compressed: the
framework's own cost), and each policy; a cache of N random tokens is filled (chunked prefill),
then ``--steps`` greedy decode steps are timed.  Ratios are against the original.  The policy
is the budget search's result stored by ``bench/budget.py`` (``--from-json``), so the speed is
measured for exactly the policy whose quality that bench measured.

    python bench/decode_speed.py --contexts 2048 8192 --json bench/results/decode_speed_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kvpass
from kvpass import models
from kvpass.evaluation import decode_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--from-json", type=Path, default=Path("bench/results/budget_smollm2.json"),
                    help="a bench/budget.py result: its searched policy is measured")
    ap.add_argument("--window", type=int, default=None, help="also a uniform Window(W, sinks=4) row")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = models.load(args.model)
    rows = json.loads(args.from_json.read_text())["rows"]
    budget = next(r for r in rows if "policy" in r and "budget" in r["label"])
    policies = {"kvpass Full()": kvpass.Full(), budget["label"]: kvpass.Policy.from_dict(budget["policy"])}
    if args.window:
        policies[f"uniform window {args.window}+4"] = kvpass.Window(args.window, sinks=4)
    base = kvpass.optimize(model)
    out = {"settings": {"model": args.model, "steps": args.steps, "threads": torch.get_num_threads(),
                        "command": " ".join(["python", *sys.argv])}, "rows": []}
    g = torch.Generator().manual_seed(0)
    for n in args.contexts:
        ids = torch.randint(100, model.config.vocab_size - 100, (1, n), generator=g)
        with torch.no_grad():
            ref = decode_speed(model, ids, steps=args.steps)
        out["rows"].append({"label": "original", "context": n, **ref, "speedup": 1.0, "cache_ratio": 1.0})
        print(f"{n:>6} original: {ref['tokens_per_s']:.2f} tok/s, cache {ref['peak_cache_bytes'] / 2**20:.1f} MiB",
              flush=True)
        for label, policy in policies.items():
            fast = kvpass.retarget(base, policy)
            t = time.time()
            with torch.no_grad():
                r = decode_speed(fast, ids, steps=args.steps)
            row = {"label": label, "context": n, **r, "speedup": r["tokens_per_s"] / ref["tokens_per_s"],
                   "cache_ratio": r["peak_cache_bytes"] / ref["peak_cache_bytes"], "seconds": round(time.time() - t, 1)}
            out["rows"].append(row)
            print(f"{n:>6} {label}: {r['tokens_per_s']:.2f} tok/s ({row['speedup']:.2f}x), cache "
                  f"{r['peak_cache_bytes'] / 2**20:.1f} MiB ({row['cache_ratio']:.3f}x)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
    print("\n| context | policy | tok/s | speed-up | peak cache | cache ratio |\n|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['context']} | {r['label']} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | "
              f"{r['peak_cache_bytes'] / 2**20:.1f} MiB | {r['cache_ratio']:.3f}x |")


if __name__ == "__main__":
    main()
