"""The pass registry: one pass per form kind, each in its own module.

A pass is ``apply(att, site, form, ctx) -> LayerPlan``: it may edit the layer's weights in
place (``ctx.weights``: the model's parameters by qualified name) or its graph, and returns how
the layer's KVCore stores and reads its cache.  ``needs_calibration(form)`` says whether it
wants the layer's calibration inputs (``ctx.calls``) and statistics (``ctx.stats``,
:class:`kvpass.calibrate.KVStats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import mhc, quantize, shared_kv, sparse, window

__all__ = ["PASSES", "PassContext", "needs_calibration", "needs_stats"]

PASSES = {"shared_kv": shared_kv.apply, "window": window.apply, "sparse": sparse.apply, "mhc": mhc.apply,
          "quantize": quantize.apply}


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


def needs_calibration(form) -> bool:
    if form.kind == "shared_kv":
        return form.grouping == "similarity" or form.merge == "calibrated"
    if form.kind == "mhc":
        return mhc.needs_calibration(form)
    return False


def needs_stats(form) -> bool:
    """Whether the pass reads ``ctx.stats`` (second moments of q/k/v over the calibration
    calls: one more run of the layer on them), not only ``ctx.calls``."""
    if form.kind == "shared_kv":
        return needs_calibration(form)
    return form.kind == "mhc" and form.method == "aware"
