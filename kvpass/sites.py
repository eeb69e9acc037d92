"""find_sites: every attention core in a traced graph, and what feeds it.

A *core* is ``aten.scaled_dot_product_attention`` or the eager form
``matmul(q, kᵀ) → [scale] → [softcap] → [mask] → softmax → [cast/dropout] → matmul(·, v)``
in any algebraically equal spelling (mul by 1/s or div by s, fp32 upcasts, masked_fill/where).
From each core kvpass walks the graph backwards — never by class or attribute names:

* ``k_pre``/``v_pre``: the last [B, Hkv, S, D] value before head repetition (repeat_kv,
  repeat_interleave, GQA broadcasting); the q→kv head map comes from *index tracing* the
  repetition ops (replaying them on a tensor of head indices);
* the projection (``linear``, Conv1D ``addmm``, ``matmul`` with a parameter) and which of its
  output channels land in each (head, dim) — separate, fused (split/slice/chunk) or per-head
  interleaved (GPT-NeoX) layouts alike, again by index tracing;
* RoPE (rotate-half, interleaved pairs, complex; partial rotary) and per-head norms on the
  key path; the scale, softcap, mask source, causality and sliding window.

Anything on the way that kvpass does not understand is recorded in ``site.problems`` with the
node and op; :func:`kvpass.optimize` refuses such a site unless the policy leaves it ``Full``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import graphutil as gu
from .capture import Captured, capture

__all__ = ["AttentionSite", "Projection", "Rope", "find_sites", "find_sites_in"]

SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax"}
MATMUL_OPS = {"matmul", "bmm", "baddbmm"}
PROJ_OPS = {"linear", "addmm", "matmul", "mm"}
NORM_OPS = {"rsqrt", "native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm"}
PATH_OPS = gu.MOVEMENT_OPS | NORM_OPS | {
    "mul", "add", "sub", "neg", "cat", "stack", "pow", "mean", "div", "sqrt", "view_as_complex",
    "view_as_real", "var_mean", "float", "getitem", "sym_size", "_assert_scalar", "type_as",
}


@dataclass(frozen=True)
class Projection:
    """A projection feeding attention: ``weight`` rows (or columns) per (head, dim).

    ``channels[h * head_dim + d]`` is the output channel of ``weight`` that becomes element
    ``d`` of head ``h`` (for the output projection: the input column that head ``h``, dim
    ``d`` feeds).  ``transposed``: the weight is stored [in, out] (GPT-2 Conv1D).
    """

    weight: str
    bias: str | None
    channels: tuple[int, ...]
    transposed: bool = False

    @property
    def layout(self) -> str:
        c = self.channels
        if all(b == a + 1 for a, b in zip(c, c[1:])):
            return "separate" if c[0] == 0 else "fused"
        return "interleaved"


@dataclass(frozen=True)
class Rope:
    kind: str  # "rotate_half" | "interleaved" | "complex"
    rotary_dim: int


@dataclass
class AttentionSite:
    """One attention in the model: its owning module, layout, positions and paths."""

    name: str
    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_head_map: tuple[int, ...]
    q_proj: Projection | None
    k_proj: Projection | None
    v_proj: Projection | None
    o_proj: Projection | None
    rope: Rope | None
    q_norm: str | None
    k_norm: str | None
    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    core: str  # "sdpa" | "eager"
    problems: list[str] = field(default_factory=list)
    nodes: SiteNodes | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def positional(self) -> str:
        if self.rope is None:
            return "none"
        partial = self.rope.rotary_dim < self.head_dim
        return f"rope:{self.rope.kind}" + (f"(partial {self.rope.rotary_dim})" if partial else "")

    def kv_values_per_token(self) -> int:
        """Values one token adds to this layer's cache in the original model: 2·Hkv·D."""
        return 2 * self.num_kv_heads * self.head_dim

    def describe(self) -> dict:
        """A JSON-friendly summary (no graph handles)."""
        return {
            "name": self.name, "layer": self.layer, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "kv_head_map": list(self.kv_head_map), "positional": self.positional,
            "q_norm": self.q_norm, "k_norm": self.k_norm, "causal": self.causal,
            "window": self.window, "scale": self.scale, "softcap": self.softcap,
            "core": self.core,
            "projections": {k: None if p is None else {"weight": p.weight, "layout": p.layout}
                            for k, p in (("q", self.q_proj), ("k", self.k_proj),
                                         ("v", self.v_proj), ("o", self.o_proj))},
            "problems": list(self.problems),
        }

    def key_path(self) -> fx.GraphModule:
        """The key path (projection output → ``k_pre``: views, norm, RoPE) as a replayable graph.

        Inputs: the projection output, then every other value the path reads (cos/sin,
        positions, ...) in graph order; parameters stay attributes.
        """
        return _path_module(self.nodes, self.nodes.k_proj, self.nodes.k_pre)

    def value_path(self) -> fx.GraphModule:
        return _path_module(self.nodes, self.nodes.v_proj, self.nodes.v_pre)


