"""The pass registry: each form type, the pass that lowers it, and what the form can do.

Modelled on torchao's config -> handler registry: a pass module registers its ``apply``
for its form type with :func:`register_pass`, together with the form's *traits*; everything
that used to compare kind strings (``optimize``'s checks, ``retarget``, the compile backend,
the streaming rewrite, evaluation, checkpoints) asks the registry instead.

A pass is ``apply(att, site, form, ctx) -> LayerPlan``: it may edit the layer's weights in
place (``ctx.weights``) or its graph, and returns how the layer's KVCore stores and reads its
cache.

Example:
    >>> import kvpass
    >>> from kvpass.transform import registry
    >>> registry.traits(kvpass.Window(512)).changes_weights
    False
    >>> registry.needs_calibration(kvpass.MHC(ratio=2, method="aware"))
    True
    >>> [f.kind for f in registry.in_order([kvpass.Quantize(bits=4), kvpass.Window(64)])]
    ['window', 'quantize']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import KVPassError
from ..ir.forms import FORMS, Form, Full

__all__ = ["Traits", "PassEntry", "register_pass", "entry", "traits", "registered", "needs_calibration",
           "needs_stats", "streamable", "in_graph", "in_order", "visibility_only", "changes_weights",
           "calibration_shape"]


def _never(form: Form) -> bool:
    return False


def _always(form: Form) -> bool:
    return True


@dataclass(frozen=True)
class Traits:
    """What a form does, for the code that decides around the passes.

    ``changes_weights``: it rewrites projection weights (needs the projections traced; refused
    on modules shared across layers; ``retarget`` cannot change it).  ``positional``: its
    layers see keys by token position (a ring or positional cache).  ``order``: passes run in
    (order, policy position), so a form that stores what the others keep (Quantize) runs last.
    The callables take the form instance: ``calibrates`` (wants calibration inputs),
    ``stats`` (wants second moments of q/k/v), ``streamable`` (changes a layer from its own
    weights and inputs alone: the layer-streamed rewrite can run it), ``in_graph`` (the
    compile backend can apply it inside a dynamo graph), ``structural`` (the form that
    rebuilds the layer's shapes without calibration, for checkpoints; given the form and the
    rewritten layer), ``context`` (tokens one calibration sequence must hold for the form's
    calibration to see what it fits: logit sinks need sequences past their window).
    """

    changes_weights: bool = False
    positional: bool = False
    order: int = 0
    calibrates: Callable[[Form], bool] = _never
    stats: Callable[[Form], bool] = _never
    streamable: Callable[[Form], bool] = _always
    in_graph: Callable[[Form], bool] = _always
    structural: Callable | None = None
    context: Callable[[Form], int] = lambda form: 0


@dataclass(frozen=True)
class PassEntry:
    form: type[Form]
    apply: Callable | None  # None: nothing to lower (Full)
    traits: Traits = field(default_factory=Traits)


_REGISTRY: dict[type[Form], PassEntry] = {}


def register_pass(form: type[Form], **traits) -> Callable:
    """Decorator: ``@register_pass(Window, positional=True)`` on a pass's ``apply``."""
    if not (isinstance(form, type) and issubclass(form, Form)):
        raise TypeError(f"register_pass: {form!r} is not a Form type")

    def deco(apply: Callable) -> Callable:
        _REGISTRY[form] = PassEntry(form, apply, Traits(**traits))
        return apply

    return deco


_REGISTRY[Full] = PassEntry(Full, None, Traits())


def registered() -> dict[type[Form], PassEntry]:
    """Form type -> entry, for every form optimize can lower (the pass modules register
    themselves when ``kvpass.transform`` is imported)."""
    return dict(_REGISTRY)


def entry(form: Form) -> PassEntry:
    """The registry entry of ``form``'s type; a form no pass lowers is a clear error."""
    e = _REGISTRY.get(type(form))
    if e is None:
        have = sorted(t.kind for t in registered())
        raise KVPassError(f"form {form!r} (kind {type(form).kind!r}): no pass lowers it in this version; available: "
                          f"{have} (known forms: {sorted(FORMS)})")
    return e


def traits(form: Form) -> Traits:
    return entry(form).traits


def changes_weights(form: Form) -> bool:
    return traits(form).changes_weights


def needs_calibration(form: Form) -> bool:
    return bool(traits(form).calibrates(form))


def needs_stats(form: Form) -> bool:
    """Whether the pass reads ``ctx.stats`` (second moments of q/k/v over the calibration
    calls: one more run of the layer on them), not only ``ctx.calls``."""
    return bool(traits(form).stats(form))


def streamable(form: Form) -> bool:
    return bool(traits(form).streamable(form))


def in_graph(form: Form) -> bool:
    return bool(traits(form).in_graph(form))


def in_order(forms) -> list[Form]:
    """The order passes run in: by trait ``order``, then as the policy lists them."""
    return sorted(forms, key=lambda f: traits(f).order)


def visibility_only(forms) -> bool:
    """Whether ``forms`` change no weights (Full, Window, Sparse, Quantize)."""
    return not any(changes_weights(f) for f in forms)


CALIBRATION_LENGTH = 256  # tokens per calibration sequence, unless a form needs longer ones
CALIBRATION_TOKENS = 4096  # tokens in all (16 sequences of 256)


def calibration_shape(forms) -> tuple[int, int]:
    """(length, count) of the calibration sequences for ``forms``: 16 x 256 tokens, or fewer,
    longer sequences (at least 2) when a form's calibration must see further (trait ``context``).

    >>> import kvpass
    >>> calibration_shape([kvpass.Window(512, sinks=4, sink="logit")])
    (1032, 3)
    """
    need = max((traits(f).context(f) for f in forms), default=0)
    length = max(CALIBRATION_LENGTH, need)
    return length, max(2, CALIBRATION_TOKENS // length)


def structural(form: Form, att) -> Form:
    """The form that rebuilds ``att``'s layer shapes without calibration (checkpoints)."""
    fn = traits(form).structural
    return form if fn is None else fn(form, att)
