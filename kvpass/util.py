"""Small helpers every stage may use (no kvpass imports): a multiple-choice knapsack, a KL
divergence of next-token distributions, a module's device, whether a model is a causal LM.

Example:
    >>> from kvpass.util import knapsack
    >>> knapsack([[1, 2], [1, 2]], [[5.0, 1.0], [4.0, 3.0]], budget=3)   # cost 2 + 1, damage 1 + 4
    [1, 0]
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["knapsack", "kl_divergence", "device_of", "is_causal_lm"]


def knapsack(costs: list[list[int]], damage: list[list[float]], budget: int, unit: int | None = None
             ) -> list[int] | None:
    """One option per item (index into its ``costs``/``damage``), least summed damage with
    summed cost ``<= budget``; None if even the cheapest options exceed it.

    A dynamic programme over budget units: ``unit`` (costs are rounded *up* to it, so the plan
    never exceeds the budget), by default the gcd of all costs (exact)."""
    if unit is None:
        unit = 0
        for cs in costs:
            for c in cs:
                unit = math.gcd(unit, int(c))
        unit = unit or 1
    cap = budget // unit
    inf = float("inf")
    best = [0.0] * (cap + 1)  # best[u]: least damage of the items so far within u units
    picks = []
    for cs, ds in zip(costs, damage):
        units = [math.ceil(c / unit) for c in cs]
        new, pick = [inf] * (cap + 1), [-1] * (cap + 1)
        for u in range(cap + 1):
            for j, (c, d) in enumerate(zip(units, ds)):
                if c <= u and best[u - c] + d < new[u]:
                    new[u], pick[u] = best[u - c] + d, j
        best = new
        picks.append(pick)
    if best[cap] == inf:
        return None
    out, u = [], cap
    for cs, pick in zip(reversed(costs), reversed(picks)):
        j = pick[u]
        out.append(j)
        u -= math.ceil(cs[j] / unit)
    return out[::-1]


def kl_divergence(clean: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(clean || other) of the next-token distributions of two logit tensors."""
    lp, lq = clean.float().log_softmax(-1), other.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def is_causal_lm(model: nn.Module, vocab: int = 16) -> bool:
    """Whether ``model`` is a causal language model, by what it does rather than its class:
    called on token ids it returns ``logits`` over a vocabulary, and changing the last token
    changes no earlier position's logits."""
    if not callable(getattr(model, "generate", None)):
        return False
    g = torch.Generator().manual_seed(0)
    device = device_of(model)
    ids = torch.randint(1, vocab, (1, 6), generator=g).to(device)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] % (vocab - 1)) + 1 if ids[0, -1] != 1 else 2
    try:
        a, b = model(input_ids=ids), model(input_ids=other)
    except Exception:  # noqa: BLE001 - a model that does not take token ids is no LM
        return False
    la, lb = getattr(a, "logits", None), getattr(b, "logits", None)
    if not isinstance(la, torch.Tensor) or la.dim() != 3 or la.shape[1] != ids.shape[1]:
        return False
    return bool(torch.allclose(la[:, :-1].float(), lb[:, :-1].float(), atol=1e-5, rtol=1e-4))
