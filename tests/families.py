"""Tiny random-init models of many families, for tests (no downloads: configs only)."""

from __future__ import annotations

import math

import torch
import transformers as tf
from torch import nn
from torch.nn import functional as F

VOCAB = 97


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0)
    base.update(kw)
    return base


def check_left_padding(fast, tol: float, new_tokens: int = 10) -> None:
    """A left-padded batch gives each row the logits it has alone (to ``tol``) and the same greedy
    tokens through ``generate`` (positions count real tokens, so padding shifts nothing)."""
    a = torch.randint(1, VOCAB, (1, 14))
    b = torch.randint(1, VOCAB, (1, 18))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        out = fast(batch, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        assert torch.isfinite(out).all()
        assert (out[0, 4:] - fast(a).logits[0]).abs().max() <= tol
        assert (out[1] - fast(b).logits[0]).abs().max() <= tol
    gen = fast.generate(batch, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    alone = fast.generate(a, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(gen[0, 4:], alone[0])


def llama(**kw):
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_common(**kw)))


def mistral(**kw):
    return tf.MistralForCausalLM(tf.MistralConfig(**_common(sliding_window=6, **kw)))


def qwen2(**kw):
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(**kw)))


def qwen3(**kw):
    kw.setdefault("head_dim", 16)
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(**kw)))


def gemma3(**kw):
    cfg = tf.Gemma3TextConfig(**_common(num_key_value_heads=1, head_dim=16, sliding_window=5,
                                        num_hidden_layers=3,
                                        layer_types=["sliding_attention", "sliding_attention",
                                                     "full_attention"], **kw))
    return tf.Gemma3ForCausalLM(cfg)


def phi3(**kw):
    return tf.Phi3ForCausalLM(tf.Phi3Config(**_common(**kw)))


def gpt2(**kw):
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, **kw)
    return tf.GPT2LMHeadModel(cfg)


def gpt_neox(**kw):
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=512,
                           pad_token_id=0, **kw)
    return tf.GPTNeoXForCausalLM(cfg)


def bert(**kw):
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, **kw)
    return tf.BertModel(cfg, add_pooling_layer=False)


# ------------------------------------------------------------- a hand-written gpt-fast-style model
def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # x [B, S, H, D]; interleaved pairs as complex numbers, freqs [S, D/2] complex
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv: int, fused: bool):
        super().__init__()
        self.n_head, self.n_kv, self.hd = n_head, n_kv, dim // n_head
        self.fused = fused
        if fused:
            self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv) * self.hd, bias=False)
        else:
            self.wq = nn.Linear(dim, n_head * self.hd, bias=False)
            self.wk = nn.Linear(dim, n_kv * self.hd, bias=False)
            self.wv = nn.Linear(dim, n_kv * self.hd, bias=False)
        self.wo = nn.Linear(n_head * self.hd, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        if self.fused:
            kv = self.n_kv * self.hd
            q, k, v = self.wqkv(x).split([self.n_head * self.hd, kv, kv], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = _rope(q.view(B, S, self.n_head, self.hd), freqs).transpose(1, 2)  # [B, H, S, D]
        k = _rope(k.view(B, S, self.n_kv, self.hd), freqs).transpose(1, 2)
        v = v.view(B, S, self.n_kv, self.hd).transpose(1, 2)
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = F.softmax(scores, dim=-1) @ v  # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, dim, n_head, n_kv, fused):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv, fused)
        self.norm = nn.RMSNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x, freqs):
        x = x + self.attention(self.norm(x), freqs)
        return x + self.ff(x)


class HandWritten(nn.Module):
    """gpt-fast style: attributes wq/wk/wv/wo (or wqkv), manual softmax(q @ kᵀ * s) @ v."""

    def __init__(self, dim=64, n_head=4, n_kv=2, layers=2, fused=False, vocab=VOCAB):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head, n_kv, fused) for _ in range(layers))
        self.out = nn.Linear(dim, vocab, bias=False)
        hd = dim // n_head
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(512).float(), inv)
        self.register_buffer("freqs", torch.polar(torch.ones_like(ang), ang), persistent=False)

    def get_input_embeddings(self):
        return self.tok

    def forward(self, input_ids):
        x = self.tok(input_ids)
        freqs = self.freqs[: input_ids.shape[1]]
        for b in self.blocks:
            x = b(x, freqs)
        return self.out(x)


