"""Visibility as small composable rules over token positions (FlexAttention's ``mask_mod``).

A :class:`MaskMod` says which keys a query may see from their positions alone.  Each carries
its meaning twice: as a torch function (what :func:`kvpass.semantics.reference.visibility`
evaluates) and as the Triton it becomes in the generated kernels — an element test over a
``[BLOCK_M, BLOCK_N]`` tile of positions, and tile tests over position bounds (``visit``: some
pair may be visible; ``full``: all are) that let a kernel skip or unmask whole tiles.
:func:`and_masks` / :func:`or_masks` compose both forms at once, so a composed rule (a window
*and* a block-sparse pattern: ``[Window, Sparse]``) means the same in the reference and the
kernels.

Example:
    >>> import torch
    >>> from kvpass.semantics import visibility as V
    >>> rule = V.and_masks(V.causal(), V.window(2, sinks=1))
    >>> q, k = torch.arange(4)[:, None], torch.arange(4)[None, :]
    >>> rule(q, k).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 0, 1, 1]], dtype=torch.int32)
    >>> V.or_masks(V.window(1), V.window(1, sinks=2))(q, k).int()[3].tolist()
    [1, 1, 0, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["MaskMod", "valid_keys", "causal", "window", "blocks", "and_masks", "or_masks", "for_layer"]


@dataclass(frozen=True)
class MaskMod:
    """One visibility rule.  ``fn(q_pos, k_pos)`` broadcasts (e.g. ``[..., Sq, 1]`` against
    ``[..., 1, Sk]``) to a bool tensor.  Triton forms (kernel variable names: ``qp``/``kp``
    positions of the tile's rows/columns, ``q_lo``/``q_hi``/``k_lo``/``k_hi`` their bounds):
    ``element`` an expression over ``QP = qp[:, None]``, ``KP = kp[None, :]``; ``visit`` /
    ``full`` tile expressions (None: no test — visit cannot be ruled out / full cannot be
    claimed); ``element_setup`` / ``tile_setup`` statements those need first."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    element: str
    visit: str | None = None
    full: str | None = None
    element_setup: str = ""
    tile_setup: str = ""

    def __call__(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self.fn(q_pos, k_pos)

    def __repr__(self) -> str:
        return f"MaskMod({self.name})"


def valid_keys() -> MaskMod:
    """Keys at a position (empty slots and padding carry -1)."""
    return MaskMod("valid", lambda q, k: k >= 0, "KP >= 0")


def causal() -> MaskMod:
    """A query sees keys at or before its own position."""
    return MaskMod("causal", lambda q, k: k <= q, "KP <= QP", visit="k_lo <= q_hi", full="k_hi <= q_lo")


def window(size: int, sinks: int = 0) -> MaskMod:
    """Keys less than ``size`` positions back, and the first ``sinks`` positions (kernels take
    ``WINDOW``/``SINKS`` as constants)."""
    if sinks:
        return MaskMod(f"window({size}, sinks={sinks})", lambda q, k: (q - k < size) | (k < sinks),
                       "(QP - KP < WINDOW) | (KP < SINKS)", visit="(q_lo - k_hi < WINDOW) | (k_lo < SINKS)",
                       full="(q_hi - k_lo < WINDOW) | (k_hi < SINKS)")
    return MaskMod(f"window({size})", lambda q, k: q - k < size, "QP - KP < WINDOW",
                   visit="q_lo - k_hi < WINDOW", full="q_hi - k_lo < WINDOW")


def blocks(table: Tensor | None, block: int) -> MaskMod:
    """A block table ``[nQB, nKB]`` (nonzero = the query block sees the key block), indexed by
    ``position // block`` (kernels: ``BTAB``, ``BLK``, ``NQB``, ``NKB``).  A tile spanning at
    most 2x2 table blocks is decided by its corners."""

    def fn(q, k):
        qb = (q // block).clamp(0, table.shape[0] - 1)
        kb = (k.clamp(min=0) // block).clamp(0, table.shape[1] - 1)
        return table[qb, kb] != 0  # bool, or a kvpass BlockTable's int8

    return MaskMod(
        f"blocks({block})", fn, "tl.load(BTAB + qb[:, None] * NKB + kb[None, :]) != 0",
        visit="bt_visit", full="bt_full",
        element_setup="""
            qb = tl.minimum(tl.maximum(qp, 0) // BLK, NQB - 1)
            kb = tl.minimum(tl.maximum(kp, 0) // BLK, NKB - 1)
        """,
        tile_setup="""
            qb0 = tl.minimum(tl.maximum(q_lo, 0) // BLK, NQB - 1)
            qb1 = tl.minimum(tl.maximum(q_hi, 0) // BLK, NQB - 1)
            kb0 = tl.minimum(tl.maximum(k_lo, 0) // BLK, NKB - 1)
            kb1 = tl.minimum(tl.maximum(k_hi, 0) // BLK, NKB - 1)
            e00 = tl.load(BTAB + qb0 * NKB + kb0) != 0
            e01 = tl.load(BTAB + qb0 * NKB + kb1) != 0
            e10 = tl.load(BTAB + qb1 * NKB + kb0) != 0
            e11 = tl.load(BTAB + qb1 * NKB + kb1) != 0
            small = (qb1 - qb0 <= 1) & (kb1 - kb0 <= 1)
            bt_visit = ~small | e00 | e01 | e10 | e11
            bt_full = small & e00 & e01 & e10 & e11
        """)


def _setup(mods, attr: str) -> str:
    seen = []
    for m in mods:
        s = getattr(m, attr)
        if s and s not in seen:
            seen.append(s)
    return "\n".join(seen)


def and_masks(*mods: MaskMod) -> MaskMod:
    """Visible where every rule allows (a tile is visited only if each rule may see it, and
    full only if each rule sees all of it)."""
    if len(mods) == 1:
        return mods[0]

    def fn(q, k):
        out = mods[0](q, k)
        for m in mods[1:]:
            out = out & m(q, k)
        return out

    visits = [m.visit for m in mods if m.visit is not None]
    fulls = [m.full for m in mods]
    return MaskMod(" & ".join(m.name for m in mods), fn, " & ".join(f"({m.element})" for m in mods),
                   visit=" & ".join(f"({v})" for v in visits) or None,
                   full=None if any(f is None for f in fulls) else " & ".join(f"({f})" for f in fulls),
                   element_setup=_setup(mods, "element_setup"), tile_setup=_setup(mods, "tile_setup"))


def or_masks(*mods: MaskMod) -> MaskMod:
    """Visible where any rule allows (Longformer-style local *or* global): a tile is visited
    if some rule may see it, and full if some rule sees all of it."""
    if len(mods) == 1:
        return mods[0]

    def fn(q, k):
        out = mods[0](q, k)
        for m in mods[1:]:
            out = out | m(q, k)
        return out

    visits = [m.visit for m in mods]
    fulls = [m.full for m in mods if m.full is not None]
    return MaskMod(" | ".join(m.name for m in mods), fn, " | ".join(f"({m.element})" for m in mods),
                   visit=None if any(v is None for v in visits) else " | ".join(f"({v})" for v in visits),
                   full=" | ".join(f"({f})" for f in fulls) or None,
                   element_setup=_setup(mods, "element_setup"), tile_setup=_setup(mods, "tile_setup"))


def for_layer(*, causal_: bool, window_: int | None = None, sinks: int = 0, table: Tensor | None = None,
              block: int | None = None, has_blocks: bool | None = None, with_valid: bool = True) -> MaskMod | None:
    """The rule of one layer's forms, composed: its causality, its window (with sinks) and its
    block pattern all apply (``[Window, Sparse]`` is their *and*).  ``has_blocks``: a block
    table is part of the rule (default: ``table`` given; kernels pass it at call time).  None:
    every pair is visible (no rule at all)."""
    mods = [valid_keys()] if with_valid else []
    if causal_:
        mods.append(causal())
    if window_ is not None:
        mods.append(window(window_, sinks))
    if table is not None if has_blocks is None else has_blocks:
        mods.append(blocks(table, block))
    return and_masks(*mods) if mods else None