@dataclass
class SiteNodes:
    """Graph handles of a site (valid for the graph it was found in)."""

    captured: Captured
    out: fx.Node          # the core's output [B, H, Sq, D]
    q: fx.Node
    k_pre: fx.Node
    v_pre: fx.Node
    mask: fx.Node | None  # the mask's source (before slicing/broadcast), if any
    mask_kind: str        # "none" | "bool_keep" | "bool_drop" | "additive"
    inner: set            # nodes of the core (removed by lowering)
    k_proj: fx.Node | None = None
    v_proj: fx.Node | None = None
    q_proj: fx.Node | None = None


# ---------------------------------------------------------------------------------- cores
@dataclass
class _Core:
    out: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    mask_kind: str
    scale: float | None
    softcap: float | None
    is_causal: bool
    gqa: bool
    inner: set
    kind: str
    problems: list[str]


def _sdpa_core(n: fx.Node) -> _Core:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    a = dict(zip(names, n.args))
    a.update(n.kwargs)
    mask = a.get("attn_mask")
    kind = "none"
    if isinstance(mask, fx.Node):
        val = mask.meta.get("val")
        kind = "bool_keep" if getattr(val, "dtype", None) == torch.bool else "additive"
    return _Core(n, a["query"], a["key"], a["value"], mask, kind, a.get("scale"), None,
                 bool(a.get("is_causal", False)), bool(a.get("enable_gqa", False)), {n}, "sdpa", [])


def _single_user_chain(start: fx.Node, ops: set[str]) -> fx.Node:
    cur = start
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if gu.op_name(nxt) not in ops:
            break
        cur = nxt
    return cur


def _eager_core(sm: fx.Node) -> _Core | None:
    """softmax → walk back to matmul(q, kᵀ), forward to matmul(p, v)."""
    problems: list[str] = []
    inner = {sm}
    scale, softcap, mask, mask_kind = 1.0, None, None, "none"
    cur = sm.args[0]
    while isinstance(cur, fx.Node) and gu.op_name(cur) not in MATMUL_OPS:
        op = gu.op_name(cur)
        inner.add(cur)
        other = [a for a in cur.args[1:3] if not isinstance(a, fx.Node)]
        tens = [a for a in cur.args if isinstance(a, fx.Node)]
        if op in ("to", "_to_copy", "type_as", "clone", "contiguous"):
            cur = cur.args[0]
        elif op in ("mul", "div") and len(tens) == 1 and other and isinstance(other[0], (int, float)):
            if gu.op_name(tens[0]) == "tanh":  # softcap: tanh(s / c) * c
                inner.add(tens[0])
                inner_div = tens[0].args[0]
                inner.add(inner_div)
                softcap = float(other[0])
                cur = inner_div.args[0]
                continue
            s = float(other[0])
            scale *= s if op == "mul" else 1.0 / s
            cur = tens[0]
        elif op in ("add", "sub") and len(tens) == 2:
            a, b = tens
            main = a if _reaches_matmul(a) else b
            mask = b if main is a else a
            mask_kind = "additive"
            cur = main
        elif op == "masked_fill":
            mask, mask_kind = cur.args[1], "bool_drop"
            cur = cur.args[0]
        elif op == "where":
            mask, mask_kind = cur.args[0], "bool_keep"
            cur = cur.args[1]
        else:
            problems.append(f"unrecognised op '{op}' (node {cur.name}) between scores and softmax")
            return None
    if not isinstance(cur, fx.Node):
        return None
    qk = cur
    inner.add(qk)
    q, kt = qk.args[0], qk.args[1]
    k = _untranspose(kt)
    if k is None:
        return None
    p = _single_user_chain(sm, {"to", "_to_copy", "dropout", "type_as", "clone", "native_dropout"})
    inner |= gu.chain_between(sm, p) if p is not sm else set()
    users = [u for u in p.users if gu.op_name(u) in MATMUL_OPS and u.args[0] is p]
    if len(users) != 1:
        return None
    pv = users[0]
    inner.add(pv)
    return _Core(pv, q, k, pv.args[1], mask, mask_kind, scale, softcap, False, False, inner,
                 "eager", problems)


