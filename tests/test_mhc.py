"""MHC: exact at full rank (RoPE or not, absorbed or not), absorbed == decompressed, the cache
holds the latent (bytes agree with the formula), generate works, refit/allocation/heal do
what they say, bad ranks are refused with their limits."""

import families as fam
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kvpass
from kvpass.errors import KVPassError, PolicyError, SiteError
from kvpass.runtime.cache import cache_nbytes
from kvpass.runtime.core import KVCore
from kvpass.transform.passes import mhc

LOW_RANK = 20  # rank of [W_k; W_v] in the models below


def _low_rank(model, seed=0):
    """Give every layer's K and V projections a joint rank of LOW_RANK (so any latent rank >=
    LOW_RANK must be exact), through the site's channel maps."""
    g = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    for s in kvpass.find_sites(model):
        W, _ = mhc.kv_weights(weights, s)
        low = (torch.randn(W.shape[0], LOW_RANK, generator=g, dtype=torch.float64)
               @ torch.randn(LOW_RANK, W.shape[1], generator=g, dtype=torch.float64)) / W.shape[1] ** 0.5
        D, H = s.head_dim, s.num_kv_heads
        for i, proj in enumerate((s.k_proj, s.v_proj)):
            for h in range(H):
                block = low[i * H * D + h * D: i * H * D + (h + 1) * D]
                mhc.shared_kv.set_head_rows(weights, proj, h, D, block, None)
    return model


_BASE: dict = {}


def _base(name):
    """(original, optimize(original)) per family: MHC variants re-plan the captured one."""
    if name not in _BASE:
        model = _low_rank(fam.build(name))
        _BASE[name] = (model, kvpass.optimize(model))
    return _BASE[name]


def _out(o):
    return o.logits if hasattr(o, "logits") else (o[0] if isinstance(o, tuple) else getattr(o, "last_hidden_state", o))


def _run(model, ids, mask=None):
    with torch.no_grad():
        return _out(model(ids) if mask is None else model(ids, attention_mask=mask))


CALIB = torch.randint(1, fam.VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
FAMILIES = ["llama", "gemma3", "gpt_neox", "phi3", "gpt2", "bert", "handwritten_fused"]


@settings(deadline=None)
@given(name=st.sampled_from(FAMILIES), method=st.sampled_from(["svd", "whitened", "aware"]),
       layout=st.sampled_from([(True, 1), (False, 1), (True, 2)]), extra=st.integers(0, 24),
       seq=st.integers(2, 19), seed=st.integers(0, 100))
def test_rank_at_least_weight_rank_is_exact(name, method, layout, extra, seq, seed):
    """rank ≥ rank([W_k; W_v]) (per factorised block) → the model's outputs are unchanged."""
    joint, groups = layout
    model, base = _base(name)
    assume(all(s.num_kv_heads % groups == 0 for s in base._kvpass.sites))
    # every factorised block (K and/or V rows of a head group) has rank <= LOW_RANK: a share of
    # at least LOW_RANK per block is enough
    need = LOW_RANK * groups * (1 if joint else 2)
    limit = min(s.kv_values_per_token() for s in base._kvpass.sites)
    rank = min(limit, need + extra)
    fast = kvpass.optimize(base, kvpass.MHC(rank=rank, method=method, joint=joint, groups=groups),
                           calibration=CALIB)
    ids = torch.randint(1, fam.VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))
    want, got = _run(model, ids), _run(fast, ids)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


@settings(deadline=None)
@given(name=st.sampled_from(["gpt2", "bert"]), seq=st.integers(2, 17), pad=st.integers(0, 5),
       seed=st.integers(0, 100))
