"""How a cache slot lays tokens out: pinned tokens plus a ring (:class:`RingSpec`), and token
positions.

The layout is part of a form's meaning (which keys future queries can still see), so it lives
beside the reference; :mod:`kvpass.runtime.cache` stores tokens this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RingSpec", "token_positions"]


@dataclass(frozen=True)
class RingSpec:
    """What a :class:`KVRingLayer` keeps: ``pinned`` first tokens (attention sinks, global
    blocks) and a ring of ``ring`` slots for the most recent tokens (None: keep everything).
    ``block``: evict whole blocks (block-sparse local bands), else single tokens (windows)."""

    pinned: int = 0
    ring: int | None = None
    block: int | None = None

    @property
    def capacity(self) -> int | None:
        return None if self.ring is None else self.pinned + self.ring

    def keep_from(self, n_seen: Tensor) -> Tensor:
        """Per row, the first position still visible to future queries in the recent band."""
        if self.block is None:
            return n_seen - self.ring
        last = (n_seen - 1).clamp(min=0) // self.block
        return (last + 1) * self.block - self.ring

    def slot(self, pos: Tensor) -> Tensor:
        """Slot of a (non-negative) token position: pinned tokens stay, the rest rotate."""
        if self.ring is None:
            return pos
        return torch.where(pos < self.pinned, pos, self.pinned + (pos - self.pinned) % self.ring)


def token_positions(valid: Tensor, n_seen: Tensor | None = None) -> Tensor:
    """Positions of new tokens counting only real ones (padding -> -1). [B, S] int64.

    >>> token_positions(torch.tensor([[False, True, True], [True, True, True]]))
    tensor([[-1,  0,  1],
            [ 0,  1,  2]])
    """
    pos = valid.long().cumsum(1) - 1
    if n_seen is not None:
        pos = pos + n_seen[:, None]
    return pos.masked_fill(~valid, -1)


