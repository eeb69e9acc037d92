"""The ``torch.compile`` backend ``"kvpass"``.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="kvpass")`` works in a process that never imported kvpass,
and through :func:`register_backend`.

- On a model already rewritten by :func:`kvpass.optimize`, every attention is one
  ``kvpass::attention`` / ``kvpass::latent_attention`` node in the dynamo graph.  The backend
  counts them (:data:`counters`) and hands the graph to inductor (``options={"inductor":
  False}``: run the captured graph as is).  Inductor keeps each kvpass op as one extern call,
  which dispatches to the generated Triton kernels on CUDA (the reference on CPU).
- On a plain model with ``options={"policy": ...}`` it applies the policy *inside* the dynamo
  graph (:func:`in_graph`): the graph's parameter placeholders are put back at their qualified
  names (read from dynamo's sources), the graph is captured again as kvpass captures models
  (aten ops, symbolic sizes; dynamo's ``nn_module_stack`` carries over, so sites get their
  module names), sites are found there, and each rewritten core becomes a
  :class:`~kvpass.runtime.core.KVCore` with the passes' plans -- the same code path as
  :func:`kvpass.optimize`, so cache-free outputs are equal.  Every form is applied in the
  graph (and compositions), including cross-layer sharing and MHC (the core reads the K/V
  projections' input), except MHC's ``refit`` and ``allocate`` (they train or score the whole
  model).  Forms that calibrate take ``options={"calibration": ids | text, "tokenizer": tok}``
  and run layer by layer on the graph, earlier layers already rewritten, as ``optimize()``
  does; the graph runs at the shape dynamo traced, so the ids are cut into chunks of it (the
  token-id input gets them, a 0/1 mask input ones).  Weights a pass changes are copies (the
  model is never touched).  Counters: ``sites``, ``rewritten``, ``cross_layer`` and one per
  form kind.  Refused with a message pointing to ``kvpass.optimize(model, policy)`` first: a
  graph that reads or fills a KV cache (generation: the compressed cache needs kvpass's cache
  layers), refit/allocate, and calibrated forms without calibration.
  A graph with integer inputs (dynamo's dynamic sizes) is rewritten once per set of sizes.
  Layer indices (per-layer policies, cross-layer pairs) count the attention sites of one
  dynamo graph: a model that dynamo splits between attention layers (graph breaks) numbers
  each piece from 0 -- compile with ``fullgraph=True`` to be sure, or ``optimize()`` first.

Example:
    >>> import torch, kvpass
    >>> register_backend()
    >>> "kvpass" in torch._dynamo.list_backends()
    True
"""

from __future__ import annotations

import collections
import re

import torch
from torch import fx, nn
from torch.fx import traceback as fx_traceback

from ..errors import KVPassError
from ..graph import util as gu
from ..graph.capture import capture_call
from ..graph.sites import AttentionSite, find_sites_in, probe_window
from ..ir.forms import Full
from ..ir.plan import CoreSpec
from ..ir.policy import Policy
from ..runtime.core import KVCore
from ..transform import registry
from ..transform.calibrate import calibration_ids
from ..transform.driver import Report, choose, rewrite_layers
from ..transform.lower import replace_cores
from ..transform.registry import needs_calibration

__all__ = ["kvpass_backend", "register_backend", "counters", "KVPASS_OPS"]

counters: collections.Counter = collections.Counter()
"""``graphs`` compiled, ``attention_ops`` (kvpass attention nodes seen), ``latent_ops``,
``inductor`` (graphs handed to inductor) -- like ``torch._dynamo.utils.counters``."""

KVPASS_OPS = ("kvpass.attention", "kvpass.latent_attention")


def _kvpass_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and
            any(str(n.target).startswith(name) for name in KVPASS_OPS)]


def _attention_like(gm: fx.GraphModule) -> int:
    """Plain attention cores in the graph (SDPA calls, softmax between two matmuls)."""
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function"
            and "scaled_dot_product_attention" in str(n.target)]
    soft = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and "softmax" in str(n.target)]
    return len(sdpa) + len(soft)


