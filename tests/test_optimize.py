"""The identity rewrite: kvpass's own attention module and cache, exactly the original."""

import copy

import families as fam
import pytest
import torch
from transformers import AutoModelForCausalLM

import kvpass
from kvpass.cache import KVCacheLayer, KVSlidingCacheLayer, cache_nbytes
from kvpass.lower import KVAttention


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
    class Future(kvpass.policy.Form):  # a form kind with no pass registered
        kind: ClassVar[str] = "test_future_form"

    with pytest.raises(kvpass.KVPassError, match="test_future_form.*not implemented"):
        kvpass.optimize(fam.build("llama"), Future())
