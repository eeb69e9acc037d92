"""KV-cache accounting of an optimised (or plain) model: bytes per token and bytes after N tokens,
per the layers' layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph.capture import capture
from ..graph.sites import find_sites_in
from .attention import KVAttention

__all__ = ["kv_bytes_per_token", "kv_cache_bytes", "vllm_request_bytes"]


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """KV-cache bytes one token adds, summed over layers, for an optimised or plain model.

    For a plain model the original layout (2·Hkv·D values per layer) is assumed.  Windowed
    and block-local layers add this only until their ring is full: see :func:`kv_cache_bytes`.
    """
    mods, others, dtype, size = _layers(model, dtype)
    return (sum(m.kv_core.bytes_per_token(dtype) * len(m.kv_core.layers) for m in mods)
            + sum(s.kv_values_per_token() * size for s in others))


def _layers(model: nn.Module, dtype: torch.dtype | None):
    """(kvpass attention modules, sites left as the model had them, dtype, its element size)."""
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    report = getattr(model, "_kvpass", None)
    dtype = dtype or next(model.parameters()).dtype
    lowered = {m.site.name for m in mods}
    sites = report.sites if report is not None else find_sites_in(capture(model))
    return mods, [s for s in sites if s.name not in lowered], dtype, torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(model: nn.Module, tokens: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
    """Bytes of the KV cache after ``tokens`` tokens (per the layers' layouts: rings stop
    growing at their capacity; a model's own sliding layers keep ``window - 1`` tokens).

    Example:
        >>> import kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.Window(size=8, sinks=2))
        >>> kvpass.kv_cache_bytes(m, 1000) == kvpass.kv_cache_bytes(m, 10)  # 10 slots per layer
        True
    """
    mods, others, dtype, size = _layers(model, dtype)
    total = 0
    for m in mods:
        n = tokens if m.site.window is None or m.kv_core.plan.positional else min(tokens, m.site.window - 1)
        total += m.kv_core.cache_bytes(n, dtype, batch) * len(m.kv_core.layers)
    for s in others:
        n = tokens if s.window is None else min(tokens, s.window - 1)
        total += batch * n * s.kv_values_per_token() * size
    return total


def vllm_request_bytes(records: list[dict], head_dim: int, max_model_len: int, max_num_batched_tokens: int,
                       elem: int = 2, block: int = 128) -> int:
    """KV bytes one request of ``max_model_len`` tokens holds in vLLM's cache, by vLLM's rule
    (``SlidingWindowSpec.max_admission_blocks_per_request`` in vLLM 0.32): a full-attention layer
    keeps every token; a sliding-window layer ``ceil(min(window - 1 + max_num_batched_tokens,
    max_model_len) / block) + 1`` blocks (the window, one scheduling step of new tokens, and a
    block for a window that starts mid-block).  ``block``: vLLM's block size in tokens (its CPU
    backend: 128; layers with fewer KV heads may get larger blocks, so pages are equal in bytes).
    ``elem``: bytes per value of the serving dtype (fp8 records: 1).

    >>> full = [{"kv_heads": 3, "window": None}] * 2
    >>> mixed = [{"kv_heads": 1, "window": None}, {"kv_heads": 3, "window": 512}]
    >>> round(vllm_request_bytes(full, 64, 8192, 512) / vllm_request_bytes(mixed, 64, 8192, 512), 2)
    4.22
    """
    total = 0
    for r in records:
        w = r.get("window")
        held = max_model_len
        if w is not None:
            held = min(held, (-(-min(w - 1 + max_num_batched_tokens, max_model_len) // block) + 1) * block)
        total += 2 * r["kv_heads"] * head_dim * (1 if r.get("kv_cache_dtype") == "fp8" else elem) * held
    return total
