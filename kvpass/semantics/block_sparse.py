"""Block-sparse attention patterns and their block tables (BigBird / Longformer style).

A :class:`SparsePattern` says, per query block, which key blocks are visible: ``local``
neighbouring blocks (causal: the query's own block and the ``local - 1`` before it;
bidirectional: ``|qb - kb| < local``), the first ``global_blocks`` blocks (global columns; in
bidirectional attention global rows see everything too), and ``random`` extra blocks per query
block drawn with ``seed`` (deterministic, and the same whatever the table's size: row ``i``'s
draw depends only on ``(seed, i)``).

A :class:`BlockTable` is the pattern materialised for ``n`` blocks, like FlexAttention's
``BlockMask``: ``table[qb, kb]`` is 0 (skip), 1 (partly visible: an element mask is needed,
e.g. the causal diagonal block) or 2 (every pair visible: no element mask).  The reference and
the generated kernels read the same int8 table (nonzero = visible; positions // block index
it), and element-level rules (causality, padding, empty slots) come from token positions.

Example:
    >>> p = SparsePattern(block=4, local=2, global_blocks=1, random=0, seed=0, causal=True)
    >>> p.table(5).table.tolist()
    [[1, 0, 0, 0, 0], [2, 1, 0, 0, 0], [2, 2, 1, 0, 0], [2, 0, 2, 1, 0], [2, 0, 0, 2, 1]]
    >>> p.density(5)
    0.8
    >>> p.ring()        # a cache of the global block + 2 local blocks is enough
    RingSpec(pinned=4, ring=8, block=4)
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .layout import RingSpec

__all__ = ["SparsePattern", "BlockTable"]

SKIP, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockTable:
    """Per (query block, key block): 0 skip, 1 partly visible, 2 fully visible (int8 [nQB, nKB])."""

    table: Tensor
    block: int

    @property
    def visible(self) -> Tensor:
        return self.table != SKIP

    def kv_indices(self, qb: int) -> list[int]:
        """The key blocks query block ``qb`` reads, ascending (what a kernel iterates)."""
        return self.visible[qb].nonzero().flatten().tolist()

    def to_dense(self, q_len: int, k_len: int | None = None, causal: bool = False) -> Tensor:
        """Element mask [q_len, k_len] bool (positions 0.. on both sides; causal adds k <= q)."""
        k_len = q_len if k_len is None else k_len
        qb = torch.arange(q_len) // self.block
        kb = torch.arange(k_len) // self.block
        dense = self.visible[qb[:, None], kb[None, :]]
        if causal:
            dense = dense & (torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None])
        return dense

    @classmethod
    def from_dense(cls, mask: Tensor, block: int) -> BlockTable:
        """The table of an element mask [Sq, Sk]: a block is 2 where all its pairs are visible,
        1 where some are, 0 where none are (blocks cut by the end count only their pairs)."""
        sq, sk = mask.shape
        nq, nk = -(-sq // block), -(-sk // block)
        pad = torch.zeros(nq * block, nk * block, dtype=torch.int32)
        valid = torch.zeros_like(pad)
        pad[:sq, :sk] = mask.int()
        valid[:sq, :sk] = 1
        count = pad.view(nq, block, nk, block).sum((1, 3))
        size = valid.view(nq, block, nk, block).sum((1, 3))
        table = torch.where(count == 0, SKIP, torch.where(count == size, FULL, PARTIAL))
        return cls(table.to(torch.int8), block)


@dataclass(frozen=True)
class SparsePattern:
    """A block pattern (see module docstring); ``table(n)`` materialises it for n blocks."""

    block: int
    local: int
    global_blocks: int
    random: int
    seed: int
    causal: bool

    def table(self, n_blocks: int) -> BlockTable:
        return BlockTable(_table(self, _pow2(max(n_blocks, 1)))[:n_blocks, :n_blocks], self.block)

    def density(self, n_blocks: int) -> float:
        """Fraction of the (causal: lower-triangular) block pairs that are read."""
        vis = self.table(n_blocks).visible
        total = n_blocks * (n_blocks + 1) // 2 if self.causal else n_blocks * n_blocks
        return vis.sum().item() / total

    @property
    def bounded(self) -> bool:
        """Whether future queries only see a bounded set of keys (the cache can evict)."""
        return self.causal and self.random == 0

    def ring(self) -> RingSpec:
        """The smallest cache that keeps everything future queries can see: the global blocks
        stay, the last ``local`` blocks rotate (whole blocks); with random blocks, everything."""
        if not self.bounded:
            return RingSpec()
        return RingSpec(pinned=self.global_blocks * self.block, ring=self.local * self.block, block=self.block)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@lru_cache(maxsize=64)
def _table(p: SparsePattern, n: int) -> Tensor:
    """The int8 table for ``n`` blocks (cached; sizes are powers of two so prefixes are reused)."""
    qb = torch.arange(n)[:, None]
    kb = torch.arange(n)[None, :]
    if p.causal:
        vis = (kb <= qb) & (qb - kb < p.local)
    else:
        vis = (qb - kb).abs() < p.local
    vis = vis | (kb < p.global_blocks)
    if p.causal:
        vis = vis & (kb <= qb)
    else:
        vis = vis | (qb < p.global_blocks)
    if p.random:
        for i in range(n):
            pool = [j for j in range(i + 1 if p.causal else n) if not vis[i, j]]
            rng = _random.Random(p.seed * 1_000_003 + i)
            for j in rng.sample(pool, min(p.random, len(pool))):
                vis[i, j] = True
    table = torch.where(vis, FULL, SKIP)
    if p.causal and p.block > 1:
        table = torch.where(vis & (kb == qb), PARTIAL, table)  # the diagonal block: k <= q inside
    return table.to(torch.int8)
