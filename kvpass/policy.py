"""Policies: which KV-saving form each attention layer gets.

A *form* is a frozen, validated dataclass (``Full``, ``SharedKV``, ``MHC``, ``Window``,
``Sparse``, ``Quantize``); a list of forms composes them (``[SharedKV(kv_heads=1), Window(512, sinks=4)]``).
A :class:`Policy` maps layers to forms: a default plus overrides selected by layer index,
range string (``"0-3"``, ``"8-"``) or module-name glob (``"*.layers.1?.self_attn"``).

Example:
    >>> import kvpass
    >>> p = kvpass.Policy(default=kvpass.Window(size=512, sinks=4), layers={"0-1": kvpass.Full()})
    >>> p.forms_for(0, "model.layers.0.self_attn")
    (Full(),)
    >>> p.forms_for(5, "model.layers.5.self_attn")
    (Window(size=512, sinks=4),)
    >>> kvpass.Policy.from_dict(p.to_dict()) == p
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import PolicyError

__all__ = ["Form", "Full", "SharedKV", "MHC", "Window", "Sparse", "Quantize", "Policy", "FORMS", "POLICY_VERSION"]

POLICY_VERSION = 1
FORMS: dict[str, type[Form]] = {}


def _check(cls: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise PolicyError(f"{cls}.{name}: invalid value {value!r}; allowed: {allowed}")


def _choice(cls: str, name: str, value, options) -> None:
    _check(cls, name, value, value in options, ", ".join(repr(o) for o in options))


def _pos_int(cls: str, name: str, value, allow_none=False, minimum=1) -> None:
    ok = (allow_none and value is None) or (isinstance(value, int) and not isinstance(value, bool)
                                            and value >= minimum)
    _check(cls, name, value, ok, f"an integer >= {minimum}" + (" or None" if allow_none else ""))


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
    calibration data after truncation.  See :mod:`kvpass.passes.mhc`.
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
        _check(n, "ratio", self.ratio, self.ratio is None or (isinstance(self.ratio, (int, float))
                                                              and not isinstance(self.ratio, bool)
                                                              and 1 < self.ratio < float("inf")),
               "a finite number > 1 (the cache shrinks by this factor) or None")
        if (self.rank is None) == (self.ratio is None):
            raise PolicyError("MHC: give exactly one of rank=r or ratio=x")
        _check(n, "joint", self.joint, isinstance(self.joint, bool), "True, False")
        _pos_int(n, "groups", self.groups)
        _choice(n, "method", self.method, ("svd", "whitened", "aware"))
        _check(n, "allocate", self.allocate, isinstance(self.allocate, bool), "True, False")
        _check(n, "refit", self.refit, isinstance(self.refit, bool), "True, False")
        if self.allocate and self.ratio is None:
            raise PolicyError("MHC.allocate: needs ratio=x (a total budget to spread over layers), "
                              "not a fixed rank")


@dataclass(frozen=True)
class Window(Form):
    """Sliding window of ``size`` tokens plus the first ``sinks`` tokens (attention sinks)."""

    kind: ClassVar[str] = "window"
    size: int = 512
    sinks: int = 4

    def __post_init__(self):
        _pos_int("Window", "size", self.size)
        _pos_int("Window", "sinks", self.sinks, minimum=0)


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
    part is per-channel, else one).  Composes with every form: it changes how the cache stores
    what the other forms keep.  See :mod:`kvpass.passes.quantize`.
    """

    kind: ClassVar[str] = "quantize"
    bits: int = 8
    group: int = 64
    keys: str = "per_channel"
    values: str = "per_token"
    residual: int = 0

    def __post_init__(self):
        _choice("Quantize", "bits", self.bits, (8, 4, 2))
        _pos_int("Quantize", "group", self.group)
        _choice("Quantize", "keys", self.keys, ("per_channel", "per_token"))
        _choice("Quantize", "values", self.values, ("per_channel", "per_token"))
        _pos_int("Quantize", "residual", self.residual, minimum=0)


def _as_forms(value, where: str) -> tuple[Form, ...]:
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


def _selector_ok(sel) -> bool:
    if isinstance(sel, int) and not isinstance(sel, bool):
        return sel >= 0
    return isinstance(sel, str) and bool(sel)


def _range(sel: str) -> tuple[int, int | None] | None:
    lo, sep, hi = sel.partition("-")
    if not sep or not lo.isdigit() or (hi and not hi.isdigit()):
        return None
    if hi and int(hi) < int(lo):
        raise PolicyError(f"Policy.layers: range {sel!r} is empty (its end is before its start); "
                          "ranges are 'a-b' with a <= b, or 'a-'")
    return int(lo), (int(hi) if hi else None)


