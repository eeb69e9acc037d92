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
    (Window(size=512, sinks=4, sink='token'),)
    >>> kvpass.Policy.from_dict(p.to_dict()) == p
    True
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PolicyError
from .forms import POLICY_VERSION, Form, Full, as_forms, check_value

__all__ = ["Policy", "check_selectors", "unmatched_selectors", "register_search"]

#: searches that build policies (``"budget"``: :func:`kvpass.search.budget.budget_policy`), registered
#: by the later stage that implements them: the IR must not import it (docs/architecture.md)
_SEARCHES: dict = {}


def register_search(name: str, fn) -> None:
    """Make ``fn`` the implementation of the policy search ``name`` (e.g. ``Policy.budget``)."""
    _SEARCHES[name] = fn

























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
        object.__setattr__(self, "default", as_forms(self.default, "Policy.default"))
        layers = {}
        for sel, forms in dict(self.layers).items():
            if not _selector_ok(sel):
                raise PolicyError(f"Policy.layers: invalid selector {sel!r}; allowed: layer index, "
                                  "'a-b', 'a-', or a module-name glob")
            if isinstance(sel, str):
                _range(sel)  # an empty range is an error here, not a silent no-match
            layers[sel] = as_forms(forms, f"Policy.layers[{sel!r}]")
        object.__setattr__(self, "layers", layers)
        check_value("Policy", "version", self.version, self.version == POLICY_VERSION, str(POLICY_VERSION))

    @classmethod
    def of(cls, value) -> Policy:
        """A Policy from a Policy, a form, or a list of forms (applied to every layer)."""
        return value if isinstance(value, Policy) else cls(default=value)

    @classmethod
    def budget(cls, model, kv_ratio: float, context: int = 4096, forms=("quantize", "window"),
               calibration=None, tokenizer=None, **kw) -> Policy:
        """A per-layer policy bringing the cache at ``context`` tokens to ``1 / kv_ratio`` of the
        original with the least estimated damage; ``policy.explanation.table()`` says why.
        See :mod:`kvpass.search.budget`."""
        search = _SEARCHES.get("budget")
        if search is None:  # the IR cannot import the search stage; kvpass/__init__ registers it
            raise PolicyError("Policy.budget: the budget search is not registered (import kvpass)")
        return search(model, kv_ratio, context, forms, calibration, tokenizer, **kw)

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