def kvpass_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    """Dynamo backend: see the module docstring.  ``options``: ``inductor`` (default True),
    ``policy`` (a :class:`~kvpass.Policy`, a form or a list of forms), ``calibration`` (token
    ids, or text with ``tokenizer``) for forms that calibrate."""
    options = dict(options or {})
    unknown = set(options) - {"inductor", "policy", "calibration", "tokenizer"}
    if unknown:
        raise KVPassError(f"backend='kvpass': unknown options {sorted(unknown)} "
                          "(known: inductor, policy, calibration, tokenizer)")
    nodes = _kvpass_nodes(gm)
    counters["graphs"] += 1
    counters["attention_ops"] += sum("latent" not in str(n.target) for n in nodes)
    counters["latent_ops"] += sum("latent" in str(n.target) for n in nodes)
    policy = options.get("policy")
    if policy is not None and not nodes and _attention_like(gm):
        return in_graph(gm, example_inputs, policy, inductor=options.get("inductor", True),
                        calibration=options.get("calibration"), tokenizer=options.get("tokenizer"))
    if policy is not None and nodes:
        raise KVPassError("backend='kvpass' got a policy for a model kvpass has already rewritten; "
                          "give the policy to one of them: optimize(model, policy) or the backend")
    if not options.get("inductor", True):
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    counters["inductor"] += 1
    return compile_fx(gm, example_inputs)


# -- a policy applied inside the dynamo graph -------------------------------------------------

_SEGMENT = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")
_ROOT = re.compile(r"^L\[[^\]]*\](?:\[\d+\])?\.?")


def _state_name(node: fx.Node, value) -> str | None:
    """``model.layers.0.self_attn.k_proj.weight`` for a placeholder dynamo lifted from a module's
    parameter or buffer (read from the node's source), else None."""
    arg = node.meta.get("grapharg")
    src = getattr(getattr(arg, "source", None), "name", None)
    src = src() if callable(src) else src
    if not isinstance(src, str) or not isinstance(value, torch.Tensor):
        return None
    if "._parameters[" not in src and "._buffers[" not in src:
        return None
    parts = _SEGMENT.findall(src)
    return ".".join(parts) if parts else None


class _Replay(nn.Module):
    """The dynamo graph as a module whose parameters sit at their qualified names: exporting it
    gives kvpass's usual capture (aten ops, ``get_attr`` parameters, symbolic sizes), and the
    dynamo graph's ``nn_module_stack`` carries over (``preserve_node_meta``), so sites are named
    by their modules as in :func:`kvpass.optimize`."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], names: list[str]):
        super().__init__()
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder" and n.name in state:
                env[n] = graph.get_attr(state[n.name][0])
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
            env[n].meta = dict(n.meta)
            stack = n.meta.get("nn_module_stack")
            if stack:
                env[n].meta["nn_module_stack"] = {k: (_ROOT.sub("", p), t) for k, (p, t) in stack.items()}
        for name, value in state.values():
            path, _, leaf = name.rpartition(".")
            owner = self
            for part in path.split(".") if path else []:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if isinstance(value, nn.Parameter):
                owner.register_parameter(leaf, value)
            else:
                owner.register_buffer(leaf, value)
        self._graph = [fx.GraphModule(self, graph)]  # unregistered: the state stays at its names
        self._names = names

    def forward(self, **inputs):
        owner = self

        class Run(fx.Interpreter):  # state read from this module (export swaps in fake tensors)
            def fetch_attr(self, target):
                value = owner
                for part in target.split("."):
                    value = getattr(value, part)
                return value

        with fx_traceback.preserve_node_meta():
            return Run(self._graph[0]).run(*[inputs[n] for n in self._names])


def _reads_or_writes_cache(site: AttentionSite, env: dict) -> str | None:
    """Why the captured attention is part of a KV cache's traffic, or None (cache-free)."""
    n = site.nodes
    q, k = env.get(n.q), env.get(n.k_pre)
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and k.shape[-2] != q.shape[-2]:
        return (f"its keys hold {k.shape[-2]} positions for {q.shape[-2]} queries: the graph reads "
                "a KV cache")
    outputs = set(gu.tensor_args(n.captured.graph.output_node()))
    seen, todo = set(), [n.k_pre, n.v_pre]
    while todo:  # K/V, or a view of them, among the graph's outputs
        cur = todo.pop()
        if cur in outputs:
            return "the graph returns its keys/values (a KV cache is being filled)"
        new = [u for u in cur.users if gu.is_movement(u) and u not in seen]
        seen.update(new)
        todo += new
    return None


