"""Decode speed and cache size of a budget policy against the original, at long contexts.

One run, both sides: the original model (Hugging Face's own attention and cache), the same
model through kvpass with ``Full()`` (kvpass's attention and cache, nothing compressed: the
framework's own cost), and each policy.  For each context every side's cache is filled with the
same N random tokens (chunked prefill, one cache per side, all kept); then ``--rounds`` rounds
each time ``--steps`` greedy decode steps per side, the sides' order rotating from round to
round, so a slow spell of the machine (a shared 2-core box swings by +-30%) falls on every side
alike.  A side's tokens/s is its median round; all rounds are in the JSON.  Ratios are against
the original.  The kvpass sides share one traced copy of the model, re-planned in place
(``kvpass.retarget``, outside the timed steps) before each side's turn.  The peak cache bytes
are read from the cache tensors after every step.  The policy is the budget search's result
stored by ``bench/budget.py`` (``--from-json``), so the speed is measured for exactly the
policy whose quality that bench measured.

    python bench/decode_speed.py --contexts 2048 8192 --json bench/results/decode_speed_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kvpass
from kvpass.assets import models
from kvpass.runtime.cache import cache_nbytes


def _prefill(model, ids, config, chunk: int = 1024) -> dict:
    """Fill a fresh cache with ``ids`` (chunked). -> the side's state (cache, next token, bytes)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    t = time.perf_counter()
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            out = model(ids[:, start:start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    nbytes = cache_nbytes(cache)
    return {"cache": cache, "next": out.logits[:, -1:].argmax(-1), "prefill_s": round(time.perf_counter() - t, 2),
            "prefill_bytes": nbytes, "peak": nbytes}


def _steps(model, st: dict, steps: int) -> float:
    """``steps`` greedy decode steps on the side's cache. -> seconds (the peak bytes updated)."""
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            out = model(st["next"], cache=st["cache"], use_cache=True, logits_to_keep=1)
            st["next"] = out.logits[:, -1:].argmax(-1)
            st["peak"] = max(st["peak"], cache_nbytes(st["cache"]))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--steps", type=int, default=16, help="decode steps per side per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (sides interleaved; the median counts)")
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
    out = {"settings": {"model": args.model, "steps": args.steps, "rounds": args.rounds,
                        "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv])},
           "rows": []}
    g = torch.Generator().manual_seed(0)
    for n in args.contexts:
        ids = torch.randint(100, model.config.vocab_size - 100, (1, n), generator=g)
        sides = ["original", *policies]

        def use(label):  # the kvpass sides share one traced copy, re-planned in place (no trace)
            return model if label == "original" else kvpass.retarget(base, policies[label])

        state = {}
        for label in sides:
            state[label] = _prefill(use(label), ids, model.config)
            print(f"{n:>6} {label}: prefill {state[label]['prefill_s']:.1f}s", flush=True)
        rounds = {label: [] for label in sides}
        for r in range(args.rounds):
            for label in sides[r % len(sides):] + sides[:r % len(sides)]:
                rounds[label].append(_steps(use(label), state[label], args.steps))
        ref = None
        for label in sides:
            st = state[label]
            tps = args.steps / statistics.median(rounds[label])
            ref = ref or tps
            row = {"label": label, "context": n, "tokens_per_s": tps, "speedup": tps / ref,
                   "rounds_s": [round(x, 3) for x in rounds[label]], "peak_cache_bytes": st["peak"],
                   "prefill_cache_bytes": st["prefill_bytes"], "prefill_s": st["prefill_s"]}
            row["cache_ratio"] = st["peak"] / state["original"]["peak"]
            out["rows"].append(row)
            print(f"{n:>6} {label}: {tps:.2f} tok/s ({row['speedup']:.2f}x; rounds "
                  f"{', '.join(f'{x:.2f}s' for x in rounds[label])}), cache {st['peak'] / 2**20:.1f} MiB "
                  f"({row['cache_ratio']:.3f}x)", flush=True)
        del sides, state
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    print("\n| context | policy | tok/s | speed-up | peak cache | cache ratio |\n|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['context']} | {r['label']} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | "
              f"{r['peak_cache_bytes'] / 2**20:.1f} MiB | {r['cache_ratio']:.3f}x |")


if __name__ == "__main__":
    main()
