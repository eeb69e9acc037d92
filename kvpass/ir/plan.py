"""Plans: what the passes decide for one layer (:class:`LayerPlan`) and what its core needs at run
time (:class:`CoreSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..semantics.block_sparse import SparsePattern
from ..semantics.layout import RingSpec
from ..semantics.qformat import QuantRule

__all__ = ["CoreSpec", "LayerPlan"]


@dataclass(frozen=True)
class CoreSpec:
    """What the attention core needs at run time (from the site)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_head_map: tuple[int, ...]
    scale: float
    causal: bool
    softcap: float | None
    mask_kind: str
    alibi: tuple[float, ...] | None = None  # ALiBi slopes: positional layers add slope · key position

    @classmethod
    def of(cls, site) -> CoreSpec:
        """From a :class:`~kvpass.graph.sites.AttentionSite` (its facts; the IR holds no graph)."""
        return cls(site.num_heads, site.num_kv_heads, site.head_dim, site.kv_head_map, site.scale,
                   site.causal, site.softcap, site.nodes.mask_kind if site.nodes else "none",
                   getattr(site, "alibi", None))


@dataclass(frozen=True)
class LayerPlan:
    """How one layer stores and reads its cache (what the passes decided).

    ``keep``: the heads of ``k_pre``/``v_pre`` that are stored (None: all);
    ``head_map[h]``: which stored head query head ``h`` reads (None: the site's map);
    ``window``/``sinks``: each query sees its last ``window`` tokens and the first ``sinks``;
    ``pattern``: a block-sparse pattern; ``latent``: the rank of an MHC latent cached instead
    of keys and values (the weights live in ``KVCore.latent``); ``quant``: the stored values
    are quantized (:class:`~kvpass.semantics.qformat.QuantRule`); ``kv_dtype``: keys and values are
    stored as fp8 bytes (no positions needed).  With any of the others the layer is
    *positional*: visibility comes from token positions (the graph's mask only says which
    tokens are padding) and the cache is a :class:`~kvpass.runtime.cache.KVRingLayer` (or
    :class:`~kvpass.runtime.cache.KVQuantLayer`) storing one position per slot.
    """

    keep: tuple[int, ...] | None = None
    head_map: tuple[int, ...] | None = None
    window: int | None = None
    sinks: int = 0
    pattern: SparsePattern | None = None
    latent: int | None = None
    quant: QuantRule | None = None
    kv_dtype: str | None = None  # "fp8_e4m3": K/V stored as one float8 byte each (Quantize(format="fp8"))

    def kept_window(self, model_window: int | None) -> int | None:
        """The window a positional form reads: its own, none under a sparse pattern, else the
        model's own sliding window (visibility comes from positions, so it must be here)."""
        return self.window if self.window is not None or self.pattern is not None else model_window

    @property
    def positional(self) -> bool:
        return (self.window is not None or self.pattern is not None or self.latent is not None
                or self.quant is not None)

    def ring(self) -> RingSpec | None:
        """The cache layout (None: the plain full cache)."""
        if self.window is not None:
            spec = RingSpec(pinned=self.sinks, ring=self.window)
        elif self.pattern is not None:
            spec = self.pattern.ring()
        elif self.positional:
            return RingSpec()  # keep every token, with its position
        else:
            return None
        if self.quant is None or spec.ring is None:
            return spec
        # quantized slots hold whole units: align both parts, and keep one unit more, since the
        # tokens still visible start anywhere inside a unit
        u = self.quant.unit
        up = -(-spec.pinned // u) * u
        ring = -(-spec.ring // u) * u + (u if u > 1 else 0)
        return RingSpec(pinned=up, ring=ring, block=spec.block)


