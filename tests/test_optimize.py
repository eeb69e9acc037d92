"""The identity rewrite: kvpass's own attention module and cache, exactly the original."""

import copy

import families as fam
import pytest
import torch
from transformers import AutoModelForCausalLM

import kvpass
from kvpass.runtime.attention import KVAttention
from kvpass.runtime.cache import KVCacheLayer, KVSlidingCacheLayer, cache_nbytes


def _out(o):
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", sorted(fam.ALL))
def test_identity_logits_and_modules(name):
    model = fam.build(name)
    before = copy.deepcopy(model.state_dict())
    fast = kvpass.optimize(model, kvpass.Full())
    n_sites = len(fast._kvpass.sites)
    assert sum(isinstance(m, KVAttention) for m in fast.modules()) == n_sites
    assert not any(isinstance(m, KVAttention) for m in model.modules()), "source was modified"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fast.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(1, fam.VOCAB, (3, 17))
    with torch.no_grad():
        assert (_out(fast(ids)) - _out(model(ids))).abs().max() <= 1e-5


@pytest.mark.parametrize("name", sorted(fam.HF_CAUSAL))
def test_identity_generate_padding_and_cache_bytes(name):
    model = fam.build(name)
    fast = kvpass.optimize(model)
    ids = torch.randint(1, fam.VOCAB, (2, 10))
    greedy = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), fast.generate(ids, **greedy))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0  # left padding
    a = model.generate(ids, attention_mask=mask, **greedy)
    b = fast.generate(ids, attention_mask=mask, **greedy, return_dict_in_generate=True)
    assert torch.equal(a, b.sequences)
    cache = b.past_key_values if hasattr(b, "past_key_values") else b.cache
    ours = [layer for layer in cache.layers if isinstance(layer, (KVCacheLayer, KVSlidingCacheLayer))]
    assert len(ours) == len(fast._kvpass.sites)
    if not any(isinstance(layer, KVSlidingCacheLayer) for layer in ours):
        tokens = b.sequences.shape[1] - 1  # the last token is never fed back
        assert cache_nbytes(cache) == kvpass.kv_bytes_per_token(fast) * ids.shape[0] * tokens


def test_beam_search_and_sampling_work():
    model = fam.build("llama")
    fast = kvpass.optimize(model)
    ids = torch.randint(1, fam.VOCAB, (1, 6))
    beams = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **beams), fast.generate(ids, **beams))
    torch.manual_seed(1)
    a = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=5, pad_token_id=0)
    torch.manual_seed(1)
    b = fast.generate(ids, max_new_tokens=5, do_sample=True, top_k=5, pad_token_id=0)
    assert torch.equal(a, b)


def test_config_and_save_pretrained_round_trip(tmp_path):
    model = fam.build("qwen2")
    fast = kvpass.optimize(model)
    assert fast.config.to_dict() == model.config.to_dict()
    fast.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, fam.VOCAB, (1, 9))
    assert (again(ids).logits - model(ids).logits).abs().max() <= 1e-6


def test_kv_bytes_per_token_plain_and_optimised():
    model = fam.build("llama")  # 2 layers x 2 (K,V) x 2 heads x 16 dims x 4 bytes
    assert kvpass.kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4
    assert kvpass.kv_bytes_per_token(kvpass.optimize(model)) == 2 * 2 * 2 * 16 * 4


def test_inplace_rewrites_the_given_model():
    model = fam.build("gpt2")
    out = kvpass.optimize(model, inplace=True)
    assert out is model and isinstance(model.transformer.h[0].attn, KVAttention)


def test_unimplemented_form_is_refused_clearly():
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Future(kvpass.ir.forms.Form):  # a form kind with no pass registered
        kind: ClassVar[str] = "test_future_form"

    with pytest.raises(kvpass.KVPassError, match="test_future_form.*no pass lowers"):
        kvpass.optimize(fam.build("llama"), Future())


class _Scaled(torch.nn.Module):
    """An attention whose softmax scale is a Python float of the layer index: the same
    code, but each layer traces a different literal."""

    def __init__(self, i, d=32, h=4):
        super().__init__()
        self.h, self.scale = h, (d // h) ** -0.5 * (1 + i)
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(B, S, -1))