def in_graph(gm: fx.GraphModule, example_inputs, policy, *, inductor: bool = True, calibration=None,
             tokenizer=None):
    """The compiled function for a dynamo graph of a plain model with ``policy`` applied.

    The graph's module state is split from its inputs; the rest is rewritten by
    :func:`apply_policy`.  A graph with integer inputs (dynamo's dynamic sizes) is rewritten
    once per distinct set of sizes (export specialises integers).  ``calibration`` (token ids,
    or text with ``tokenizer``) feeds the forms that calibrate."""
    ids = None
    if calibration is not None:
        ids = calibration_ids(calibration, tokenizer)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = {n.name: (name, x) for n, x in zip(phs, example_inputs)
             if (name := _state_name(n, x)) is not None}
    keep = [i for i, n in enumerate(phs) if n.name not in state]  # the inputs that are not state
    names = [phs[i].name for i in keep]
    built: dict[tuple, object] = {}

    def build(inputs: list):
        graph = apply_policy(gm, state, names, inputs, policy, ids)
        if not inductor:
            return graph
        from torch._inductor.compile_fx import compile_fx

        counters["inductor"] += 1
        return compile_fx(graph, inputs)

    def key(inputs):
        return tuple(int(x) for x in inputs if not isinstance(x, torch.Tensor))

    first = [_concrete(example_inputs[i]) for i in keep]
    built[key(first)] = build(first)

    def run(*args):
        inputs = [args[i] for i in keep]
        k = key(inputs)
        if k not in built:
            built[k] = build([_concrete(x) for x in inputs])
        out = built[k](*inputs)
        return tuple(out) if isinstance(out, list) else out

    return run


def _concrete(x):
    return x if isinstance(x, torch.Tensor) else int(x)


