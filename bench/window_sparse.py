"""Windowed and sparse attention on SmolLM2-135M: quality, long-range recall, cache bytes.

One run compares the original model with each policy on held-out text (Emma; the hybrids'
full layers are chosen on the calibration text, Persuasion, never on the evaluation):

- perplexity of ``--len-a``-token chunks and of ``--len-b``-token chunks;
- long-range perplexity: only targets at positions >= ``--late`` of the long chunks;
- passkey retrieval over lengths x depths, counted only where the original succeeds;
- KV-cache bytes at both lengths (``kvpass.kv_cache_bytes``) and the ratio to the original;
- a greedy generation of ``--gen`` tokens with ``Window(512, sinks=4)`` and with the original
  model, cache bytes measured from the cache tensors after every step (plot).

Hybrids: full attention on a few layers, windows elsewhere — fixed layers (``--hybrid-full``),
the layers with most far attention (``--hybrid-auto``), and ``--search-full`` layers chosen by
a greedy pass-key search (:func:`kvpass.search.hybrid.retrieval_layers`, ~30 min on 2 cores)
with the largest window that keeps the cache at ``--len-b`` tokens within 1/4 of the original's.

    python bench/window_sparse.py --json bench/results/window_sparse_smollm2.json \\
        --plot bench/results/window_sparse_cache.png
    # only some policies, added to that file (its original row reused, same-label rows replaced):
    python bench/window_sparse.py --update --only passkey-searched "window 1024" --hybrid-auto 0 --gen 0 \\
        --json bench/results/window_sparse_smollm2.json
    # Window(512, 4) perplexity over more chunks:
    python bench/window_sparse.py --ppl-only --chunks-a 22 --only "window 512, sinks" --json <file>
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text, token_chunks
from kvpass.eval.long_range import passkey_accuracy, passkey_retained, perplexity_by_position, plot_passkey
from kvpass.eval.perplexity import perplexity
from kvpass.runtime.cache import cache_nbytes, find_caches
from kvpass.search.hybrid import far_attention, hybrid_layers, hybrid_window, retrieval_layers

W = kvpass.Window


def policies(n_layers: int, hybrid_full: list[int], auto_full: list[int] | None = None,
             searched: tuple[list[int], int] | None = None) -> dict[str, object]:
    hybrid = kvpass.Policy(default=W(512, sinks=4), layers={i: kvpass.Full() for i in hybrid_full})
    auto = {}
    if searched:
        layers, window = searched
        auto[f"hybrid: full on passkey-searched layers {layers}, window {window}+4 elsewhere"] = kvpass.Policy(
            default=W(window, sinks=4), layers={i: kvpass.Full() for i in layers})
    if auto_full:
        auto[f"hybrid: full on far-attention layers {auto_full}, window 512+4 elsewhere"] = kvpass.Policy(
            default=W(512, sinks=4), layers={i: kvpass.Full() for i in auto_full})
    # most informative first (partial runs still answer the goals)
    return {
        "window 512, sinks 4": W(512, sinks=4),
        "window 512, sinks 0": W(512, sinks=0),
        **auto,
        f"hybrid: full on layers {hybrid_full}, window 512+4 elsewhere": hybrid,
        # 7 local blocks of 64 + 1 global block = 512 keys per query, like window 512 + sinks
        "sparse b64 local 7 global 64": kvpass.Sparse(block=64, local=7, global_tokens=64),
        "window 1024, sinks 4": W(1024, sinks=4),
        "window 1024, sinks 0": W(1024, sinks=0),
        "window 256, sinks 4": W(256, sinks=4),
        "window 256, sinks 0": W(256, sinks=0),
        "sparse b64 local 5 global 64 random 2": kvpass.Sparse(block=64, local=5, global_tokens=64, random=2),
    }


def measure(model, tok, a_chunks, b_chunks, late, lengths, depths, ppl_only=False) -> dict:
    t = time.time()
    row = {"ppl_a": perplexity(model, a_chunks, batch_size=1, progress=False)}
    if not ppl_only:
        row.update(_long_chunks(model, b_chunks, late),
                   passkey=passkey_accuracy(model, tok, lengths, depths, progress=False))
    row["seconds"] = round(time.time() - t, 1)
    return row


def _long_chunks(model, chunks, late) -> dict:
    """Perplexity of the long chunks, all targets and targets at positions >= late (one pass)."""
    bucket = math.gcd(late, 512)
    by_pos = perplexity_by_position(model, chunks, bucket=bucket, progress=False)
    nll = [(start, math.log(p)) for start, p in by_pos]
    counts = [min(start + bucket, chunks.shape[1]) - max(start, 1) for start, _ in nll]
    total = sum(c * v for c, (_, v) in zip(counts, nll)) / sum(counts)
    far = [(c, v) for c, (start, v) in zip(counts, nll) if start >= late]
    return {"ppl_b": math.exp(total), "long_range_ppl_b": math.exp(sum(c * v for c, v in far) / sum(c for c, _ in far)),
            "ppl_b_by_position": by_pos}


def generation_trace(model, ids: torch.Tensor, steps: int, every: int = 16) -> list[tuple[int, int]]:
    """(tokens in context, cache bytes) after every ``every``-th forward of a greedy generation."""
    trace, count = [], [0]

    def hook(mod, args, kwargs, out):
        count[0] += 1
        caches = find_caches(kwargs)
        if caches and (count[0] % every == 0 or count[0] == 1):
            trace.append((caches[0].get_seq_length(), cache_nbytes(caches[0])))

    h = model.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        h.remove()
    return trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--len-a", type=int, default=2048)
    ap.add_argument("--chunks-a", type=int, default=4)
    ap.add_argument("--len-b", type=int, default=4096)
    ap.add_argument("--chunks-b", type=int, default=2)
    ap.add_argument("--late", type=int, default=1024, help="long-range perplexity counts targets from here")
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--hybrid-full", type=int, nargs="+", default=[0, 8, 16, 24])
    ap.add_argument("--hybrid-auto", type=int, default=4,
                    help="also a hybrid keeping full the k layers with most far attention on calibration text")
    ap.add_argument("--search-full", type=int, default=6,
                    help="also a hybrid of this many full layers chosen by a greedy pass-key search on calibration "
                         "text (kvpass.search.hybrid.retrieval_layers), the largest window that keeps the cache at "
                         "len-b <= 1/4 elsewhere (0: skip)")
    ap.add_argument("--searched-layers", type=int, nargs="+", default=None,
                    help="skip the search: these layers (from an earlier run's JSON 'retrieval_search')")
    ap.add_argument("--text", default="eval", help="held-out text (kvpass.assets.text.load_text name or a file)")
    ap.add_argument("--ppl-only", action="store_true",
                    help="only the len-a perplexity (e.g. over more chunks: --chunks-a 22); no search, no generation")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of policy labels to run")
    ap.add_argument("--gen", type=int, default=4096, help="tokens to generate for the cache trace (0: skip)")
    ap.add_argument("--skip-original", type=Path, default=None,
                    help="reuse the original model's row from this earlier JSON (same settings)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--update", action="store_true",
                    help="add to an existing --json of the same settings: reuse its original row and other rows, "
                         "replace the rows of the policies run now")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = models.load(args.model)
    text = load_text(args.text)
    if args.ppl_only:
        args.search_full = args.hybrid_auto = args.gen = 0
    a_chunks = token_chunks(tok, text, args.len_a, args.chunks_a)
    b_chunks = token_chunks(tok, text, args.len_b, args.chunks_b)
    n_layers = len(kvpass.find_sites(model))
    out = {"model": args.model, "text": "emma (held out)" if args.text == "eval" else args.text,
           "len_a": args.len_a, "chunks_a": len(a_chunks),
           "len_b": args.len_b, "chunks_b": len(b_chunks), "late": args.late, "rows": []}

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(args.json)

    def put(row):  # a policy run again replaces its earlier row (--update)
        labels = [r["label"] for r in out["rows"]]
        if row["label"] in labels:
            out["rows"][labels.index(row["label"])] = row
        else:
            out["rows"].append(row)

    full_bytes = {n: kvpass.kv_cache_bytes(model, n) for n in (args.len_a, args.len_b)}
    prev = json.loads(args.json.read_text()) if args.update and args.json and args.json.exists() else None
    if prev:
        keys = ("model", "text", "len_a", "chunks_a", "len_b", "chunks_b", "late")
        other = [k for k in keys if prev.get(k) != out[k]]
        if prev["rows"][0].get("passkey", {}).get("lengths") not in (None, args.passkey_lengths):
            other.append("passkey lengths")
        if other:
            raise SystemExit(f"--update: {args.json} was measured with other settings ({', '.join(other)})")
        out = {**prev, "rows": list(prev["rows"])}
        base = out["rows"][0]
    elif args.skip_original:
        base = json.loads(args.skip_original.read_text())["rows"][0]
    else:
        base = measure(model, tok, a_chunks, b_chunks, args.late, args.passkey_lengths, args.passkey_depths,
                       args.ppl_only)
    base.update(label="original", cache_a=full_bytes[args.len_a], cache_b=full_bytes[args.len_b])
    put(base)
    print(_fmt(base, base), flush=True)
    save()
    lowered = kvpass.optimize(model, kvpass.Full())
    auto = None
    if args.hybrid_auto:  # chosen on calibration text (Persuasion), never on the evaluation
        calib = token_chunks(tok, load_text("calibration"), args.len_b, 2)
        mass = far_attention(lowered, calib, window=512, sinks=4)
        auto = hybrid_layers(mass, args.hybrid_auto)
        out["far_attention"] = {"window": [512, 4], "per_layer": mass, "chosen": auto}
        print("far attention (window 512+4) per layer:", {k: round(v, 3) for k, v in mass.items()}, "->", auto)
    searched = None
    if args.search_full:  # chosen on calibration text (Persuasion) prompts, never the evaluation's filler
        window = hybrid_window(lowered, args.searched_layers or args.search_full, args.len_b, ratio=0.25, sinks=4)
        t = time.time()
        layers = args.searched_layers or retrieval_layers(
            lowered, tok, args.search_full, window, sinks=4, filler=load_text("calibration"))
        out["retrieval_search"] = {"full_layers": layers, "window": [window, 4], "reused": bool(args.searched_layers),
                                   "seconds": round(time.time() - t, 1)}
        searched = (layers, window)
        print("passkey-searched full layers:", layers, f"window {window}+4 elsewhere", flush=True)
    for label, policy in policies(n_layers, args.hybrid_full, auto, searched).items():
        if args.only and not any(s in label for s in args.only):
            continue
        fast = kvpass.retarget(lowered, policy)  # == optimize(model, policy); no re-trace per policy
        row = measure(fast, tok, a_chunks, b_chunks, args.late, args.passkey_lengths, args.passkey_depths,
                      args.ppl_only)
        row.update(label=label, policy=kvpass.Policy.of(policy).to_dict(),
                   cache_a=kvpass.kv_cache_bytes(fast, args.len_a), cache_b=kvpass.kv_cache_bytes(fast, args.len_b))
        if not args.ppl_only:
            row["passkey_vs_original"] = passkey_retained(base["passkey"], row["passkey"])
        put(row)
        print(_fmt(row, base), flush=True)
        save()
    if args.plot and not args.ppl_only:
        grids = {r["label"]: r["passkey"] for r in out["rows"] if "passkey" in r}
        plot_passkey(grids, args.plot.with_name(args.plot.stem + "_passkey.png"))
    if args.gen:
        prompt = token_chunks(tok, text, 32, 1)
        win = kvpass.retarget(lowered, W(512, sinks=4))
        t = time.time()
        tw = generation_trace(win, prompt, args.gen)
        tf = generation_trace(model, prompt, args.gen)
        at = {n: b for n, b in tw}
        ref = min((n for n in at if n >= 516), default=None)
        out["generation"] = {
            "tokens": args.gen, "window": [512, 4], "window_trace": tw, "full_trace": tf,
            "window_peak_bytes": max(b for _, b in tw), "window_bytes_at": [ref, at.get(ref)],
            "full_peak_bytes": max(b for _, b in tf), "seconds": round(time.time() - t, 1),
        }
        if ref is not None:
            g = out["generation"]
            g["peak_over_at_516"] = g["window_peak_bytes"] / at[ref]
            print(f"generation of {args.gen}: window peak {g['window_peak_bytes']:,} B = "
                  f"{g['peak_over_at_516']:.3f} x the cache at {ref} tokens; full peak {g['full_peak_bytes']:,} B")
        save()
        if args.plot:
            _plot(tw, tf, args.plot)


def _fmt(row: dict, base: dict) -> str:
    rel = (row["ppl_a"] / base["ppl_a"] - 1) * 100
    line = f"{row['label']:<62} ppl@a {row['ppl_a']:8.3f} ({rel:+.2f}%)  "
    if "passkey" in row:
        ret = row.get("passkey_vs_original", {}).get("retained")
        line += (f"ppl@b {row['ppl_b']:8.3f}  late ppl {row['long_range_ppl_b']:8.3f}  "
                 f"passkey {row['passkey']['accuracy']:.2f}{'' if ret is None else f' (retained {ret:.2f})'}  ")
    return line + f"cache@b {row['cache_b'] / base['cache_b']:.3f}x  [{row['seconds']} s]"


def _plot(tw, tf, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([n for n, _ in tf], [b / 2**20 for _, b in tf], label="original (DynamicCache)")
    ax.plot([n for n, _ in tw], [b / 2**20 for _, b in tw], label="kvpass Window(512, sinks=4)")
    ax.set_xlabel("tokens in context")
    ax.set_ylabel("KV cache (MiB, measured)")
    ax.set_title("SmolLM2-135M greedy generation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
