"""torch.compile(backend="kvpass"): found through the entry point in a fresh process, one
graph with one kvpass attention node per layer (prefill and a cached decode step, fullgraph),
outputs equal to the eager optimised model, and a clear refusal for a policy on a plain model."""

import subprocess
import sys

import families as fam
import pytest
import torch
from transformers import DynamicCache

import kvpass
from kvpass.backend import counters


def test_entry_point_in_a_fresh_process():
    code = ("import sys, torch\n"
            "before = 'kvpass' in sys.modules\n"
            "fn = torch._dynamo.lookup_backend('kvpass')\n"
            "print(before, fn.__module__, 'kvpass' in torch._dynamo.list_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "kvpass.backend", "True"], out.stderr[-2000:]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = fam.llama().eval()
    return model, kvpass.optimize(model, kvpass.SharedKV(kv_heads=1))


def test_compiled_optimised_model_prefill_fullgraph(models):
    _, fast = models
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, fam.VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    comp = torch.compile(fast, backend="kvpass", fullgraph=True)
    with torch.no_grad():
        got, want = comp(ids).logits, fast(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert counters["graphs"] == 1 and counters["attention_ops"] == 2 and counters["inductor"] == 1


def test_compiled_decode_step_fullgraph(models):
    _, fast = models
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, fam.VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    step = torch.compile(lambda x, c: fast(x, past_key_values=c, use_cache=True).logits,
                         backend="kvpass", fullgraph=True, options={"inductor": False})
    with torch.no_grad():
        c1, c2 = DynamicCache(), DynamicCache()
        fast(ids[:, :10], past_key_values=c1, use_cache=True)
        fast(ids[:, :10], past_key_values=c2, use_cache=True)
        got = step(ids[:, 10:11], c1)
        want = fast(ids[:, 10:11], past_key_values=c2, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert counters["graphs"] == 1 and counters["attention_ops"] == 2
    assert c1.get_seq_length() == 11


def test_policy_on_a_plain_model_is_refused(models):
    model, _ = models
    torch._dynamo.reset()
    comp = torch.compile(model, backend="kvpass", options={"policy": kvpass.SharedKV(kv_heads=1)})
    with pytest.raises(Exception, match=r"kvpass.optimize\(model, policy\)"):
        comp(torch.randint(1, fam.VOCAB, (1, 5)))


def test_unknown_option_is_refused(models):
    _, fast = models
    torch._dynamo.reset()
    comp = torch.compile(fast, backend="kvpass", options={"polcy": None})
    with pytest.raises(Exception, match="unknown options"):
        comp(torch.randint(1, fam.VOCAB, (1, 5)))
