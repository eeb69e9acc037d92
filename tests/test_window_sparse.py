"""Window and Sparse: exact where the rule hides nothing, equal to the masked reference
everywhere, ring buffers equal to one prefill, bounded caches, no NaN."""

import dataclasses

import families as fam
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpass
from kvpass.errors import SiteError
from kvpass.runtime.attention import KVAttention
from kvpass.runtime.cache import KVRingLayer, cache_nbytes
from kvpass.runtime.core import KVCore
from kvpass.semantics import reference
from kvpass.semantics.block_sparse import BlockTable, SparsePattern
from kvpass.semantics.layout import RingSpec, token_positions
from kvpass.transform.passes.sparse import pattern_of


def _llama(layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    return fam.llama(num_hidden_layers=layers, **kw).eval()


_FAST: dict = {}


def _fast(form, layers=2):
    """One optimised tiny Llama per (form, layers), shared by hypothesis examples."""
    key = (repr(form), layers)
    if key not in _FAST:
        model = _llama(layers=layers)
        _FAST[key] = (model, kvpass.optimize(model, form))
    return _FAST[key]


def _stepwise(model, ids, first, cfg):
    """Logits of a prefill of ``first`` tokens then one token at a time, through one cache."""
    cache = DynamicCache(config=cfg)
    outs = [model(ids[:, :first], cache=cache, use_cache=True).logits]
    for t in range(first, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1), cache


# ----------------------------------------------------------------------------- reference level
@settings(max_examples=25, deadline=None)
@given(sq=st.integers(1, 40), w=st.integers(1, 16), s=st.integers(0, 4), heads=st.sampled_from([(4, 2), (2, 1)]))
def test_short_sequences_are_exact(sq, w, s, heads):
    """Length <= W + S: every earlier token is a sink or inside the window."""
    h, hkv = heads
    sq = min(sq, w + s)
    q, k, v = torch.randn(1, h, sq, 16), torch.randn(1, hkv, sq, 16), torch.randn(1, hkv, sq, 16)
    full = reference.attention(q, k, v, causal=True)
    win = reference.attention(q, k, v, causal=True, window=w, sinks=s)
    assert torch.allclose(full, win, atol=1e-6)


def _dense_window_mask(n, w, s):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & ((i - j < w) | (j < s))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), w=st.integers(1, 12), s=st.integers(0, 4), data=st.data())
def test_ring_layer_equals_masked_reference(n, w, s, data):
    """Feeding any chunking through a ring of W + S slots == the dense masked reference."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=5))) - {n})
    q, k, v = torch.randn(2, 4, n, 16), torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
    want = reference.attention(q, k, v, mask=_dense_window_mask(n, w, s))
    layer, outs = KVRingLayer(RingSpec(pinned=s, ring=w)), []
    for a, b in zip([0, *cuts], [*cuts, n]):
        kk, vv, qp, kp = layer.update(k[:, :, a:b], v[:, :, a:b])
        outs.append(reference.attention(q[:, :, a:b], kk, vv, causal=True, q_pos=qp, k_pos=kp, window=w, sinks=s))
        assert layer.keys.shape[2] <= w + s
    assert torch.allclose(torch.cat(outs, 2), want, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 70), block=st.sampled_from([2, 4, 8]), local=st.integers(1, 3), glob=st.integers(0, 9),
       data=st.data())
def test_block_ring_keeps_every_visible_key(n, block, local, glob, data):
    """A sparse ring (global blocks + last L blocks, whole-block eviction) == dense pattern."""
    pat = SparsePattern(block=block, local=local, global_blocks=-(-glob // block), random=0, seed=0, causal=True)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=5))) - {n})
    q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 1, n, 16), torch.randn(1, 1, n, 16)
    tab = pat.table(-(-n // block))
    want = reference.attention(q, k, v, mask=tab.to_dense(n, causal=True))
    layer, outs = KVRingLayer(pat.ring()), []
    for a, b in zip([0, *cuts], [*cuts, n]):
        kk, vv, qp, kp = layer.update(k[:, :, a:b], v[:, :, a:b])
        outs.append(reference.attention(q[:, :, a:b], kk, vv, causal=True, q_pos=qp, k_pos=kp,
                                        block_mask=tab.table, block=block))
        assert layer.keys.shape[2] <= pat.ring().capacity
    assert torch.allclose(torch.cat(outs, 2), want, atol=1e-5)


def test_no_nan_for_sink_only_and_padded_rows():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    k_pos = torch.tensor([[0, 1, -1, -1, -1, -1]])  # only the two sinks are stored
    q_pos = torch.tensor([[100, -1, 1]])  # far query (sees only sinks), a padded row, a near one
    out = reference.attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, window=4, sinks=2)
    assert torch.isfinite(out).all()
    assert out[0, :, 1].abs().max() == 0  # padded row -> zeros
    sink_only = torch.softmax((q[0, :, 0] @ k[0, 0, :2].T) * 16**-0.5, -1) @ v[0, 0, :2]
    assert torch.allclose(out[0, :, 0], sink_only, atol=1e-6)


# ----------------------------------------------------------------------------- block tables
@settings(max_examples=30, deadline=None)
@given(nb=st.integers(1, 12), block=st.sampled_from([1, 3, 4]), local=st.integers(1, 4), glob=st.integers(0, 3),
       rnd=st.integers(0, 3), seed=st.integers(0, 5), causal=st.booleans())
def test_block_table_dense_round_trip(nb, block, local, glob, rnd, seed, causal):
    pat = SparsePattern(block=block, local=local, global_blocks=glob, random=rnd, seed=seed, causal=causal)
    tab = pat.table(nb)
    n = nb * block
    dense = tab.to_dense(n, causal=causal)
    back = BlockTable.from_dense(dense, block)
    assert torch.equal(back.table, tab.table)  # full/partial flags survive too
    assert torch.equal(back.to_dense(n, causal=causal), dense)
    assert torch.equal(pat.table(nb + 3).table[:nb, :nb], tab.table)  # prefix-stable random draws
    for qb in range(nb):
        assert tab.kv_indices(qb) == tab.visible[qb].nonzero().flatten().tolist()


def test_block_table_from_awkward_lengths():
    mask = torch.ones(10, 7, dtype=torch.bool).tril()
    tab = BlockTable.from_dense(mask, 4)
    assert tab.table.tolist() == [[1, 0], [2, 1], [2, 2]]
    assert torch.equal(tab.to_dense(10, 7) & mask, mask)


# ----------------------------------------------------------------------------- model level
@settings(max_examples=6, deadline=None)
@given(w=st.integers(2, 10), s=st.integers(0, 3), n=st.integers(2, 13))
def test_window_model_exact_when_short(w, s, n):
    model, fast = _fast(kvpass.Window(size=4, sinks=1))
    for m in fast.modules():  # same pass, other sizes: set the layers' plans directly
        if isinstance(m, KVCore):
            m.plan = dataclasses.replace(m.plan, window=w, sinks=s)
    ids = torch.randint(1, fam.VOCAB, (2, min(n, w + s)))
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_window_model_equals_attention_over_kept_tokens():
    """Independent ground truth: for one layer, the last query's output under Window(W, S)
    is the original model's output on just the sinks and the last W tokens (same positions)."""
    model = _llama(layers=1)
    w, s = 7, 3
    fast = kvpass.optimize(model, kvpass.Window(size=w, sinks=s))
    ids = torch.randint(1, fam.VOCAB, (1, 33))
    keep = [*range(s), *range(33 - w, 33)]
    with torch.no_grad():
        got = fast(ids).logits[0, -1]
        want = model(ids[:, keep], position_ids=torch.tensor([keep])).logits[0, -1]
        assert (got - want).abs().max() <= 1e-5
        assert (fast(ids).logits[0, -1] - model(ids).logits[0, -1]).abs().max() > 1e-4  # the window matters


