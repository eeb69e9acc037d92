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
node and op.  Problems of the core itself (``site.core_problems``: a score bias such as ALiBi,
a per-head mask, keys and values on different head maps) keep the layer as the model has it;
problems on the projection side only refuse the forms that change weights (``SharedKV``,
``MHC``): :func:`kvpass.optimize` still applies ``Full``/``Window``/``Sparse``/``Quantize``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import util as gu
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
    ``d`` feeds).  ``transposed``: the weight is stored [in, out] (GPT-2 Conv1D).  ``scale``: a
    per-channel parameter applied over the whole projection output before the head view (the
    weight of a norm over all heads: its entries follow ``channels`` like the bias's).
    """

    weight: str
    bias: str | None
    channels: tuple[int, ...]
    transposed: bool = False
    scale: str | None = None

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
    core_problems: list[str] = field(default_factory=list)
    sink_logits: str | None = None  # per-head logits that join every softmax row (gpt-oss), if any
    positional_problems: list[str] = field(default_factory=list)  # what refuses position-based forms
    alibi: tuple[float, ...] | None = None  # per-head slopes of an ALiBi score bias (in the mask), if any

    @property
    def ok(self) -> bool:
        """Everything understood: every form applies (see :attr:`core_ok`)."""
        return not self.problems

    @property
    def core_ok(self) -> bool:
        """The attention core is understood (visibility, mask, head map): forms that change no
        weights (``Full``, ``Window``, ``Sparse``, ``Quantize``) apply even where the projections
        are not (``problems`` then lists only projection-side ones)."""
        return not self.core_problems

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
            "projections": {k: None if p is None else {"weight": p.weight, "layout": p.layout, "scale": p.scale}
                            for k, p in (("q", self.q_proj), ("k", self.k_proj),
                                         ("v", self.v_proj), ("o", self.o_proj))},
            "problems": list(self.problems), "core_problems": list(self.core_problems),
            "sink_logits": self.sink_logits, "positional_problems": list(self.positional_problems),
            "alibi": None if self.alibi is None else list(self.alibi),
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
    sinks: fx.Node | None = None  # the per-head sink logits the core reads, if any


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
    sinks: fx.Node | None = None  # per-head sink logits [H] joining the softmax (gpt-oss)


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


_CASTS = {"to", "_to_copy", "type_as", "clone", "contiguous", "float", "alias"}
_RESHAPES = {"view", "_unsafe_view", "reshape"}
_SCALAR_SCALES = {"mul", "div", "mul_", "div_"}
_ADDS = {"add", "sub", "add_", "sub_"}


def _scalar(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _eager_core(sm: fx.Node, env: dict | None = None) -> tuple[_Core | None, str | None]:
    """softmax → walk back to matmul(q, kᵀ), forward to matmul(p, v).

    Returns ``(core, None)``, or ``(None, why)`` when the softmax is not attention.  Score
    transforms kvpass cannot reproduce (a score bias besides the mask, a multiplicative mask,
    concatenated sink logits, an unknown op) keep the core, with a problem naming the node.
    """
    problems: list[str] = []
    inner = {sm}
    scale, softcap, mask, mask_kind, sinks = 1.0, None, None, "none", None
    biases: list[fx.Node] = []  # additive score terms besides the mask: joined into it below
    zeroed: list[fx.Node] = []  # 0/1 factors on the scores: redundant where the mask hides every 0
    cur = sm.args[0]
    for _ in range(48):
        if not isinstance(cur, fx.Node) or gu.op_name(cur) in MATMUL_OPS or _einsum_qk(cur):
            break
        op = gu.op_name(cur)
        inner.add(cur)
        tens = gu.tensor_args(cur)
        other = [a for a in cur.args[1:3] if _scalar(a)]
        if not tens:
            return None, f"softmax {sm.name}: its input is a constant"
        if op in _CASTS or op in _RESHAPES or op in ("dropout", "native_dropout"):
            cur = cur.args[0]
        elif op in _SCALAR_SCALES and len(tens) == 1 and other:
            if gu.op_name(tens[0]) == "tanh":  # softcap: tanh(s / c) * c
                inner.add(tens[0])
                inner_div = tens[0].args[0]
                inner.add(inner_div)
                softcap = float(other[0])
                cur = inner_div.args[0]
                continue
            s = float(other[0])
            scale *= s if op.startswith("mul") else 1.0 / s
            cur = tens[0]
        elif op in _ADDS and len(tens) == 1:  # a constant shift: softmax does not see it
            cur = tens[0]
        elif op in _ADDS | _SCALAR_SCALES | {"maximum", "max", "minimum", "min"} and len(tens) == 2:
            main, side = _main_and_side(tens)
            if main is None:
                problems.append(f"'{op}' (node {cur.name}) of two score terms")
                main = tens[0]
            if main in gu.ancestors(side):  # e.g. s - max(s): a per-row shift (stability)
                pass
            elif op in ("maximum", "max", "minimum", "min"):
                pass  # clamping masked scores at the dtype's minimum
            elif op.startswith("mul") and _zero_one(side, env):
                zeroed.append(side)  # scores * 0/1 (GPT-1's causal buffer): checked against the mask below
            elif op in _SCALAR_SCALES:
                problems.append(f"scores multiplied by a tensor (node {cur.name}, op '{op}'): a "
                                "multiplicative mask/bias kvpass cannot reproduce")
            elif op.startswith("add") and (mask is None or _redundant(mask, mask_kind, side, "additive", env)
                                           or _redundant(side, "additive", mask, mask_kind, env)):
                mask, mask_kind = _one_mask(mask, mask_kind, side, "additive", cur, env, problems)
            elif op.startswith("add") and env is not None:
                biases.append(side)  # a score bias besides the mask (ALiBi, relative positions)
            else:
                problems.append(f"a second score term (node {cur.name}, op '{op}') besides the mask")
            cur = main
        elif op in ("max", "clamp", "clamp_min", "clamp_max", "nan_to_num"):
            cur = tens[0]
        elif op in ("masked_fill", "masked_fill_"):
            mask, mask_kind = _one_mask(mask, mask_kind, cur.args[1], "bool_drop", cur, env, problems)
            cur = cur.args[0]
        elif op == "where":
            cond, a, b = cur.args[:3]
            keep = isinstance(a, fx.Node) and _reaches_matmul(a)
            mask, mask_kind = _one_mask(mask, mask_kind, cond, "bool_keep" if keep else "bool_drop", cur, env,
                                        problems)
            cur = a if keep else b
        elif op == "cat":
            found = _sink_logits(cur) if sinks is None else None
            if found is None:
                problems.append(f"extra logits concatenated to the scores (node {cur.name}) that are not one "
                                "sink logit per head (or per head and query)")
            else:
                sinks = found
                inner.add(cur)
                inner |= set(gu.chain_between(sinks, cur)) - {sinks}
            cur = tens[0]
        else:
            main, _ = _main_and_side(tens) if len(tens) > 1 else (tens[0], None)
            problems.append(f"unrecognised op '{op}' (node {cur.name}) between scores and softmax")
            if main is None:
                return None, f"softmax {sm.name}: " + problems[-1]
            cur = main
    if not isinstance(cur, fx.Node) or not (gu.op_name(cur) in MATMUL_OPS or _einsum_qk(cur)):
        return None, f"softmax {sm.name}: no matmul of queries and keys before it ({problems[0] if problems else ''})"
    qk = cur
    inner.add(qk)
    if gu.op_name(qk) == "baddbmm":  # beta * bias + alpha * q @ kᵀ
        bias, q, kt = qk.args[:3]
        beta, alpha = qk.kwargs.get("beta", 1.0), qk.kwargs.get("alpha", 1.0)
        scale *= float(alpha)
        zero = env is not None and isinstance(env.get(bias), torch.Tensor) and not bool(env[bias].any())
        if isinstance(bias, fx.Node) and beta != 0 and not zero:
            if env is not None and beta == 1.0:
                biases.append(bias)  # BLOOM's ALiBi
            else:
                problems.append(f"a score bias added by baddbmm (node {qk.name}) with beta={beta}")
        k = _untranspose(kt)
    elif gu.op_name(qk) == "einsum":
        q, k = qk.args[1][:2]
    else:
        q, kt = qk.args[0], qk.args[1]
        kt, f = _strip_scalar(kt, inner, env)
        q, g = _strip_scalar(q, inner, env)
        scale *= f * g
        k = _untranspose(kt)
    if k is None and isinstance(kt, fx.Node) and env is not None:
        k = _synth_transpose(kt, env)  # keys stored transposed already (GPT-1's [B, H, D, S])
    if k is None:
        return None, f"softmax {sm.name}: the key operand of {qk.name} is not a transposed key"
    p, pv = _probs_to_values(sm)
    if pv is None:
        return None, f"softmax {sm.name}: its probabilities do not feed one matmul with the values"
    inner |= set(gu.chain_between(sm, p))
    if sinks is not None and not any(gu.op_name(n) in ("slice", "narrow") for n in gu.chain_between(sm, p)):
        problems.append(f"sink logits (node {sinks.name}) whose probability column is not dropped before "
                        "the values")
    inner.add(pv)
    v = pv.args[1][1] if gu.op_name(pv) == "einsum" else pv.args[1]
    out = pv
    # heads folded into the batch ([B·H, S, D], the bmm spelling): the 4-D values around it
    q, k, v = (_unfold_heads(x) if len(_shape(x) or ()) == 3 else x for x in (q, k, v))
    if len(_shape(pv) or ()) == 3:
        out = _folded_out(pv)
        if out is not None:
            inner |= set(gu.chain_between(pv, out))
    if None in (q, k, v, out):
        return None, f"softmax {sm.name}: a [batch·heads, seq, dim] core whose 4-D views were not found"
    if len(_shape(q) or ()) != 4:
        return None, f"softmax {sm.name}: queries of shape {list(_shape(q) or [])} (not [B, H, S, D])"
    if biases:
        joined = _guarded(problems, f"score bias {biases[0].name}", None, _join_bias, sm, mask, mask_kind,
                          biases, int(_shape(q)[1]), env)
        if joined is not None:
            mask, mask_kind = joined, "additive"
    for z in zeroed:
        hidden = mask is not None and _guarded(problems, f"0/1 factor {z.name}", False, _hides, mask, mask_kind, z, env)
        if not hidden:
            problems.append(f"scores multiplied by a 0/1 tensor (node {z.name}) that the mask does not "
                            "hide: a multiplicative mask kvpass cannot reproduce")
    return _Core(out, q, k, v, mask, mask_kind, scale, softcap, False, False, inner, "eager", problems,
                 sinks), None


_PROB_OPS = _CASTS | _RESHAPES | {"dropout", "native_dropout", "slice", "narrow"}


def _probs_to_values(sm: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the probabilities as the values' matmul reads them, that matmul): forward from the
    softmax through casts, views, dropout and slices (other users, e.g. returned attention
    weights, may branch off)."""
    frontier = [sm]
    for _ in range(8):
        found = [(n, u) for n in frontier for u in n.users
                 if (gu.op_name(u) in MATMUL_OPS and u.args[0] is n) or (_einsum_pv(u) and u.args[1][0] is n)]
        if len(found) == 1:
            return found[0]
        if found:
            return sm, None
        frontier = [u for n in frontier for u in n.users if gu.op_name(u) in _PROB_OPS]
        if not frontier:
            break
    return sm, None


def _constant(a, env: dict | None) -> float | None:
    """A Python number, or a one-element tensor computed from no graph input (a constant)."""
    if _scalar(a):
        return float(a)
    if (isinstance(a, fx.Node) and env is not None and isinstance(env.get(a), torch.Tensor)
            and env[a].numel() == 1 and not any(x.op == "placeholder" for x in gu.ancestors(a))):
        return float(env[a])
    return None


def _keep(m, kind: str) -> torch.Tensor:
    if kind == "additive":
        return (m.float() > -1e3) & ~torch.isinf(m.float())  # exp(-1000) is 0 in fp32: masked
    return m.bool() if kind == "bool_keep" else ~m.bool()


def _redundant(a, kind_a: str, b, kind_b: str, env: dict | None) -> bool:
    """Whether mask ``a`` hides nothing that mask ``b`` lets through, on the sample (then ``b``
    alone is the visibility: e.g. GPT-Neo's causal buffer beside HF's causal + padding mask)."""
    if env is None or not isinstance(env.get(a), torch.Tensor) or not isinstance(env.get(b), torch.Tensor):
        return False
    for m, kind in ((env[a], kind_a), (env[b], kind_b)):
        if kind == "additive" and bool(((m.float() > -1e3) & (m != 0)).any()):
            return False  # finite non-zero terms: a score bias (ALiBi, relative positions), not a mask
    try:
        ka, kb = torch.broadcast_tensors(_keep(env[a], kind_a), _keep(env[b], kind_b))
    except RuntimeError:
        return False
    return bool((ka | ~kb).all())


def _one_mask(mask, kind: str, new, new_kind: str, node: fx.Node, env, problems: list[str]):
    """The mask after meeting ``new`` on the way back from the softmax: the first one, or of two
    masks the one that implies the other; else a problem (kvpass's core takes one mask)."""
    if mask is None:
        return new, new_kind
    if _redundant(new, new_kind, mask, kind, env):
        return mask, kind
    if _redundant(mask, kind, new, new_kind, env):
        return new, new_kind
    problems.append(f"a second mask (node {node.name}) that the first does not imply")
    return mask, kind


def _zero_one(a, env: dict | None) -> bool:
    """Whether ``a``'s sample value is a tensor of zeros and ones only."""
    v = env.get(a) if env is not None and isinstance(a, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.numel() > 0 and bool(((v == 0) | (v == 1)).all())


def _hides(mask, kind: str, z: fx.Node, env: dict) -> bool:
    """Whether ``mask`` hides every score that the 0/1 factor ``z`` zeroes (on the sample):
    then multiplying the scores by ``z`` changes nothing the softmax sees."""
    ka, zero = torch.broadcast_tensors(_keep(env[mask], kind), env[z] == 0)
    return not bool((ka & zero).any())


def join_score_terms(mask, kind: str, biases: tuple, heads: int):
    """The additive [B, H|1, Sq|1, Sk] mask a core reads for ``mask`` (of ``kind``; None at
    run time when the caller passes none) plus the score ``biases`` added besides it; a bias on
    heads folded into the batch ([B·H, Sq|1, Sk]) is unfolded.  Discovery puts a call to this
    before the softmax of a core with a score bias (ALiBi, relative position biases)."""
    total = None
    for b in biases:
        b = b.unflatten(0, (-1, heads)) if b.dim() == 3 else b
        total = b if total is None else total + b
    if mask is None:
        return total
    if kind == "additive":
        return mask + total
    keep = mask.bool() if kind == "bool_keep" else ~mask.bool()
    return torch.where(keep, total, float("-inf"))


def _join_bias(sm: fx.Node, mask, kind: str, biases: list[fx.Node], heads: int, env: dict) -> fx.Node:
    """A :func:`join_score_terms` node before the softmax (with its sample value), reused if
    discovery ran on this graph before."""
    done = sm.meta.get("kvpass_bias")
    if isinstance(done, fx.Node) and done.graph is sm.graph and done in env:
        return done
    for b in biases:
        if len(_shape(b) or ()) not in (3, 4):
            raise ValueError(f"a score bias of shape {list(_shape(b) or [])}")
    args = (mask, kind, tuple(biases), heads)
    with sm.graph.inserting_before(sm):
        n = sm.graph.call_function(join_score_terms, args)
    val = join_score_terms(env.get(mask) if mask is not None else None, kind, tuple(env[b] for b in biases), heads)
    if val.dim() != 4:
        sm.graph.erase_node(n)
        raise ValueError(f"a score bias of shape {list(val.shape)}, not [B, H, Sq, Sk]")
    fake0 = next((b.meta.get("val") for b in biases if isinstance(b.meta.get("val"), torch.Tensor)), None)
    fake = getattr(fake0, "fake_mode", None)
    with fake if fake is not None else contextlib.nullcontext():
        mv = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        n.meta["val"] = join_score_terms(mv, kind, tuple(b.meta.get("val") for b in biases), heads)
    n.meta["nn_module_stack"] = sm.meta.get("nn_module_stack")
    n.meta["kvpass_synth"] = "score_bias"
    env[n] = val
    sm.meta["kvpass_bias"] = n
    return n


def _sink_logits(cat: fx.Node) -> fx.Node | None:
    """For ``cat([scores, s], -1)`` with ``s`` a [H] parameter broadcast to [B, H, Sq, 1]: the
    [H] node (sink logits, one per head); with ``s`` computed per query ([B, H, Sq, 1], e.g. a
    projection of the hidden state): that node; else None."""
    parts = cat.args[0] if isinstance(cat.args[0], (list, tuple)) else []
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    shp = _shape(cat)
    if len(parts) != 2 or shp is None or len(shp) != 4 or dim not in (-1, 3):
        return None
    side = parts[1]
    side_shape = _shape(side) if isinstance(side, fx.Node) else None
    if side_shape is None or str(side_shape[-1]) != "1":
        return None
    cur = side
    for _ in range(8):
        val = _shape(cur)
        if val is not None and len(val) == 1 and str(val[0]) == str(shp[1]):
            return cur
        if not gu.is_movement(cur) or not gu.tensor_args(cur):
            break
        cur = gu.tensor_args(cur)[0]
    if tuple(str(x) for x in side_shape) == tuple(str(x) for x in (*shp[:3], 1)):
        return side  # one logit per (batch, head, query): computed from the query's token
    return None


def _strip_scalar(n, inner: set, env: dict | None = None) -> tuple[object, float]:
    """An operand scaled by constants (``k.transpose(-1, -2) / s``): (the operand, the factor);
    the scaling nodes join ``inner`` (the core then applies the factor)."""
    factor = 1.0
    while isinstance(n, fx.Node) and gu.op_name(n) in _SCALAR_SCALES and len(n.users) == 1:
        data, c = n.args[0], _constant(n.args[1], env) if len(n.args) > 1 else None
        if not isinstance(data, fx.Node) or c is None:
            break
        factor *= c if gu.op_name(n).startswith("mul") else 1.0 / c
        inner.add(n)
        n = data
    return n, factor


def _einsum_terms(n: fx.Node) -> tuple[str, str, str] | None:
    """The two 4-D operand terms and the 4-D output term of a two-operand ``einsum`` node."""
    if gu.op_name(n) != "einsum" or not isinstance(n.args[0], str):
        return None
    ins, _, out = n.args[0].replace(" ", "").partition("->")
    parts = ins.split(",")
    if len(parts) != 2 or any(len(x) != 4 for x in (*parts, out)):
        return None
    return parts[0], parts[1], out


def _einsum_qk(n: fx.Node) -> bool:
    """``einsum("bhqd,bhkd->bhqk", q, k)`` (any letters)."""
    t = _einsum_terms(n)
    if t is None:
        return False
    a, b, out = t
    return a[:2] == b[:2] == out[:2] and a[3] == b[3] and out == a[:3] + b[2] and a[2] != b[2]


def _einsum_pv(n: fx.Node) -> bool:
    """``einsum("bhqk,bhkd->bhqd", p, v)``."""
    t = _einsum_terms(n)
    if t is None:
        return False
    a, b, out = t
    return a[:2] == b[:2] == out[:2] and a[3] == b[2] and out == a[:3] + b[3]


def _main_and_side(tens: list[fx.Node]) -> tuple[fx.Node | None, fx.Node | None]:
    """Of two operands, the one computed from the scores' matmul, and the other."""
    a, b = tens[:2]
    ra, rb = _reaches_matmul(a), _reaches_matmul(b)
    if ra and not rb:
        return a, b
    if rb and not ra:
        return b, a
    if ra and rb:  # both: the one the other is computed from (s - max(s)), else the first
        return (a, b) if a in gu.ancestors(b) else (b, a) if b in gu.ancestors(a) else (a, b)
    return None, b


def _unfold_heads(n: fx.Node) -> fx.Node | None:
    """The [B, H, S, D] value a [B·H, S, D] operand was folded from (through movement ops)."""
    cur = n
    for _ in range(8):
        shp = _shape(cur)
        if shp is not None and len(shp) == 4:
            return cur
        if not gu.is_movement(cur):
            return None
        data = gu.tensor_args(cur)
        if not data:
            return None
        cur = data[0]
    return None


def _folded_out(pv: fx.Node) -> fx.Node | None:
    """The first [B, H, S, D] view of a [B·H, S, D] attention output."""
    cur = pv
    for _ in range(4):
        if len(cur.users) != 1:
            return None
        cur = next(iter(cur.users))
        if not gu.is_movement(cur):
            return None
        shp = _shape(cur)
        if shp is not None and len(shp) == 4:
            return cur
    return None


def _reaches_matmul(n: fx.Node, depth: int = 12) -> bool:
    """Whether ``n`` is computed from a scores matmul within ``depth`` steps."""
    if depth <= 0 or not isinstance(n, fx.Node):
        return False
    if gu.op_name(n) in MATMUL_OPS or _einsum_qk(n):
        return True
    tens = gu.tensor_args(n)
    if gu.op_name(n) == "where" and len(n.args) >= 3:  # follow the scores, not the condition
        tens = [a for a in n.args[1:3] if isinstance(a, fx.Node)]
    return any(_reaches_matmul(t, depth - 1) for t in tens[:2])


def _synth_transpose(kt: fx.Node, env: dict) -> fx.Node | None:
    """A ``transpose(kt, -2, -1)`` node right after ``kt`` (reused if discovery added it before),
    with its sample value and fake metadata: the key as [B, H, S, D]."""
    for u in kt.users:
        if u.meta.get("kvpass_synth") == "key_transpose":
            return u
    val = kt.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 3 or kt not in env:
        return None
    op = torch.ops.aten.transpose.int
    with kt.graph.inserting_after(kt):
        n = kt.graph.call_function(op, (kt, -2, -1))
    fake = getattr(val, "fake_mode", None)
    with fake if fake is not None else contextlib.nullcontext():
        n.meta["val"] = op(val, -2, -1)
    n.meta["nn_module_stack"] = kt.meta.get("nn_module_stack")
    n.meta["kvpass_synth"] = "key_transpose"
    env[n] = op(env[kt], -2, -1)
    return n


def _untranspose(kt: fx.Node) -> fx.Node | None:
    """kᵀ → k for transpose(-2,-1)/permute spellings (3-D or 4-D)."""
    op = gu.op_name(kt)
    nd = len(_shape(kt) or ()) or 4
    if op == "transpose":
        dims = sorted(d % nd for d in kt.args[1:3])
        return kt.args[0] if dims == [nd - 2, nd - 1] else None
    if op == "permute":
        perm = [d % nd for d in kt.args[1]]
        return kt.args[0] if perm[-2:] == [nd - 1, nd - 2] else None
    if op == "t":
        return kt.args[0]
    return None


def _cores(graph: fx.Graph, env: dict | None = None) -> tuple[list[_Core], list[str]]:
    """The attention cores of ``graph``, and why each softmax that is not one was passed over.
    ``env`` (sample values) lets discovery add normalising nodes (a key transpose)."""
    out, passed = [], []
    for n in graph.nodes:
        op = gu.op_name(n)
        c, why = None, None
        if op == "scaled_dot_product_attention":
            c = _sdpa_core(n)
        elif op in SOFTMAX_OPS:
            c, why = _eager_core(n, env)
        if c is not None:
            why = _not_over_tokens(c)
            if why is None:
                out.append(c)
                continue
        if why:
            passed.append(why)
    return out, passed


def _not_over_tokens(c: _Core) -> str | None:
    """Why core ``c`` attends over something other than tokens (None: it is token attention).

    Heads are fixed by the weights, so a query whose head axis has a dynamic size (the traced
    sequence length) while its key axis has a fixed one mixes a fixed set of entries at each
    position: e.g. attention over the outputs of earlier layers (Inkling's block residuals).
    Such a core keeps no per-token keys, so there is no KV cache to rewrite."""
    qs, ks = _shape(c.q), _shape(c.k)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return None
    heads, keys = qs[1], ks[2]
    if isinstance(heads, torch.SymInt) and not isinstance(keys, torch.SymInt):
        return (f"{gu.op_name(c.out)} {c.out.name}: attends over {keys} fixed entries per position (its "
                f"head axis has the dynamic size {heads}): not attention over tokens, no KV cache")
    return None


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
    projs = _nearest_projections(pre)
    projs = [p for p in projs if not any(_is_projection(x) for x in gu.chain_between(p, pre)[1:])]
    if len(projs) != 1:
        problems.append(f"{what}: expected one projection feeding it, found {len(projs)}")
        return None, None, []
    proj = projs[0]
    chain = gu.chain_between(proj, pre)
    # the first head-shaped node the projection's channels reach, through movement ops and
    # point-wise ones (a scale, a bias, a norm over the whole projection width) alike
    D = _shape(pre)[-1]
    val = env[proj]
    ids = torch.arange(val.shape[-1], dtype=torch.float64).expand(val.shape).contiguous()
    traced = gu.trace_indices(chain, env, proj, ids)
    entry = None
    for n in chain[1:]:
        shp = _shape(n)
        if (isinstance(traced.get(n), torch.Tensor) and shp is not None and len(shp) == 4
                and str(shp[-1]) == str(D) and gu.is_movement(n)):
            entry = n
            break
    if entry is None:
        stop = next((n for n in chain[1:] if n in traced and traced[n] is None), None)
        fresh = next((n for n in chain[1:] if gu.op_name(n) in _FRESH_OPS), None)
        if fresh is not None:  # e.g. MLA: a latent's up-projection and a shared rope key copied in
            why = (f" (the head view is assembled into a new tensor at node {fresh.name}, op "
                   f"'{gu.op_name(fresh)}', from more than this projection: e.g. MLA's latent key plus a "
                   "shared rope key)")
        elif stop is not None:
            why = f" (the channels are mixed at node {stop.name}, op '{gu.op_name(stop)}')"
        else:
            why = ""
        problems.append(f"{what}: no [.., heads, head_dim] view after projection {proj.name}{why}")
        return None, proj, chain
    ev = traced[entry]
    shp = [str(x) for x in _shape(entry)]
    seq_sym = str(_shape(pre)[2])
    h_dim = 1 if shp[2] == seq_sym else 2
    per_head = ev[0, 0] if h_dim == 2 else ev[0, :, 0]  # [h, D]
    channels = tuple(int(x) for x in per_head.reshape(-1).tolist())
    scale = _width_norm(gu.chain_between(proj, entry), int(val.shape[-1]))
    weight, bias, transposed = _proj_params(proj)
    return Projection(weight, bias, channels, transposed, scale), proj, chain


def _width_norm(chain: list[fx.Node], width: int) -> str | None:
    """A per-channel parameter over the whole projection width on the way to the head view
    (the weight of a norm over all heads, e.g. OLMo 2's q/k norms), if any."""
    inside = set(chain)
    for n in chain[1:]:
        for a in gu.tensor_args(n):
            w = _param_behind(a) if a not in inside else None
            if w is not None and _shape(w) is not None and tuple(_shape(w)) == (width,):
                return gu.fqn(w.target)
    return None


_FRESH_OPS = {"new_empty", "empty", "new_zeros", "zeros", "full", "new_full", "empty_like", "zeros_like"}
_WEIGHT_FLIPS = {"t", "numpy_T", "transpose", "permute", "mT"}
_WEIGHT_CASTS = {"to", "_to_copy", "alias", "detach", "type_as", "contiguous"}


def _weight_arg(a) -> tuple[fx.Node | None, int]:
    """(the 2-D parameter behind operand ``a``, how many times it was transposed on the way)."""
    flips = 0
    for _ in range(4):
        if not isinstance(a, fx.Node):
            return None, 0
        if a.op == "get_attr":
            val = a.meta.get("val")
            return (a, flips) if isinstance(val, torch.Tensor) and val.dim() == 2 else (None, 0)
        op = gu.op_name(a)
        if op in _WEIGHT_FLIPS:
            flips += 1
        elif op not in _WEIGHT_CASTS:
            return None, 0
        a = a.args[0]
    return None, 0


def _nearest_projections(pre: fx.Node) -> list[fx.Node]:
    """Projections with a path to ``pre`` that crosses no other projection (``pre`` itself
    included): a walk back from ``pre`` that stops at projections.  A superset of those whose
    every path is projection-free (the caller filters), found without visiting every earlier
    layer of a whole model's graph."""
    if _is_projection(pre):
        return [pre]
    seen, out, stack = {pre}, [], [pre]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if _is_projection(a):
                out.append(a)
            else:
                stack.append(a)
    return sorted(out)


def _is_projection(n: fx.Node) -> bool:
    if gu.op_name(n) not in PROJ_OPS:
        return False
    if gu.op_name(n) == "linear":
        return _weight_arg(n.args[1])[0] is not None
    return any(_weight_arg(a)[0] is not None for a in n.args[:3])


def _proj_params(n: fx.Node) -> tuple[str, str | None, bool]:
    """(weight, bias, transposed: the weight is stored [in, out]) of a projection node."""
    op = gu.op_name(n)
    if op == "linear":
        w, flips = _weight_arg(n.args[1])
        b = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else None
        return gu.fqn(w.target), (gu.fqn(b.target) if b is not None and b.op == "get_attr" else None), flips % 2 == 1
    if op == "addmm":  # Conv1D: addmm(bias, x, W[in, out])
        bias = gu.fqn(n.args[0].target) if n.args[0].op == "get_attr" else None
        w, flips = _weight_arg(n.args[2])
        return gu.fqn(w.target), bias, flips % 2 == 0
    w, flips = _weight_arg(n.args[1])
    if w is not None:  # x @ W: stored [in, out] unless transposed on the way (x @ W.T)
        return gu.fqn(w.target), None, flips % 2 == 0
    w, flips = _weight_arg(n.args[0])
    return gu.fqn(w.target), None, flips % 2 == 1


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
                if w is not None and _shape(w) is not None and tuple(_shape(w)) == (D,) and norm is None:
                    norm = gu.fqn(w.target)
    return rope, norm


def _param_name(n: fx.Node) -> str:
    """The qualified name of the parameter behind ``n`` (casts/views), else the node's name."""
    w = _param_behind(n)
    return gu.fqn(w.target) if w is not None else n.name


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
    """The mask before slicing/broadcasting to the scores: back over movement ops that keep it
    4-D (a [B, S] padding vector viewed as [B, 1, 1, S] stays the 4-D view)."""
    cur = mask
    while gu.is_movement(cur):
        data = [a for a in cur.args if isinstance(a, fx.Node)]
        if not data or len(_shape(data[0]) or ()) != 4:
            break
        cur = data[0]
    return cur


def _mask_facts(core: _Core, env, problems: list[str]) -> tuple[bool, int | None]:
    """Causality and window from the sample mask (also flags score biases such as ALiBi)."""
    if core.mask is None:
        return core.is_causal, None
    m = env[core.mask]
    if core.mask_kind == "additive":
        keep = _keep(m, "additive")
    else:
        keep = m.bool() if core.mask_kind == "bool_keep" else ~m.bool()
    if keep.dim() == 4 and keep.shape[1] > 1 and not bool((keep == keep[:, :1]).all()):
        problems.append(f"per-head mask (node {core.mask.name}): not supported")
    keep = keep.reshape(-1, *keep.shape[-2:])[0]
    Sq, Sk = keep.shape
    tri = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    causal = core.is_causal or bool((~keep[~tri]).all()) and Sq > 1
    return causal, None


def _score_bias(core: _Core, env, H: int) -> tuple[tuple[float, ...] | None, str | None]:
    """A score bias in the sample's additive mask (finite values other than 0): ``(slopes,
    None)`` where it is ALiBi — per head, ``slope_h · key position`` plus a per-query constant
    (softmax does not see the constant), so forms that store keys by position recompute it
    exactly — else ``(None, why)``: the bias passes through with the mask (``Full``,
    ``SharedKV``) but cannot be extended to positions the graph never computed it for."""
    if core.mask is None or core.mask_kind != "additive":
        return None, None
    m = env[core.mask].float()
    keep = _keep(m, "additive")  # exp(-1000) is 0 in fp32: GPT-1's -1e4 is a mask value
    if not bool((m[keep] != 0).any()):
        return None, None  # a plain mask
    tail = ": forms that decide visibility by token position (Window, Sparse, Quantize, MHC) cannot recompute it"
    why = f"a score bias (node {core.mask.name}) that is not ALiBi (slope · key position per head)" + tail
    if any(gu.op_name(n) in PROJ_OPS for n in gu.ancestors(core.mask)):
        return None, (f"a score bias (node {core.mask.name}) computed from the tokens' content "
                      "(a projection feeds it)" + tail)
    if m.dim() != 4 or m.shape[1] not in (1, H):
        return None, why
    Sk = m.shape[-1]
    pos = torch.arange(Sk, dtype=torch.float64).expand(m.shape)
    w = keep.double()
    n = w.sum(-1, keepdim=True)
    rows = n[..., 0] >= 2
    if not bool(rows.any()):
        return None, why
    n = n.clamp(min=1)
    mc = torch.where(keep, m.double(), 0.0)
    pc = (pos - (pos * w).sum(-1, keepdim=True) / n) * w
    bc = (mc - (mc * w).sum(-1, keepdim=True) / n) * w
    slopes = (pc * bc).sum((0, 2, 3)) / (pc * pc).sum((0, 2, 3)).clamp(min=1e-12)  # per head
    resid = (bc - slopes.view(1, -1, 1, 1) * pc).abs().amax()
    if not bool(resid <= 1e-3 * max(1.0, float(m[keep].abs().amax()))):
        return None, why
    slopes = slopes.expand(H) if slopes.numel() == 1 else slopes
    return tuple(float(x) for x in slopes), None


def probe_window(cap: Captured, core_mask: fx.Node, kind: str, length: int = 1536,
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
def _guarded(problems: list[str], what: str, default, fn, *args):
    """``fn(*args)``, or ``default`` with a problem naming what failed: an unknown pattern in
    one part of a site is a problem of that site, never an exception out of discovery."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded in site.problems
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        problems.append(f"{what}: not understood ({type(e).__name__}: {msg})")
        return default


def _site(cap: Captured, core: _Core, layer: int, probe: bool) -> AttentionSite:
    env, core_probs = cap.env, list(core.problems)
    qshape = _shape(core.q)
    H, D = int(qshape[1]), int(qshape[3])
    k_pre, k_chain = _head_pre(core.k, _shape(core.k))
    v_pre, v_chain = _head_pre(core.v, _shape(core.v))
    Hkv = int(_shape(k_pre)[1])
    kmap = _guarded(core_probs, "key head map", list(range(H)), _trace_heads, k_pre, k_chain, core.k, env)
    vmap = _guarded(core_probs, "value head map", list(range(H)), _trace_heads, v_pre, v_chain, core.v, env)
    core_h = int(_shape(core.k)[1])
    if core.gqa and core_h != H:
        kmap = [kmap[h * core_h // H] for h in range(H)]
        vmap = [vmap[h * core_h // H] for h in range(H)]
    elif core_h == 1 and H > 1:
        kmap, vmap = kmap * H, vmap * H
    if kmap != vmap:
        core_probs.append("keys and values use different head maps")
    if int(_shape(v_pre)[1]) != Hkv:
        core_probs.append("keys and values have different head counts")
    causal, window = _guarded(core_probs, "mask", (core.is_causal, None), _mask_facts, core, env, core_probs)
    alibi, bias_why = _guarded(core_probs, "score bias", (None, None), _score_bias, core, env, H)
    if probe and core.mask is not None:
        window = _guarded(core_probs, "mask window", None, probe_window, cap, core.mask, core.mask_kind)
    # the projection side: what forms that change weights need (SharedKV, MHC)
    problems: list[str] = []
    none3 = (None, None, [])
    qp, q_node, q_chain = _guarded(problems, "query path", none3, _projection, core.q, env, problems, "query path")
    kp, k_node, k_path = _guarded(problems, "key path", none3, _projection, k_pre, env, problems, "key path")
    vp, v_node, v_path = _guarded(problems, "value path", none3, _projection, v_pre, env, problems, "value path")
    rope, k_norm = _guarded(problems, "key path", (None, None), _rope_and_norm, k_path, D, problems, "key path")
    _, q_norm = _guarded(problems, "query path", (None, None), _rope_and_norm, q_chain, D, problems, "query path")
    op, o_node = _guarded(problems, "output projection", (None, None), _output_projection, core.out, env, H, D)
    scale = core.scale if core.scale is not None else 1 / math.sqrt(D)
    # the owning module: the smallest holding the core and its K/V/output projections
    paths = [gu.module_path(n) for n in (core.out, k_node, v_node, o_node) if n is not None]
    paths += [gu.module_path(n) for n in core.inner]
    name = gu.common_prefix(p for p in paths if p)
    nodes = SiteNodes(cap, core.out, core.q, k_pre, v_pre,
                      None if core.mask is None else _mask_source(core.mask), core.mask_kind,
                      core.inner, k_node, v_node, q_node, core.sinks)
    where = name or "<top>"
    site = AttentionSite(name, layer, H, Hkv, D, tuple(kmap), qp, kp, vp, op, rope, q_norm, k_norm,
                         causal, window, float(scale), core.softcap, core.kind,
                         [f"{where}: {p}" for p in core_probs + problems], nodes,
                         [f"{where}: {p}" for p in core_probs],
                         None if core.sinks is None else _param_name(core.sinks), alibi=alibi)
    if bias_why:
        site.positional_problems.append(f"{where}: {bias_why}")
    sq, sk = _shape(core.q)[2], _shape(core.k)[2]
    if str(sq) != str(sk):  # a cache-free call: one key per token, unless the model adds keys
        site.positional_problems.append(
            f"{where}: {sk} keys for {sq} queries in a cache-free call (compressed or memory keys): forms that "
            "decide visibility by token position (Window, Sparse, Quantize, MHC) need one key per token")
    return site


class SiteList(list):
    """The sites of a graph (a list), with ``passed``: why each softmax that is not an
    attention core was passed over (node and op), for error messages."""

    passed: list[str]


def find_sites_in(cap: Captured, *, probe_windows: bool = True) -> SiteList:
    """All attention sites of a captured graph, in graph order."""
    cores, passed = _cores(cap.graph, cap.env)
    out = SiteList(_site(cap, c, i, probe_windows) for i, c in enumerate(cores))
    out.passed = passed
    return out


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