def _reaches_matmul(n: fx.Node) -> bool:
    cur = n
    for _ in range(8):
        if gu.op_name(cur) in MATMUL_OPS:
            return True
        tens = [a for a in cur.args if isinstance(a, fx.Node)]
        if not tens:
            return False
        cur = tens[0]
    return False


def _untranspose(kt: fx.Node) -> fx.Node | None:
    """kᵀ → k for transpose(-2,-1)/permute spellings."""
    op = gu.op_name(kt)
    if op == "transpose":
        dims = sorted(d % 4 for d in kt.args[1:3])
        return kt.args[0] if dims == [2, 3] else None
    if op == "permute":
        perm = list(kt.args[1])
        return kt.args[0] if perm[-2:] == [len(perm) - 1, len(perm) - 2] else None
    if op == "t":
        return kt.args[0]
    return None


def _cores(graph: fx.Graph) -> list[_Core]:
    out = []
    for n in graph.nodes:
        op = gu.op_name(n)
        if op == "scaled_dot_product_attention":
            out.append(_sdpa_core(n))
        elif op in SOFTMAX_OPS:
            c = _eager_core(n)
            if c is not None:
                out.append(c)
    return out


# ------------------------------------------------------------------------------ key paths
def _shape(n: fx.Node):
    return gu.meta_shape(n)