class _ScaledLM(torch.nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.attn = torch.nn.ModuleList(_Scaled(i) for i in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for a in self.attn:
            x = x + a(x)
        return x


@pytest.mark.parametrize("name", ["llama", "gemma3", "scaled"])
def test_layers_reuse_one_capture_only_where_they_trace_the_same(name, monkeypatch):
    """optimize() captures a layer's module once per distinct traced code (kvpass.transform.lower
    CaptureReuse): the result equals capturing every layer on its own, windows included."""
    from kvpass.transform import lower

    torch.manual_seed(0)
    model = _ScaledLM().eval() if name == "scaled" else fam.build(name)
    ids = torch.randint(1, 50 if name == "scaled" else fam.VOCAB, (2, 40))
    hits = []
    real_lookup = lower.CaptureReuse.lookup

    def spy(self, *a, **k):
        got = real_lookup(self, *a, **k)
        hits.append(got is not None)
        return got

    monkeypatch.setattr(lower.CaptureReuse, "lookup", spy)
    policy = kvpass.Window(8, sinks=2)
    reused = kvpass.optimize(model, policy)
    monkeypatch.setattr(lower.CaptureReuse, "lookup", lambda self, *a, **k: None)
    alone = kvpass.optimize(model, policy)
    n = len(kvpass.find_sites(model))
    if name == "scaled":
        assert sum(hits) == 0  # every layer's literal scale differs: each captured alone
    else:
        assert sum(hits) >= 1
    # the signature itself tells the layers apart (not only the output check behind it)
    from kvpass.graph.capture import capture, default_example_inputs, run_cache_free
    from kvpass.graph.sites import find_sites_in

    ex = default_example_inputs(model)
    found = find_sites_in(capture(model, ex))
    calls = lower.record_calls(model, [s.name for s in found], lambda: run_cache_free(model, ex))
    sigs = [lower.CaptureReuse.signature(s, model.get_submodule(s.name), calls[s.name]) for s in found]
    assert all(x is not None for x in sigs)
    assert len(set(sigs)) == (len(sigs) if name == "scaled" else 1 if name == "llama" else len(set(sigs)))
    with torch.no_grad():
        a, b, ref = _out(reused(ids)), _out(alone(ids)), _out(model(ids))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - ref).abs().max() > 0 or n == 0  # the window really applies (40 > 8 tokens)
    sites = {m.site.name: m.site for m in reused.modules() if isinstance(m, KVAttention)}
    alone_sites = {m.site.name: m.site for m in alone.modules() if isinstance(m, KVAttention)}
    assert {k: (s.window, s.scale) for k, s in sites.items()} == \
        {k: (s.window, s.scale) for k, s in alone_sites.items()}


def test_modules_that_store_into_a_state_argument_keep_storing():
    """Gemma 4 passes a dict down the layers; producers store their K/V in it and later
    (KV-shared) layers read them.  A lowered producer must still store into the caller's dict:
    if the store were lost, the consumers would fail or attend to nothing."""
    from transformers import AutoConfig, Gemma4ForCausalLM

    from kvpass.eval import zoo

    cfg = zoo.shrink_config(AutoConfig.for_model("gemma4_text"))
    cfg.num_hidden_layers, cfg.num_kv_shared_layers = 4, 2
    cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(cfg).float().eval()
    assert [layer.self_attn.is_kv_shared_layer for layer in model.model.layers] == [False, False, True, True]
    fast = kvpass.optimize(model)
    lowered = [n for n, m in fast.named_modules() if isinstance(m, KVAttention)]
    assert lowered == ["model.layers.0.self_attn", "model.layers.1.self_attn"]  # the producers
    ids = torch.randint(1, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, model(ids).logits)
    g = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, **g), model.generate(ids, **g))
    # the consumers' K/V come from other layers: forms that change them are refused, by name
    with pytest.raises(kvpass.KVPassError, match="model.layers: the module runs 2 attention cores"):
        kvpass.optimize(model, kvpass.Window(4, sinks=1))


def test_a_module_called_for_several_layers_gets_one_cache_slot_per_call():
    """HRM runs each attention module of its stacks several times per forward (its layers
    share weights): one core serves all those layers, each call in its own cache slot, so
    generation with a cache equals the original's and the cache counts every layer."""
    from transformers import DynamicCache

    from kvpass.eval import zoo

    model = zoo.build("hrm_text")
    fast = kvpass.optimize(model)
    shared = fast._kvpass.shared_modules
    assert len(shared) == 4 and sorted(i for ls in shared.values() for i in ls) == list(range(16))
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() < 1e-5
    g = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(fast.generate(ids, **g), model.generate(ids, **g))
    with torch.no_grad():  # decode steps on a cache, logit by logit
        steps = []
        for m in (model, fast):
            cache = DynamicCache()
            logits = [m(ids[:, :5], past_key_values=cache, use_cache=True).logits]
            for t in range(5, 9):
                out = m(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
            steps.append(torch.cat(logits, 1))
        assert (steps[0] - steps[1]).abs().max() < 1e-5
    assert kvpass.kv_bytes_per_token(fast) == sum(s.kv_values_per_token() * 4 for s in fast._kvpass.sites)
    win = kvpass.optimize(model, kvpass.Window(4, sinks=1))
    cache = win(ids, use_cache=True).past_key_values
    assert cache_nbytes(cache) == kvpass.kv_cache_bytes(win, 9, batch=2) < kvpass.kv_cache_bytes(fast, 9, batch=2)
    # one module's layers cannot take different forms
    with pytest.raises(kvpass.KVPassError, match="give them the same forms"):
        kvpass.optimize(model, kvpass.Policy(layers={0: kvpass.Window(4, sinks=1)}))