FORMS = [kvpass.Window(size=5, sinks=2), kvpass.Window(size=4, sinks=0),
         [kvpass.SharedKV(kv_heads=1), kvpass.Window(size=6, sinks=1)],
         kvpass.Sparse(block=4, local=2, global_tokens=3), kvpass.Sparse(block=4, local=1, global_tokens=4, random=1),
         [kvpass.SharedKV(kv_heads=1), kvpass.Sparse(block=2, local=2, global_tokens=2)]]


@settings(max_examples=6, deadline=None)
@given(form=st.sampled_from(FORMS), n=st.integers(12, 30), first=st.integers(1, 6))
def test_decode_equals_prefill(form, n, first):
    """Ring buffer: N tokens one by one (after a short prefill) == one prefill of N tokens."""
    model, fast = _fast(form)
    ids = torch.randint(1, fam.VOCAB, (2, n))
    with torch.no_grad():
        whole = fast(ids).logits
        step, cache = _stepwise(fast, ids, first, model.config)
    assert (whole - step).abs().max() <= 1e-4
    assert all(isinstance(layer, KVRingLayer) for layer in cache.layers)


def test_padding_matches_unpadded_and_generation():
    _, fast = _fast(kvpass.Window(size=5, sinks=2))
    fam.check_left_padding(fast, 1e-5)


