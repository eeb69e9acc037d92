"""Native exports: checkpoints that stock Hugging Face code loads with no kvpass (fewer
``num_key_value_heads``, a Mistral-style ``sliding_window``).
"""

from __future__ import annotations

import torch

from ..runtime.attention import KVAttention

__all__ = ["native_shared_kv", "native_window", "window_changes", "ITEMSIZE"]

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def native_shared_kv(model) -> tuple[dict, dict] | None:
    """(state_dict, config changes) of a native fewer-KV-heads checkpoint, or None when the
    rewritten model has no such form (see module docstring)."""
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    report = model._kvpass
    if not mods or report.kept or len(mods) != len(report.sites):
        return None
    stored = set()
    drop: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for att in mods:
        core, site = att.kv_core, att.site
        if [f.kind for f in core.forms] != ["shared_kv"] or core.forms[0].cross_layer != 1:
            return None
        plan = core.plan
        keep = plan.keep if plan.keep is not None else tuple(range(site.num_kv_heads))
        H, k = site.num_heads, len(keep)
        head_map = plan.head_map or site.kv_head_map
        if tuple(head_map) != tuple(h * k // H for h in range(H)) or H % k:
            return None
        stored.add(k)
        for proj in (site.k_proj, site.v_proj):
            if proj is None or proj.layout != "separate" or proj.transposed:
                return None
            D = site.head_dim
            rows = torch.tensor([h * D + d for h in keep for d in range(D)])
            for name in (proj.weight, proj.bias):
                if name is not None:
                    drop[name] = state[name].index_select(0, rows).clone()
    if len(stored) != 1 or not hasattr(model.config, "num_key_value_heads"):
        return None
    state.update(drop)
    return state, {"num_key_value_heads": stored.pop()}


def native_window(model) -> tuple[dict, dict] | None:
    """(state_dict, config changes) of a Mistral-style ``sliding_window`` checkpoint for a
    Llama source whose every layer got the same ``Window(size=W, sinks=0)``, else None."""
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    report = model._kvpass
    if not mods or report.kept or len(mods) != len(report.sites):
        return None
    changes = window_changes(model.config.to_dict(), [m.kv_core.forms for m in mods])
    return None if changes is None else (model.state_dict(), changes)


def window_changes(config: dict, layer_forms: list) -> dict | None:
    """Config changes that make a Llama ``config`` whose every layer has the forms
    ``(Window(size=W, sinks=0),)`` a Mistral ``sliding_window=W`` model, else None."""
    if config.get("model_type") != "llama" or config.get("attention_bias") or config.get("mlp_bias"):
        return None
    if not layer_forms or len(set(map(tuple, layer_forms))) != 1:
        return None
    only = tuple(layer_forms[0])
    if len(only) != 1 or only[0].kind != "window" or only[0].sinks != 0 or only[0].sink != "token":
        return None
    return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": only[0].size}


