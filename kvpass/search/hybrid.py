"""Searches for hybrid window layouts: which layers keep full attention (by attention mass beyond
the window, or by pass-key retrieval) and the largest window that fits a cache budget.
"""

from __future__ import annotations

from ..eval.long_range import last_logits, passkey_prompt
from ..ir.forms import Full, Window
from ..ir.policy import Policy
from ..runtime.accounting import kv_cache_bytes
from ..runtime.attention import KVAttention
from ..runtime.core import KVCore
from ..transform.optimize import optimize, retarget

__all__ = ["far_attention", "hybrid_layers", "hybrid_window", "retrieval_layers"]


def far_attention(model, ids, window: int, sinks: int = 0, last: int = 32) -> dict[int, float]:
    """Per layer: the attention mass the last ``last`` queries of each sequence put on keys a
    ``Window(window, sinks)`` would hide (mean over heads and queries; 0 = the window loses
    nothing).  ``model``: an original or optimised model; ``ids``: [N, S] calibration token ids,
    S well beyond ``window``.  Layers with a large value are the ones to keep full in a hybrid.

    Example:
        >>> import torch, kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> mass = far_attention(LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 40)), window=8)
        >>> sorted(mass), all(0 < m < 1 for m in mass.values())
        ([0, 1], True)
    """
    import torch

    model = _optimised(model)
    cores = [m for m in model.modules() if isinstance(m, KVCore)]
    sums: dict[int, list[float]] = {}

    def tap_for(core):
        def tap(q, k, v):
            if k is None:
                return
            s = core.spec
            kk = k.index_select(1, torch.tensor(core.plan.head_map or s.kv_head_map, device=k.device))
            n, m = k.shape[2], min(last, q.shape[2])
            scores = (q[:, :, -m:].float() @ kk.float().transpose(-1, -2)) * s.scale
            qp = torch.arange(n - m, n, device=q.device)[:, None]
            kp = torch.arange(n, device=q.device)[None, :]
            probs = scores.masked_fill(kp > qp, float("-inf")).softmax(-1)
            hidden = ((qp - kp >= window) & (kp >= sinks)).float()
            sums.setdefault(core.layer_idx, []).append(float((probs * hidden).sum(-1).mean()))
        return tap

    for c in cores:
        c.taps.append(tap_for(c))
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None])
    finally:
        for c in cores:
            c.taps.pop()
    return {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}


def hybrid_layers(mass: dict[int, float], full_layers: int) -> list[int]:
    """The ``full_layers`` layers with the most far attention (see :func:`far_attention`).

    >>> hybrid_layers({0: 0.1, 1: 0.6, 2: 0.3}, 2)
    [1, 2]
    """
    return sorted(sorted(mass, key=mass.get, reverse=True)[:full_layers])


def hybrid_window(model, full, length: int, ratio: float = 0.25, sinks: int = 4) -> int:
    """The largest window ``W`` such that ``Full()`` on ``full`` layers and ``Window(W, sinks)``
    on the others cache at most ``ratio`` of the all-``Full()`` cache at ``length`` tokens.

    Bytes are :func:`kvpass.kv_cache_bytes` of each candidate policy, ring positions included
    (a ring slot also stores its token's position, so slot arithmetic alone overshoots).
    ``full``: layer indices, or a count ``k`` — then the ``k`` layers with the largest full
    caches (a budget that holds whichever ``k`` layers a search keeps).  ``model``: optimised
    (re-planned in place with :func:`kvpass.retarget` while measuring; left all ``Full()``) or
    original (optimised first).

    Example:
        >>> import kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
        >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval())
        >>> w = hybrid_window(m, 1, 1000)  # 1 full layer + 7 windows <= 1/4 of the cache at 1000
        >>> w  # 134 slots of 7 layers: 1000 tokens' worth of keys/values, positions included
        130
        >>> policy = kvpass.Policy(default=kvpass.Window(w, sinks=4), layers={0: kvpass.Full()})
        >>> full = kvpass.kv_cache_bytes(kvpass.retarget(m, kvpass.Full()), 1000)
        >>> kvpass.kv_cache_bytes(kvpass.retarget(m, policy), 1000) <= full / 4
        True
    """
    model = _optimised(model)
    retarget(model, Full())
    budget = ratio * kv_cache_bytes(model, length)
    if isinstance(full, int):
        dtype = next(model.parameters()).dtype
        per_layer = {m.site.layer: m.kv_core.cache_bytes(length, dtype)
                     for m in model.modules() if isinstance(m, KVAttention)}
        full = sorted(per_layer, key=lambda i: (-per_layer[i], i))[:full]

    def fits(window: int) -> bool:
        return kv_cache_bytes(retarget(model, _hybrid(full, window, sinks)), length) <= budget

    try:
        if not fits(1):
            raise ValueError(f"Full() on layers {sorted(full)} already exceeds {ratio} of the cache at "
                             f"{length} tokens")
        lo, hi = 1, length  # fits(lo); find the largest window that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo
    finally:
        retarget(model, Full())


