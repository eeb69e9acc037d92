"""Model hooks that keep HF caches in kvpass's layouts: before a forward, kvpass layers are swapped
into the caches handed to the model (e.g. by ``generate``); after it, what each step kept is
released.
"""

from __future__ import annotations

from torch import nn

from .attention import KVAttention
from .cache import ensure_layer, find_caches

__all__ = ["prepare_caches", "release_steps"]


def prepare_caches(model: nn.Module, args, kwargs):
    """Swap kvpass layers into caches handed to the model (e.g. by ``generate``)."""
    caches = find_caches(kwargs)
    if not caches:
        return
    report = getattr(model, "_kvpass", None)
    known = model.__dict__.get("_kvpass_cores")  # modules change only when optimize reports anew
    if known is None or known[0] is not report:
        known = (report, [m.kv_core for m in model.modules() if isinstance(m, KVAttention)])
        model.__dict__["_kvpass_cores"] = known
    cores = known[1]
    plans = tuple(c.plan for c in cores)  # the objects, not their ids (an id can be reused)
    for cache in caches:
        if getattr(cache, "_kvpass_prepared", None) == (id(model), tuple(cache.layers), plans):
            continue  # prepared by this model, plans and layers unchanged: a decode step
        for c in sorted(cores, key=lambda c: c.producer is not None):
            for layer in c.layers:
                ensure_layer(cache, layer, None if c.producer is None else c.producer.layer_idx, ring=c.ring(),
                             quant=c.plan.quant)
        cache.__dict__.pop("_kvpass_calls", None)  # a new cache or new plans: shared modules start over
        cache._kvpass_prepared = (id(model), tuple(cache.layers), plans)


def release_steps(model: nn.Module, args, kwargs, output) -> None:
    """After a forward, drop what each kvpass core and cache layer kept of this step (its full
    keys/values, for cross-layer consumers within the forward): held on, a long prefill stayed
    resident until the next step, far beyond a window's ring."""
    for m in model.modules():
        if isinstance(m, KVAttention):
            m.kv_core._last = None
    caches = find_caches(kwargs)
    out = getattr(output, "past_key_values", None)
    if out is not None and all(out is not c for c in caches):
        caches.append(out)
    for cache in caches:
        for layer in getattr(cache, "layers", ()):
            for kept in ("step", "last_positions"):  # both set anew by the next update
                if getattr(layer, kept, None) is not None:
                    setattr(layer, kept, None)


