"""The per-layer driver: which forms each site gets (:func:`choose`), and the loop that calibrates,
runs the passes, sets up cross-layer sharing and heals, layer by layer (:func:`rewrite_layers`).
:func:`kvpass.optimize`, the compile backend and the streaming rewrite all run it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import SiteError
from ..graph.sites import AttentionSite
from ..ir.forms import Form, Full
from ..ir.policy import Policy, check_selectors
from ..runtime.attention import KVAttention
from ..runtime.core import KVCore
from .calibrate import collect_stats, run_calls
from .heal import snapshot
from .passes import PassContext
from .registry import changes_weights, entry, in_order, needs_calibration, needs_stats, traits


def rewrite_layers(jobs, weights: dict, report: Report, *, inputs=None, ranks=None, healer=None,
                   progress: bool = False) -> None:
    """The per-layer loop, in layer order: calibrate, run the passes, set up sharing, heal.

    ``jobs``: ``(site, att, forms)`` per rewritten layer, where ``att`` is what a pass sees of
    the layer (a :class:`~kvpass.runtime.attention.KVAttention`, or the compile backend's view of
    a layer inside a whole-model graph); ``weights``: the parameters passes may edit, by name;
    ``inputs(site)``: the layer's calibration calls, asked for only when a form calibrates or
    ``healer`` is set, and only once the layers before it are rewritten (None: no calibration);
    ``ranks``: choices made for the whole model first (MHC rank allocation); ``healer(site,
    att, teacher, calls)``: trains the rewritten layer (``teacher``: its snapshot before the
    passes) and returns (loss before, after).  Counters and removed parameters go to ``report``.
    """
    jobs = list(jobs)
    producers: dict[int, KVCore] = {}
    sharing = sharing_groups([site for site, _, _ in jobs], {site.name: forms for site, _, forms in jobs})
    for site, att, forms in tqdm(jobs, desc="kvpass: rewriting layers", disable=not progress):
        wants = healer is not None or any(needs_calibration(f) for f in forms)
        calls = inputs(site) if wants and inputs is not None else None
        teacher = snapshot(att) if healer is not None else None
        stats = None
        if calls is not None and any(needs_stats(f) for f in forms):
            with torch.no_grad(), collect_stats(att.kv_core) as stats:
                run_calls(att, calls)
        ctx = PassContext(weights, stats, calls, ranks or {}, progress=progress)
        for form in in_order(forms):
            apply = entry(form).apply
            if apply is not None:
                att.kv_core.plan = apply(att, site, form, ctx)
                count(report, form.kind)
        if ctx.removed:
            report.removed[site.name] = ctx.removed
        cross_layer(att, site, producers, sharing, report)
        if healer is not None:
            report.heal[site.name] = healer(site, att, teacher, calls)
            count(report, "healed")


def sharing_groups(lossy: list[AttentionSite], chosen) -> dict[int, int]:
    """Consumer layer -> producer layer for ``cross_layer=k``.

    Layers are paired with the next layers *of the same kind* (window, heads, head_dim), in
    runs of k, so hybrid models (Gemma 3: 5 sliding + 1 global) share within each kind.
    """
    kinds: dict[tuple, list[AttentionSite]] = {}
    for s in lossy:
        k = max((getattr(f, "cross_layer", 1) for f in chosen[s.name]), default=1)
        others = tuple(f for f in chosen[s.name] if not changes_weights(f))  # window, sparse, ...
        if k > 1:
            kinds.setdefault((k, s.window, s.num_heads, s.num_kv_heads, s.head_dim, others), []).append(s)
    out = {}
    for (k, *_), members in kinds.items():
        for i, s in enumerate(members):
            if i % k:
                out[s.layer] = members[i - i % k].layer
    return out


def cross_layer(att, site, producers, sharing, report) -> None:
    if site.layer not in sharing:
        producers[site.layer] = att.kv_core
        return
    prod = producers[sharing[site.layer]]
    att.kv_core.set_producer(prod)
    att.kv_core.plan = dataclasses.replace(prod.plan, keep=None, head_map=prod.plan.head_map or site.kv_head_map)
    report.removed[site.name] = att.drop_kv_inputs()
    count(report, "cross_layer")


def trainable(att: KVAttention, site: AttentionSite) -> list[str]:
    """The layer's projections (relative names); K/V only where the layer still has them."""
    names = dict(att.named_parameters())
    out = []
    for proj in (site.q_proj, site.k_proj, site.v_proj, site.o_proj):
        for full in (proj.weight, proj.bias):
            rel = full[len(site.name) + 1:] if full and full.startswith(site.name + ".") else None
            if rel in names and rel not in out:
                out.append(rel)
    out += [n for n in names if n.startswith("kv_core.latent.")]  # an MHC latent
    out += [n for n in names if n == "kv_core.sink_logits"]  # Window(sink="logit")
    return out


def count(report: Report, key: str) -> None:
    report.counters[key] = report.counters.get(key, 0) + 1


def shared_modules_of(sites, counts: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Modules that run one attention core per call and were called once for each of their
    sites (ALBERT's shared layer, recurrent stacks): name -> the layers, in call order."""
    layers: dict[str, list[int]] = {}
    for s in sites:
        layers.setdefault(s.name, []).append(s.layer)
    return {n: tuple(ls) for n, ls in layers.items() if n and len(ls) > 1 and counts.get(n) == len(ls)}


def choose(sites, policy: Policy, report: Report, check: bool = True) -> dict[str, tuple[Form, ...]]:
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
            weights = [f.kind for f in forms if changes_weights(f)]
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
        weights = [f.kind for f in forms if changes_weights(f)]
        blocking = s.problems if weights else s.core_problems
        if any(traits(f).positional for f in forms) and not blocking:
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
        for f in forms:
            entry(f)  # a form no pass lowers: a clear error
        chosen[s.name] = forms
    return chosen


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