def test_cache_stays_bounded_and_measured():
    w, s = 6, 2
    model, fast = _fast(kvpass.Window(size=w, sinks=s))
    sizes = []
    ids = torch.randint(1, fam.VOCAB, (1, 3))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = fast(ids, cache=cache, use_cache=True)
        for _ in range(30):
            nxt = out.logits[:, -1:].argmax(-1)
            out = fast(nxt, cache=cache, use_cache=True)
            sizes.append(cache_nbytes(cache))
    assert max(sizes) == sizes[-1] == kvpass.kv_cache_bytes(fast, 33) == kvpass.kv_cache_bytes(fast, w + s)
    assert kvpass.kv_cache_bytes(fast, 33) < kvpass.kv_cache_bytes(model, 33)
    assert [layer.keys.shape[2] for layer in cache.layers] == [w + s, w + s]


def test_savings_multiply_and_hybrid_policy():
    model = _llama(layers=4)
    n = 200
    full = kvpass.kv_cache_bytes(model, n)
    win = kvpass.kv_cache_bytes(kvpass.optimize(model, kvpass.Window(size=16, sinks=4)), n)
    both = kvpass.kv_cache_bytes(kvpass.optimize(model, [kvpass.SharedKV(kv_heads=1), kvpass.Window(size=16, sinks=4)]),
                                 n)
    assert win - 4 * 20 * 8 == full * 20 // n  # K/V of 20 slots, plus one int64 position per slot
    assert both - 4 * 20 * 8 == (win - 4 * 20 * 8) // 2  # 2 -> 1 KV heads halves the K/V bytes
    hybrid = kvpass.Policy(default=kvpass.Window(size=16, sinks=4), layers={"0": kvpass.Full()})
    fast = kvpass.optimize(model, hybrid)
    ids = torch.randint(1, fam.VOCAB, (1, 40))
    with torch.no_grad():
        whole = fast(ids).logits
        step, cache = _stepwise(fast, ids, 30, model.config)
    assert (whole - step).abs().max() <= 1e-4
    assert [type(x).__name__ for x in cache.layers] == ["KVCacheLayer"] + ["KVRingLayer"] * 3
    assert cache_nbytes(cache) == kvpass.kv_cache_bytes(fast, 40)


