"""Forms: frozen, validated dataclasses naming a KV-saving rewrite of one attention layer
(``Full``, ``SharedKV``, ``MHC``, ``Window``, ``Sparse``, ``Quantize``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..errors import PolicyError

__all__ = ["label_items", "Form", "Full", "SharedKV", "MHC", "Window", "Sparse", "Quantize", "FORMS", "POLICY_VERSION",
           "as_forms"]

POLICY_VERSION = 1


FORMS: dict[str, type[Form]] = {}
#: field metadata: labels (kvpass.evaluate's, bench rows) leave the field out at its default, so
#: fields added later keep earlier labels unchanged
QUIET = {"quiet_at_default": True}


def label_items(form: Form) -> list[tuple[str, object]]:
    """(field, value) pairs a label shows: every field, less quiet ones at their default."""
    return [(f.name, getattr(form, f.name)) for f in dataclasses.fields(form)
            if not (f.metadata.get("quiet_at_default") and getattr(form, f.name) == f.default)]


def check_value(cls: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise PolicyError(f"{cls}.{name}: invalid value {value!r}; allowed: {allowed}")


def _choice(cls: str, name: str, value, options) -> None:
    check_value(cls, name, value, value in options, ", ".join(repr(o) for o in options))


def _pos_int(cls: str, name: str, value, allow_none=False, minimum=1) -> None:
    ok = (allow_none and value is None) or (isinstance(value, int) and not isinstance(value, bool)
                                            and value >= minimum)
    check_value(cls, name, value, ok, f"an integer >= {minimum}" + (" or None" if allow_none else ""))


@dataclass(frozen=True)
class Form:
    """Base of all forms.  ``kind`` names it in policy files."""

    kind: ClassVar[str] = "form"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        FORMS[cls.kind] = cls

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> Form:
        if not isinstance(d, dict) or "kind" not in d:
            raise PolicyError(f"form: expected a mapping with a 'kind' field, got {d!r}")
        kind = d["kind"]
        _choice("form", "kind", kind, sorted(FORMS))
        cls = FORMS[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names - {"kind"}
        if extra:
            raise PolicyError(f"{cls.__name__}: unknown field(s) {sorted(extra)}; allowed: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k != "kind"})


@dataclass(frozen=True)
class Full(Form):
    """The original attention, run by kvpass's own module and cache (the identity rewrite)."""

    kind: ClassVar[str] = "full"


@dataclass(frozen=True)
class SharedKV(Form):
    """Fewer KV heads (MHA/GQA → GQA/MQA) and/or layers sharing one cache.

    Give ``kv_heads`` (heads kept) or ``ratio`` (heads divided by).  ``grouping``: which heads
    merge; ``merge``: how; ``cross_layer=k``: k consecutive layers read one cache.
    """

    kind: ClassVar[str] = "shared_kv"
    kv_heads: int | None = None
    ratio: int | None = None
    grouping: str = "contiguous"
    merge: str = "mean"
    cross_layer: int = 1

    def __post_init__(self):
        n = "SharedKV"
        _pos_int(n, "kv_heads", self.kv_heads, allow_none=True)
        _pos_int(n, "ratio", self.ratio, allow_none=True)
        if (self.kv_heads is None) == (self.ratio is None) and self.cross_layer == 1:
            raise PolicyError("SharedKV: give exactly one of kv_heads=N or ratio=r (or cross_layer>1)")
        _choice(n, "grouping", self.grouping, ("contiguous", "similarity"))
        _choice(n, "merge", self.merge, ("mean", "calibrated"))
        _pos_int(n, "cross_layer", self.cross_layer)


@dataclass(frozen=True)
class MHC(Form):
    """Multi-head compression: one low-rank latent per token cached instead of K and V.

    Give ``rank`` (latent values per token and layer) or ``ratio`` (the cache is ``1/ratio`` of
    the layer's K/V: ``rank = 2·Hkv·D / ratio``).  ``joint``: one latent for K and V together
    (else separate K and V latents, rank split between them); ``groups``: per group of KV heads;
    ``method``: ``"svd"`` of the weights, ``"whitened"`` (by the calibration inputs'
    covariance: minimises the error on real activations) or ``"aware"`` (whitened, and keys /
    values weighted by how their errors reach scores / outputs); ``allocate`` (with ``ratio``): spend
    the model's total rank unevenly over layers (and K vs V when not joint) by measured
    calibration sensitivity; ``refit``: refit the output projection by least squares on
    calibration data after truncation.  See :mod:`kvpass.transform.passes.mhc`.
    """

    kind: ClassVar[str] = "mhc"
    rank: int | None = None
    ratio: float | None = None
    joint: bool = True
    groups: int = 1
    method: str = "whitened"
    allocate: bool = False
    refit: bool = False

    def __post_init__(self):
        n = "MHC"
        _pos_int(n, "rank", self.rank, allow_none=True)
        check_value(n, "ratio", self.ratio, self.ratio is None or (isinstance(self.ratio, (int, float))
                                                              and not isinstance(self.ratio, bool)
                                                              and 1 < self.ratio < float("inf")),
               "a finite number > 1 (the cache shrinks by this factor) or None")
        if (self.rank is None) == (self.ratio is None):
            raise PolicyError("MHC: give exactly one of rank=r or ratio=x")
        check_value(n, "joint", self.joint, isinstance(self.joint, bool), "True, False")
        _pos_int(n, "groups", self.groups)
        _choice(n, "method", self.method, ("svd", "whitened", "aware"))
        check_value(n, "allocate", self.allocate, isinstance(self.allocate, bool), "True, False")
        check_value(n, "refit", self.refit, isinstance(self.refit, bool), "True, False")
        if self.allocate and self.ratio is None:
            raise PolicyError("MHC.allocate: needs ratio=x (a total budget to spread over layers), "
                              "not a fixed rank")


