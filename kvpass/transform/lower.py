"""Lowering: swap each attention site's owning module for a :class:`KVAttention`.

The owning module's own call is captured (``torch.export`` of that module with the inputs
it received in a sample forward), its attention core found again in that graph, and replaced
by a :class:`KVCore` node that receives ``q``, ``k_pre`` and ``v_pre`` (keys/values before head
repetition) and the raw mask.  Everything else of the module — projections, norms, RoPE,
output projection, anything model-specific — runs as traced.  The KVCore owns the cache
traffic and calls the form's attention (the reference on CPU, generated kernels on GPU).

:class:`KVAttention` adopts the original module's children and parameters under the same
names, so ``state_dict`` keys and ``save_pretrained`` are unchanged.

Capturing is the cost of lowering (``torch.export`` of one attention module: ~0.5 s; 30 layers
of SmolLM2 were 15 of optimize's 23 s).  A layer whose traced code is the same as an earlier
layer's reuses that layer's capture with its own parameters bound in (:class:`CaptureReuse`).
"The same" is decided on the *whole model's* graph, which traced every layer: the nodes the
two modules ran (from ``nn_module_stack``) must be the same ops with the same literal
arguments and the same dataflow, reading the same-named parameters of each module and no
tensor constants, and the two calls must have the same keys, tensor dtypes/shapes and
non-tensor values.  Python branches on a layer's attributes (a per-layer scale, a window
flag) show up as different ops or literals there, so such layers are captured on their own.
The reused graph is then run on the layer's own call and must reproduce the module's output,
else the layer is captured after all.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import SiteError
from ..graph.capture import Captured, bind_call, capture_call, sample_env
from ..graph.sites import AttentionSite, find_sites_in
from ..ir.forms import Form
from ..ir.plan import CoreSpec
from ..runtime.attention import KVAttention
from ..runtime.cache import find_caches
from ..runtime.core import KVCore, stride_order

__all__ = ["lower_site", "record_calls", "replace_cores", "CaptureReuse"]
























def record_calls(model: nn.Module, names: list[str], run) -> dict[str, dict]:
    """Run ``run()`` once and record the flat keyword call of each named module (its first
    call); ``calls.counts[name]``: how many times the forward called it."""
    calls = _Calls()
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m, args, kwargs, name=name):
            calls.counts[name] = calls.counts.get(name, 0) + 1
            if name not in calls:
                flat = bind_call(m, args, kwargs)
                cs = find_caches(flat)
                # mapping arguments as they are at this call (later layers may store into them)
                calls[name] = {k: (None if any(v is c for c in cs) else dict(v) if isinstance(v, Mapping) else v)
                               for k, v in flat.items()}

        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return calls


class _Calls(dict):
    """Recorded calls by module name, with ``counts``: calls per module in one forward."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}


class _NoReuse(Exception):
    pass


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(m.named_parameters(remove_duplicate=False), m.named_buffers(remove_duplicate=False)))


def _fetch(gm: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), gm)


class CaptureReuse:
    """Captures of attention modules by the signature of their traced code (module
    docstring), for :func:`lower_site` to reuse across layers.  ``hits`` counts reuses."""

    def __init__(self):
        self._by_sig: dict = {}
        self.hits = 0

    @staticmethod
    def signature(site: AttentionSite, original: nn.Module, call: dict):
        """What decides that two layers trace the same graph (None: cannot tell, capture)."""
        nodes = site.nodes
        if nodes is None or nodes.captured is None:
            return None
        gm = nodes.captured.module
        own = {id(t): k for k, t in _tensors(original).items()}

        def inside(n):
            stack = n.meta.get("nn_module_stack")
            if not stack:
                return False
            path = str(list(stack.values())[-1][0]).removeprefix("kvroot.")
            return path == site.name or path.startswith(site.name + ".")

        body = [n for n in gm.graph.nodes if n.op == "call_function" and inside(n)]
        index = {n: i for i, n in enumerate(body)}
        ext: dict = {}

        def norm(a):
            if isinstance(a, fx.Node):
                if a in index:
                    return ("in", index[a])
                if a.op == "get_attr":
                    name = own.get(id(_fetch(gm, a.target)))
                    if name is None:  # a tensor constant or another module's tensor
                        raise _NoReuse
                    return ("param", name)
                return ("ext", ext.setdefault(a, len(ext)))
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, tuple(norm(x) for x in a))
            if isinstance(a, dict):
                return ("dict", tuple((k, norm(v)) for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))))
            if isinstance(a, torch.Tensor):
                raise _NoReuse
            return ("lit", type(a).__name__, repr(a))

        def arg(v):
            if isinstance(v, torch.Tensor):
                return ("t", str(v.dtype), tuple(v.shape))
            if isinstance(v, (int, float, bool, str, type(None))):
                return ("v", repr(v))
            if isinstance(v, (list, tuple)):
                return (type(v).__name__, tuple(arg(x) for x in v))
            if isinstance(v, dict):
                return ("dict", tuple((str(k), arg(x)) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))))
            raise _NoReuse

        try:
            code = tuple((str(n.target), norm(n.args), norm(n.kwargs)) for n in body)
            inputs = tuple((k, arg(v)) for k, v in sorted(call.items()))
        except _NoReuse:
            return None
        if not body:
            return None
        return type(original), inputs, code

    def lookup(self, sig, original: nn.Module, call: dict) -> Captured | None:
        """A capture of ``original(**call)`` from an earlier layer of signature ``sig``."""
        hit = self._by_sig.get(sig) if sig is not None else None
        if hit is None or any(isinstance(v, Mapping) for v in call.values()):
            return None  # (a call with state containers: the check below would store into them)
        pristine, first, paths, out_spec = hit
        rel = {id(t): k for k, t in _tensors(first).items()}
        mine = _tensors(original)
        memo = {}
        for t in _tensors(pristine).values():
            k = rel.get(id(t))
            if k is None or k not in mine or mine[k].shape != t.shape or mine[k].dtype != t.dtype:
                return None
            memo[id(t)] = mine[k]
        leaves_with_paths, _ = pytree.tree_flatten_with_path(call)
        if [pytree.keystr(p) for p, _ in leaves_with_paths] != paths:
            return None
        gm = copy.deepcopy(pristine, memo)
        leaves = [v for _, v in leaves_with_paths]
        cap = Captured(gm, paths, out_spec, sample=call)
        try:
            with torch.no_grad():
                cap.env = sample_env(gm, leaves)
                want = pytree.tree_leaves(original(**call))
            got = pytree.tree_leaves(pytree.tree_unflatten(list(gm(*leaves)), out_spec))
        except Exception:  # noqa: BLE001 - anything odd: capture this layer on its own
            return None
        same = len(got) == len(want) and all(
            (torch.allclose(a, b, atol=1e-6, rtol=1e-5) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
             and a.shape == b.shape else a is None and b is None) for a, b in zip(got, want))
        if not same:
            return None
        self.hits += 1
        return cap

    def store(self, sig, original: nn.Module, cap: Captured) -> None:
        if sig is None or sig in self._by_sig:
            return
        memo = {id(t): t for t in _tensors(cap.module).values()}  # parameters shared, not copied
        self._by_sig[sig] = (copy.deepcopy(cap.module, memo), original, list(cap.input_paths), cap.out_spec)


