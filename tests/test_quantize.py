"""Quantize: the format's error bound, the flush rule's meaning (one prefill = token by token),
composition with every form, cache bytes counted = measured, clear errors."""

import families as fam
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpass
from kvpass.errors import PolicyError, SiteError
from kvpass.runtime.cache import KVQuantLayer, cache_nbytes
from kvpass.semantics import reference
from kvpass.semantics.qformat import QuantRule, dequantize, fake_quantize, pack, quantize, unpack


def _llama(layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    return fam.llama(num_hidden_layers=layers, **kw).eval()


_FAST: dict = {}


def _fast(form, layers=2, family=None):
    """One optimised tiny model per (form, layers, family), shared by hypothesis examples."""
    key = (repr(form), layers, family)
    if key not in _FAST:
        if family is None:
            model = _llama(layers=layers)
        else:
            torch.manual_seed(0)
            model = getattr(fam, family)().eval()
        _FAST[key] = (model, kvpass.optimize(model, form))
    return _FAST[key]


def _stepwise(model, ids, chunks, cfg, mask=None):
    """Logits of prefill chunks (sizes ``chunks``, then single tokens) through one cache."""
    cache = DynamicCache(config=cfg)
    outs, t = [], 0
    sizes = list(chunks) + [1] * ids.shape[1]
    for n in sizes:
        if t >= ids.shape[1]:
            break
        n = min(n, ids.shape[1] - t)
        kw = {} if mask is None else {"attention_mask": mask[:, :t + n]}
        outs.append(model(ids[:, t:t + n], cache=cache, use_cache=True, **kw).logits)
        t += n
    return torch.cat(outs, 1), cache


# ----------------------------------------------------------------------------- the format
@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([8, 4, 2]), group=st.sampled_from([1, 2, 4, 8, 16, 32, 64]),
       width=st.sampled_from([16, 32, 64, 128]), axis=st.sampled_from(["token", "channel"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.floats(1e-3, 1e3), offset=st.floats(-50, 50), seed=st.integers(0, 10_000))
def test_error_within_half_a_step(bits, group, width, axis, dtype, scale, offset, seed):
    """|x - x̂| <= scale/2 for every element (the stored scale, rounded up into the dtype)."""
    if axis == "token" and width % group:
        group = width
    g = torch.Generator().manual_seed(seed)
    tokens = group * 3 if axis == "channel" else 5
    x = (torch.randn(2, 3, tokens, width, generator=g) * scale + offset).to(dtype)
    x[0, 0, 0, 0] = x[0, 0, 0, 0] * 30  # an outlier
    q = quantize(x, bits, group, axis)
    assert q.codes.dtype == torch.uint8 and q.codes.shape[-1] == width * bits // 8
    assert q.scale.dtype == dtype
    xh = dequantize(q).float()
    step = q.scale_of_each().float()
    err = (xh - x.float()).abs()
    slack = 4 * torch.finfo(dtype).eps * (x.float().abs() + step * (1 << bits))  # dequant rounding
    assert bool((err <= step / 2 + slack).all()), float((err - step / 2).max())
    # a constant group is exact
    c = torch.full((1, 1, tokens, width), 3.25, dtype=dtype)
    assert torch.equal(dequantize(quantize(c, bits, group, axis)), c)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([8, 4, 2]), n=st.integers(1, 16), seed=st.integers(0, 1000))
def test_pack_round_trips(bits, n, seed):
    per = 8 // bits
    codes = torch.randint(0, 1 << bits, (3, n * per), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, n) and torch.equal(unpack(packed, bits), codes)


def test_fake_quantize_groups_by_position():
    """Channel groups follow positions, so padding in front does not shift them."""
    x = torch.randn(1, 2, 12, 8)
    pos = torch.arange(12)[None]
    hat, _, _ = fake_quantize(x, pos, 4, 4, "channel")
    padded = torch.cat([torch.zeros(1, 2, 3, 8), x], 2)
    ppos = torch.cat([torch.full((1, 3), -1), pos], 1)
    hat2, _, _ = fake_quantize(padded, ppos, 4, 4, "channel")
    assert torch.equal(hat2[:, :, 3:], hat)
    assert torch.equal(hat2[:, :, :3], padded[:, :, :3])  # padding untouched
    manual = dequantize(quantize(x, 4, 4, "channel"))
    assert torch.equal(hat, manual)


def test_rule_flushes_in_units_after_the_residual():
    r = QuantRule(bits=4, group=4, keys="channel", values="token", residual=3)
    assert [r.flushed(n) for n in range(12)] == [0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 8]
    assert r.buffer == 6
    assert QuantRule(bits=8, group=64, keys="token", values="token").flushed(5) == 5


# ----------------------------------------------------------------------------- the meaning
def test_reference_rule_equals_attention_per_query():
    """The mixed attention equals, for each query, plain attention over the keys/values as that
    query sees them (quantized below flushed(i + 1), else full precision)."""
    rule = QuantRule(bits=2, group=4, keys="channel", values="token", residual=2)
    q, k, v = torch.randn(1, 2, 15, 8), torch.randn(1, 1, 15, 8), torch.randn(1, 1, 15, 8)
    pos = torch.arange(15)[None]
    kh = fake_quantize(k, pos, 2, 4, "channel")[0]
    vh = fake_quantize(v, pos, 2, 4, "token")[0] if False else dequantize(quantize(v, 2, 4, "token"))
    out = reference.attention(q, k, v, causal=True, k_hat=kh, v_hat=vh, quant=rule)
    for i in range(15):
        sel = (pos[0] < rule.flushed(i + 1))[None, None, :, None]
        ki, vi = torch.where(sel, kh, k), torch.where(sel, vh, v)
        one = reference.attention(q[:, :, i:i + 1], ki[:, :, :i + 1], vi[:, :, :i + 1], causal=True)
        assert torch.allclose(out[:, :, i:i + 1], one, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([8, 4, 2]), group=st.sampled_from([1, 2, 4, 8]),
       keys=st.sampled_from(["channel", "token"]), values=st.sampled_from(["channel", "token"]),
       residual=st.integers(0, 5), window=st.sampled_from([None, 3, 6, 11]), sinks=st.integers(0, 3),
       n=st.integers(1, 40), chunks=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       pad=st.integers(0, 4), seed=st.integers(0, 1000))
def test_cache_steps_equal_one_prefill(bits, group, keys, values, residual, window, sinks, n, chunks, pad, seed):
    """The cache layer's meaning: attending chunk by chunk (then token by token) through a
    KVQuantLayer equals one prefill of the whole sequence under the rule, exactly -- whatever
    the format, residual, window, sinks, left padding and chunking."""
    from kvpass.ir.plan import LayerPlan
    from kvpass.semantics.layout import token_positions

    rule = QuantRule(bits=bits, group=group, keys=keys, values=values, residual=residual)
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[0, :min(pad, n - 1)] = False
    vis = dict(causal=True, window=window, sinks=sinks if window else 0)
    pos = token_positions(valid)
    kh = fake_quantize(k, pos, bits, group, keys)[0]
    vh = fake_quantize(v, pos, bits, group, values)[0]
    whole = reference.attention(q, k, v, q_pos=pos, k_pos=pos, k_hat=kh, v_hat=vh, quant=rule, **vis)
    plan = LayerPlan(window=window, sinks=sinks if window else 0, quant=rule)
    layer = KVQuantLayer(plan.ring(), rule)
    outs, t = [], 0
    for size in chunks + [1] * n:
        if t >= n:
            break
        sl = slice(t, min(n, t + size))
        kk, vv, qp, kp, khh, vhh = layer.update(k[:, :, sl], v[:, :, sl], valid[:, sl])
        outs.append(reference.attention(q[:, :, sl], kk, vv, q_pos=qp, k_pos=kp, k_hat=khh, v_hat=vhh,
                                        quant=rule, **vis))
        t = sl.stop
    steps = torch.cat(outs, 2)
    real = valid[:, None, :, None]
    assert torch.allclose(whole * real, steps * real, atol=1e-5), float((whole - steps).abs().max())
    if window is not None:
        assert layer.positions.shape[1] <= plan.ring().capacity


FORMS = [
    kvpass.Quantize(bits=8, group=16),
    kvpass.Quantize(bits=8, group=8, keys="per_token", residual=5),
    [kvpass.Window(size=9, sinks=2), kvpass.Quantize(bits=8, group=8, residual=3)],
    [kvpass.Window(size=7, sinks=0), kvpass.Quantize(bits=8, group=16, keys="per_token")],
    [kvpass.SharedKV(kv_heads=1), kvpass.Quantize(bits=8, group=8)],
    [kvpass.Sparse(block=4, local=2, global_tokens=4), kvpass.Quantize(bits=8, group=8)],
    [kvpass.Quantize(bits=8, group=16), kvpass.MHC(rank=16, method="svd")],
    [kvpass.MHC(rank=32, method="svd"), kvpass.Quantize(bits=8, group=16, residual=4)],
]


@settings(max_examples=16, deadline=None)
@given(form=st.sampled_from(FORMS), n=st.integers(1, 45), first=st.integers(1, 20), chunk=st.integers(1, 9),
       seed=st.integers(0, 1000))
def test_models_generate_through_the_quantized_cache(form, n, first, chunk, seed):
    """Whole models, every composition: prefill chunks + tokens through the cache agree with one
    forward (to 1e-2: a last-bit difference in a projection can move a value across a rounding
    boundary of the grid; the exact statement is the cache-level test above), and the bytes the
    cache holds are the bytes kvpass computes."""
    model, fast = _fast(form)
    ids = torch.randint(1, fam.VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        whole = fast(ids).logits
        steps, cache = _stepwise(fast, ids, [first, chunk], model.config)
    assert (whole - steps).abs().max() <= 1e-2
    assert cache_nbytes(cache) == kvpass.kv_cache_bytes(fast, n, batch=2)
    assert all(isinstance(layer, KVQuantLayer) for layer in cache.layers)


def test_quantized_cache_is_packed_and_smaller():
    model, fast = _fast(kvpass.Quantize(bits=4, group=16))
    _, full = _fast(kvpass.Full())
    ids = torch.randint(1, fam.VOCAB, (1, 40))
    with torch.no_grad():
        _, cache = _stepwise(fast, ids, [20], model.config)
    layer = cache.layers[0]
    assert layer.kq.codes.dtype == torch.uint8 and layer.keys is None and layer.values is None
    assert layer.kq.codes.shape[-1] == 16 // 2  # 16-dim heads, two codes per byte
    ratio = kvpass.kv_cache_bytes(fast, 4096) / kvpass.kv_cache_bytes(full, 4096)
    # per layer and token, fp32 cache 2 heads x 16 dims x (K, V) x 4 B = 256 B; quantized: codes 32 B,
    # key scale+zero per channel per 16 tokens 16 B, value scale+zero per token 16 B, position 8 B
    assert abs(ratio - 72 / 256) < 0.01


def test_int8_window_close_to_the_window_alone():
    """bits=8 on a window form: logits within 1e-2 of the unquantized window form."""
    win = kvpass.Window(size=8, sinks=2)
    model, plain = _fast(win)
    _, q8 = _fast([win, kvpass.Quantize(bits=8, group=16)])
    ids = torch.randint(1, fam.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = plain(ids).logits
        b = q8(ids).logits
        c, _ = _stepwise(q8, ids, [5], model.config)
    assert (a - b).abs().max() <= 1e-2
    assert (a - c).abs().max() <= 1e-2
    assert (a - b).abs().max() > 0  # it does quantize


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_quantize_keeps_a_models_own_window(family):
    """Quantize alone on a model with its own sliding layers keeps their windows (a quantized
    layer reads visibility from positions, so the window must be in its plan): int8 stays within
    1e-2 of the original well past the window, one-shot and token by token."""
    model = fam.build(family)
    fast = kvpass.optimize(model, kvpass.Quantize(bits=8, group=4))
    windows = {m.site.name: m.site.window for m in fast.modules() if hasattr(m, "site")}
    assert any(w is not None for w in windows.values())
    for m in fast.modules():
        if hasattr(m, "site"):
            assert m.kv_core.plan.window == m.site.window
    ids = torch.randint(1, fam.VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = fast(ids, use_cache=False).logits
        steps, _ = _stepwise(fast, ids, [7], model.config)
    assert (got - want).abs().max() <= 1e-2 and (steps - want).abs().max() <= 1e-2


def test_padding_and_generate():
    _, fast = _fast(kvpass.Quantize(bits=4, group=8, residual=3))
    fam.check_left_padding(fast, 1e-4, new_tokens=12)


def test_window_cache_stays_bounded():
    model, fast = _fast([kvpass.Window(size=6, sinks=2), kvpass.Quantize(bits=4, group=4)])
    sizes = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = fast(torch.randint(1, fam.VOCAB, (1, 3)), cache=cache, use_cache=True)
        for _ in range(40):
            out = fast(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            sizes.append(cache_nbytes(cache))
    assert max(sizes) == sizes[-1] == kvpass.kv_cache_bytes(fast, 43) == kvpass.kv_cache_bytes(fast, 400)


def test_retarget_sweeps_quantization():
    model = _llama()
    fast = kvpass.optimize(model)
    ids = torch.randint(1, fam.VOCAB, (1, 30))
    for form in (kvpass.Quantize(bits=4, group=8), [kvpass.Window(6, sinks=1), kvpass.Quantize(bits=2, group=8)]):
        ref = kvpass.optimize(model, form)
        kvpass.retarget(fast, form)
        with torch.no_grad():
            assert torch.allclose(fast(ids).logits, ref(ids).logits, atol=1e-6)
        assert kvpass.kv_bytes_per_token(fast) == kvpass.kv_bytes_per_token(ref)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_module():
    with pytest.raises(PolicyError, match="bits"):
        kvpass.Quantize(bits=3)
    with pytest.raises(PolicyError, match="keys"):
        kvpass.Quantize(keys="per_head")
    with pytest.raises(PolicyError, match="twice"):
        kvpass.Policy(default=[kvpass.Quantize(), kvpass.Quantize(bits=4)])
    with pytest.raises(SiteError, match=r"model\.layers\.0\.self_attn.*group=24"):
        kvpass.optimize(_llama(), kvpass.Quantize(bits=4, group=24))
    torch.manual_seed(0)
    with pytest.raises(SiteError, match="bidirectional"):
        kvpass.optimize(fam.bert().eval(), kvpass.Quantize(bits=8, group=16))


def test_policy_round_trip_and_checkpoint(tmp_path):
    pol = kvpass.Policy(default=[kvpass.Window(8, sinks=2), kvpass.Quantize(bits=4, group=8, residual=2)])
    assert kvpass.Policy.from_dict(pol.to_dict()) == pol
    model, fast = _fast(pol.default)
    kvpass.save_pretrained(fast, tmp_path / "out")
    back = kvpass.from_pretrained(tmp_path / "out")
    ids = torch.randint(1, fam.VOCAB, (1, 25))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, fast(ids).logits, atol=1e-5)
    assert kvpass.kv_bytes_per_token(back) == kvpass.kv_bytes_per_token(fast)


def test_decode_reads_the_packed_cache_even_without_a_kernel_spec():
    """head_dim 8 has no kernel spec: decode reads the cache as it is in torch (store
    dequantized + residual), the same values the one-shot rule gives the newest query."""
    torch.manual_seed(0)
    model = fam.llama(hidden_size=32, num_attention_heads=4, num_key_value_heads=2).eval()
    fast = kvpass.optimize(model, [kvpass.Window(9, sinks=1), kvpass.Quantize(bits=8, group=8, residual=2)])
    ids = torch.randint(1, fam.VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = fast(ids).logits
        steps, cache = _stepwise(fast, ids, [4], model.config)
    assert (whole - steps).abs().max() <= 1e-2
    assert all(layer.step is None for layer in cache.layers)  # decode steps built no dequantized copy
