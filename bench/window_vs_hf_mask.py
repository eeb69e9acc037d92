"""Is Window(W, S)'s perplexity cost the model's or kvpass's?  The original HF model given the
same window + sinks as a 4D additive mask against kvpass's ``Window(W, sinks=S)``, per chunk of
held-out text (equal numbers = the loss is the model's use of far context, not the rewrite's).

    python bench/window_vs_hf_mask.py            # SmolLM2-135M, 2 x 2048 tokens of Emma, W=512, S=4
"""

import argparse
import math

import torch
import torch.nn.functional as F

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text, token_chunks


def window_mask(n: int, window: int, sinks: int) -> torch.Tensor:
    """[1, 1, n, n] additive mask: query q sees keys k <= q with q - k < window or k < sinks."""
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    visible = (k <= q) & ((q - k < window) | (k < sinks))
    return torch.zeros(n, n).masked_fill(~visible, float("-inf"))[None, None]


@torch.no_grad()
def ppl(model, ids, **kw) -> float:
    logits = model(ids, **kw).logits[0, :-1].float()
    return math.exp(float(F.cross_entropy(logits, ids[0, 1:])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    args = ap.parse_args()
    model, tok = models.load(args.model)
    chunks = token_chunks(tok, load_text("eval"), args.length, args.chunks)
    win = kvpass.optimize(model, kvpass.Window(args.window, sinks=args.sinks))
    mask = window_mask(args.length, args.window, args.sinks)
    for i, row in enumerate(chunks):
        ids = row[None]
        hf, ours, full = ppl(model, ids, attention_mask=mask), ppl(win, ids), ppl(model, ids)
        print(f"chunk {i}: HF + 4D mask {hf:.6f}  kvpass Window {ours:.6f}  (|diff| {abs(hf - ours):.2e})  "
              f"full {full:.4f}  window cost {(ours / full - 1) * 100:+.2f}%", flush=True)


if __name__ == "__main__":
    main()