def lower_site(model: nn.Module, site: AttentionSite, call: dict, forms: tuple[Form, ...],
               reuse: CaptureReuse | None = None, layers: tuple[int, ...] | None = None) -> KVAttention:
    """Capture the site's owning module, swap its core for a KVCore, install the result.
    ``reuse``: captures shared across layers that trace the same code (module docstring).
    ``layers``: the layers a module called once per layer runs (default: the site's own)."""
    original = model.get_submodule(site.name)
    sig = reuse.signature(site, original, call) if reuse is not None else None
    cap = reuse.lookup(sig, original, call) if sig is not None else None
    if cap is None:
        with torch.no_grad():
            cap = capture_call(original, call)
        if reuse is not None:
            reuse.store(sig, original, cap)
    found = find_sites_in(cap, probe_windows=False)
    if len(found) != 1:
        why = getattr(found, "passed", [])
        raise SiteError(f"{site.name}: expected one attention core in the module's own graph, "
                        f"found {len(found)}" + (f" (passed over: {why[0]})" if why else ""))
    local = found[0]
    core = KVCore(CoreSpec.of(local), forms, site.layer)
    core.layers = tuple(layers or (site.layer,))
    gm = _rewrite(cap, local, core)
    new = KVAttention(original, gm, cap, core, site, local)
    parent, _, leaf = site.name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return new


def _rewrite(cap: Captured, site: AttentionSite, core: KVCore) -> fx.GraphModule:
    return replace_cores(cap, [(site, core, "kv_core")])


def replace_cores(cap: Captured, swaps: list[tuple[AttentionSite, KVCore, str]]) -> fx.GraphModule:
    """Replace each site's attention core in ``cap``'s graph by a call of its KVCore
    (registered as submodule ``name``) on ``(q, k_pre, v_pre, mask)``; returns the module."""
    gm = cap.module
    g = gm.graph
    for site, core, name in swaps:
        n = site.nodes
        gm.add_submodule(name, core)
        val = n.out.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                core.out_order = stride_order(val)
            except Exception:  # noqa: BLE001 - symbolic strides that can't be ordered: leave as is
                core.out_order = None
        with g.inserting_before(n.out):
            sinks = () if n.sinks is None else (n.sinks,)
            new = g.call_module(name, (n.q, n.k_pre, n.v_pre, n.mask, *sinks))
        new.meta = dict(n.out.meta)
        n.out.replace_all_uses_with(new)
        out = g.output_node()
        out.args = fx.node.map_arg(out.args, lambda a, inner=n.inner: None if a in inner else a)
        for node in reversed(list(g.nodes)):  # the old core (DCE keeps SDPA: it may be random)
            if node in n.inner and not node.users:
                g.erase_node(node)
    g.eliminate_dead_code()
    g.lint()
    for node in g.nodes:  # fake-tensor metadata is not needed to run, and can't be deep-copied
        for key in ("val", "example_value", "tensor_meta", "unbacked_bindings"):
            node.meta.pop(key, None)
    gm.recompile()
    return gm
