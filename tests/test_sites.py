"""find_sites on many model families: everything comes from the traced graph."""

import families as fam
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpass


@pytest.fixture(scope="module")
def sites_of():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = kvpass.find_sites(fam.build(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name,heads,kv,dim,layout,positional", [
    ("llama", 4, 2, 16, "separate", "rope:rotate_half"),
    ("mistral", 4, 2, 16, "separate", "rope:rotate_half"),
    ("qwen2", 4, 2, 16, "separate", "rope:rotate_half"),
    ("qwen3", 4, 2, 16, "separate", "rope:rotate_half"),
    ("gemma3", 4, 1, 16, "separate", "rope:rotate_half"),
    ("phi3", 4, 2, 16, "fused", "rope:rotate_half"),
    ("gpt2", 4, 4, 16, "fused", "none"),
    ("gpt_neox", 4, 4, 16, "interleaved", "rope:rotate_half(partial 8)"),
    ("bert", 4, 4, 16, "separate", "none"),
    ("handwritten", 4, 2, 16, "separate", "rope:complex"),
    ("handwritten_fused", 4, 2, 16, "fused", "rope:complex"),
])
def test_family_sites(sites_of, name, heads, kv, dim, layout, positional):
    sites = sites_of(name)
    model = fam.build(name)
    n_layers = 3 if name == "gemma3" else 2
    assert len(sites) == n_layers
    for i, s in enumerate(sites):
        assert s.ok, s.problems
        assert (s.layer, s.num_heads, s.num_kv_heads, s.head_dim) == (i, heads, kv, dim)
        assert s.kv_head_map == tuple(h * kv // heads for h in range(heads))
        assert s.k_proj.layout == layout and s.positional == positional
        assert s.causal == (name != "bert")
        scalar = getattr(getattr(model, "config", None), "query_pre_attn_scalar", None) or dim  # Gemma's own scale
        assert s.scale == pytest.approx(scalar ** -0.5)
        model.get_submodule(s.name)  # the owning module exists
        for p in (s.q_proj, s.k_proj, s.v_proj, s.o_proj):
            assert p is not None and p.weight in dict(model.named_parameters())
        assert len(s.k_proj.channels) == kv * dim and len(s.o_proj.channels) == heads * dim


def test_fused_channels_point_at_the_right_rows(sites_of):
    """Phi3's qkv_proj: q rows first, then k, then v; GPT-NeoX interleaves per head."""
    s = sites_of("phi3")[0]
    assert s.q_proj.channels == tuple(range(64))
    assert s.k_proj.channels == tuple(range(64, 96)) and s.v_proj.channels == tuple(range(96, 128))
    neox = sites_of("gpt_neox")[0]  # view [B,S,H,3D]: head h's key is rows h*48+16 .. h*48+32
    assert neox.k_proj.channels[:16] == tuple(range(16, 32))
    assert neox.k_proj.channels[16:32] == tuple(range(64, 80))
    gpt2 = sites_of("gpt2")[0]
    assert gpt2.k_proj.transposed and gpt2.k_proj.channels == tuple(range(64, 128))


def test_norms_windows_and_names(sites_of):
    q3 = sites_of("qwen3")[0]
    assert q3.q_norm.endswith("q_norm.weight") and q3.k_norm.endswith("k_norm.weight")
    assert [s.window for s in sites_of("gemma3")] == [5, 5, None]
    assert sites_of("gemma3")[0].k_norm.endswith("k_norm.weight")  # Gemma's norm: x * (1 + w)
    assert [s.window for s in sites_of("mistral")] == [6, 6]
    assert sites_of("llama")[0].name == "model.layers.0.self_attn"
    assert sites_of("handwritten")[1].name == "blocks.1.attention"
    assert sites_of("bert")[0].core == "sdpa" and sites_of("handwritten")[0].core == "eager"


def test_key_path_replays(sites_of):
    """The key path subgraph recomputes k_pre from the projection output."""
    s = sites_of("qwen3")[0]
    env = s.nodes.captured.env
    gm = s.key_path()
    inputs = [env[s.nodes.k_proj]] + [env[n] for n in _external_inputs(s)]
    out = gm(*inputs)
    assert torch.equal(out, env[s.nodes.k_pre])


def _external_inputs(s):
    from kvpass.graph import util as gu
    chain = gu.chain_between(s.nodes.k_proj, s.nodes.k_pre)
    inside, seen = set(chain), []
    for n in chain[1:]:
        for a in gu.tensor_args(n):
            if a not in inside and a.op != "get_attr" and a not in seen:
                seen.append(a)
    return seen


@settings(max_examples=4)
@given(kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([8, 16, 24]), layers=st.integers(1, 2),
       family=st.sampled_from(["llama", "qwen3", "gpt_neox"]))
def test_random_configs_found_and_identity_exact(kv, group, head_dim, layers, family):
    heads = kv * group
    torch.manual_seed(0)
    if family == "gpt_neox":
        model = fam.tf.GPTNeoXForCausalLM(fam.tf.GPTNeoXConfig(
                vocab_size=fam.VOCAB, hidden_size=heads * head_dim, intermediate_size=64,
                num_hidden_layers=layers, num_attention_heads=heads, rotary_pct=0.5,
                pad_token_id=0))
        kv = heads
    else:
        build = fam.llama if family == "llama" else fam.qwen3
        extra = {} if family == "llama" else {"head_dim": head_dim}
        extra.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * head_dim,
                     num_hidden_layers=layers)
        model = build(**extra)
    model.eval()
    sites = kvpass.find_sites(model)
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == [(heads, kv, head_dim)] * layers
    fast = kvpass.optimize(model)
    ids = torch.randint(1, fam.VOCAB, (2, 11))
    assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_capture_has_dynamic_batch_and_sequence(name):
    """The captured graph runs at other batch sizes and lengths than the sample (2 x 13)."""
    model = fam.build(name)
    cap = kvpass.capture(model)
    for shape in [(1, 5), (3, 29)]:
        ids = torch.randint(1, fam.VOCAB, shape)
        leaves = [ids if p == "['input_ids']" else (torch.ones_like(ids) if p == "['attention_mask']"
                                                    else cap.sample[p.strip("[]'")])
                  for p in cap.input_paths]
        with torch.no_grad():
            got = cap.module(*leaves)[0]
            ref = model(ids, attention_mask=torch.ones_like(ids))
        ref = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
        assert (got - ref).abs().max() <= 1e-5
