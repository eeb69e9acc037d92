"""The budget policy against every uniform policy of the same budget, on SmolLM2-135M.

``kvpass.Policy.budget`` searches per-layer forms (quantized storage, windows, both) for
``1 / --ratio`` of the cache at ``--kv-context`` tokens (bytes of a bf16 cache, what a
deployment holds; calibration: *Persuasion*).  The uniform baselines are each form kvpass
offers at its best setting within the same budget.  All are evaluated by
``kvpass.evaluate`` on held-out *Emma*: perplexity of ``--chunks`` × ``--len``-token chunks,
late perplexity, passkey over lengths up to the kv context (counted where the original
succeeds), KV bytes at the kv context (computed = measured), decode tokens/s and peak cache at
512 / 2048 / 8192 tokens.

    python bench/budget.py --json bench/results/budget_smollm2.json --plot bench/results/budget_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kvpass
from kvpass.assets import models
from kvpass.eval.compare import evaluate


def uniform(model, kv_context: int, ratio: float) -> dict[str, object]:
    """Each form at its best setting within the budget (bf16 bytes at kv_context)."""
    per = kvpass.kv_bytes_per_token(model, dtype=torch.bfloat16)  # original, all layers
    layers = len(kvpass.find_sites(model))
    slots = int(kv_context / ratio * per / (per + 8 * layers))  # a ring slot also holds an 8-byte position
    w = slots - 4
    blocks = max(1, (slots - 64) // 64)
    return {
        f"uniform window {w}+4": kvpass.Window(w, sinks=4),
        f"uniform sparse b64 local {blocks} global 64": kvpass.Sparse(block=64, local=blocks, global_tokens=64),
        "uniform int2 g32, keys per channel": kvpass.Quantize(bits=2, group=32),
        "uniform int4 g64 (over budget at 4x: 3.3x)": kvpass.Quantize(bits=4, group=64),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--kv-context", type=int, default=4096)
    ap.add_argument("--len", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--speed-contexts", type=int, nargs="*", default=[512, 2048, 8192])
    ap.add_argument("--only-budget", action="store_true", help="skip the uniform baselines")
    ap.add_argument("--uniform", nargs="*", default=None, help="substrings of the uniform rows to run (default all)")
    ap.add_argument("--policy-from", type=Path, default=None,
                    help="reuse the searched policy of an earlier run's JSON instead of searching again")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = models.load(args.model)
    if args.policy_from:  # the searched policy of an earlier run (the search is deterministic)
        old = json.loads(args.policy_from.read_text())
        row = next(r for r in old["rows"] if "budget" in r["label"])
        budget = kvpass.Policy.from_dict(row["policy"])
        search = {k: old["settings"][k] for k in ("search_seconds", "budget_layers", "budget_bytes", "budget_limit")}
        search["policy_from"] = str(args.policy_from)
    else:
        t0 = time.time()
        budget = kvpass.Policy.budget(model, args.ratio, context=args.kv_context, tokenizer=tok, dtype=torch.bfloat16)
        search = dict(search_seconds=round(time.time() - t0, 1), budget_layers=budget.explanation.rows,
                      budget_bytes=budget.explanation.bytes, budget_limit=budget.explanation.budget)
        print(budget.explanation.table(), f"\n({search['search_seconds']} s)", flush=True)
    policies = {f"budget {args.ratio:g}x (searched)": budget}
    if not args.only_budget:
        policies.update({k: v for k, v in uniform(model, args.kv_context, args.ratio).items()
                         if args.uniform is None or any(s in k for s in args.uniform)})
    extra = dict(model=args.model, budget_ratio=args.ratio, budget_dtype="bfloat16", **search,
                 command=" ".join(["python", *sys.argv]))

    def partial(ev):
        ev.settings.update(extra)
        print(ev.table(), flush=True)
        if args.json:
            ev.to_json(args.json)

    ev = evaluate(model, policies, tok, context=args.len, chunks=args.chunks, kv_context=args.kv_context,
                  passkey_lengths=args.passkey_lengths, speed_contexts=args.speed_contexts, on_row=partial)
    if args.plot:
        print("plot:", ev.plot(args.plot))
    print(json.dumps({r["label"]: {"ppl": r["perplexity"], "bf16_ratio": r["cache_ratio_bf16"],
                                   "passkey_retained": r.get("passkey_retained")} for r in ev.rows}, indent=1))


if __name__ == "__main__":
    main()
