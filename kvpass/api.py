"""The Python entry points: :func:`optimize` and :func:`kv_bytes_per_token`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache import ensure_layer, find_caches
from .capture import capture, default_example_inputs
from .errors import KVPassError, SiteError
from .lower import KVAttention, lower_site, record_calls
from .policy import Form, Full, Policy
from .sites import AttentionSite, find_sites_in

__all__ = ["optimize", "kv_bytes_per_token", "Report"]

IMPLEMENTED = {"full"}


@dataclass
class Report:
    """What :func:`optimize` did: sites, forms chosen, counters (like inductor's)."""

    sites: list[AttentionSite]
    forms: dict[str, tuple[Form, ...]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # name -> why left untouched
    counters: dict[str, int] = field(default_factory=dict)


def optimize(model: nn.Module, policy=None, calibration=None, *, example_inputs=None,
             inplace: bool = False) -> nn.Module:
    """Rewrite every attention site of ``model`` into the forms ``policy`` asks for.

    ``policy``: a :class:`~kvpass.Policy`, a form, or a list of forms (all layers); default
    ``Full()`` (kvpass's own attention and cache, same results).  The model is copied first
    unless ``inplace=True``: the source is never modified.  The result works with HF
    ``generate()``; ``model._kvpass`` holds a :class:`Report`.

    Example:
        >>> import torch, kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> fast = kvpass.optimize(model, kvpass.Full())
        >>> ids = torch.tensor([[1, 2, 3, 4]])
        >>> bool((fast(ids).logits - model(ids).logits).abs().max() < 1e-5)
        True
        >>> kvpass.kv_bytes_per_token(fast)   # 2 layers x 2 (K,V) x 2 heads x 8 dims x 4 bytes
        256
    """
    policy = Policy.of(Full() if policy is None else policy)
    if calibration is not None:
        raise KVPassError("calibration: no lossy form is available in this version; nothing to calibrate")
    if not inplace:
        model = copy.deepcopy(model)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    sites = find_sites_in(capture(model, example_inputs))
    if not sites:
        raise SiteError(f"{type(model).__name__}: no attention found in the traced graph")
    report = Report(sites)
    chosen = _choose(sites, policy, report)
    calls = record_calls(model, list(chosen), lambda: _run(model, example_inputs))
    for site in sites:
        if site.name in chosen:
            lower_site(model, site, calls[site.name], chosen[site.name])
            report.counters["lowered"] = report.counters.get("lowered", 0) + 1
    model._kvpass = report
    if not getattr(model, "_kvpass_hook", False):
        model.register_forward_pre_hook(_prepare_caches, with_kwargs=True)
        model._kvpass_hook = True
    return model


def _choose(sites, policy: Policy, report: Report) -> dict[str, tuple[Form, ...]]:
    chosen = {}
    for s in sites:
        forms = policy.forms_for(s.layer, s.name)
        report.forms[s.name] = forms
        lossless = forms == (Full(),)
        if s.problems and not lossless:
            raise SiteError("cannot rewrite " + "; ".join(s.problems) +
                            ". Leave this layer Full() in the policy to keep it as it is.")
        if s.problems or not s.name:
            report.kept[s.name] = "; ".join(s.problems) or "no owning module"
            continue
        missing = [f.kind for f in forms if f.kind not in IMPLEMENTED]
        if missing:
            raise KVPassError(f"{s.name}: form(s) {missing} are not implemented in this version; "
                              f"available: {sorted(IMPLEMENTED)}")
        if s.name in chosen:
            raise SiteError(f"{s.name}: holds more than one attention core; not supported")
        chosen[s.name] = forms
    return chosen


def _run(model: nn.Module, example_inputs) -> None:
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
        if "use_cache" in _params(model):
            kwargs.setdefault("use_cache", False)
        model(**kwargs)
    elif isinstance(example_inputs, torch.Tensor):
        model(example_inputs)
    else:
        model(*example_inputs)


def _params(model: nn.Module):
    import inspect

    return inspect.signature(model.forward).parameters


def _prepare_caches(model: nn.Module, args, kwargs):
    """Swap kvpass layers into caches handed to the model (e.g. by ``generate``)."""
    layers = [m.kv_core.layer_idx for m in model.modules() if isinstance(m, KVAttention)]
    for cache in find_caches(kwargs):
        for i in layers:
            ensure_layer(cache, i)


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """KV-cache bytes one token adds, summed over layers, for an optimised or plain model.

    For a plain model the original layout (2·Hkv·D values per layer) is assumed.
    """
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    report = getattr(model, "_kvpass", None)
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    total = sum(m.kv_core.bytes_per_token(dtype) for m in mods)
    lowered = {m.site.name for m in mods}
    sites = report.sites if report is not None else find_sites_in(capture(model))
    total += sum(s.kv_values_per_token() * size for s in sites if s.name not in lowered)
    return total
