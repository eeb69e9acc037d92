"""Shared KV: exact when the merged heads (or layers) are identical; the cache really shrinks."""

import families as fam
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpass
from kvpass.ir.plan import LayerPlan
from kvpass.runtime.attention import KVAttention
from kvpass.runtime.cache import cache_nbytes
from kvpass.transform.passes import shared_kv


def _tie_groups(model, n_groups):
    """Make the K/V projections of every head in a contiguous group identical."""
    weights = dict(model.named_parameters())
    for s in kvpass.find_sites(model):
        D, g = s.head_dim, s.num_kv_heads // n_groups
        for proj in (s.k_proj, s.v_proj):
            for h in range(s.num_kv_heads):
                src = shared_kv.head_rows(weights, proj, (h // g) * g, D)
                shared_kv.set_head_rows(weights, proj, h, D, *src)


def _logits(m, ids):
    out = m(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@settings(max_examples=4)
@given(family=st.sampled_from(["llama", "qwen3", "phi3", "gpt2", "bert"]), n=st.sampled_from([1, 2]))
def test_identical_heads_merge_exactly(family, n):
    model = fam.build(family)
    kv = kvpass.find_sites(model)[0].num_kv_heads
    if n >= kv:  # the present head count changes nothing: refused (test_policy)
        n = 1
    _tie_groups(model, n)
    fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=n))
    ids = torch.randint(1, fam.VOCAB, (2, 11))
    with torch.no_grad():
        assert (_logits(fast, ids) - _logits(model, ids)).abs().max() <= 1e-5
    assert kvpass.kv_bytes_per_token(model) * n == kvpass.kv_bytes_per_token(fast) * kv


def test_similarity_grouping_finds_identical_heads_and_relayout_is_exact():
    torch.manual_seed(0)
    model = fam.llama(num_attention_heads=8, num_key_value_heads=4).eval()
    weights = dict(model.named_parameters())
    for s in kvpass.find_sites(model):  # tie heads 0~2 and 1~3 (not contiguous)
        for proj in (s.k_proj, s.v_proj):
            for a, b in ((0, 2), (1, 3)):
                rows = shared_kv.head_rows(weights, proj, a, s.head_dim)
                shared_kv.set_head_rows(weights, proj, b, s.head_dim, *rows)
    calib = torch.randint(1, fam.VOCAB, (4, 32))
    fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=2, grouping="similarity"), calibration=calib)
    ids = torch.randint(1, fam.VOCAB, (2, 13))
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_relayout_alone_changes_nothing():
    model = kvpass.optimize(fam.llama(num_attention_heads=8, num_key_value_heads=4).eval())
    ids = torch.randint(1, fam.VOCAB, (2, 9))
    ref = model(ids).logits
    weights = dict(model.named_parameters())
    for s in model._kvpass.sites:
        head_map, _ = shared_kv.relayout(weights, s, [[3, 0], [2, 1]])
        att = model.get_submodule(s.name)
        assert isinstance(att, KVAttention)
        att.kv_core.plan = LayerPlan(head_map=head_map)
        assert head_map == (0, 0, 1, 1, 2, 2, 3, 3)  # groups [3,0],[2,1] now contiguous
    assert (model(ids).logits - ref).abs().max() <= 1e-5


def test_cross_layer_exact_when_layers_see_the_same_keys():
    model = fam.build("llama")
    layer0, layer1 = model.model.layers
    with torch.no_grad():  # layer 0 adds nothing: layer 1 sees the same input; same K/V weights
        layer0.self_attn.o_proj.weight.zero_()
        layer0.mlp.down_proj.weight.zero_()
        layer1.input_layernorm.weight.copy_(layer0.input_layernorm.weight)
        layer1.self_attn.k_proj.weight.copy_(layer0.self_attn.k_proj.weight)
        layer1.self_attn.v_proj.weight.copy_(layer0.self_attn.v_proj.weight)
    fast = kvpass.optimize(model, kvpass.SharedKV(cross_layer=2))
    assert not hasattr(fast.model.layers[1].self_attn, "k_proj")  # its K/V projections are gone
    ids = torch.randint(1, fam.VOCAB, (2, 10))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-5
    out = fast.generate(ids, return_dict_in_generate=True, **greedy)
    assert torch.equal(out.sequences, model.generate(ids, **greedy))
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    tokens = out.sequences.shape[1] - 1
    assert cache_nbytes(cache) == kvpass.kv_bytes_per_token(fast) * 2 * tokens
    assert kvpass.kv_bytes_per_token(fast) * 2 == kvpass.kv_bytes_per_token(model)


def test_generate_with_fewer_heads_and_measured_bytes():
    model = fam.build("qwen2")
    fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=1))
    ids = torch.randint(1, fam.VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert cache_nbytes(cache) == kvpass.kv_bytes_per_token(fast) * 2 * (out.sequences.shape[1] - 1)


@pytest.mark.parametrize("form,msg", [(kvpass.SharedKV(kv_heads=3), r"allowed kv_heads: \[1\]"),
                                      (kvpass.SharedKV(ratio=4), r"ratio: \[2\]")])
def test_bad_head_counts_list_valid_values(form, msg):
    with pytest.raises(kvpass.PolicyError, match=msg):
        kvpass.optimize(fam.build("llama"), form)


def test_calibrated_needs_calibration():
    with pytest.raises(kvpass.KVPassError, match="calibration"):
        kvpass.optimize(fam.build("llama"), kvpass.SharedKV(kv_heads=1, merge="calibrated"))


def test_heal_never_worse_and_calibrated_merge_runs():
    model = fam.build("llama")
    calib = torch.randint(1, fam.VOCAB, (4, 32))
    fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=1, merge="calibrated"), calibration=calib,
                           heal=20)
    assert len(fast._kvpass.heal) == 2
    for before, after in fast._kvpass.heal.values():
        assert after <= before


@given(h=st.sampled_from([2, 4, 6, 8, 12]), seed=st.integers(0, 1000), data=st.data())
def test_balanced_clustering_partitions_heads(h, seed, data):
    n = data.draw(st.sampled_from([d for d in range(1, h + 1) if h % d == 0]))
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(h, h, generator=g)
    d = d + d.T
    d.fill_diagonal_(0)
    groups = shared_kv.similarity_groups(d, n)
    assert sorted(x for gr in groups for x in gr) == list(range(h))
    assert all(len(gr) == h // n for gr in groups)


def test_cross_layer_pairs_layers_of_the_same_kind():
    model = fam.build("gemma3")  # sliding, sliding, full
    fast = kvpass.optimize(model, kvpass.SharedKV(cross_layer=2))
    assert fast._kvpass.counters["cross_layer"] == 1
    assert fast.model.layers[1].self_attn.kv_core.producer is fast.model.layers[0].self_attn.kv_core
    assert fast.model.layers[2].self_attn.kv_core.producer is None
    ids = torch.randint(1, fam.VOCAB, (2, 12))
    out = fast.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 18)
