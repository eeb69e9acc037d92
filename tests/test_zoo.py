"""Discovery that generalises (issue 20).

* The automatic zoo: every decoder and text encoder transformers registers, built tiny from its
  default config (:mod:`kvpass.eval.zoo`).  CI runs a fixed stride of the registry (no family picked
  by hand); the whole zoo is ``slow``.
* Models written outside transformers: a hand-written decoder with no
  ``get_input_embeddings``, one built from ``nn.MultiheadAttention``, and timm's ViT attention
  layout — found and rewritten with and without ``example_inputs``.
* Spellings seen in the wild, each on a small module: scaling before the head view, a norm over
  the whole projection, a fused projection split per KV group, an eager core with no scale.
"""

from __future__ import annotations

import copy
import math

import families as fam
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kvpass
from kvpass.errors import CaptureError, KVPassError, SiteError
from kvpass.eval import zoo

STRIDE = 12  # CI: every 12th family of the sorted registry (19 of ~230)


# ------------------------------------------------------------------------------ the zoo
def test_families_come_from_transformers_registries():
    fams = zoo.families()
    kinds = dict(fams)
    assert len(fams) > 150
    assert kinds["llama"] == "causal" and kinds["modernbert"] == "encoder"
    assert len(set(fams)) == len(fams)


def test_shrink_config_is_by_meaning():
    from transformers import AutoConfig

    for model_type in ("mixtral", "gpt2", "deepseek_v3", "gemma3_text"):
        cfg = zoo.shrink_config(AutoConfig.for_model(model_type))
        assert cfg.hidden_size == zoo.HIDDEN and cfg.num_attention_heads == zoo.HEADS
        assert cfg.num_hidden_layers == zoo.LAYERS and cfg.vocab_size == zoo.VOCAB
    moe = zoo.shrink_config(AutoConfig.for_model("mixtral"))
    assert (moe.num_local_experts, moe.num_experts_per_tok) == (4, 2)
    gemma = zoo.shrink_config(AutoConfig.for_model("gemma3_text"))  # both layer kinds kept
    assert len(gemma.layer_types) == 2 and len(set(gemma.layer_types)) == 2


@pytest.fixture(scope="module")
def subset_rows():
    items = zoo.families()[::STRIDE]
    return zoo.run(items, jobs=2, timeout=180, progress=False)


def test_zoo_subset_has_no_crash_and_no_silent_noop(subset_rows):
    assert len(subset_rows) == len(zoo.families()[::STRIDE])
    crashes = [(r["model_type"], r["reason"]) for r in subset_rows if r["class"] == "CRASH"]
    assert not crashes
    noops = [(r["model_type"], k) for r in subset_rows for k, v in r.get("forms", {}).items()
             if v["status"] == "noop"]
    assert not noops
    for r in subset_rows:  # every class that is not EXACT says why
        assert r["class"] in zoo.CLASSES
        if r["class"] not in ("EXACT",):
            assert r.get("reason"), r


def test_zoo_subset_is_mostly_exact(subset_rows):
    s = zoo.summary(subset_rows)
    assert s["buildable"] >= 10
    assert s["exact_share"] >= 0.85, zoo.markdown_table(subset_rows)
    for r in subset_rows:
        if r["class"] == "EXACT":
            assert r["sites"] == r["cores"] and r["identity"] <= zoo.IDENTITY_TOL
            assert all(v["status"] in ("applied", "refused") for v in r["forms"].values())
            assert all(v.get("reason") for v in r["forms"].values() if v["status"] == "refused")
            if r["weights"] != "traced" and "shared_kv" in r["forms"]:  # untraced weights: refused, never guessed
                assert r["forms"]["shared_kv"]["status"] == "refused", r


@pytest.mark.slow
def test_full_zoo_goals():
    rows = zoo.run(progress=False)
    s = zoo.summary(rows)
    assert s["counts"]["CRASH"] == 0, [r for r in rows if r["class"] == "CRASH"]
    assert s["silent_noops"] == 0
    assert s["exact_share"] >= 0.90
    assert s["window_applied_share"] >= 0.90 and s["quantize_applied_share"] >= 0.90


