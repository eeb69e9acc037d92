"""`KernelSpec`: everything a generated attention kernel is specialised on.

A spec is the static part of one attention site after the passes have run: head layout,
head size, scale and the visibility rules of :mod:`kvpass.semantics.reference`.  Tensors' sizes along
batch and sequence are *not* part of it (one kernel serves every length).

The spec travels as a JSON string (``spec.to_json()``) through the ``kvpass::attention``
custom op, and ``spec.key()`` (sha256 of that canonical JSON) names the generated source on
disk.

Extension points (future forms), all in the one ``extra`` mapping so the fields above never
change meaning:

- ``extra={"latent": {"rank": r, "rope": bool, "norm_eps": float | None}}`` -- MHC latent
  caches (implemented): the "K" argument is the latent ``c`` [B, 1, Sk, r]; keys and values
  are rebuilt per tile in registers (``c·B`` + bias, optional per-head RMS norm, RoPE of any
  pairing) as :func:`kvpass.semantics.reference.latent_keys_values` defines; never written to memory.
- ``extra={"quant": {"bits": b, "group": g, "keys": axis, "values": axis, "unit": u}}`` --
  quantized K/V storage (implemented for decode): "K"/"V" are packed uint8 codes
  [B, Hkv, Sk, D·b/8] with scale/zero tensors ([B, Hkv, Sk, D/g] for ``axis="token"``,
  [B, Hkv, Sk/u, D] for ``"channel"``), dequantized in registers as
  :func:`kvpass.semantics.qformat.dequantize` defines, plus a full-precision residual buffer read after
  them (:class:`kvpass.runtime.cache.KVQuantLayer`).  With a latent, the latent is what is quantized.

The generator refuses (``CodegenError``) any ``extra`` key it does not implement, so a spec
can never silently run a kernel that ignores part of its meaning.

Example:
    >>> spec = KernelSpec(num_heads=4, num_kv_heads=2, head_dim=80, causal=True, window=16)
    >>> spec.kv_head_map, round(spec.scale, 4)
    ((0, 0, 1, 1), 0.1118)
    >>> KernelSpec.from_json(spec.to_json()) == spec
    True
    >>> len(spec.key())
    64
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import KVPassError

__all__ = ["KernelSpec", "CodegenError", "DTYPES"]

DTYPES = ("float32", "float16", "bfloat16")
KNOWN_EXTRA: frozenset[str] = frozenset({"latent", "quant"})  # keys of `extra` the generator implements


class CodegenError(KVPassError, ValueError):
    """A kernel spec is invalid, or asks for something the generator does not implement."""


def _canonical_json(obj: Any) -> str:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"))`` for the values a spec holds,
    in plain Python that dynamo can trace (the json module's C encoder is a graph break)."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise TypeError(f"{obj!r} is not JSON-serialisable in a kernel spec")
        return repr(float(obj))
    if isinstance(obj, str):
        if any(c in obj for c in '"\\') or not obj.isprintable() or not obj.isascii():
            return json.dumps(obj)
        return '"' + obj + '"'
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_canonical_json(x) for x in obj) + "]"
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"kernel spec keys must be strings, got {k!r}")
        return "{" + ",".join(_canonical_json(k) + ":" + _canonical_json(obj[k]) for k in sorted(obj)) + "}"
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable in a kernel spec")


@dataclass(frozen=True)
class KernelSpec:
    """Static description of one attention kernel (see module docstring).

    Fields:
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` as stored (after head sharing).
        head_dim: ``D`` of q and k (16..256; non-powers of two are padded and masked).
        kv_head_map: ``kv_head_map[h]`` = KV head read by query head ``h`` (any map);
            default contiguous groups ``h * Hkv // H``.
        head_dim_v: ``Dv`` of v and of the output; default ``head_dim``.
        scale: logit scale; default ``head_dim ** -0.5``.
        causal, window, sinks, softcap: visibility/logit rules as in ``kvpass.semantics.reference``.
        block: block size of a block-sparse table (positions // block index it).
        has_block_mask: a ``[nQB, nKB]`` block table is passed at call time.
        has_mask: an additive/bool graph mask ``[B, 1|H, Sq, Sk]`` is passed at call time.
        dtype: storage dtype of q/k/v/out: ``float32``, ``float16`` or ``bfloat16``.
        extra: room for future forms (see module docstring); must be JSON-serialisable.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_head_map: tuple[int, ...] = ()
    head_dim_v: int | None = None
    scale: float | None = None
    causal: bool = False
    window: int | None = None
    sinks: int = 0
    softcap: float | None = None
    block: int | None = None
    has_block_mask: bool = False
    has_mask: bool = False
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        fill = object.__setattr__  # frozen: fill defaults once, here
        if not self.kv_head_map:
            fill(self, "kv_head_map", tuple(h * self.num_kv_heads // self.num_heads
                                            for h in range(self.num_heads)))
        fill(self, "kv_head_map", tuple(int(x) for x in self.kv_head_map))
        if self.head_dim_v is None:
            fill(self, "head_dim_v", self.head_dim)
        if self.scale is None:
            fill(self, "scale", self.head_dim**-0.5)
        fill(self, "scale", float(self.scale))
        if self.softcap is not None:
            fill(self, "softcap", float(self.softcap))
        fill(self, "extra", dict(self.extra))
        self._validate()
        # computed once (not a cached_property: torch.compile cannot trace its lock)
        # plain Python (no json module) so torch.compile can build specs without a graph break
        fill(self, "_json", _canonical_json(self.to_dict()))

    def _validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise CodegenError(f"KernelSpec: {what}")

        need(self.num_heads >= 1 and self.num_kv_heads >= 1, "num_heads, num_kv_heads must be >= 1")
        need(len(self.kv_head_map) == self.num_heads,
             f"kv_head_map has {len(self.kv_head_map)} entries, num_heads={self.num_heads}")
        need(all(0 <= g < self.num_kv_heads for g in self.kv_head_map),
             f"kv_head_map {self.kv_head_map} must index [0, {self.num_kv_heads})")
        need(16 <= self.head_dim <= 256, f"head_dim={self.head_dim} not in 16..256")
        need(16 <= self.head_dim_v <= 256, f"head_dim_v={self.head_dim_v} not in 16..256")
        need(self.window is None or self.window >= 1, f"window={self.window} must be >= 1")
        need(self.sinks >= 0, f"sinks={self.sinks} must be >= 0")
        need(self.softcap is None or self.softcap > 0, f"softcap={self.softcap} must be > 0")
        need(not self.has_block_mask or (self.block or 0) >= 1, "has_block_mask needs block >= 1")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r} not in {DTYPES}")
        _canonical_json(self.extra)  # raises TypeError if not JSON-serialisable
        lat = self.extra.get("latent")
        if lat is not None:
            need(isinstance(lat, dict) and set(lat) == {"rank", "rope", "norm_eps"},
                 f"extra['latent'] must be {{rank, rope, norm_eps}}, got {lat!r}")
            need(isinstance(lat["rank"], int) and 1 <= lat["rank"] <= 1024,
                 f"latent rank {lat['rank']!r} not in 1..1024")
            need(lat["norm_eps"] is None or lat["norm_eps"] >= 0, "latent norm_eps must be >= 0")
        qz = self.extra.get("quant")
        if qz is not None:
            need(isinstance(qz, dict) and set(qz) == {"bits", "group", "keys", "values", "unit"},
                 f"extra['quant'] must be {{bits, group, keys, values, unit}}, got {qz!r}")
            need(qz["bits"] in (8, 4, 2), f"quant bits {qz['bits']!r} not in 8, 4, 2")
            need(qz["keys"] in ("token", "channel") and qz["values"] in ("token", "channel"),
                 "quant keys/values axes must be 'token' or 'channel'")
            need(qz["group"] >= 1 and qz["unit"] >= 1, "quant group and unit must be >= 1")

    # -- derived facts the generator specialises on -------------------------------------
    @property
    def group_size(self) -> int | None:
        """``G`` when the head map is contiguous groups (``h // G``), else None."""
        if self.num_heads % self.num_kv_heads:
            return None
        g = self.num_heads // self.num_kv_heads
        return g if self.kv_head_map == tuple(h // g for h in range(self.num_heads)) else None

    @property
    def latent(self) -> dict | None:
        """``extra["latent"]`` (rank, rope, norm_eps) or None."""
        return self.extra.get("latent")

    @property
    def quant(self) -> dict | None:
        """``extra["quant"]`` (bits, group, keys, values, unit) or None."""
        return self.extra.get("quant")

    @property
    def max_group(self) -> int:
        """Largest number of query heads reading one KV head."""
        return max(self.kv_head_map.count(g) for g in range(self.num_kv_heads))

    @property
    def head_groups(self) -> tuple[tuple[int, ...], ...]:
        """Query heads of each KV head, in order: ``head_groups[g] = (h, ...)``."""
        return tuple(tuple(h for h, x in enumerate(self.kv_head_map) if x == g)
                     for g in range(self.num_kv_heads))

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (tuples as lists)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["kv_head_map"] = list(self.kv_head_map)
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal specs give equal strings."""
        return self._json

    @classmethod
    def from_json(cls, text: str) -> KernelSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def key(self) -> str:
        """Stable 64-hex-digit sha256 of :meth:`to_json` (names the generated source)."""
        return hashlib.sha256(self._json.encode()).hexdigest()

    def replace(self, **changes: Any) -> KernelSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)
