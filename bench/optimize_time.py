"""How long kvpass takes to load, capture, find and lower a real model: both sides in one run.

Times, on the bundled model (default SmolLM2-135M), each step a user waits for:

- ``load``: :func:`kvpass.assets.models.load` (weights from the bundled package);
- ``capture``: one whole-model ``torch.export`` trace (:func:`kvpass.graph.capture.capture`);
- ``find_sites``: discovery on that graph (:func:`kvpass.graph.sites.find_sites_in`);
- ``optimize Full()`` / ``optimize Window``: the whole :func:`kvpass.optimize` call, once with
  per-layer capture reuse (the default, :class:`kvpass.transform.lower.CaptureReuse`) and once with reuse
  switched off (every layer traced on its own, the behaviour before reuse), with the ratio.

Each reused result is checked against the original model (max |logit difference| on real text),
so a fast path that changed the answer would show here.  Writes ``bench/results/optimize_time.json``.

    python bench/optimize_time.py                    # SmolLM2-135M, ~1 min on 2 cores
    python bench/optimize_time.py --model gemma-3-270m --json /tmp/gemma.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text
from kvpass.graph.capture import capture
from kvpass.graph.sites import find_sites_in
from kvpass.transform import lower

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _optimize(model, form, reuse: bool):
    """(optimized model, seconds, layers reused, layers lowered) with capture reuse on or off."""
    orig = lower.CaptureReuse.lookup
    hits: list[bool] = []

    def spy(self, *a, **k):
        r = orig(self, *a, **k) if reuse else None
        hits.append(r is not None)
        return r

    lower.CaptureReuse.lookup = spy
    try:
        fast, secs = _timed(lambda: kvpass.optimize(model, form))
    finally:
        lower.CaptureReuse.lookup = orig
    return fast, secs, sum(hits), len(hits)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "optimize_time.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    (model, tok), t_load = _timed(lambda: models.load(args.model))
    cap, t_cap = _timed(lambda: capture(model))
    sites, t_find = _timed(lambda: find_sites_in(cap))
    ids = tok(load_text("eval")[:4000], return_tensors="pt").input_ids[:, :256]
    ref = model(ids).logits
    out = {"model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "sites": len(sites), "seconds": {"load": t_load, "capture": t_cap, "find_sites": t_find},
           "optimize": {}}
    for label, form in [("Full()", kvpass.Full()), ("Window(512, sinks=4)", kvpass.Window(512, sinks=4))]:
        row = {}
        for reuse in (True, False):
            fast, secs, hit, n = _optimize(model, form, reuse)
            diff = float((fast(ids).logits - ref).abs().max())
            row["reuse" if reuse else "no_reuse"] = {"seconds": secs, "layers_reused": hit, "layers": n,
                                                     "max_logit_diff_vs_original": diff}
        row["speedup"] = row["no_reuse"]["seconds"] / row["reuse"]["seconds"]
        out["optimize"][label] = row
    print(f"{args.model}: load {t_load:.1f} s, capture {t_cap:.1f} s, find_sites {t_find:.2f} s "
          f"({len(sites)} sites), torch threads {out['threads']}")
    print(f"{'optimize':24} {'reuse':>8} {'no reuse':>9} {'speedup':>8} {'reused':>7} {'max|dlogit|':>12}")
    for label, row in out["optimize"].items():
        r, n = row["reuse"], row["no_reuse"]
        print(f"{label:24} {r['seconds']:7.1f}s {n['seconds']:8.1f}s {row['speedup']:7.2f}x "
              f"{r['layers_reused']:>3}/{r['layers']:<3} {r['max_logit_diff_vs_original']:12.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
