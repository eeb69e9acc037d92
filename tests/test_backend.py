"""torch.compile(backend="kvpass"): found through the entry point in a fresh process, one
graph with one kvpass attention node per layer (prefill and a cached decode step, fullgraph),
outputs equal to the eager optimised model; a policy applied inside the dynamo graph of a plain
model equals optimize(), with clear refusals where the graph cannot hold the form."""

import subprocess
import sys

import families as fam
import pytest
import torch
from transformers import DynamicCache

import kvpass
from kvpass.compile.backend import counters


def test_entry_point_in_a_fresh_process():
    code = ("import sys, torch\n"
            "before = 'kvpass' in sys.modules\n"
            "fn = torch._dynamo.lookup_backend('kvpass')\n"
            "print(before, fn.__module__, 'kvpass' in torch._dynamo.list_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "kvpass.compile.backend", "True"], out.stderr[-2000:]


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


IN_GRAPH = {
    "shared_kv": kvpass.SharedKV(kv_heads=1),
    "window": kvpass.Window(4, sinks=1),
    "shared_kv+window": [kvpass.SharedKV(kv_heads=1), kvpass.Window(4, sinks=1)],
    "sparse": kvpass.Sparse(block=2, local=2, global_tokens=2),
    "quantize": kvpass.Quantize(bits=4, group=4),
    "sparse+quantize": [kvpass.Sparse(block=4, local=1, global_tokens=4, random=1), kvpass.Quantize(bits=2, group=4)],
    "mhc_svd+window": [kvpass.MHC(ratio=2, method="svd"), kvpass.Window(4, sinks=1)],
    "cross_layer+window": [kvpass.SharedKV(kv_heads=1, cross_layer=2), kvpass.Window(4, sinks=1)],
}


SINGLE = {"shared_kv", "window", "sparse", "quantize"}  # also inside the compositions: slow marker (CI time)
CASES = [pytest.param("llama", name, marks=[pytest.mark.slow] if name in SINGLE else []) for name in IN_GRAPH] + [
    # a hand-written model (fused QKV, complex RoPE)
    ("handwritten_fused", "shared_kv+window"), ("handwritten_fused", "sparse+quantize"),
    ("handwritten_fused", "mhc_svd+window"),
    ("mistral", "quantize")]  # a model's own sliding window, kept by a positional form


@pytest.mark.parametrize(("family", "name"), CASES)
def test_policy_inside_the_graph_equals_optimize(family, name):
    """The backend finds the sites in the dynamo graph of a *plain* model and applies the policy
    there: outputs equal optimize(model, policy), the model is untouched, counters count."""
    model = fam.build(family)
    policy = IN_GRAPH[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, fam.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    kw = {} if family.startswith("handwritten") else {"use_cache": False}
    comp = torch.compile(model, backend="kvpass", options={"policy": policy, "inductor": False})
    with torch.no_grad():
        got, want, orig = (m(ids, **kw) for m in (comp, kvpass.optimize(model, policy), model))
    got, want, orig = (getattr(x, "logits", x) for x in (got, want, orig))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - orig).abs().max() > 1e-3  # the rewrite took effect
    kinds = [f.kind for f in kvpass.Policy.of(policy).default]
    assert counters["sites"] == 2 and counters["rewritten"] == 2
    assert all(counters[k] == 2 for k in kinds)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_policy_inside_the_graph_with_padding_and_new_lengths(models):
    model, _ = models
    policy = [kvpass.SharedKV(kv_heads=1), kvpass.Window(4, sinks=1)]
    fast = kvpass.optimize(model, policy)
    torch._dynamo.reset()
    counters.clear()
    comp = torch.compile(model, backend="kvpass", options={"policy": policy, "inductor": False})
    for n in (11, 7, 13):  # the second length makes dynamo compile a dynamic graph
        ids = torch.randint(1, fam.VOCAB, (2, n), generator=torch.Generator().manual_seed(n))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with torch.no_grad():
            got = comp(ids, attention_mask=mask, use_cache=False).logits
            want = fast(ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
    assert counters["rewritten"] >= 4


def test_policy_inside_the_graph_through_inductor(models):
    model, _ = models
    policy = kvpass.Window(4, sinks=1)
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, fam.VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    comp = torch.compile(model, backend="kvpass", options={"policy": policy})
    with torch.no_grad():
        got = comp(ids, use_cache=False).logits
        want = kvpass.optimize(model, policy)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert counters["inductor"] == 1 and counters["window"] == 2


CALIBRATED = {
    "mhc_whitened": kvpass.MHC(ratio=2),
    "shared_kv_similarity_calibrated": kvpass.SharedKV(kv_heads=1, grouping="similarity", merge="calibrated"),
    "mhc_aware+window": [kvpass.MHC(ratio=2, method="aware"), kvpass.Window(4, sinks=1)],
}


@pytest.mark.parametrize(("family", "name"),
                         [("llama", n) for n in CALIBRATED]
                         + [pytest.param("handwritten_fused", "mhc_whitened", marks=pytest.mark.slow),
                            ("gemma3", "mhc_whitened")])
def test_calibrated_policy_inside_the_graph_equals_optimize(family, name):
    """Forms that calibrate run layer by layer on the graph (earlier layers already rewritten),
    as optimize() does: with the same calibration ids the outputs are equal."""
    model = fam.build(family)
    policy = CALIBRATED[name]
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(1, fam.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    calib = torch.randint(1, fam.VOCAB, (4, 11), generator=torch.Generator().manual_seed(5))
    kw = {} if family.startswith("handwritten") else {"use_cache": False}
    comp = torch.compile(model, backend="kvpass", options={"policy": policy, "calibration": calib, "inductor": False})
    with torch.no_grad():
        got, want, orig = (m(ids, **kw) for m in (comp, kvpass.optimize(model, policy, calibration=calib), model))
    got, want, orig = (getattr(x, "logits", x) for x in (got, want, orig))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - orig).abs().max() > 1e-3 and counters["rewritten"] == counters["sites"] >= 2


@pytest.mark.parametrize("case", ["cache", "uncalibrated", "refit", "too_few_tokens"])
def test_policy_inside_the_graph_refusals(models, case):
    """Generation with a compressed cache, calibrated forms without calibration, forms that need
    the module (refit, allocation): one clear message pointing to optimize() first."""
    model, _ = models
    torch._dynamo.reset()
    ids = torch.randint(1, fam.VOCAB, (1, 5))
    few = torch.randint(1, fam.VOCAB, (1, 3))
    policy, opts, kw, match = {
        "cache": (kvpass.Window(4, sinks=1), {}, {"use_cache": True}, "KV cache is being filled"),
        "uncalibrated": (kvpass.MHC(ratio=2), {}, {"use_cache": False}, "calibrates: give"),
        "refit": (kvpass.MHC(ratio=2, refit=True), {"calibration": few}, {"use_cache": False},
                  "needs the module itself"),
        "too_few_tokens": (kvpass.MHC(ratio=2), {"calibration": few}, {"use_cache": False}, "3 tokens"),
    }[case]
    comp = torch.compile(model, backend="kvpass", options={"policy": policy, "inductor": False, **opts})
    with pytest.raises(Exception, match=match) as err, torch.no_grad():
        comp(ids, **kw)
    if case != "too_few_tokens":
        assert "kvpass.optimize(model, policy" in str(err.value)


def test_unknown_option_is_refused(models):
    _, fast = models
    torch._dynamo.reset()
    comp = torch.compile(fast, backend="kvpass", options={"polcy": None})
    with pytest.raises(Exception, match="unknown options"):
        comp(torch.randint(1, fam.VOCAB, (1, 5)))
