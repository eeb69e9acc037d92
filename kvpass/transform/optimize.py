"""The Python entry points: :func:`optimize` (capture, find, lower, then the per-layer driver) and
:func:`retarget` (new visibility forms for an optimised model, without capturing again)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..errors import KVPassError, SiteError
from ..graph.capture import capture, default_example_inputs, run_cache_free
from ..graph.sites import find_sites_in
from ..ir.forms import Full
from ..ir.plan import LayerPlan
from ..ir.policy import Policy, check_selectors
from ..runtime.attention import KVAttention
from ..runtime.hooks import prepare_caches, release_steps
from .calibrate import LayerFeeder, RecordedCalls, calibration_ids, record_all, run_calls
from .driver import Report, choose, count, rewrite_layers, shared_modules_of, trainable
from .heal import HEAL_DEFAULT_STEPS, heal_block
from .lower import CaptureReuse, lower_site, record_calls
from .passes import PassContext, mhc
from .registry import calibration_shape, changes_weights, entry, in_order, needs_calibration, traits

__all__ = ["optimize", "retarget"]


def optimize(model: nn.Module, policy=None, calibration=None, *, tokenizer=None, heal=False,
             heal_lr: float = 2e-3, example_inputs=None, inplace: bool = False,
             progress: bool = False) -> nn.Module:
    """Rewrite every attention site of ``model`` into the forms ``policy`` asks for.

    ``policy``: a :class:`~kvpass.Policy`, a form, or a list of forms (all layers); default
    ``Full()`` (kvpass's own attention and cache, same results).  ``calibration``: token ids,
    text, a list of texts or a text-file path (text needs ``tokenizer``), or the attention
    modules' recorded inputs (:class:`kvpass.transform.calibrate.RecordedCalls`) — used by passes that
    calibrate and by ``heal`` (``True`` = :data:`kvpass.transform.heal.HEAL_DEFAULT_STEPS` Adam steps per
    layer, or an int; ``heal_lr`` its Adam learning rate).  Layers are calibrated and healed in
    order, each on the outputs of the already rewritten layers before it.  The model is copied
    first unless ``inplace=True``: the source is never modified.  The result works with HF
    ``generate()``; ``model._kvpass`` holds a :class:`Report`.  Given a model that
    ``optimize(model)`` (all ``Full()``) returned, the capture is reused (no new trace): the
    cheap way to try several policies on one model.

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
    source = None if inplace else model
    reuse = _reusable(model)
    if not inplace:
        model = copy.deepcopy(model)
    if reuse:  # already lowered as Full(): re-plan without capturing again
        sites = model._kvpass.sites
        report = Report(sites, shared_modules=dict(model._kvpass.shared_modules))
        chosen = choose(sites, policy, report)
        lowered = {m.site.name: m for m in model.modules() if isinstance(m, KVAttention)}
        for name, forms in chosen.items():
            lowered[name].kv_core.forms = forms
            count(report, "lowered")
    else:
        if example_inputs is None:
            example_inputs = default_example_inputs(model)
        sites = find_sites_in(capture(model, example_inputs))
        if not sites:
            why = getattr(sites, "passed", [])
            raise SiteError(f"{type(model).__name__}: no attention found in the traced graph" +
                            (f" ({len(why)} softmax node(s) passed over; first: {why[0]})" if why else
                             " (no SDPA call and no softmax)"))
        report = Report(sites)
        names = list(dict.fromkeys(s.name for s in sites if s.name))
        calls = record_calls(model, names, lambda: run_cache_free(model, example_inputs))
        report.shared_modules = shared_modules_of(sites, calls.counts)
        chosen = choose(sites, policy, report)
        lowered = {}
        reuse = CaptureReuse()
        for site in sites:
            if site.name in chosen and site.name not in lowered:
                lowered[site.name] = lower_site(model, site, calls[site.name], chosen[site.name], reuse,
                                                report.shared_modules.get(site.name))
                count(report, "lowered")
    if not getattr(model, "_kvpass_hook", False):
        model.register_forward_pre_hook(prepare_caches, with_kwargs=True)
        model.register_forward_hook(release_steps, with_kwargs=True)
        model._kvpass_hook = True
    model._kvpass = report
    steps = HEAL_DEFAULT_STEPS if heal is True else int(heal or 0)
    lossy = [s for s in sites if s.name in chosen and chosen[s.name] != (Full(),)]
    lossy = [s for i, s in enumerate(lossy) if all(t.name != s.name for t in lossy[:i])]  # one per module
    if not lossy:
        return model
    need = steps > 0 or any(needs_calibration(f) for s in lossy for f in chosen[s.name])
    if isinstance(calibration, RecordedCalls):  # recorded attention inputs (the streaming rewrite)
        if steps or any(getattr(f, "allocate", False) for s in lossy for f in chosen[s.name]):
            raise KVPassError("calibration: recorded calls serve per-layer passes only; healing and "
                              "MHC(allocate=True) run the whole model and need token ids")
        _rewrite_model(model, source, lossy, chosen, lowered, calibration, (0, heal_lr), report, progress)
        return model
    length, n_seq = calibration_shape(f for s in lossy for f in chosen[s.name])
    ids = calibration_ids(calibration, tokenizer, length=length, max_chunks=n_seq) if calibration is not None else None
    if need and ids is None:
        raise KVPassError("this policy calibrates (whitened/aware MHC, MHC refit or allocation, similarity grouping, "
                          "calibrated merge or heal): "
                          "pass calibration=<token ids | text | file> (and tokenizer= for text)")
    _rewrite_model(model, source, lossy, chosen, lowered, ids, (steps, heal_lr), report, progress)
    return model


def _rewrite_model(model, source, lossy, chosen, lowered, ids, heal, report, progress) -> None:
    """Set up what the per-layer driver needs for a whole model (its calibration inputs layer by
    layer, MHC rank allocation, healing against the source's own activations) and run it."""
    steps, lr = heal
    names = [s.name for s in lossy]
    ranks = {}
    alloc = {s.name: f for s in lossy for f in chosen[s.name] if getattr(f, "allocate", False)}
    if alloc:
        ranks, report.allocation = mhc.allocate_ranks(model, [s for s in lossy if s.name in alloc], alloc,
                                                      lowered, ids, progress)
    if isinstance(ids, RecordedCalls):
        feeder, ids = ids, None
    else:
        feeder = LayerFeeder(model, names, ids) if ids is not None else None
    originals = record_all(source, names, ids) if steps and source is not None else None

    def healer(site, att, teacher, calls):
        targets = None
        if originals is not None:  # the original model's own activations at this layer
            with torch.no_grad():
                targets = run_calls(source.get_submodule(site.name), originals.pop(site.name))
        return heal_block(att, teacher, calls, trainable(att, site), steps=steps, lr=lr,
                          desc=f"heal {site.name}", progress=progress, targets=targets)

    rewrite_layers([(s, lowered[s.name], chosen[s.name]) for s in lossy], dict(model.named_parameters()), report,
                   inputs=None if feeder is None else (lambda site: feeder.inputs(site.name)), ranks=ranks,
                   healer=healer if steps else None, progress=progress)


def _reusable(model: nn.Module) -> bool:
    """An ``optimize(model)`` result with every layer still ``Full()``: its capture can be reused."""
    report = getattr(model, "_kvpass", None)
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    return (report is not None and bool(mods) and all(s.nodes is not None for s in report.sites)
            and all(m.kv_core.forms == (Full(),) and m.kv_core.plan == LayerPlan()
                    and m.kv_core.latent is None and m.kv_core.producer is None for m in mods)
            and len(mods) == len({s.name for s in report.sites if s.name not in report.kept}))


def retarget(model: nn.Module, policy) -> nn.Module:
    """Give an optimised model other *visibility* forms in place, without capturing again.

    Only forms that change no weights (``Full``, ``Window``, ``Sparse``, ``Quantize``), on
    layers whose other forms (heads, sharing, latents) stay as they are; what results equals
    ``optimize(original, policy)``.  Cheap
    (no trace): for sweeping windows and patterns over one model.  Caches made before are not
    valid afterwards.

    Example:
        >>> import kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval())
        >>> kvpass.kv_cache_bytes(kvpass.retarget(m, kvpass.Window(8, sinks=2)), 100)  # 10 slots
        2720
    """
    policy = Policy.of(policy)
    weights = dict(model.named_parameters())
    report = getattr(model, "_kvpass", None)
    if report is not None:
        check_selectors(policy, [(s.layer, s.name) for s in report.sites])
    for s in report.sites if report is not None else []:
        forms = policy.forms_for(s.layer, s.name)
        if s.name in report.kept and forms != (Full(),):
            raise SiteError(f"cannot retarget {s.name or '<top>'}: it was kept as the model has it "
                            f"({report.kept[s.name]}); leave it Full() in the policy")
        if s.positional_problems and any(traits(f).positional for f in forms):
            raise SiteError("cannot retarget " + "; ".join(s.positional_problems))
    for att in [m for m in model.modules() if isinstance(m, KVAttention)]:
        core, site = att.kv_core, att.site
        forms = policy.forms_for(site.layer, site.name)
        if len({policy.forms_for(i, site.name) for i in core.layers}) > 1:
            raise SiteError(f"{site.name} runs layers {list(core.layers)} with one module (weights shared across "
                            "layers): give them the same forms")
        fixed = [f for f in core.forms if changes_weights(f)]
        if core.producer is not None or [f for f in forms if changes_weights(f)] != fixed:
            raise KVPassError(f"{site.name}: retarget changes only forms that change no weights (Full, Window, Sparse, "
                              "Quantize), on layers with "
                              f"their own cache; this layer has {[f.kind for f in core.forms]}, asked "
                              f"{[f.kind for f in forms]}; use optimize() on the original model")
        core.plan = dataclasses.replace(core.plan, window=None, sinks=0, pattern=None, quant=None)
        for form in in_order(forms):
            apply = entry(form).apply
            if not changes_weights(form) and apply is not None:
                core.plan = apply(att, site, form, PassContext(weights))
        core.forms = forms
    return model