def test_the_zoo_catches_a_silent_noop(monkeypatch):
    """A form that returns without rewriting anything is a CRASH row, not a pass."""
    monkeypatch.setattr(zoo, "retarget", lambda model, policy: model)
    row = zoo.check_family("llama")
    assert row["forms"]["window"]["status"] == "noop"
    assert row["class"] == "CRASH"


def test_the_zoo_catches_a_missed_core(monkeypatch):
    """Cores the model runs that kvpass does not find make the row PARTIAL (or NOT_FOUND)."""
    from kvpass.graph import sites

    real = sites._cores

    def drop_last(graph, env=None):
        cores, passed = real(graph, env)
        return cores[:-1] if len(cores) > 1 else cores, passed

    monkeypatch.setattr(sites, "_cores", drop_last)
    row = zoo.check_family("llama")
    assert row["class"] == "PARTIAL" and "of 2 attention cores" in row["reason"]


def test_core_counter_is_independent_of_kvpass():
    model = fam.build("gpt2")
    ids = torch.randint(0, fam.VOCAB, (2, 13))
    n, _ = zoo.count_cores(model, {"input_ids": ids})
    assert n == 2


# --------------------------------------------------------- models outside transformers
def _ids(n=20, batch=1):
    return torch.randint(0, fam.VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(fam.OUTSIDE))
@pytest.mark.parametrize("given", [False, True], ids=["found-input", "example-inputs"])
def test_outside_models_found_and_rewritten(name, given):
    torch.manual_seed(0)
    model = fam.OUTSIDE[name]().eval()
    ex = (torch.randint(0, fam.VOCAB, (2, 13)),) if given else None
    sites = kvpass.find_sites(model, example_inputs=ex)
    assert len(sites) == 2 and all(s.ok for s in sites), [s.problems for s in sites]
    assert all(s.q_proj and s.k_proj and s.v_proj and s.o_proj for s in sites)
    fast = kvpass.optimize(model, kvpass.Full(), example_inputs=ex)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        assert (fast(ids) - ref).abs().max() < 1e-5
    causal = sites[0].causal
    assert causal == (name != "timm")
    vis = kvpass.Window(4, sinks=1) if causal else kvpass.Sparse(block=4, local=1, global_tokens=4)
    short = kvpass.optimize(fast, vis)
    assert short._kvpass.counters[vis.kind] == 2
    with torch.no_grad():
        assert (short(ids) - ref).abs().max() > 1e-3  # it changed what the layers see
    if name == "timm":  # per-head q/k norms on a fused projection: MHC replays them
        lat = kvpass.optimize(fast, kvpass.MHC(rank=64, method="svd"))  # full rank: exact
        with torch.no_grad():
            assert (lat(ids) - ref).abs().max() < 1e-4
        assert kvpass.kv_bytes_per_token(lat) < kvpass.kv_bytes_per_token(fast)
    else:
        fewer = kvpass.optimize(fast, kvpass.SharedKV(kv_heads=1))
        assert kvpass.kv_bytes_per_token(fewer) * sites[0].num_kv_heads == kvpass.kv_bytes_per_token(fast)


def test_mha_latent_is_refused_by_name():
    """nn.MultiheadAttention projects [seq, batch, features]: MHC says so instead of crashing."""
    model = fam.MHALM().eval()
    with pytest.raises(SiteError, match=r"layers\.0.*sequence-first"):
        kvpass.optimize(model, kvpass.MHC(ratio=2, method="svd"))


class _TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)

    def forward(self, ids, extra):
        return self.emb(ids) + extra


class _NoEmbedding(nn.Module):
    def forward(self, x):
        return x * 2


def test_token_input_errors_say_what_to_pass():
    with pytest.raises(CaptureError, match=r"forward\(ids, extra\) needs 2 arguments"):
        kvpass.find_sites(_TwoArgs())
    with pytest.raises(CaptureError, match="no nn.Embedding"):
        kvpass.find_sites(_NoEmbedding())