HF_CAUSAL = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3,
             "phi3": phi3, "gpt2": gpt2, "gpt_neox": gpt_neox}
ALL = {**HF_CAUSAL, "bert": bert,
       "handwritten": lambda: HandWritten(), "handwritten_fused": lambda: HandWritten(fused=True)}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ALL[name]().eval()


# ------------------------------------------- models written outside transformers (issue 20)
class _ScaledFirstAttention(nn.Module):
    """gpt-fast-like, with the spellings seen in the wild: the query scaled *before* the head
    view, a norm over the whole key projection width, ``repeat_interleave`` GQA, a
    ``masked_fill`` causal mask, and softmax in fp32 cast back (``.type_as``)."""

    def __init__(self, dim: int, n_head: int, n_kv: int):
        super().__init__()
        self.n_head, self.n_kv, self.hd = n_head, n_kv, dim // n_head
        self.wq = nn.Linear(dim, n_head * self.hd, bias=False)
        self.wk = nn.Linear(dim, n_kv * self.hd, bias=False)
        self.wv = nn.Linear(dim, n_kv * self.hd, bias=False)
        self.k_norm = nn.RMSNorm(n_kv * self.hd)
        self.wo = nn.Linear(n_head * self.hd, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = (self.wq(x) * self.hd ** -0.5).view(B, S, self.n_head, self.hd).transpose(1, 2)  # [B, H, S, D]
        k = self.k_norm(self.wk(x)).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        scores = q @ k.transpose(-2, -1)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = torch.softmax(scores.float(), dim=-1).type_as(q) @ v
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class NoGetterLM(nn.Module):
    """A hand-written decoder with an ``nn.Embedding`` but no ``get_input_embeddings()``: kvpass
    must find the token input itself."""

    def __init__(self, dim=64, n_head=4, n_kv=2, layers=2, vocab=VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(256, dim)
        self.attn = nn.ModuleList(_ScaledFirstAttention(dim, n_head, n_kv) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for norm, att in zip(self.norms, self.attn):
            x = x + att(norm(x))
        return self.head(x)


class MHALM(nn.Module):
    """A causal LM built from ``nn.MultiheadAttention`` (batch_first, fused ``in_proj_weight``)."""

    def __init__(self, dim=64, n_head=4, layers=2, vocab=VOCAB):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.MultiheadAttention(dim, n_head, batch_first=True) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.tok(ids)
        S = ids.shape[1]
        mask = torch.ones(S, S, dtype=torch.bool, device=ids.device).triu(1)  # True = masked
        for norm, att in zip(self.norms, self.layers):
            h = norm(x)
            x = x + att(h, h, h, attn_mask=mask, need_weights=False)[0]
        return self.head(x)


class _TimmAttention(nn.Module):
    """timm's ViT attention: fused qkv viewed as [B, N, 3, H, D] and permuted to [3, B, H, N, D],
    per-head q/k LayerNorm, ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.hd = n_head, dim // n_head
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.n_head, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmStyleEncoder(nn.Module):
    """A bidirectional token encoder with timm ViT blocks (no ``get_input_embeddings``)."""

    def __init__(self, dim=64, n_head=4, layers=2, vocab=VOCAB):
        super().__init__()
        self.patch_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, 256, dim) * 0.02)
        self.blocks = nn.ModuleList(_TimmAttention(dim, n_head) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.patch_embed(x) + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            h = h + blk(h)
        return self.norm(h)


OUTSIDE = {"no_getter": NoGetterLM, "mha": MHALM, "timm": TimmStyleEncoder}
