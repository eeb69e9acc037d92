"""Small helpers over FX graphs: op names, data-movement ops, replaying node chains."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
from torch import fx

# Ops that only move, copy, broadcast or re-type data: a value's elements are some of the input's
# elements (maybe repeated), never mixed.  Index tracing replays them on tensors of indices.
MOVEMENT_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "transpose", "permute", "contiguous", "clone", "expand",
    "expand_as", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "getitem",
    "chunk", "unbind", "to", "_to_copy", "alias", "flatten", "unflatten", "repeat_interleave",
    "repeat", "detach", "lift_fresh_copy", "t", "narrow", "index_select", "movedim", "type_as",
    "_assert_tensor_metadata", "index", "reshape_as", "view_as",
})


def op_name(node: fx.Node) -> str:
    """'view', 'linear', 'scaled_dot_product_attention', 'getitem', ... ('' for non-calls)."""
    if node.op != "call_function":
        return node.op if node.op in ("placeholder", "get_attr", "output") else ""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return t._opname if hasattr(t, "_opname") else t.__name__.split(".")[0]
    return getattr(t, "__name__", str(t)).split(".")[0]


def is_movement(node: fx.Node) -> bool:
    return op_name(node) in MOVEMENT_OPS


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node arguments of ``node`` (flattening lists such as cat's)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def meta_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def module_path(node: fx.Node) -> str:
    """The owning module path of a node, from export's nn_module_stack ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # export records e.g. "L['self'].model.layers[0].self_attn" or "model.layers.0.self_attn"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").split("["):
        out.append(part.strip("'\""))
    return fqn(".".join(p for p in ".".join(out).split(".") if p))


ROOT = "kvroot"  # attribute under which capture wraps the traced module


def fqn(name: str) -> str:
    """A qualified name in the captured graph, relative to the captured module."""
    if name == ROOT:
        return ""
    return name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else name


def common_prefix(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    pre = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        pre.append(items[0])
    return ".".join(pre)


def replay(nodes: list[fx.Node], env: dict[fx.Node, object], overrides: dict[fx.Node, object],
           keep_dtype: bool = False) -> dict:
    """Re-run ``nodes`` (in graph order) with some values overridden; other args come from env.

    Returns the new values of the replayed nodes.  Used for index tracing (``keep_dtype``): a
    chain of movement ops replayed on a tensor of indices shows where each element came from.
    """
    vals: dict[fx.Node, object] = dict(overrides)

    def look(a):
        return vals[a] if a in vals else env[a]

    for n in nodes:
        if n in overrides:
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), look)
        fn: Callable = n.target  # type: ignore[assignment]
        if op_name(n) == "_assert_tensor_metadata":
            vals[n] = None
            continue
        if keep_dtype and op_name(n) in ("to", "_to_copy"):
            vals[n] = args[0]  # index tracing: keep the exact index dtype
            continue
        vals[n] = fn(*args, **kwargs)
    return vals


# Ops that keep each element where it is (element-wise, maybe with per-token factors such as a
# norm's rsqrt): index tracing passes the traced input straight through them.
POINTWISE_OPS = frozenset({
    "mul", "div", "add", "sub", "neg", "rsqrt", "sqrt", "pow", "tanh", "sigmoid", "silu", "gelu", "relu",
    "exp", "clamp", "float", "half", "bfloat16", "native_layer_norm", "layer_norm", "rms_norm",
    "_fused_rms_norm", "where", "masked_fill", "abs", "reciprocal", "getitem",
})


def trace_indices(chain: list[fx.Node], env: dict, src: fx.Node, idx: torch.Tensor) -> dict:
    """Where each element of the nodes of ``chain`` comes from, as a tensor of ``src``'s indices.

    Movement ops are replayed on the index tensor; point-wise ops (scales, biases, a norm over
    the last dimension) pass through the one traced input of their own shape; other nodes (a
    reduction, a matmul) get ``None``, and so does anything computed from them only.
    """
    vals: dict[fx.Node, object] = {src: idx}
    for n in chain:
        if n is src:
            continue
        traced = [a for a in tensor_args(n) if a in vals]
        if not traced:
            continue
        if any(vals[a] is None for a in traced) and not any(vals[a] is not None for a in traced):
            vals[n] = None
            continue
        op = op_name(n)
        if op in MOVEMENT_OPS and op != "getitem" or (op == "getitem" and isinstance(vals[traced[0]], (list, tuple))):
            if any(vals[a] is None for a in traced):
                vals[n] = None
                continue
            try:
                vals[n] = replay([n], {**env, **{a: vals[a] for a in traced}}, {}, keep_dtype=True)[n]
            except Exception:  # noqa: BLE001 - an op that can't run on indices isn't traceable
                vals[n] = None
            continue
        shape = meta_shape(n)
        full = [vals[a] for a in traced if isinstance(vals[a], torch.Tensor) and shape is not None
                and len(vals[a].shape) == len(shape) and all(str(x) == str(y) for x, y in
                                                              zip(meta_shape(a) or (), shape))]
        same = all(torch.equal(full[0], f) for f in full[1:]) if full else False
        vals[n] = full[0] if op in POINTWISE_OPS and full and same else None
    return vals


def chain_between(src: fx.Node, dst: fx.Node) -> list[fx.Node]:
    """Nodes on any path from ``src`` to ``dst`` (inclusive), in graph order.

    Bounded by the graph's order (nodes compare by position): only ``dst``'s ancestors that
    come after ``src`` are visited, so the cost is the chain's neighbourhood, not the whole
    model's graph (a late layer's ancestors are every earlier layer).
    """
    up = {dst}
    stack = [dst]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in up and not a < src:
                up.add(a)
                stack.append(a)
    if src not in up:
        return []
    keep = {src}
    stack = [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in up and u not in keep:
                keep.add(u)
                stack.append(u)
    return sorted(keep)


def _reach(start, step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(start)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` depends on."""
    return _reach(node.all_input_nodes, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that depends on ``node``."""
    return _reach(node.users, lambda n: n.users)
