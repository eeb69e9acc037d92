"""The passes: one module per form, each registering its ``apply`` for its form type with
:func:`kvpass.transform.registry.register_pass` (with the form's traits).

A pass is ``apply(att, site, form, ctx) -> LayerPlan``: it may edit the layer's weights in
place (``ctx.weights``: the model's parameters by qualified name) or its graph, and returns how
the layer's KVCore stores and reads its cache.  Whether it wants the layer's calibration inputs
(``ctx.calls``) and statistics (``ctx.stats``, :class:`kvpass.transform.calibrate.KVStats`) is
a trait: :func:`kvpass.transform.registry.needs_calibration` / ``needs_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import mhc, quantize, shared_kv, sparse, window  # noqa: F401 - each registers its pass

__all__ = ["PassContext"]


@dataclass
class PassContext:
    """What a pass may use besides the layer: the model's parameters by name, the layer's
    calibration inputs and statistics (None without calibration), choices made for the whole
    model before the per-layer passes (``ranks``: MHC rank allocation by site name), and where
    to report (``removed``: parameters a pass deleted)."""

    weights: dict
    stats: object | None = None
    calls: list[dict] | None = None
    ranks: dict = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    progress: bool = False