def retrieval_layers(
    model,
    tokenizer,
    full_layers: int,
    window: int,
    sinks: int = 4,
    *,
    lengths=(2048,),
    depths=(0.15, 0.5),
    filler: str | None = None,
    keep: int | None = None,
    seed: int = 1,
    progress: bool = True,
) -> list[int]:
    """The ``full_layers`` layers to keep full, windows elsewhere, so that passkeys far back are
    still retrieved: greedy forward selection on pass-key prompts.

    Far-attention mass (:func:`far_attention`) ranks layers one at a time, but retrieval is a
    circuit: on SmolLM2 the 4 layers with the most far attention kept passkey at 0.33 of the
    original's.  Here each step tries every remaining layer as the next full one (all other
    layers ``Window(window, sinks)``) and keeps the one that makes the answer most likely: the
    mean log-probability of the key's tokens, teacher-forced, over one prompt per
    ``(length, depth)`` pair (:func:`kvpass.eval.long_range.passkey_prompt` on ``filler`` with keys
    from ``random.Random(seed)``; choose a filler and lengths other than the evaluation's).
    Cost: about ``full_layers * n_layers`` forwards of each prompt; ``keep`` prunes to the
    ``keep`` best first-step layers after the first step (faster, but layers that only help
    in combination may be lost).

    ``model``: an optimised model (visibility is changed in place with :func:`kvpass.retarget`
    while searching; on return it has the chosen hybrid) or an original (optimised first, the
    original untouched).  Returns the chosen layers, sorted.

    Example (SmolLM2-135M, ~30 min on 2 CPU cores; tested on a tiny model in
    tests/test_window_sparse.py):
        >>> import kvpass  # doctest: +SKIP
        >>> from kvpass.assets import models  # doctest: +SKIP
        >>> model, tok = models.load("smollm2-135m")  # doctest: +SKIP
        >>> fast = kvpass.optimize(model, kvpass.Full())  # doctest: +SKIP
        >>> w = hybrid_window(fast, 6, 4096)  # 250  # doctest: +SKIP
        >>> retrieval_layers(fast, tok, 6, 252, filler=kvpass.assets.text.load_text("calibration"))  # doctest: +SKIP
        [0, 7, 18, 20, 21, 23]

    (measured: the same layers at windows 248 and 252; with ``Window(250, 4)`` elsewhere the
    hybrid caches 0.2499x of the original at 4096 tokens and keeps passkey 1.00 of the
    original's on bench/window_sparse.py's grid, where the 4 far-attention layers kept 0.33.)
    """
    import random

    import torch
    from tqdm.auto import tqdm

    model = _optimised(model)
    layers = sorted({m.site.layer for m in model.modules() if isinstance(m, KVAttention)})
    if not 0 < full_layers < len(layers):
        raise ValueError(f"full_layers must be in 1..{len(layers) - 1} for a model of {len(layers)} layers, "
                         f"got {full_layers}")
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for depth in depths:
            prompt, answer = passkey_prompt(tokenizer, length, depth, rng.randint(10_000, 99_999), filler)
            prompts.append((torch.cat([prompt[0], answer])[None], answer))

    @torch.inference_mode()
    def score(full: list[int]) -> float:
        retarget(model, _hybrid(full, window, sinks))
        total = 0.0
        for ids, answer in prompts:
            logp = last_logits(model, ids, len(answer) + 1)[0, :-1].float().log_softmax(-1)  # [k, V]
            total += float(logp.gather(-1, answer[:, None]).mean())
        return total / len(prompts)

    chosen: list[int] = []
    candidates = list(layers)
    later = len(layers) - 1 if keep is None else min(keep, len(layers) - 1)
    total = len(layers) + sum(later - s for s in range(full_layers - 1))
    bar = tqdm(total=total, desc="kvpass: retrieval layers", disable=not progress)
    for step in range(full_layers):
        scores = {}
        for layer in candidates:
            scores[layer] = score(chosen + [layer])
            bar.update()
        best = max(scores, key=scores.get)
        chosen.append(best)
        if step == 0 and keep is not None:
            candidates = sorted(scores, key=scores.get, reverse=True)[:keep + 1]
        candidates = [c for c in candidates if c != best]
    bar.close()
    chosen.sort()
    retarget(model, _hybrid(chosen, window, sinks))
    return chosen


def _optimised(model):
    """``model`` if kvpass already rewrote it, else ``optimize(model, Full())`` (a copy)."""
    return model if any(isinstance(m, KVAttention) for m in model.modules()) else optimize(model, Full())


def _hybrid(full, window: int, sinks: int):
    """``Full()`` on the layers ``full``, ``Window(window, sinks)`` elsewhere."""
    return Policy(default=Window(window, sinks=sinks), layers={i: Full() for i in full})


