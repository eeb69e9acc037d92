"""KVAttention: kvpass's replacement for an attention module (same call signature, same
parameters), running the module's traced graph with its core swapped for a
:class:`~kvpass.runtime.core.KVCore`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import SiteError
from ..graph import util as gu
from ..graph.capture import Captured, bind_call
from ..graph.sites import AttentionSite
from .cache import find_caches
from .core import KVCore

__all__ = ["KVAttention"]

_LEAVES = (torch.Tensor, int, float, bool, str, type(None))


def _leaf_paths(obj, prefix: str, out: dict) -> bool:
    """``out[path] = leaf`` for every leaf of nested dicts/tuples/lists, each path spelled as
    ``pytree.keystr`` spells it (``['key'][0]``); ~15x cheaper than pytree's walk on a decode
    step.  False if ``obj`` holds anything else (the caller then asks pytree)."""
    t = type(obj)
    if t is dict or isinstance(obj, Mapping):
        return all(_leaf_paths(v, f"{prefix}[{k!r}]", out) for k, v in obj.items())
    if t is tuple or t is list:
        return all(_leaf_paths(v, f"{prefix}[{i}]", out) for i, v in enumerate(obj))
    if isinstance(obj, _LEAVES):
        out[prefix] = obj
        return True
    return False


class KVAttention(nn.Module):
    """kvpass's replacement for an attention module: same call signature, same parameters."""

    def __init__(self, original: nn.Module, gm: fx.GraphModule, cap: Captured, core: KVCore,
                 site: AttentionSite, local: AttentionSite):
        super().__init__()
        for k, val in vars(original).items():
            if not k.startswith("_") and k != "training":
                object.__setattr__(self, k, val)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.kv_core = core
        self._graph = [gm]  # not a registered child: parameters stay under their own names
        self._forward_of = original.forward
        self._paths = cap.input_paths
        self._out_spec = cap.out_spec
        self._writes = cap.writes  # the graph also returns what the module stores into mapping args
        self._consts = dict(zip(cap.input_paths, pytree.tree_leaves(cap.sample)))
        self.site = dataclasses.replace(site, nodes=None)  # the facts, without graph handles
        n = local.nodes  # nodes of our own graph that passes rewire (MHC), by name (deepcopy-safe)
        self._handles = {k: None if v is None else v.name for k, v in (
            ("q", n.q), ("k_pre", n.k_pre), ("v_pre", n.v_pre), ("q_proj", n.q_proj),
            ("k_proj", n.k_proj), ("v_proj", n.v_proj))}
        self.training = original.training

    def forward(self, *args, **kwargs):
        flat = bind_call(self, args, kwargs)
        caches = find_caches(flat)
        flat = {k: (None if any(v is c for c in caches) else v) for k, v in flat.items()}
        got = {}
        if not _leaf_paths(flat, "", got):  # containers beyond dict/tuple/list: pytree's own walk
            got = {pytree.keystr(p): v for p, v in pytree.tree_flatten_with_path(flat)[0]}
        leaves = []
        for path in self._paths:
            sample = self._consts[path]
            if path not in got:
                if isinstance(sample, torch.Tensor):
                    raise SiteError(f"{self.site.name}: call lacks input {path} it was traced with")
                leaves.append(sample)
            else:
                leaves.append(got[path] if isinstance(sample, torch.Tensor) else sample)
        self.kv_core._cache = caches[0] if caches else None
        try:
            out = self._graph[0](*leaves)
        finally:
            self.kv_core._cache = None
        out = pytree.tree_unflatten(list(out), self._out_spec)
        if not self._writes:
            return out
        out, writes = out
        for name, items in writes.items():  # stores into the caller's containers, as the module did
            if items and isinstance(flat.get(name), Mapping):
                flat[name].update(items)
        return out

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._graph[0]

    def handles(self) -> dict[str, fx.Node | None]:
        """The site's nodes in this module's graph: q, k_pre, v_pre and the projections."""
        nodes = {n.name: n for n in self.graph_module.graph.nodes}
        return {k: nodes.get(v) if v is not None else None for k, v in self._handles.items()}

    def core_call(self) -> fx.Node:
        """The graph node calling ``kv_core`` (args: q, k, v, mask)."""
        return next(n for n in self.graph_module.graph.nodes if n.op == "call_module" and n.target == "kv_core")

    def sample_leaves(self) -> list:
        """The graph inputs of the sample call the module was captured with."""
        return [self._consts[p] for p in self._paths]

    def remove_unused_parameters(self) -> list[str]:
        """After a pass cut nodes from the graph: drop children whose parameters nothing reads
        any more.  Returns the removed parameter names."""
        gm = self.graph_module
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        used = {gu.fqn(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        removed = []
        for name, child in list(self.named_children()):
            names = [f"{name}.{p}" for p, _ in child.named_parameters()]
            if name != "kv_core" and names and not any(n in used for n in names):
                delattr(self, name)
                removed += names
        return removed

    def drop_kv_inputs(self) -> list[str]:
        """Stop computing keys/values (a cross-layer consumer): cut them from the graph and
        remove parameters nothing reads any more.  Returns the removed parameter names."""
        call = self.core_call()
        call.args = (call.args[0], None, None, *call.args[3:])
        return self.remove_unused_parameters()


