"""The Python entry points: :func:`optimize` and :func:`kv_bytes_per_token`."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import ensure_layer, find_caches
from .calibrate import LayerFeeder, RecordedCalls, calibration_ids, collect_stats, record_all, run_calls
from .capture import capture, default_example_inputs, run_cache_free
from .errors import KVPassError, SiteError
from .heal import HEAL_DEFAULT_STEPS, heal_block, snapshot
from .lower import CaptureReuse, KVAttention, KVCore, LayerPlan, lower_site, record_calls
from .passes import PASSES, PassContext, mhc, needs_calibration, needs_stats
from .policy import Form, Full, Policy, check_selectors
from .sites import AttentionSite, find_sites_in

__all__ = ["optimize", "retarget", "kv_bytes_per_token", "kv_cache_bytes", "Report"]

VISIBILITY_FORMS = ("full", "window", "sparse", "quantize")  # forms that change no weights
POSITIONAL_FORMS = ("window", "sparse", "quantize", "mhc")  # forms that see keys by token position


def _in_order(forms):
    """Passes run in the policy's order, except Quantize last (it stores what the others keep)."""
    return sorted(forms, key=lambda f: f.kind == "quantize")

IMPLEMENTED = {"full", *PASSES}  # form kinds optimize can lower


@dataclass
class Report:
    """What :func:`optimize` did: sites, forms chosen, counters (like inductor's)."""

    sites: list[AttentionSite]
    forms: dict[str, tuple[Form, ...]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # name -> why left untouched
    counters: dict[str, int] = field(default_factory=dict)
    heal: dict[str, tuple[float, float]] = field(default_factory=dict)  # loss before/after
    removed: dict[str, list[str]] = field(default_factory=dict)  # params dropped (cross-layer, MHC)
    allocation: dict = field(default_factory=dict)  # MHC rank allocation: sensitivities, ranks
    #: modules called once per layer for several layers (ALBERT, recurrent stacks): name -> layers
    shared_modules: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __deepcopy__(self, memo):  # sites hold graph handles: shared, not copied
        return dataclasses.replace(self, forms=dict(self.forms), kept=dict(self.kept),
                                   counters=dict(self.counters), heal=dict(self.heal),
                                   removed=dict(self.removed), allocation=dict(self.allocation),
                                   shared_modules=dict(self.shared_modules))


def optimize(model: nn.Module, policy=None, calibration=None, *, tokenizer=None, heal=False,
             heal_lr: float = 2e-3, example_inputs=None, inplace: bool = False,
             progress: bool = False) -> nn.Module:
    """Rewrite every attention site of ``model`` into the forms ``policy`` asks for.

    ``policy``: a :class:`~kvpass.Policy`, a form, or a list of forms (all layers); default
    ``Full()`` (kvpass's own attention and cache, same results).  ``calibration``: token ids,
    text, a list of texts or a text-file path (text needs ``tokenizer``), or the attention
    modules' recorded inputs (:class:`kvpass.calibrate.RecordedCalls`) — used by passes that
    calibrate and by ``heal`` (``True`` = :data:`kvpass.heal.HEAL_DEFAULT_STEPS` Adam steps per
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
        chosen = _choose(sites, policy, report)
        lowered = {m.site.name: m for m in model.modules() if isinstance(m, KVAttention)}
        for name, forms in chosen.items():
            lowered[name].kv_core.forms = forms
            _count(report, "lowered")
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
        report.shared_modules = _shared_modules(sites, calls.counts)
        chosen = _choose(sites, policy, report)
        lowered = {}
        reuse = CaptureReuse()
        for site in sites:
            if site.name in chosen and site.name not in lowered:
                lowered[site.name] = lower_site(model, site, calls[site.name], chosen[site.name], reuse,
                                                report.shared_modules.get(site.name))
                _count(report, "lowered")
    if not getattr(model, "_kvpass_hook", False):
        model.register_forward_pre_hook(_prepare_caches, with_kwargs=True)
        model.register_forward_hook(_release_steps, with_kwargs=True)
        model._kvpass_hook = True
    model._kvpass = report
    steps = HEAL_DEFAULT_STEPS if heal is True else int(heal or 0)
    lossy = [s for s in sites if s.name in chosen and chosen[s.name] != (Full(),)]
    lossy = [s for i, s in enumerate(lossy) if all(t.name != s.name for t in lossy[:i])]  # one per module
    if not lossy:
        return model
    need = steps > 0 or any(needs_calibration(f) for s in lossy for f in chosen[s.name])
    if isinstance(calibration, RecordedCalls):  # recorded attention inputs (the streaming rewrite)
        if steps or any(f.kind == "mhc" and f.allocate for s in lossy for f in chosen[s.name]):
            raise KVPassError("calibration: recorded calls serve per-layer passes only; healing and "
                              "MHC(allocate=True) run the whole model and need token ids")
        _rewrite_layers(model, source, lossy, chosen, lowered, calibration, (0, heal_lr), report, progress)
        return model
    ids = calibration_ids(calibration, tokenizer) if calibration is not None else None
    if need and ids is None:
        raise KVPassError("this policy calibrates (whitened/aware MHC, MHC refit or allocation, similarity grouping, "
                          "calibrated merge or heal): "
                          "pass calibration=<token ids | text | file> (and tokenizer= for text)")
    _rewrite_layers(model, source, lossy, chosen, lowered, ids, (steps, heal_lr), report, progress)
    return model


def _reusable(model: nn.Module) -> bool:
    """An ``optimize(model)`` result with every layer still ``Full()``: its capture can be reused."""
    report = getattr(model, "_kvpass", None)
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    return (report is not None and bool(mods) and all(s.nodes is not None for s in report.sites)
            and all(m.kv_core.forms == (Full(),) and m.kv_core.plan == LayerPlan()
                    and m.kv_core.latent is None and m.kv_core.producer is None for m in mods)
            and len(mods) == len({s.name for s in report.sites if s.name not in report.kept}))


def _rewrite_layers(model, source, lossy, chosen, lowered, ids, heal, report, progress) -> None:
    """Layer by layer, in order: calibrate, run the passes, set up sharing, heal."""
    steps, lr = heal
    weights = dict(model.named_parameters())
    producers: dict[int, KVCore] = {}
    sharing = _sharing_groups(lossy, chosen)
    names = [s.name for s in lossy]
    ranks = {}
    alloc = {s.name: f for s in lossy for f in chosen[s.name] if f.kind == "mhc" and f.allocate}
    if alloc:
        ranks, report.allocation = mhc.allocate_ranks(model, [s for s in lossy if s.name in alloc], alloc,
                                                      lowered, ids, progress)
    if isinstance(ids, RecordedCalls):
        feeder, ids = ids, None
    else:
        feeder = LayerFeeder(model, names, ids) if ids is not None else None
    originals = record_all(source, names, ids) if steps and source is not None else None
    for site in tqdm(lossy, desc="kvpass: rewriting layers", disable=not progress):
        att = lowered[site.name]
        forms = chosen[site.name]
        wants = steps or any(needs_calibration(f) for f in forms)
        calls = feeder.inputs(site.name) if wants and feeder is not None else None
        teacher = snapshot(att) if steps else None
        stats = None
        if calls is not None and any(needs_stats(f) for f in forms):
            with torch.no_grad(), collect_stats(att.kv_core) as stats:
                run_calls(att, calls)
        ctx = PassContext(weights, stats, calls, ranks, progress=progress)
        for form in _in_order(forms):
            att.kv_core.plan = PASSES[form.kind](att, site, form, ctx)
            _count(report, form.kind)
        if ctx.removed:
            report.removed[site.name] = ctx.removed
        _cross_layer(att, site, producers, sharing, report)
        if steps:
            targets = None
            if originals is not None:  # the original model's own activations at this layer
                with torch.no_grad():
                    targets = run_calls(source.get_submodule(site.name), originals.pop(site.name))
            before, after = heal_block(att, teacher, calls, _trainable(att, site), steps=steps, lr=lr,
                                       desc=f"heal {site.name}", progress=progress, targets=targets)
            report.heal[site.name] = (before, after)
            _count(report, "healed")


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
        if s.positional_problems and any(f.kind in POSITIONAL_FORMS for f in forms):
            raise SiteError("cannot retarget " + "; ".join(s.positional_problems))
    for att in [m for m in model.modules() if isinstance(m, KVAttention)]:
        core, site = att.kv_core, att.site
        forms = policy.forms_for(site.layer, site.name)
        if len({policy.forms_for(i, site.name) for i in core.layers}) > 1:
            raise SiteError(f"{site.name} runs layers {list(core.layers)} with one module (weights shared across "
                            "layers): give them the same forms")
        fixed = [f for f in core.forms if f.kind not in VISIBILITY_FORMS]
        if core.producer is not None or [f for f in forms if f.kind not in VISIBILITY_FORMS] != fixed:
            raise KVPassError(f"{site.name}: retarget changes only {VISIBILITY_FORMS} forms, on layers with "
                              f"their own cache; this layer has {[f.kind for f in core.forms]}, asked "
                              f"{[f.kind for f in forms]}; use optimize() on the original model")
        core.plan = dataclasses.replace(core.plan, window=None, sinks=0, pattern=None, quant=None)
        for form in _in_order(forms):
            if form.kind in VISIBILITY_FORMS and form.kind != "full":
                core.plan = PASSES[form.kind](att, site, form, PassContext(weights))
        core.forms = forms
    return model


def _sharing_groups(lossy: list[AttentionSite], chosen) -> dict[int, int]:
    """Consumer layer -> producer layer for ``cross_layer=k``.

    Layers are paired with the next layers *of the same kind* (window, heads, head_dim), in
    runs of k, so hybrid models (Gemma 3: 5 sliding + 1 global) share within each kind.
    """
    kinds: dict[tuple, list[AttentionSite]] = {}
    for s in lossy:
        k = max((getattr(f, "cross_layer", 1) for f in chosen[s.name]), default=1)
        others = tuple(f for f in chosen[s.name] if f.kind != "shared_kv")  # window, sparse, ...
        if k > 1:
            kinds.setdefault((k, s.window, s.num_heads, s.num_kv_heads, s.head_dim, others), []).append(s)
    out = {}
    for (k, *_), members in kinds.items():
        for i, s in enumerate(members):
            if i % k:
                out[s.layer] = members[i - i % k].layer
    return out


def _cross_layer(att, site, producers, sharing, report) -> None:
    if site.layer not in sharing:
        producers[site.layer] = att.kv_core
        return
    prod = producers[sharing[site.layer]]
    att.kv_core.set_producer(prod)
    att.kv_core.plan = dataclasses.replace(prod.plan, keep=None, head_map=prod.plan.head_map or site.kv_head_map)
    report.removed[site.name] = att.drop_kv_inputs()
    _count(report, "cross_layer")


def _trainable(att: KVAttention, site: AttentionSite) -> list[str]:
    """The layer's projections (relative names); K/V only where the layer still has them."""
    names = dict(att.named_parameters())
    out = []
    for proj in (site.q_proj, site.k_proj, site.v_proj, site.o_proj):
        for full in (proj.weight, proj.bias):
            rel = full[len(site.name) + 1:] if full and full.startswith(site.name + ".") else None
            if rel in names and rel not in out:
                out.append(rel)
    out += [n for n in names if n.startswith("kv_core.latent.")]  # an MHC latent
    return out


def _count(report: Report, key: str) -> None:
    report.counters[key] = report.counters.get(key, 0) + 1


def _shared_modules(sites, counts: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Modules that run one attention core per call and were called once for each of their
    sites (ALBERT's shared layer, recurrent stacks): name -> the layers, in call order."""
    layers: dict[str, list[int]] = {}
    for s in sites:
        layers.setdefault(s.name, []).append(s.layer)
    return {n: tuple(ls) for n, ls in layers.items() if n and len(ls) > 1 and counts.get(n) == len(ls)}


def _choose(sites, policy: Policy, report: Report, check: bool = True) -> dict[str, tuple[Form, ...]]:
    """Forms per site; ``check``: every selector of the policy must match a site (the compile
    backend sees one dynamo graph at a time, where other layers may live in other graphs)."""
    if check:
        check_selectors(policy, [(s.layer, s.name) for s in sites])
    chosen = {}
    cores = {}
    for s in sites:
        cores[s.name] = cores.get(s.name, 0) + 1
    for s in sites:
        forms = policy.forms_for(s.layer, s.name)
        report.forms[s.name] = forms
        lossless = forms == (Full(),)
        shared = report.shared_modules.get(s.name)
        if shared:  # one module called for several layers: one core, the same forms for all
            other = {policy.forms_for(i, s.name) for i in shared}
            if len(other) > 1:
                raise SiteError(f"{s.name} runs layers {list(shared)} with one module (weights shared across "
                                f"layers): give them the same forms (asked: {sorted(map(str, other))})")
            weights = [f.kind for f in forms if f.kind not in VISIBILITY_FORMS]
            if weights:
                raise SiteError(f"cannot rewrite {s.name}: form(s) {weights} change the weights of a module that "
                                f"runs layers {list(shared)} (weights shared across layers); use forms that change "
                                "no weights (Window, Sparse, Quantize) or leave these layers Full()")
            cores[s.name] = 1
        if cores[s.name] > 1:  # one module, several cores in one call
            why = (f"{s.name or '<top>'}: the module runs {cores[s.name]} attention cores in one call; kvpass "
                   "rewrites one core per call of a module")
            if not lossless:
                raise SiteError(f"cannot rewrite {why}. Leave these layers Full() in the policy.")
            report.kept[s.name] = why
            continue
        weights = [f.kind for f in forms if f.kind not in VISIBILITY_FORMS]
        blocking = s.problems if weights else s.core_problems
        if any(f.kind in POSITIONAL_FORMS for f in forms) and not blocking:
            blocking = s.positional_problems
        if blocking and not lossless:
            need = (f"form(s) {weights} change the projection weights, which need the projections "
                    "understood" if weights else "the attention core is not understood")
            raise SiteError("cannot rewrite " + "; ".join(blocking) + f" ({need}). Leave this layer "
                            "Full() in the policy to keep it as it is" +
                            (", or use forms that change no weights (Window, Sparse, Quantize)."
                             if weights and not s.core_problems else "."))
        if blocking or not s.name:
            report.kept[s.name] = "; ".join(blocking) or "no owning module"
            continue
        missing = [f.kind for f in forms if f.kind not in IMPLEMENTED]
        if missing:
            raise KVPassError(f"{s.name}: form(s) {missing} are not implemented in this version; "
                              f"available: {sorted(IMPLEMENTED)}")
        chosen[s.name] = forms
    return chosen


def _prepare_caches(model: nn.Module, args, kwargs):
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


def _release_steps(model: nn.Module, args, kwargs, output) -> None:
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


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """KV-cache bytes one token adds, summed over layers, for an optimised or plain model.

    For a plain model the original layout (2·Hkv·D values per layer) is assumed.  Windowed
    and block-local layers add this only until their ring is full: see :func:`kv_cache_bytes`.
    """
    mods, others, dtype, size = _layers(model, dtype)
    return (sum(m.kv_core.bytes_per_token(dtype) * len(m.kv_core.layers) for m in mods)
            + sum(s.kv_values_per_token() * size for s in others))


def _layers(model: nn.Module, dtype: torch.dtype | None):
    """(kvpass attention modules, sites left as the model had them, dtype, its element size)."""
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    report = getattr(model, "_kvpass", None)
    dtype = dtype or next(model.parameters()).dtype
    lowered = {m.site.name for m in mods}
    sites = report.sites if report is not None else find_sites_in(capture(model))
    return mods, [s for s in sites if s.name not in lowered], dtype, torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(model: nn.Module, tokens: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
    """Bytes of the KV cache after ``tokens`` tokens (per the layers' layouts: rings stop
    growing at their capacity; a model's own sliding layers keep ``window - 1`` tokens).

    Example:
        >>> import kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.Window(size=8, sinks=2))
        >>> kvpass.kv_cache_bytes(m, 1000) == kvpass.kv_cache_bytes(m, 10)  # 10 slots per layer
        True
    """
    mods, others, dtype, size = _layers(model, dtype)
    total = 0
    for m in mods:
        n = tokens if m.site.window is None or m.kv_core.plan.positional else min(tokens, m.site.window - 1)
        total += m.kv_core.cache_bytes(n, dtype, batch) * len(m.kv_core.layers)
    for s in others:
        n = tokens if s.window is None else min(tokens, s.window - 1)
        total += batch * n * s.kv_values_per_token() * size
    return total