def apply_policy(gm: fx.GraphModule, state: dict, names: list[str], inputs: list, policy,
                 calibration: torch.Tensor | None = None) -> fx.GraphModule:
    """Rewrite the attention sites of dynamo graph ``gm`` (a plain model) per ``policy``.

    ``state``: placeholder name -> (qualified name, tensor) for the module's parameters and
    buffers; ``names``/``inputs``: the other placeholders and sample values.  The graph is
    captured again as kvpass captures models (aten ops, parameters as ``get_attr``), sites are
    found in it and each rewritten one's core becomes a :class:`~kvpass.runtime.core.KVCore` with the
    pass plans, exactly as :func:`kvpass.optimize` would (cache-free).  Returns the rewritten
    module over ``inputs``.  Weights a pass changes are copies: the model is never touched.

    Calibration (token ids [N, S]) runs layer by layer as in :func:`kvpass.optimize`: layer i's
    statistics come from the graph with layers before it already rewritten.  The graph runs at
    the shapes dynamo traced it with, so the ids are cut into chunks of that shape.
    """
    policy = Policy.of(policy)
    replay = _Replay(gm, state, names)
    # a capture of its own: the export must not add guards to the frame dynamo is compiling
    with torch.no_grad(), torch._guards.tracing(None), torch._guards.compile_context(None):
        cap = capture_call(replay, dict(zip(names, inputs)))
    sites = find_sites_in(cap)
    _probe_windows(cap, sites, names, inputs)
    report = Report(sites)
    chosen = choose(sites, policy, report, check=False)
    swaps = []
    for i, site in enumerate(sites):
        forms = chosen.get(site.name)
        if forms is None or forms == (Full(),):
            continue
        bad = [f for f in forms if not registry.in_graph(f)]
        if bad:
            raise KVPassError(
                f"{site.name}: backend='kvpass' applies every form inside the graph except MHC rank "
                f"allocation and refit; {bad[0]!r} needs the module itself. Rewrite "
                "first: fast = kvpass.optimize(model, policy, calibration=...); "
                "torch.compile(fast, backend='kvpass')")
        if calibration is None and any(needs_calibration(f) for f in forms):
            raise KVPassError(
                f"{site.name}: {[f for f in forms if needs_calibration(f)][0]!r} calibrates: give "
                "options={'policy': ..., 'calibration': <token ids | text (with 'tokenizer')>}, or "
                "rewrite first: fast = kvpass.optimize(model, policy, calibration=...)")
        why = _reads_or_writes_cache(site, cap.env)
        if why:
            raise KVPassError(
                f"{site.name}: backend='kvpass' cannot apply {list(forms)} in this graph: {why}, and "
                "the policy stores the cache in another layout. Compile a cache-free forward "
                "(use_cache=False), or for generation rewrite first: fast = kvpass.optimize(model, "
                "policy); torch.compile(fast, backend='kvpass')")
        swaps.append((site, KVCore(CoreSpec.of(site), forms, site.layer), f"kv_core_{i}"))
    if not swaps:
        counters["sites"] += len(sites)
        return cap.module
    weights = _copied_weights(cap.module, sites, chosen)
    graph = replace_cores(cap, swaps)
    calls = _calibration_calls(names, inputs, calibration) if calibration is not None else None
    jobs = [(site, _InGraph(graph, site, core, name, inputs, names), core.forms) for site, core, name in swaps]
    # calibration runs the whole graph: taps on each layer's nodes see its inputs, with the
    # layers before it already rewritten
    rewrite_layers(jobs, weights, report, inputs=None if calls is None else (lambda site: calls))
    for key, n in report.counters.items():
        counters[key] += n
    counters["sites"] += len(sites)
    counters["rewritten"] += len(swaps)
    return graph


def _int_inputs(inputs: list) -> list[int]:
    return [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dim() == 2
            and not x.is_floating_point() and x.dtype != torch.bool]


def _token_input(inputs: list) -> int | None:
    """The graph input holding token ids: the 2-D integer input that is not a 0/1 mask (the
    only 2-D integer input, if all are 0/1); None when that is ambiguous."""
    ints = _int_inputs(inputs)
    tokens = [i for i in ints if not bool(((inputs[i] == 0) | (inputs[i] == 1)).all())] or ints[:1]
    return tokens[0] if len(tokens) == 1 else None


def _probe_windows(cap, sites: list[AttentionSite], names: list[str], inputs: list) -> None:
    """A model's own sliding windows, from the mask's construction replayed on unpadded inputs
    of the traced shape (the graph runs at that shape only; a band as wide as the sequence is no
    window there).  Positional forms (MHC, Quantize) keep these windows, as in optimize()."""
    t = _token_input(inputs)
    if t is None:
        return
    B, S = inputs[t].shape
    for site in sites:
        if site.nodes is not None and site.nodes.mask is not None and site.window is None:
            site.window = probe_window(cap, site.nodes.mask, site.nodes.mask_kind, length=S,
                                        ids_path=cap.input_paths[t], batch=B)