def unmatched_selectors(policy: Policy, layers: list[tuple[int, str]]) -> list:
    """The selectors of ``policy.layers`` that select none of ``layers`` ((index, module name))."""
    return [sel for sel in policy.layers if not any(_matches(sel, i, n) for i, n in layers)]


def check_selectors(policy: Policy, layers: list[tuple[int, str]]) -> None:
    """Raise :class:`PolicyError` naming every selector that matches no layer (a typo would
    otherwise leave those layers silently at the default)."""
    bad = unmatched_selectors(policy, layers)
    if bad:
        names = [n for _, n in layers]
        raise PolicyError(f"Policy.layers: selector(s) {bad} match no attention layer; this model has layers "
                          f"0-{len(layers) - 1}" + (f" named like {names[0]!r}" if names else ""))


@dataclass(frozen=True)
class Policy:
    """Forms per layer: ``default`` plus ``layers`` overrides (later keys win).

    Selectors: an int (layer index), ``"a-b"`` (inclusive), ``"a-"`` (a to the end), a digit
    string, or a glob on the module name.
    """

    default: Any = field(default_factory=Full)
    layers: dict = field(default_factory=dict)
    version: int = POLICY_VERSION

    def __post_init__(self):
        object.__setattr__(self, "default", _as_forms(self.default, "Policy.default"))
        layers = {}
        for sel, forms in dict(self.layers).items():
            if not _selector_ok(sel):
                raise PolicyError(f"Policy.layers: invalid selector {sel!r}; allowed: layer index, "
                                  "'a-b', 'a-', or a module-name glob")
            if isinstance(sel, str):
                _range(sel)  # an empty range is an error here, not a silent no-match
            layers[sel] = _as_forms(forms, f"Policy.layers[{sel!r}]")
        object.__setattr__(self, "layers", layers)
        _check("Policy", "version", self.version, self.version == POLICY_VERSION, str(POLICY_VERSION))

    @classmethod
    def of(cls, value) -> Policy:
        """A Policy from a Policy, a form, or a list of forms (applied to every layer)."""
        return value if isinstance(value, Policy) else cls(default=value)

    @classmethod
    def budget(cls, model, kv_ratio: float, context: int = 4096, forms=("quantize", "window"),
               calibration=None, tokenizer=None, **kw) -> Policy:
        """A per-layer policy bringing the cache at ``context`` tokens to ``1 / kv_ratio`` of the
        original with the least estimated damage; ``policy.explanation.table()`` says why.
        See :mod:`kvpass.budget`."""
        from .budget import budget_policy

        return budget_policy(model, kv_ratio, context, forms, calibration, tokenizer, **kw)

    def forms_for(self, layer: int, name: str) -> tuple[Form, ...]:
        chosen = self.default
        for sel, forms in self.layers.items():
            if _matches(sel, layer, name):
                chosen = forms
        return chosen

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        def enc(forms):
            return [f.to_dict() for f in forms]

        return {"version": self.version, "default": enc(self.default),
                "layers": {str(k): enc(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        if not isinstance(d, dict):
            raise PolicyError(f"policy: expected a mapping, got {type(d).__name__}")
        extra = set(d) - {"version", "default", "layers"}
        if extra:
            raise PolicyError(f"policy: unknown field(s) {sorted(extra)}; allowed: version, default, layers")
        if "version" not in d:
            raise PolicyError(f"policy.version: missing; allowed: {POLICY_VERSION}")
        layers = d.get("layers") or {}
        if not isinstance(layers, dict):
            raise PolicyError(f"policy.layers: expected a mapping, got {layers!r}")
        layers = {(int(k) if isinstance(k, str) and k.isdigit() else k): v for k, v in layers.items()}
        return cls(default=d.get("default", [{"kind": "full"}]), layers=layers, version=d["version"])

    def to_file(self, path: str | Path) -> None:
        """Write JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        d = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(d, sort_keys=False)
        else:
            text = json.dumps(d, indent=2) + "\n"
        path.write_text(text)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise PolicyError(f"policy file {path}: {e.strerror}") from e
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # noqa: BLE001 - parse errors of either format
            raise PolicyError(f"policy file {path}: not valid {path.suffix[1:] or 'JSON'}: {e}") from e
        return cls.from_dict(d)


def _matches(sel, layer: int, name: str) -> bool:
    if isinstance(sel, int):
        return sel == layer
    if sel.isdigit():
        return int(sel) == layer
    rng = _range(sel)
    if rng is not None:
        lo, hi = rng
        return layer >= lo and (hi is None or layer <= hi)
    return fnmatch.fnmatchcase(name, sel)