# ----------------------------------------------------------------- spellings in the wild
class _Block(nn.Module):
    """One attention + a tiny LM around it, to test one spelling of the core or projections."""

    def __init__(self, attn: nn.Module, dim=32, vocab=fam.VOCAB):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([attn, copy.deepcopy(attn)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        x = self.tok(input_ids)
        for a in self.layers:
            x = x + a(x)
        return self.head(x)


class _GroupedFused(nn.Module):
    """A fused QKV projection laid out per KV group: [q heads of the group, k, v] (Falcon's
    new architecture, ChatGLM)."""

    def __init__(self, dim=32, heads=4, kv=2):
        super().__init__()
        self.h, self.kv, self.d = heads, kv, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv) * self.d)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        B, S, _ = x.shape
        g = self.h // self.kv
        y = self.qkv(x).view(B, S, self.kv, g + 2, self.d)
        q = y[:, :, :, :g].reshape(B, S, self.h, self.d).transpose(1, 2)  # [B, H, S, D]
        k = y[:, :, :, g].transpose(1, 2)  # [B, KV, S, D]
        v = y[:, :, :, g + 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(B, S, -1))


class _QKVO(nn.Module):
    """Separate q/k/v/o projections of ``dim`` features in ``heads`` heads."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))


class _NoScaleWhere(_QKVO):
    """An eager core with no scale between the matmuls (queries pre-scaled) and a
    ``torch.where`` causal mask at the dtype's minimum."""

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.h, self.d).transpose(1, 2) / math.sqrt(self.d)
        k = self.k(x).view(B, S, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(B, S, self.h, self.d).transpose(1, 2)
        s = torch.matmul(q, k.transpose(-1, -2))
        keep = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
        return self.o(torch.matmul(s.softmax(-1), v).transpose(1, 2).reshape(B, S, -1))


class _EinsumFolded(_QKVO):
    """Two older spellings in one: scores by ``einsum("bhqd,bhkd->bhqk")``, values by ``bmm`` on
    heads folded into the batch ([B·H, S, D], BART-style), keys divided by a constant tensor."""

    def forward(self, x):
        B, S, _ = x.shape
        view = (lambda t: t.view(B, S, self.h, self.d).transpose(1, 2))
        q, k, v = view(self.q(x)), view(self.k(x)), view(self.v(x))
        s = torch.einsum("bhqd,bhkd->bhqk", q, k / torch.tensor(float(self.d)).sqrt())
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        p = s.softmax(-1).reshape(B * self.h, S, S)
        out = torch.bmm(p, v.reshape(B * self.h, S, self.d)).view(B, self.h, S, self.d)
        return self.o(out.transpose(1, 2).reshape(B, S, -1))


class _TwoKeyProjections(nn.Module):
    """Keys from the sum of two projections: the core is plain, the key path is not one
    projection — forms that change no weights still apply, SharedKV / MHC are refused."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k1, self.k2, self.v, self.o = (nn.Linear(dim, dim) for _ in range(5))

    def forward(self, x):
        B, S, _ = x.shape
        view = (lambda t: t.view(B, S, self.h, self.d).transpose(1, 2))
        out = F.scaled_dot_product_attention(view(self.q(x)), view(self.k1(x) + self.k2(x)), view(self.v(x)),
                                             is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize("attn,kv", [(_GroupedFused, 2), (_NoScaleWhere, 4), (_EinsumFolded, 4)])
def test_spellings_found_exactly(attn, kv):
    torch.manual_seed(0)
    model = _Block(attn()).eval()
    sites = kvpass.find_sites(model)
    assert len(sites) == 2 and all(s.ok for s in sites), [s.problems for s in sites]
    assert sites[0].num_kv_heads == kv and sites[0].causal
    fast = kvpass.optimize(model)
    ids = _ids()
    with torch.no_grad():
        assert (fast(ids) - model(ids)).abs().max() < 1e-5
    one = kvpass.optimize(fast, kvpass.SharedKV(kv_heads=1))
    assert kvpass.kv_bytes_per_token(one) * kv == kvpass.kv_bytes_per_token(fast)


def test_grouped_fused_channels_follow_the_groups():
    """The key of KV group j is the block after that group's query heads (index tracing)."""
    model = _Block(_GroupedFused()).eval()
    s = kvpass.find_sites(model)[0]
    D, g = 8, 2
    per = (g + 2) * D
    assert s.k_proj.channels == tuple(j * per + g * D + d for j in range(2) for d in range(D))
    assert s.v_proj.channels == tuple(j * per + (g + 1) * D + d for j in range(2) for d in range(D))
    assert s.q_proj.channels[:2 * D] == tuple(range(2 * D))


def test_core_only_forms_apply_where_projections_are_not_understood():
    torch.manual_seed(0)
    model = _Block(_TwoKeyProjections()).eval()
    sites = kvpass.find_sites(model)
    assert len(sites) == 2 and all(s.core_ok and not s.ok for s in sites)
    assert "key path" in sites[0].problems[0] and "layers.0" in sites[0].problems[0]
    ids = _ids()
    fast = kvpass.optimize(model)
    with torch.no_grad():
        assert (fast(ids) - model(ids)).abs().max() < 1e-5
    for form in (kvpass.Window(4, sinks=1), kvpass.Quantize(bits=8, group=8)):
        out = kvpass.optimize(fast, form)
        assert out._kvpass.counters[form.kind] == 2
        assert kvpass.kv_cache_bytes(out, 64) < kvpass.kv_cache_bytes(fast, 64)
    for form in (kvpass.SharedKV(kv_heads=1), kvpass.MHC(ratio=2, method="svd")):
        with pytest.raises(SiteError, match=r"layers\.0: key path.*change the projection weights"):
            kvpass.optimize(model, form)


def test_discovery_never_raises_on_an_unknown_pattern(monkeypatch):
    """An analysis that fails inside a site becomes that site's problem, naming the part."""
    from kvpass.graph import sites as S

    def boom(*a, **k):
        raise TypeError("unexpected layout")

    monkeypatch.setattr(S, "_output_projection", boom)
    found = kvpass.find_sites(fam.build("llama"))
    assert len(found) == 2 and all(not s.ok and s.core_ok for s in found)
    assert "output projection: not understood (TypeError: unexpected layout)" in found[0].problems[0]


def test_eager_hf_models_do_not_crash():
    """Eager attention (softmax cast back, dropout) in HF models: found, exact (issue 24's crash)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**fam._common(), attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    fast = kvpass.optimize(model)
    ids = _ids()
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() < 1e-5
    assert all(s.core == "eager" for s in fast._kvpass.sites)


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_slopes_found_and_recomputed_by_position(family):
    """ALiBi (BLOOM's baddbmm on folded heads, MPT's added position bias) joins the mask; its
    per-head slopes are fitted from the sample, so positional forms recompute it exactly."""
    model = zoo.build(family)
    found = kvpass.find_sites(model)
    assert len(found) == 2 and all(s.core_ok and s.alibi is not None for s in found)
    H = found[0].num_heads
    want = [2 ** (-8 * (h + 1) / H) for h in range(H)]  # both models' slopes for a power-of-two H
    assert torch.allclose(torch.tensor(found[0].alibi).abs(), torch.tensor(want), atol=1e-5)
    ids = _ids(12)
    with torch.no_grad():
        ref = model(ids).logits
        for form in (kvpass.Full(), kvpass.Window(64)):  # a window over all 12 tokens: the bias by position
            fast = kvpass.optimize(model, form)
            assert (fast(ids).logits - ref).abs().max() < 1e-4, form
            assert torch.equal(fast.generate(ids, max_new_tokens=5, do_sample=False),
                               model.generate(ids, max_new_tokens=5, do_sample=False)), form
        short = kvpass.optimize(model, kvpass.Window(4))
        assert (short(ids).logits - ref).abs().max() > 1e-3  # the window does cut keys


def test_biases_that_are_not_alibi_pass_through_and_refuse_positions():
    """A relative position bias (MPNet) and a content-dependent one (Doge) pass through with the
    mask (Full exact, SharedKV applies); positional forms are refused, naming the bias."""
    enc = zoo.build("mpnet", "encoder")
    s = kvpass.find_sites(enc)[0]
    assert s.core_ok and s.alibi is None and "not ALiBi" in s.positional_problems[0]
    ids = _ids(10)
    with torch.no_grad():
        assert (kvpass.optimize(enc)(ids)[0] - enc(ids)[0]).abs().max() < 1e-5
    with pytest.raises(KVPassError, match="not ALiBi"):
        kvpass.optimize(enc, kvpass.Sparse(block=4, local=1))
    doge = zoo.build("doge")
    with pytest.raises(KVPassError, match="content"):
        kvpass.optimize(doge, kvpass.Window(4))
    assert kvpass.kv_bytes_per_token(kvpass.optimize(doge, kvpass.SharedKV(kv_heads=1))) < \
        kvpass.kv_bytes_per_token(doge)


def test_zero_one_score_factor_hidden_by_the_mask():
    """GPT-1 multiplies the scores by its causal 0/1 buffer before adding -1e4 where it is 0:
    the factor changes nothing the softmax sees, the core is causal and every form applies."""
    model = zoo.build("openai-gpt")
    s = kvpass.find_sites(model)[0]
    assert s.ok and s.causal
    ids = _ids(12)
    with torch.no_grad():
        assert (kvpass.optimize(model)(ids).logits - model(ids).logits).abs().max() < 1e-5


# ------------------------------------------------------------------- sink logits (gpt-oss)
def test_sink_logits_reference_is_an_extra_softmax_column():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    sinks = torch.randn(4, generator=g)
    from kvpass.semantics import reference

    got = reference.attention(q, k, v, causal=True, sink_logits=sinks)
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(torch.cat([s, sinks.view(1, 4, 1, 1).expand(2, 4, 5, 1)], -1), -1)[..., :-1]
    assert torch.allclose(got, p @ v, atol=1e-6)
    assert torch.allclose(reference.attention_sdpa(q, k, v, causal=True, sink_logits=sinks), got, atol=1e-6)


def test_gpt_oss_sink_logits_exact_and_composable():
    model = zoo.build("gpt_oss")
    fast = kvpass.optimize(model)
    s = fast._kvpass.sites[0]
    assert s.ok and s.sink_logits is not None and s.sink_logits.endswith("sinks")
    ids = _ids(12)
    with torch.no_grad():
        ref = model(ids).logits
        assert (fast(ids).logits - ref).abs().max() < 1e-5
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = fast.generate(ids, max_new_tokens=6, do_sample=False)  # decode over kvpass's cache
    assert torch.equal(a, b)
    q8 = kvpass.optimize(fast, kvpass.Quantize(bits=8, group=4))
    with torch.no_grad():
        assert (q8(ids).logits - ref).abs().max() < 5e-2
    with pytest.raises(SiteError, match="sink logits"):
        kvpass.optimize(fast, kvpass.MHC(ratio=2, method="svd"))


def test_cli_zoo(tmp_path, capsys):
    from kvpass.cli import main

    out = tmp_path / "zoo.json"
    assert main(["zoo", "--only", "gpt2", "--jobs", "1", "--json", str(out)]) == 0
    assert "| gpt2 | causal | EXACT |" in capsys.readouterr().out
    import json

    data = json.loads(out.read_text())
    assert data["summary"]["counts"]["EXACT"] == 1 and data["rows"][0]["model_type"] == "gpt2"
    assert main(["zoo", "--only", "no_such_type"]) == 2
    assert "unknown model type" in capsys.readouterr().err