def _calibration_calls(names: list[str], inputs: list, ids: torch.Tensor) -> list[dict]:
    """The graph's inputs for each calibration chunk: the token-id input (the 2-D integer input
    that is not a 0/1 mask) gets the ids, cut to the traced [B, S]; a 0/1 integer input of the
    same shape (an attention mask) gets ones.  Anything else cannot be made up: refused."""
    ints = _int_inputs(inputs)
    t = _token_input(inputs)
    if t is None:
        raise KVPassError("backend='kvpass' calibration: cannot tell which graph input takes the token "
                          f"ids (2-D integer inputs: {[names[i] for i in ints]}); calibrate with "
                          "kvpass.optimize(model, policy, calibration=...) instead")
    B, S = inputs[t].shape
    others = [i for i, x in enumerate(inputs) if i != t and isinstance(x, torch.Tensor)]
    masks = [i for i in others if i in ints and inputs[i].shape == inputs[t].shape]
    if set(others) - set(masks):
        raise KVPassError("backend='kvpass' calibration: the graph takes inputs besides token ids and "
                          f"a mask ({[names[i] for i in others if i not in masks]}); calibrate with "
                          "kvpass.optimize(model, policy, calibration=...) instead")
    flat = ids.reshape(-1)
    n = flat.numel() // (B * S)
    if n == 0:
        raise KVPassError(f"backend='kvpass' calibration: {flat.numel()} tokens, the graph runs on "
                          f"[{B}, {S}] = {B * S} at a time")
    chunks = flat[: n * B * S].view(n, B, S).to(inputs[t].device, inputs[t].dtype)
    out = []
    for c in chunks:
        call = {names[t]: c}
        call.update({names[i]: torch.ones_like(inputs[i]) for i in masks})
        out.append(call)
    return out


class _InGraph:
    """What a pass sees of one layer rewritten inside a whole-model graph: the same interface
    as :class:`~kvpass.runtime.attention.KVAttention` (its core, its graph's nodes, sample inputs, called
    with the graph's inputs by name), where the graph is the model's."""

    def __init__(self, gm: fx.GraphModule, site: AttentionSite, core, name: str, leaves: list,
                 names: list[str]):
        n = site.nodes
        self.graph_module, self.kv_core, self._name, self._leaves = gm, core, name, leaves
        self._names = names
        self._handles = {"q": n.q, "k_pre": n.k_pre, "v_pre": n.v_pre, "q_proj": n.q_proj,
                         "k_proj": n.k_proj, "v_proj": n.v_proj}

    def __call__(self, **inputs):
        """Run the whole graph (calibration: taps on this layer's nodes see its inputs)."""
        return self.graph_module(*[inputs[n] for n in self._names])

    def handles(self) -> dict:
        return dict(self._handles)

    def core_call(self) -> fx.Node:
        return next(n for n in self.graph_module.graph.nodes if n.op == "call_module" and n.target == self._name)

    def sample_leaves(self) -> list:
        return list(self._leaves)

    def drop_kv_inputs(self) -> list[str]:
        """A cross-layer consumer: the core no longer takes keys/values."""
        call = self.core_call()
        call.args = (call.args[0], None, None, *call.args[3:])
        return self.remove_unused_parameters()

    def remove_unused_parameters(self) -> list[str]:
        """Cut what the rewired core no longer reads (the model's parameters stay registered:
        they are the model's own, not this graph's to drop)."""
        self.graph_module.graph.eliminate_dead_code()
        self.graph_module.recompile()
        return []


def _copied_weights(gm: fx.GraphModule, sites, chosen) -> dict:
    """The captured module's parameters by site name; those of layers whose forms change weights
    (shared KV) are replaced by copies first, so the source model stays as it was."""
    for site in sites:
        if not any(registry.changes_weights(f) for f in chosen.get(site.name, ())):
            continue
        for proj in (site.q_proj, site.k_proj, site.v_proj, site.o_proj):
            for name in (proj.weight, proj.bias) if proj is not None else ():
                if name is None:
                    continue
                path, _, leaf = f"{gu.ROOT}.{name}".rpartition(".")
                owner = gm.get_submodule(path)
                old = getattr(owner, leaf)
                if isinstance(old, nn.Parameter):
                    owner.register_parameter(leaf, nn.Parameter(old.detach().clone(), old.requires_grad))
                else:
                    owner.register_buffer(leaf, old.detach().clone())
    return {gu.fqn(k): v for k, v in gm.named_parameters(remove_duplicate=False)}


def register_backend() -> None:
    """Register ``"kvpass"`` with dynamo (idempotent; the entry point does this lazily)."""
    from torch._dynamo.backends import registry as dynamo_registry

    if "kvpass" not in dynamo_registry.list_backends(exclude_tags=()):
        dynamo_registry.register_backend(compiler_fn=kvpass_backend, name="kvpass")
