"""The README's results table, generated from the measured runs in ``bench/results``.

One row per method as the literature reports them: cache reduction, perplexity change,
long-range recall (passkey accuracy relative to the original, where measured), decode
speed-up (where measured), and the run it comes from.  Nothing here is typed by hand: every
number is read from a JSON a bench wrote, and each row names the command that reproduces it.

    python bench/report.py                 # markdown table on stdout
    python bench/report.py --out RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _row(method, reduction, change, recall, speedup, source, setting) -> dict:
    return {
        "method": method,
        "reduction": reduction,
        "change": change,
        "recall": recall,
        "speedup": speedup,
        "source": source,
        "setting": setting,
    }


def rows() -> list[dict]:
    out = []
    d = _load("window_sparse_smollm2.json")
    if d:
        base = d["rows"][0]
        for r in d["rows"][1:]:
            if "ppl_a" not in r:
                continue
            out.append(
                _row(
                    r["label"],
                    base["cache_b"] / r["cache_b"],
                    r["ppl_a"] / base["ppl_a"] - 1,
                    r.get("passkey_vs_original", {}).get("retained"),
                    None,
                    "python bench/window_sparse.py",
                    f"ppl {d['len_a']} tok, cache @{d['len_b']}",
                )
            )
    for name in ("mhc_smollm2_2x_alloc_heal.json", "mhc_smollm2_4x_alloc_heal.json", "mhc_smollm2_8x_alloc_heal.json"):
        d = _load(name)
        if not d:
            continue
        base = d["rows"][0]
        for r in d["rows"][1:]:
            out.append(
                _row(
                    f"MHC {r['ratio']:g}x ({r['variant']})",
                    base["kv_bytes_per_token"] / r["kv_bytes_per_token"],
                    r["perplexity"] / base["perplexity"] - 1,
                    None,
                    None,
                    d.get("command", "python bench/mhc.py"),
                    f"ppl {d['eval_len']} tok",
                )
            )
    d = _load("shared_kv_smollm2.json")
    if d:
        base = d["rows"][0]
        for r in d["rows"][1:]:
            out.append(
                _row(
                    f"SharedKV {base['kv_heads']}→{r['kv_heads']} heads ({r['variant']})",
                    base["kv_bytes_per_token"] / r["kv_bytes_per_token"],
                    r["perplexity"] / base["perplexity"] - 1,
                    None,
                    None,
                    "python bench/shared_kv.py --model smollm2-135m",
                    "ppl 1024 tok",
                )
            )
    d = _load("quantize_smollm2.json")
    if d:
        for r in d["rows"][1:]:
            out.append(
                _row(
                    r["label"],
                    1 / r["cache_ratio_bf16"],
                    r["ppl_change"],
                    None,
                    None,
                    "python bench/quantize.py",
                    f"ppl {d['len']} tok, bf16 cache @{d['len']}",
                )
            )
    d = _load("budget_smollm2.json")
    if d:
        base = d["rows"][0]
        n = str(max((int(k) for k in base.get("speed") or {}), default=0))
        speeds = _load("decode_speed_smollm2.json")  # bench/decode_speed.py: the same policies
        far, measured = 0, {}
        if speeds:
            far = max(r["context"] for r in speeds["rows"])
            measured = {r["label"]: r["speedup"] for r in speeds["rows"] if r["context"] == far}
        for r in d["rows"][1:]:
            sp, where = None, f", decode @{n}" if n != "0" else ""
            if n in r.get("speed", {}) and n in base.get("speed", {}):
                sp = r["speed"][n]["tokens_per_s"] / base["speed"][n]["tokens_per_s"]
            elif r["label"] in measured:
                sp, where = measured[r["label"]], f", decode @{far} (bench/decode_speed.py)"
            out.append(
                _row(
                    r["label"],
                    1 / r["cache_ratio_bf16"],
                    r["perplexity"] / base["perplexity"] - 1,
                    r.get("passkey_retained"),
                    sp,
                    "python bench/budget.py",
                    f"ppl {d['settings']['context']} tok, bf16 cache @{d['settings']['kv_context']}" + where,
                )
            )
    return out


def table(rs: list[dict]) -> str:
    lines = [
        "| method | cache reduction | perplexity change | long-range recall | decode speed-up (CPU) "
        "| setting | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rs:
        rec = "—" if r["recall"] is None else f"{r['recall']:.2f}"
        sp = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        lines.append(
            f"| {r['method']} | {r['reduction']:.2f}× | {r['change'] * 100:+.1f}% | {rec} | {sp} | "
            f"{r['setting']} | `{r['source']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    text = table(rows())
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