def test_gemma3_sliding_layers_and_policy_windows():
    """A hybrid sliding/global model: under Window every slot becomes a ring while HF keeps
    building masks per layer type (the rings report the sizes of the layers they replaced)."""
    torch.manual_seed(0)
    model = fam.gemma3().eval()
    ids = torch.randint(1, fam.VOCAB, (2, 24))
    for policy in [kvpass.Window(size=8, sinks=2),
                   kvpass.Policy(default=kvpass.Full(), layers={"2": kvpass.Window(size=8, sinks=2)})]:
        fast = kvpass.optimize(model, policy)
        with torch.no_grad():
            whole = fast(ids).logits
            step, cache = _stepwise(fast, ids, 9, model.config)
        assert (whole - step).abs().max() <= 1e-4
    kept = kvpass.optimize(model, kvpass.Full())  # the model's own windows stay
    with torch.no_grad():
        assert (kept(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_sparse_covering_pattern_is_exact_and_bidirectional():
    model = _llama(layers=2)
    ids = torch.randint(1, fam.VOCAB, (2, 21))
    covering = kvpass.optimize(model, kvpass.Sparse(block=4, local=6, global_tokens=0))
    with torch.no_grad():
        assert (covering(ids).logits - model(ids).logits).abs().max() <= 1e-5
    torch.manual_seed(0)
    bert = fam.bert().eval()
    site = kvpass.find_sites(bert)[0]
    assert not site.causal and not pattern_of(site, kvpass.Sparse()).bounded
    enc = kvpass.optimize(bert, kvpass.Sparse(block=4, local=2, global_tokens=4))
    full = kvpass.optimize(bert, kvpass.Sparse(block=4, local=8, global_tokens=0))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        a = enc(ids, attention_mask=mask).last_hidden_state
        b = full(ids, attention_mask=mask).last_hidden_state
        want = bert(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(a).all()
    assert (b - want)[0].abs().max() <= 1e-5 and (b - want)[1, :15].abs().max() <= 1e-5
    assert (a - want).abs().max() > 1e-3  # the sparse pattern does change an encoder


def test_errors_name_the_module():
    bert = fam.bert().eval()
    with pytest.raises(SiteError, match=r"encoder\.layer\.0.*bidirectional"):
        kvpass.optimize(bert, kvpass.Window(size=4))


def test_token_positions_skip_padding():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert token_positions(valid, torch.tensor([5, 0])).tolist() == [[-1, -1, 5, 6], [0, 1, 2, 3]]


def test_retarget_equals_optimize():
    model, fast = _fast(kvpass.Window(size=5, sinks=2))
    policy = kvpass.Policy(default=kvpass.Sparse(block=4, local=2, global_tokens=4), layers={"1": kvpass.Full()})
    ids = torch.randint(1, fam.VOCAB, (2, 30))
    direct = kvpass.optimize(model, policy)
    other = kvpass.retarget(kvpass.optimize(model), policy)
    with torch.no_grad():
        assert (direct(ids).logits - other(ids).logits).abs().max() <= 1e-6
    with pytest.raises(kvpass.KVPassError, match="retarget"):
        kvpass.retarget(other, kvpass.SharedKV(kv_heads=1))


@settings(max_examples=40, deadline=None)
@given(sq=st.integers(1, 20), sk=st.integers(1, 30), w=st.one_of(st.none(), st.integers(1, 8)), s=st.integers(0, 3),
       blk=st.one_of(st.none(), st.sampled_from([2, 4])), causal=st.booleans(), with_mask=st.booleans(),
       hmap=st.sampled_from([(1, 0, 0, 1), (0, 0, 1, 1), None]), positions=st.booleans(),
       quant=st.one_of(st.none(), st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from(["channel", "token"]),
                                            st.integers(0, 3))), data=st.data())
def test_sdpa_fallback_equals_reference(sq, sk, w, s, blk, causal, with_mask, hmap, positions, quant, data):
    """The CPU path (torch SDPA with the visibility as a bool mask) == the reference, including
    empty slots, padded queries and rows that see nothing; grouped head maps go through SDPA's
    GQA (no repeated K/V), all-visible rows through the unmasked kernel."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = torch.randn(2, 4, sq, 16, generator=g), torch.randn(2, 2, sk, 16, generator=g), torch.randn(2, 2, sk, 16,
                                                                                                          generator=g)
    k_pos = torch.randint(-1, 40, (2, sk), generator=g)
    q_pos = torch.randint(-1, 40, (2, sq), generator=g)
    kw = dict(kv_head_map=hmap, scale=0.3, causal=causal, window=w, sinks=s)
    if positions:
        kw.update(q_pos=q_pos, k_pos=k_pos)
    if blk:
        kw.update(block=blk, block_mask=torch.randint(0, 3, (40 // blk + 1, 40 // blk + 1), generator=g).to(torch.int8))
    if with_mask:
        kw["mask"] = torch.rand(2, 1, sq, sk, generator=g) > 0.3
    if quant:  # quantized storage: each pair reads the quantized or the full-precision key
        from kvpass.semantics.qformat import QuantRule

        group, axis, residual = quant
        kw.update(k_hat=k + torch.randn(k.shape, generator=g), v_hat=v + torch.randn(v.shape, generator=g),
                  quant=QuantRule(bits=4, group=group, keys=axis, residual=residual))
    want = reference.attention(q, k, v, **kw)
    got = reference.attention_sdpa(q, k, v, **kw)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-5)


def test_far_attention_measures_what_a_window_hides():
    from kvpass.search.hybrid import far_attention, hybrid_layers

    model, _ = _fast(kvpass.Window(size=5, sinks=2))
    ids = torch.randint(1, fam.VOCAB, (2, 30))
    none = far_attention(model, ids, window=30)
    some = far_attention(model, ids, window=4, sinks=1)
    assert set(none) == set(some) == {0, 1}
    assert all(v == 0 for v in none.values()) and all(0.2 < v < 1 for v in some.values())
    assert len(hybrid_layers(some, 1)) == 1


class _CharTokenizer:
    """One id per character: enough of a tokenizer for pass-key prompts on a tiny model."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, verbose=False):
        out = {"input_ids": [1 + ord(c) % (fam.VOCAB - 1) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def test_retrieval_layers_is_greedy_on_the_answer_log_probability():
    from kvpass.eval.long_range import last_logits, passkey_prompt
    from kvpass.search.hybrid import retrieval_layers

    tok, model = _CharTokenizer(), _llama(layers=3, seed=3)
    fast = kvpass.optimize(model, kvpass.Full())
    kw = dict(window=8, sinks=2, lengths=(150,), depths=(0.2,), seed=5, progress=False)
    one = retrieval_layers(fast, tok, 1, **kw)
    # brute force: the same prompt, each layer full in turn
    import random

    prompt, answer = passkey_prompt(tok, 150, 0.2, random.Random(5).randint(10_000, 99_999))
    ids = torch.cat([prompt[0], answer])[None]
    scores = {}
    for layer in range(3):
        kvpass.retarget(fast, kvpass.Policy(default=kvpass.Window(8, sinks=2), layers={layer: kvpass.Full()}))
        with torch.no_grad():
            logp = last_logits(fast, ids, len(answer) + 1)[0, :-1].log_softmax(-1)
        scores[layer] = float(logp.gather(-1, answer[:, None]).mean())
    assert len(set(scores.values())) == 3  # the layers do differ: the argmax means something
    assert one == [max(scores, key=scores.get)]

    two = retrieval_layers(fast, tok, 2, **kw)
    assert two == sorted(set(two)) and len(two) == 2 and one[0] in two
    windows = {m.site.layer: m.kv_core.plan.window for m in fast.modules() if isinstance(m, KVAttention)}
    assert windows == {i: (None if i in two else 8) for i in range(3)}  # left with the chosen hybrid
    with pytest.raises(ValueError, match="full_layers"):
        retrieval_layers(fast, tok, 3, **kw)


def test_hybrid_window_is_the_largest_that_fits():
    from kvpass.search.hybrid import hybrid_window

    model = _llama(layers=6)
    fast = kvpass.optimize(model, kvpass.Full())
    whole = kvpass.kv_cache_bytes(fast, 600)

    def size(window, full):
        policy = kvpass.Policy(default=kvpass.Window(window, sinks=2), layers={i: kvpass.Full() for i in full})
        return kvpass.kv_cache_bytes(kvpass.retarget(fast, policy), 600)

    for ratio, full in ((0.25, 1), (0.5, [2, 4]), (0.9, 5)):
        w = hybrid_window(fast, full, 600, ratio=ratio, sinks=2)
        layers = list(range(full)) if isinstance(full, int) else full
        assert size(w, layers) <= ratio * whole < size(w + 1, layers)
    assert hybrid_window(model, 1, 600, sinks=2) == hybrid_window(fast, 1, 600, sinks=2)  # original: optimised first
    with pytest.raises(ValueError, match="exceeds"):
        hybrid_window(fast, 2, 600, ratio=0.25)


# ----------------------------------------------------------------------------- composition
COMPOSED = [kvpass.Window(size=6, sinks=2), kvpass.Sparse(block=4, local=1, global_tokens=4)]


def test_window_and_sparse_compose_as_the_and_of_both():
    """``[Window, Sparse]`` on one layer: each query sees the keys both rules allow (the
    visibility rules' ``and_masks``), checked against masks written out here; the composed
    model differs from either form alone, decodes as it prefills, and keeps the window's
    bounded ring."""
    from kvpass.semantics import visibility as V

    model, fast = _fast(COMPOSED)
    core = next(m.kv_core for m in fast.modules() if isinstance(m, KVAttention))
    assert core.plan.window == 6 and core.plan.pattern is not None
    torch.manual_seed(3)
    n = 26
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    pos = torch.arange(n)[None]
    table = core.plan.pattern.table(-(-n // 4)).table
    got = core._attend(q, k, v, pos, pos, n, core.spec.kv_head_map)
    qp, kp = torch.arange(n)[:, None], torch.arange(n)[None, :]
    by_hand = (kp <= qp) & ((qp - kp < 6) | (kp < 2)) & (table[qp // 4, kp // 4] != 0)
    rule = V.and_masks(V.causal(), V.window(6, sinks=2), V.blocks(table, 4))
    assert torch.equal(rule(qp, kp), by_hand)
    want = reference.attention(q, k, v, kv_head_map=core.spec.kv_head_map, scale=core.spec.scale,
                               mask=by_hand[None, None])
    assert (got - want).abs().max() <= 1e-5
    assert not torch.equal(by_hand, (kp <= qp) & ((qp - kp < 6) | (kp < 2)))  # the pattern hides more

    ids = torch.randint(1, fam.VOCAB, (2, 30))
    with torch.no_grad():
        whole = fast(ids).logits
        step, cache = _stepwise(fast, ids, 5, model.config)
        alone = [_fast(f)[1](ids).logits for f in COMPOSED]
    assert (whole - step).abs().max() <= 1e-4
    assert all((whole - a).abs().max() > 1e-4 for a in alone)
    assert kvpass.kv_cache_bytes(fast, 300) == kvpass.kv_cache_bytes(_fast(COMPOSED[0])[1], 300)


def test_or_masks_compose_and_are_sound_on_tiles():
    """``or_masks``/``and_masks``: visible where either / both rules are; the composed Triton
    tile tests (plain integer expressions, evaluated here) never skip a tile holding a visible
    pair and never call a tile holding a hidden pair full, over every tile of a grid."""
    from kvpass.semantics import visibility as V

    qp, kp = torch.arange(16)[:, None], torch.arange(16)[None, :]
    either = V.or_masks(V.causal(), V.window(3))
    assert torch.equal(either(qp, kp), (kp <= qp) | (qp - kp < 3))
    both = V.and_masks(V.causal(), V.window(3, sinks=2))
    assert torch.equal(both(qp, kp), (kp <= qp) & ((qp - kp < 3) | (kp < 2)))
    checked = 0
    for rule in (either, both):
        for t in range(0, 16, 4):
            for u in range(0, 16, 4):
                env = dict(q_lo=t, q_hi=t + 3, k_lo=u, k_hi=u + 3, WINDOW=3, SINKS=2)
                tile = rule(qp[t:t + 4], kp[:, u:u + 4])
                visit, full = bool(eval(rule.visit, {}, env)), bool(eval(rule.full, {}, env))
                assert (visit or not tile.any()) and (not full or tile.all())
                checked += visit and not full  # tiles masked element by element
    assert checked > 0
