"""Which layers retrieve a passkey (attention of the last queries to the key, on calibration text),
and passkey accuracy of a hybrid keeping those 4 layers full, Window(512, 4) elsewhere.

    python bench/passkey_hybrid.py   # prints per-layer retrieval mass, then the hybrid grid
"""
import json
import time

import torch

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text
from kvpass.eval.long_range import passkey_accuracy, passkey_prompt
from kvpass.runtime.core import KVCore

model, tok = models.load("smollm2-135m")
fast = kvpass.optimize(model, kvpass.Full())
mass = {}
span = {}
def tap_for(core):
    def tap(q, k, v):
        s = core.spec
        kk = k.index_select(1, torch.tensor(s.kv_head_map))
        sc = (q[:, :, -8:] @ kk.transpose(-1, -2)) * s.scale
        n = k.shape[2]
        qp = torch.arange(n - 8, n)[:, None]
        kp = torch.arange(n)[None]
        p = sc.masked_fill(kp > qp, float("-inf")).softmax(-1)  # [1,H,8,n]
        a, b = span["ab"]
        per_head = p[..., a:b].sum(-1).mean(-1)[0]  # [H]
        mass.setdefault(core.layer_idx, []).append(float(per_head.max()))
    return tap
for m in fast.modules():
    if isinstance(m, KVCore):
        m.taps.append(tap_for(m))
filler = load_text("calibration")
with torch.no_grad():
    for depth, key in ((0.25, 54321), (0.5, 77213)):
        ids, ans = passkey_prompt(tok, 2048, depth, key, filler=filler)
        row = ids[0].tolist()
        a_ = ans.tolist()
        hits = [i for i in range(len(row) - len(a_)) if row[i:i + len(a_)] == a_]
        hits = hits or [i for i in range(len(row)) if row[i] == a_[0]]
        span["ab"] = (min(hits), max(hits) + len(a_))
        fast(ids)
avg = {layer: sum(v) / len(v) for layer, v in mass.items()}
order = sorted(avg, key=avg.get, reverse=True)
print(json.dumps({layer: round(avg[layer], 3) for layer in order}), flush=True)
top = sorted(order[:4])
for m in fast.modules():
    if isinstance(m, KVCore):
        m.taps.clear()
kvpass.retarget(fast, kvpass.Policy(default=kvpass.Window(512, sinks=4), layers={i: kvpass.Full() for i in top}))
t = time.time()
r = passkey_accuracy(fast, tok, [1024, 2048, 4096], [0.1, 0.5, 0.9], progress=False)
print("retrieval-chosen", top, r["grid"], r["accuracy"], time.time() - t)
