"""The pass registry: one pass per form kind, each in its own module.

A pass is ``apply(att, site, form, weights, stats) -> LayerPlan``: it may edit the layer's
weights in place (``weights``: the model's parameters by qualified name) and returns how the
layer's KVCore stores and reads its cache.  ``needs_stats(form)`` says whether it wants
calibration statistics (:class:`kvpass.calibrate.KVStats`).
"""

from __future__ import annotations

from . import shared_kv, sparse, window

PASSES = {"shared_kv": shared_kv.apply, "window": window.apply, "sparse": sparse.apply}


def needs_stats(form) -> bool:
    if form.kind == "shared_kv":
        return form.grouping == "similarity" or form.merge == "calibrated"
    return False