def _head_pre(core_in: fx.Node, ref_shape) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from a core input over movement ops to the farthest [B, h, S, D] node."""
    B, _, S, D = (str(x) for x in ref_shape)
    cur, best, chain = core_in, core_in, [core_in]
    while True:
        shp = _shape(cur)
        if shp is not None and len(shp) == 4 and (str(shp[0]), str(shp[2]), str(shp[3])) == (B, S, D):
            best = cur
        if not gu.is_movement(cur):
            break
        data = [a for a in cur.args if isinstance(a, fx.Node)]
        if not data:
            break
        cur = data[0]
        chain.append(cur)
    idx = chain.index(best)
    return best, list(reversed(chain[:idx]))


def _trace_heads(pre: fx.Node, chain: list[fx.Node], out: fx.Node, env) -> list[int]:
    """Which head of ``pre`` each head of ``out`` reads: replay ``chain`` on head indices."""
    val = env[pre]
    idx = torch.arange(val.shape[1], dtype=torch.float64).view(1, -1, 1, 1).expand(val.shape).contiguous()
    vals = gu.replay(chain, env, {pre: idx}, keep_dtype=True)
    res = vals.get(out, idx)
    return [int(x) for x in res[0, :, 0, 0].tolist()]


def _projection(pre: fx.Node, env, problems: list[str], what: str) -> tuple[Projection | None, fx.Node | None, list]:
    """The projection feeding ``pre`` and its channel per (head, dim)."""
    projs = [n for n in gu.ancestors(pre) | {pre} if _is_projection(n)]
    projs = [p for p in projs if not any(_is_projection(x) for x in gu.chain_between(p, pre)[1:])]
    if len(projs) != 1:
        problems.append(f"{what}: expected one projection feeding it, found {len(projs)}")
        return None, None, []
    proj = projs[0]
    chain = gu.chain_between(proj, pre)
    # first head-shaped node reached from the projection through movement ops only
    D = _shape(pre)[-1]
    entry = None
    for n in chain[1:]:
        if not gu.is_movement(n):
            break
        shp = _shape(n)
        if shp is not None and len(shp) == 4 and str(shp[-1]) == str(D):
            entry = n
            break
    if entry is None:
        problems.append(f"{what}: no [.., heads, head_dim] view after projection {proj.name}")
        return None, proj, chain
    val = env[proj]
    ids = torch.arange(val.shape[-1], dtype=torch.float64).expand(val.shape).contiguous()
    moved = gu.replay([n for n in gu.chain_between(proj, entry) if n is not proj], env, {proj: ids},
                      keep_dtype=True)
    ev = moved[entry]
    shp = [str(x) for x in _shape(entry)]
    seq_sym = str(_shape(pre)[2])
    h_dim = 1 if shp[2] == seq_sym else 2
    per_head = ev[0, 0] if h_dim == 2 else ev[0, :, 0]  # [h, D]
    channels = tuple(int(x) for x in per_head.reshape(-1).tolist())
    weight, bias, transposed = _proj_params(proj)
    return Projection(weight, bias, channels, transposed), proj, chain


def _is_projection(n: fx.Node) -> bool:
    if gu.op_name(n) not in PROJ_OPS:
        return False
    return any(a.op == "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)
               and a.meta["val"].dim() == 2 for a in gu.tensor_args(n))


def _proj_params(n: fx.Node) -> tuple[str, str | None, bool]:
    op = gu.op_name(n)
    attrs = [a for a in gu.tensor_args(n) if a.op == "get_attr"]
    if op == "linear":
        w = n.args[1]
        b = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else None
        return gu.fqn(w.target), (gu.fqn(b.target) if b is not None and b.op == "get_attr" else None), False
    if op == "addmm":  # Conv1D: addmm(bias, x, W[in, out])
        bias = gu.fqn(n.args[0].target) if n.args[0].op == "get_attr" else None
        return gu.fqn(n.args[2].target), bias, True
    w = attrs[0]
    return gu.fqn(w.target), None, w is n.args[1]


def _rope_and_norm(chain: list[fx.Node], D: int, problems: list[str], what: str):
    rope, norm = None, None
    ops = {gu.op_name(n) for n in chain}
    chain = chain[1:]  # the projection itself
    for n in chain:
        op = gu.op_name(n)
        if op not in PATH_OPS:
            problems.append(f"{what}: unrecognised op '{op}' (node {n.name})")
    if "view_as_complex" in ops:
        c = next(n for n in chain if gu.op_name(n) == "view_as_complex")
        rope = Rope("complex", 2 * int(_shape(c)[-1]))
    elif "neg" in ops and "cat" in ops:
        neg = next(n for n in chain if gu.op_name(n) == "neg")
        rope = Rope("rotate_half", 2 * int(_shape(neg)[-1]))
    elif "neg" in ops and "stack" in ops:
        neg = next(n for n in chain if gu.op_name(n) == "neg")
        rope = Rope("interleaved", 2 * int(_shape(neg)[-1]))
    if ops & NORM_OPS:
        inside = set(chain)
        for n in chain:
            for a in gu.tensor_args(n):
                w = _param_behind(a) if a not in inside else None
                if w is not None and _shape(w) is not None and tuple(_shape(w)) == (D,):
                    norm = gu.fqn(w.target)
    return rope, norm


def _param_behind(n: fx.Node, steps: int = 3) -> fx.Node | None:
    """The parameter a norm scale comes from, through e.g. Gemma's ``1 + weight`` or a cast."""
    for _ in range(steps):
        if n.op == "get_attr":
            return n
        data = gu.tensor_args(n)
        if len(data) != 1:
            return None
        n = data[0]
    return n if n.op == "get_attr" else None