@dataclass(frozen=True)
class Window(Form):
    """Sliding window of ``size`` tokens plus attention sinks.

    ``sink="token"`` (default): the first ``sinks`` tokens stay visible to every query (their
    K/V pinned in the cache).  ``sink="logit"``: no tokens are pinned; instead one learned logit
    per query head joins every row's softmax with value zero (gpt-oss style, what vLLM's
    attention runs as ``sinks``), calibrated so that attention with it matches attention with
    the first ``sinks`` tokens (``sinks=0``: the logit starts at 0 and is only trained, by
    healing, or loaded from a checkpoint).  The cache holds ``size`` tokens.
    """

    kind: ClassVar[str] = "window"
    size: int = 512
    sinks: int = 4
    sink: str = dataclasses.field(default="token", metadata=QUIET)

    def __post_init__(self):
        _pos_int("Window", "size", self.size)
        _pos_int("Window", "sinks", self.sinks, minimum=0)
        _choice("Window", "sink", self.sink, ("token", "logit"))

    @property
    def pinned(self) -> int:
        """Tokens pinned in the cache besides the window (token sinks; none for logit sinks)."""
        return self.sinks if self.sink == "token" else 0


@dataclass(frozen=True)
class Sparse(Form):
    """Block-sparse attention (BigBird/Longformer): local, global and random blocks."""

    kind: ClassVar[str] = "sparse"
    block: int = 64
    local: int = 2
    global_tokens: int = 1
    random: int = 0
    seed: int = 0

    def __post_init__(self):
        _pos_int("Sparse", "block", self.block)
        _pos_int("Sparse", "local", self.local)
        _pos_int("Sparse", "global_tokens", self.global_tokens, minimum=0)
        _pos_int("Sparse", "random", self.random, minimum=0)
        _pos_int("Sparse", "seed", self.seed, minimum=0)


@dataclass(frozen=True)
class Quantize(Form):
    """Quantized KV storage: ``bits`` per stored value, one scale and zero per ``group``.

    ``keys``/``values``: ``"per_channel"`` (a group is one channel over ``group`` consecutive
    tokens; keys' outliers live in channels, KIVI) or ``"per_token"`` (a group is ``group``
    consecutive values of one token's head).  ``residual``: at least this many newest tokens
    stay in full precision; tokens are quantized a unit at a time (``group`` tokens when either
    part is per-channel, else one).  ``format="fp8"``: instead, every value is stored as one
    float8 e4m3 byte (scale 1, saturating at ±448) -- what vLLM stores with
    ``kv_cache_dtype="fp8"``.  Composes with every form (fp8: not with MHC yet): it changes how
    the cache stores what the other forms keep.  See :mod:`kvpass.transform.passes.quantize`.
    """

    kind: ClassVar[str] = "quantize"
    bits: int = 8
    group: int = 64
    keys: str = "per_channel"
    values: str = "per_token"
    residual: int = 0
    format: str = dataclasses.field(default="int", metadata=QUIET)

    def __post_init__(self):
        _choice("Quantize", "format", self.format, ("int", "fp8"))
        if self.format == "fp8":  # one fp8 e4m3 byte per value, scale 1: what vLLM's kv_cache_dtype="fp8" stores
            check_value("Quantize", "bits", self.bits, self.bits == 8, "8 with format='fp8'")
            default = Quantize()
            for name in ("group", "keys", "values", "residual"):
                check_value("Quantize", name, getattr(self, name), getattr(self, name) == getattr(default, name),
                            f"{getattr(default, name)!r} with format='fp8' (no groups, scales or residual)")
        _choice("Quantize", "bits", self.bits, (8, 4, 2))
        _pos_int("Quantize", "group", self.group)
        _choice("Quantize", "keys", self.keys, ("per_channel", "per_token"))
        _choice("Quantize", "values", self.values, ("per_channel", "per_token"))
        _pos_int("Quantize", "residual", self.residual, minimum=0)


def as_forms(value, where: str) -> tuple[Form, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for f in items:
        if isinstance(f, dict):
            f = Form.from_dict(f)
        if not isinstance(f, Form):
            raise PolicyError(f"{where}: expected a form (Full(), Window(...), ...), got {f!r}")
        out.append(f)
    if not out:
        raise PolicyError(f"{where}: empty list of forms")
    kinds = [f.kind for f in out]
    if "full" in kinds and len(out) > 1:
        raise PolicyError(f"{where}: Full() cannot be composed with other forms: {kinds}")
    if len(set(kinds)) < len(kinds):
        raise PolicyError(f"{where}: a form kind appears twice: {kinds}")
    return tuple(out)