def test_absorbed_equals_decompressed(name, seq, pad, seed):
    """No-RoPE sites attend in latent space; rebuilding K and V from the same latent first
    gives the same outputs (padding included)."""
    model, base = _base(name)
    fast = kvpass.optimize(base, kvpass.MHC(rank=12, method="svd"))
    lats = [m.latent for m in fast.modules() if isinstance(m, KVCore)]
    assert lats and all(lat.absorbed for lat in lats)
    ids = torch.randint(1, fam.VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    pad = min(pad, seq - 1)
    if pad:
        if name == "bert":
            mask[0, seq - pad:] = 0
        else:
            mask[0, :pad] = 0
    absorbed = _run(fast, ids, mask)
    for lat in lats:
        lat._paths = [None, None, None]  # decompress, with the plain head layout
    try:
        assert not lats[0].absorbed
        decompressed = _run(fast, ids, mask)
    finally:
        for lat in lats:
            lat._paths = None
    keep = mask.bool()
    assert (absorbed - decompressed)[keep].abs().max() <= 1e-5


def test_bad_rank_or_ratio_names_the_limits():
    _, base = _base("llama")
    with pytest.raises(PolicyError, match=r"allowed: 1\.\.64 \(2·Hkv·D = 2·2·16"):
        kvpass.optimize(base, kvpass.MHC(rank=65, method="svd"))
    for bad in (dict(ratio=1), dict(ratio=0.5), dict(ratio=True)):
        with pytest.raises(PolicyError, match="ratio.*> 1"):
            kvpass.MHC(**bad)
    with pytest.raises(PolicyError, match="allocate: needs ratio"):
        kvpass.MHC(rank=8, allocate=True)
    with pytest.raises(PolicyError, match="groups.*allowed: \\[1, 2\\]"):
        kvpass.optimize(base, kvpass.MHC(rank=16, groups=3, method="svd"))
    with pytest.raises(SiteError, match="MHC cannot follow SharedKV"):
        kvpass.optimize(base, [kvpass.SharedKV(kv_heads=1), kvpass.MHC(rank=8, method="svd")])
    with pytest.raises(KVPassError, match="calibration="):
        kvpass.optimize(base, kvpass.MHC(rank=8))  # whitened needs calibration text


def test_cache_holds_the_latent_and_generate_matches():
    """Left-padded batch, greedy: an exact latent generates the original's tokens; the cache
    holds rank values + one position per token and layer, as kv_bytes_per_token says."""
    model, base = _base("llama")
    fast = kvpass.optimize(base, kvpass.MHC(rank=LOW_RANK, method="svd"))
    ids = torch.randint(1, fam.VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    g = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, **g)
    out = fast.generate(ids, attention_mask=mask, return_dict_in_generate=True, **g)
    assert torch.equal(out.sequences, want)
    per = kvpass.kv_bytes_per_token(fast)
    assert per == 2 * (LOW_RANK * 4 + 8)  # 2 layers: fp32 latent + int64 position
    stored = out.sequences.shape[1] - 1  # the last token is never stored
    assert cache_nbytes(out.past_key_values) == 2 * stored * per == kvpass.kv_cache_bytes(fast, stored, batch=2)
    assert [tuple(layer.keys.shape) for layer in out.past_key_values.layers] == [(2, 1, stored, LOW_RANK)] * 2
    torch.manual_seed(0)
    sampled = fast.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (2, 15)


def test_state_dict_holds_the_latent_not_kv_projections():
    _, base = _base("llama")
    fast = kvpass.optimize(base, kvpass.MHC(rank=16, method="svd"))
    keys = set(fast.state_dict())
    assert "model.layers.0.self_attn.kv_core.latent.down" in keys
    assert not any(k.endswith(("k_proj.weight", "v_proj.weight")) for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert fast._kvpass.removed["model.layers.0.self_attn"] == ["k_proj.weight", "v_proj.weight"]


def test_gemma3_sliding_layers_keep_their_window_with_a_latent():
    """A model's own sliding layers stay sliding (bounded ring of latents); exact at full rank."""
    model, base = _base("gemma3")
    fast = kvpass.optimize(base, kvpass.MHC(rank=LOW_RANK, method="svd"))
    ids = torch.randint(1, fam.VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    g = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    out = fast.generate(ids, return_dict_in_generate=True, **g)
    assert torch.equal(out.sequences, model.generate(ids, **g))
    slots = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert slots == [5, 5, 19]  # sliding window 5 (two local layers), all 19 on the global one


def test_mhc_composes_with_window():
    """[MHC, Window]: a ring of latents; exact latent → same logits as the window alone, and
    the bytes multiply (latent bytes x ring slots)."""
    model, base = _base("llama")
    both = kvpass.optimize(base, [kvpass.MHC(rank=LOW_RANK, method="svd"), kvpass.Window(6, sinks=2)])
    window = kvpass.optimize(base, kvpass.Window(6, sinks=2))
    ids = torch.randint(1, fam.VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))
    assert (_run(both, ids) - _run(window, ids)).abs().max() <= 1e-5
    out = both.generate(ids[:, :4], max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [8, 8]
    assert kvpass.kv_cache_bytes(both, 1000) == 2 * 8 * (LOW_RANK * 4 + 8)


def test_refit_never_worsens_the_layer_output():
    """Least squares from the original output projection as a feasible point: the first layer's
    output error on its calibration inputs can only go down."""
    model, base = _base("llama")
    ids = CALIB  # the guarantee is on the calibration data (held-out text is the bench's job)
    errs = []
    for refit in (False, True):
        fast = kvpass.optimize(base, kvpass.Policy(default=kvpass.Full(), layers={
            0: kvpass.MHC(rank=6, refit=refit)}), calibration=CALIB)
        want = _block(model, ids)
        got = _block(fast, ids)
        errs.append(float(((got - want) ** 2).sum()))
    assert errs[1] < errs[0]


def _block(model, ids):
    outs = []
    att = model.get_submodule("model.layers.0.self_attn")
    h = att.register_forward_hook(lambda m, a, o: outs.append(o[0]))
    try:
        _run(model, ids)
    finally:
        h.remove()
    return outs[0]


def test_allocation_spends_the_budget_and_reports_it():
    _, base = _base("llama")
    fast = kvpass.optimize(base, kvpass.MHC(ratio=4, joint=False, allocate=True), calibration=CALIB)
    alloc = fast._kvpass.allocation
    ranks = alloc["ranks"]
    assert set(ranks) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert alloc["budget"] == 2 * 64 // 4 and alloc["spent"] <= alloc["budget"]
    assert sum(a + b for a, b in ranks.values()) == alloc["spent"]
    for name, (rk, rv) in ranks.items():
        assert fast.get_submodule(name).kv_core.latent.rank == rk + rv
    for name, (rk, rv) in ranks.items():  # around the uniform split (8, 8), within [r/2, 2r]
        assert 4 <= rk <= 16 and 4 <= rv <= 16
        for key in ("k", "v"):
            d = alloc["damage"][name][key]
            assert len(d["kl_change"]) == len(d["ranks"]) and d["kl_change"][d["ranks"].index(8)] == 0.0


def test_allocation_on_an_encoder():
    """Encoders (no logits): damage is the relative error of the last hidden state."""
    _, base = _base("bert")
    fast = kvpass.optimize(base, kvpass.MHC(ratio=4, allocate=True), calibration=CALIB)
    alloc = fast._kvpass.allocation
    assert alloc["spent"] <= alloc["budget"] == 2 * 128 // 4
    assert all(16 <= r <= 64 for r in alloc["ranks"].values())


def test_knapsack_is_optimal_on_non_convex_curves():
    """The allocation's DP (kvpass.util.knapsack) finds the best combination where greedy
    steps would stall (a curve flat before a cliff)."""
    import itertools

    from kvpass.util import knapsack

    items = [([8, 16, 24], [1.0, 0.99, 0.0]), ([8, 16, 24], [0.5, 0.2, 0.1]), ([8, 16, 24], [0.3, 0.25, 0.2])]
    picked = [items[i][0][j] for i, j in enumerate(knapsack([g for g, _ in items], [c for _, c in items], 48))]
    best = min(itertools.product(*[range(3)] * 3),
               key=lambda js: sum(c[j] for (_, c), j in zip(items, js)) if sum(
                   g[j] for (g, _), j in zip(items, js)) <= 48 else 1e9)
    assert picked == [items[i][0][j] for i, j in enumerate(best)] == [24, 16, 8]


def test_heal_trains_the_latent():
    _, base = _base("llama")
    fast = kvpass.optimize(base, kvpass.MHC(rank=6), calibration=CALIB, heal=8)
    for before, after in fast._kvpass.heal.values():
        assert after <= before
    from kvpass.transform.driver import trainable
    att = fast.get_submodule("model.layers.0.self_attn")
    assert "kv_core.latent.down" in trainable(att, att.site)


@pytest.mark.parametrize("name,norm,pairing", [
    ("llama", False, "half"), ("qwen3", True, "half"), ("gemma3", True, "half"),
    ("gpt_neox", False, "partial"), ("handwritten_fused", False, "interleaved")])
def test_key_path_fit_reproduces_the_path(name, norm, pairing):
    """The probed fit (norm? + RoPE) of each family's replayed key path: right structure, and
    the fused reference equals decompress-then-replay on a real forward's latents."""
    from kvpass.semantics.reference import latent_keys_values
    _, base = _base(name)
    fast = kvpass.optimize(base, kvpass.MHC(rank=24, method="svd"))
    lats = [m.latent for m in fast.modules() if isinstance(m, KVCore) and m.latent is not None]
    assert lats
    for lat in lats:
        fit = lat.fit
        assert fit is not None, lat.fit_error
        assert fit.rope and (fit.norm_eps is not None) == norm and fit.max_error <= 1e-5
        if norm:
            assert abs(fit.norm_eps - 1e-6) <= 1e-8  # the families' rms_norm_eps
        D, i = lat.head_dim, torch.arange(lat.head_dim)
        part = fit.partner[:D]
        if pairing == "half":
            assert torch.equal(part, (i + D // 2) % D)
        elif pairing == "interleaved":
            assert torch.equal(part, i ^ 1)
        else:  # partial rotary: some dimensions are not rotated
            assert (part == i).any() and (part != i).any()
        g = torch.Generator().manual_seed(0)
        c = torch.randn(2, 1, 11, lat.rank, generator=g)
        pos = torch.randint(0, 500, (2, 11), generator=g)
        k_path, v_path = lat.keys_values(c, pos)
        k_fit, v_fit = latent_keys_values(c, pos, lat.fused_weights(fit, torch.float32), fit.norm_eps)
        torch.testing.assert_close(k_fit, k_path, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(v_fit, v_path, atol=2e-5, rtol=2e-5)


def test_key_path_that_is_not_norm_and_rope_is_not_fused():
    """A key path with another nonlinearity keeps the decompress path, with the reason."""
    from kvpass.runtime.latent import fit_key_path
    _, base = _base("llama")
    fast = kvpass.optimize(base, kvpass.MHC(rank=24, method="svd"))
    lat = next(m.latent for m in fast.modules() if isinstance(m, KVCore) and m.latent is not None)
    heads = lat._heads
    lat._heads = lambda y, path, ch, pos: torch.tanh(heads(y, path, ch, pos))
    with pytest.raises(SiteError, match="neither linear"):
        fit_key_path(lat)
    lat._heads = lambda y, path, ch, pos: heads(y, path, ch, pos).roll(1, -1)  # mixes 3 dims
    with pytest.raises(SiteError, match="position 0|more than one"):
        fit_key_path(lat)