def _output_projection(out: fx.Node, env, H: int, D: int) -> tuple[Projection | None, fx.Node | None]:
    """The projection the heads' outputs feed, and which of its columns each (head, dim) is."""
    cur, chain = out, []
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None, None
        u = users[0]
        if _is_projection(u):
            break
        if not gu.is_movement(u):
            return None, None
        chain.append(u)
        cur = u
    val = env[out]
    ids = torch.arange(H * D, dtype=torch.float64).view(1, H, 1, D).expand(val.shape).contiguous()
    moved = gu.replay(chain, env, {out: ids}, keep_dtype=True)
    flat = moved.get(cur, ids)
    cols = flat.reshape(-1, flat.shape[-1])[0]  # column j <- channel h*D+d
    channels = [0] * (H * D)
    for j, c in enumerate(cols.tolist()):
        channels[int(c)] = j
    weight, bias, transposed = _proj_params(u)
    return Projection(weight, bias, tuple(channels), transposed), u


# ---------------------------------------------------------------------------- masks
def _mask_source(mask: fx.Node) -> fx.Node:
    cur = mask
    while gu.is_movement(cur):
        data = [a for a in cur.args if isinstance(a, fx.Node)]
        if not data:
            break
        cur = data[0]
    return cur


def _mask_facts(core: _Core, env, problems: list[str]) -> tuple[bool, int | None]:
    """Causality and window from the sample mask (also flags score biases such as ALiBi)."""
    if core.mask is None:
        return core.is_causal, None
    m = env[core.mask]
    if core.mask_kind == "additive":
        big = m.float() < torch.finfo(torch.float16).min
        if not bool((((m == 0) | big | torch.isinf(m))).all()):
            problems.append(f"score bias (node {core.mask.name}): values other than 0/-inf added to "
                            "the scores, e.g. ALiBi; not a mask kvpass can reproduce")
        keep = ~(big | torch.isinf(m))
    else:
        keep = m.bool() if core.mask_kind == "bool_keep" else ~m.bool()
    if keep.dim() == 4 and keep.shape[1] > 1 and not bool((keep == keep[:, :1]).all()):
        problems.append(f"per-head mask (node {core.mask.name}): not supported")
    keep = keep.reshape(-1, *keep.shape[-2:])[0]
    Sq, Sk = keep.shape
    tri = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    causal = core.is_causal or bool((~keep[~tri]).all()) and Sq > 1
    return causal, None


def _probe_window(cap: Captured, core_mask: fx.Node, kind: str, length: int = 1536,
                  ids_path: str = "['input_ids']", batch: int = 1) -> int | None:
    """Replay the mask's construction on ``length`` tokens (``batch`` rows, unpadded); the band
    it keeps is the window.  ``ids_path``: the graph input holding token ids."""
    if ids_path not in cap.input_paths:
        return None
    anc = gu.ancestors(core_mask) | {core_mask}
    nodes = [n for n in cap.graph.nodes if n in anc]
    if any(gu.op_name(n) in PROJ_OPS for n in nodes):
        return None
    env = dict(cap.env)
    placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
    ids_node = placeholders[cap.input_paths.index(ids_path)]
    phs = {n: env[n] for n in placeholders}
    for n in placeholders:  # token-aligned inputs (ids, padding mask): a long unpadded sequence
        if isinstance(env[n], torch.Tensor) and env[n].shape == env[ids_node].shape:
            phs[n] = torch.ones(batch, length, dtype=env[n].dtype)
    phs[ids_node] = torch.zeros(batch, length, dtype=torch.long)
    try:
        vals = gu.replay([n for n in nodes if n.op != "placeholder"], {**env, **phs}, dict(phs))
    except Exception:  # noqa: BLE001 - a mask that can't be replayed simply isn't probed
        return None
    m = vals[core_mask]
    if kind == "additive":
        keep = (m > torch.finfo(torch.float16).min) & ~torch.isinf(m)
    else:
        keep = m.bool() if kind == "bool_keep" else ~m.bool()
    row = keep.reshape(-1, *keep.shape[-2:])[0][-1]
    if row.shape[0] != length:
        return None
    visible = int(row.sum())
    return visible if visible < length else None


