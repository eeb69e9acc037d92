"""An optimised model runs its attention through the generated Triton kernels (interpreted on CPU)."""

import subprocess
import sys

SCRIPT = r"""
import torch, kvpass, families as fam
from kvpass.lower import KVCore
calls = []
orig = kvpass.codegen.attention
kvpass.lower.codegen.attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
torch.manual_seed(0)
model = fam.llama(num_attention_heads=2, num_key_value_heads=1, hidden_size=32).eval()
fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=1))
ids = torch.randint(1, fam.VOCAB, (2, 9))
mask = torch.ones_like(ids); mask[0, :3] = 0
with torch.no_grad():
    d = (fast(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits)[1].abs().max()
g = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
same = torch.equal(fast.generate(ids, attention_mask=mask, **g), model.generate(ids, attention_mask=mask, **g))
import triton
print("RESULT", float(d), same, len(calls) > 0, kvpass.codegen.interpreting())
"""


def test_optimised_model_on_interpreted_kernels():
    env = {"KVPASS_KERNELS": "interpret", "PYTHONPATH": "tests"}
    import os
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    assert line, r.stderr[-3000:]
    _, diff, same, called, interp = line[0].split()
    assert float(diff) <= 1e-5 and same == "True" and called == "True" and interp == "True"