# ------------------------------------------------------------------------------ sites
def _site(cap: Captured, core: _Core, layer: int, probe: bool) -> AttentionSite:
    env, problems = cap.env, list(core.problems)
    qshape = _shape(core.q)
    H, D = int(qshape[1]), int(qshape[3])
    k_pre, k_chain = _head_pre(core.k, _shape(core.k))
    v_pre, v_chain = _head_pre(core.v, _shape(core.v))
    Hkv = int(_shape(k_pre)[1])
    kmap = _trace_heads(k_pre, k_chain, core.k, env)
    vmap = _trace_heads(v_pre, v_chain, core.v, env)
    core_h = int(_shape(core.k)[1])
    if core.gqa and core_h != H:
        kmap = [kmap[h * core_h // H] for h in range(H)]
        vmap = [vmap[h * core_h // H] for h in range(H)]
    elif core_h == 1 and H > 1:
        kmap, vmap = kmap * H, vmap * H
    if kmap != vmap:
        problems.append("keys and values use different head maps")
    if int(_shape(v_pre)[1]) != Hkv:
        problems.append("keys and values have different head counts")
    qp, q_node, q_chain = _projection(core.q, env, problems, "query path")
    kp, k_node, k_path = _projection(k_pre, env, problems, "key path")
    vp, v_node, v_path = _projection(v_pre, env, problems, "value path")
    rope, k_norm = _rope_and_norm(k_path, D, problems, "key path")
    _, q_norm = _rope_and_norm(q_chain, D, problems, "query path")
    _, _ = _rope_and_norm(v_path, D, [], "value path")
    op, o_node = _output_projection(core.out, env, H, D)
    causal, window = _mask_facts(core, env, problems)
    if probe and core.mask is not None:
        window = _probe_window(cap, core.mask, core.mask_kind)
    scale = core.scale if core.scale is not None else 1 / math.sqrt(D)
    # the owning module: the smallest holding the core and its K/V/output projections
    paths = [gu.module_path(n) for n in (core.out, k_node, v_node, o_node) if n is not None]
    paths += [gu.module_path(n) for n in core.inner]
    name = gu.common_prefix(p for p in paths if p)
    nodes = SiteNodes(cap, core.out, core.q, k_pre, v_pre,
                      None if core.mask is None else _mask_source(core.mask), core.mask_kind,
                      core.inner, k_node, v_node, q_node)
    site = AttentionSite(name, layer, H, Hkv, D, tuple(kmap), qp, kp, vp, op, rope, q_norm, k_norm,
                         causal, window, float(scale), core.softcap, core.kind, problems, nodes)
    site.problems = [f"{name or '<top>'}: {p}" for p in problems]
    return site


def find_sites_in(cap: Captured, *, probe_windows: bool = True) -> list[AttentionSite]:
    """All attention sites of a captured graph, in graph order."""
    return [_site(cap, c, i, probe_windows) for i, c in enumerate(_cores(cap.graph))]


def find_sites(model: nn.Module, example_inputs=None) -> list[AttentionSite]:
    """Capture ``model`` and return its attention sites (one per attention core).

    Example:
        >>> import kvpass
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> sites = kvpass.find_sites(LlamaForCausalLM(cfg).eval())
        >>> [(s.name, s.num_heads, s.num_kv_heads, s.head_dim) for s in sites]
        [('model.layers.0.self_attn', 4, 2, 8), ('model.layers.1.self_attn', 4, 2, 8)]
    """
    return find_sites_in(capture(model, example_inputs))


def _path_module(nodes: SiteNodes, proj: fx.Node, pre: fx.Node) -> fx.GraphModule:
    chain = gu.chain_between(proj, pre)
    inside = set(chain)
    g = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {proj: g.placeholder("proj_out")}
    for n in chain[1:]:
        for a in gu.tensor_args(n):
            if a not in inside and a not in remap:
                remap[a] = g.get_attr(a.target) if a.op == "get_attr" else g.placeholder(a.name)
        remap[n] = g.node_copy(n, lambda a: remap[a])
    g.output(remap[pre])
    return fx.GraphModule(nodes.captured.module, g)
