"""Shared KV: fewer KV heads per layer (MHA/GQA → GQA/MQA) and layers sharing one cache.

Weights are edited where they are (the projection rows of each KV head, found by the site's
channel maps, so separate, fused and interleaved layouts alike): every head of a group gets
the merged weights, and the layer's KVCore stores only one head per group — the cache shrinks
by the group size, whatever the projection layout.

Merges (group ``G`` of KV heads, per-head projection ``W_h``):

* ``mean`` — ``W_G = mean_h W_h`` (and biases): the GQA paper's conversion.
* ``calibrated`` — keys: ``W_G = (Σ_h C_h)⁻¹ Σ_h C_h W_h`` with ``C_h = E[q qᵀ]`` over the
  query heads reading head ``h`` (minimises Σ_h E[(q·(k_h − k_G))²], the score error);
  values: the same with ``C_h = O_h O_hᵀ``, ``O_h`` the output-projection columns those
  query heads feed (minimises the output error Σ_h ‖(v_h − v_G) O_h‖²).

``grouping="similarity"`` clusters heads into equal groups by calibration similarity of their
keys and values, then *re-lays out* heads (KV rows, query rows and output columns) so every
group is contiguous — the standard GQA layout; the re-layout alone changes nothing.
``cross_layer=k``: k consecutive layers read the first one's cache; the others stop computing
keys and values (their K/V projections are removed where not fused with the query).

Example:
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> m = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.SharedKV(kv_heads=1))
    >>> kvpass.kv_bytes_per_token(m)  # 2 layers x (K,V) x 1 head x 8 dims x 4 bytes
    128
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ...errors import PolicyError, SiteError
from ...graph.sites import AttentionSite, Projection
from ...ir.forms import SharedKV
from ...ir.plan import LayerPlan
from ...runtime.attention import KVAttention
from ..registry import register_pass

__all__ = ["target_heads", "contiguous_groups", "similarity_groups", "relayout", "merge", "apply"]


def target_heads(site: AttentionSite, form: SharedKV) -> int:
    h = site.num_kv_heads
    valid = [d for d in range(1, h + 1) if h % d == 0]
    n = form.kv_heads if form.kv_heads is not None else (h // form.ratio if form.ratio else h)
    if form.cross_layer == 1:
        valid = valid[:-1] or valid  # the present count would change nothing (refused below)
    if form.kv_heads is not None and n not in valid + [h] or form.ratio is not None and h % form.ratio:
        what = f"kv_heads={form.kv_heads}" if form.kv_heads is not None else f"ratio={form.ratio}"
        raise PolicyError(f"SharedKV.{what.split('=')[0]}: invalid value {what.split('=')[1]} for "
                          f"{site.name} with {h} KV heads; allowed kv_heads: {valid}, "
                          f"ratio: {[h // d for d in valid]}")
    if n == h and form.cross_layer == 1:  # never a silent no-op
        what = f"kv_heads={form.kv_heads}" if form.kv_heads is not None else f"ratio={form.ratio}"
        raise PolicyError(f"SharedKV({what}) changes nothing on {site.name}: it already has {h} KV heads; "
                          f"ask for fewer ({', '.join(map(str, valid[:-1])) or 'none possible'}) or leave "
                          "the layer out of the policy")
    return n


def contiguous_groups(num_kv: int, n: int) -> list[list[int]]:
    g = num_kv // n
    return [list(range(i * g, (i + 1) * g)) for i in range(n)]


def _head_distances(stats, num_kv: int, D: int) -> torch.Tensor:
    """Normalised E‖k_a − k_b‖² + E‖v_a − v_b‖² between KV heads, from cross-covariances."""
    out = torch.zeros(num_kv, num_kv)
    for c in (stats.kk, stats.vv):
        blocks = c.view(num_kv, D, num_kv, D)
        tr = torch.einsum("adbd->ab", blocks)  # E[k_a · k_b] (times N)
        diag = tr.diagonal()
        out += (diag[:, None] + diag[None, :] - 2 * tr) / (diag[:, None] + diag[None, :]).clamp(min=1e-12)
    return out


def similarity_groups(dist: torch.Tensor, n: int) -> list[list[int]]:
    """Balanced clustering into ``n`` equal groups: greedy seeds, then pairwise swaps."""
    h = dist.shape[0]
    g = h // n
    left, groups = set(range(h)), []
    while left:
        seed = max(left, key=lambda a: sum(float(dist[a, b]) for b in left))
        near = sorted(left - {seed}, key=lambda b: float(dist[seed, b]))[: g - 1]
        groups.append([seed, *near])
        left -= set(groups[-1])

    def cost(gr):
        return sum(float(dist[a, b]) for a in gr for b in gr)

    while _swap_once(groups, cost):
        pass
    return [sorted(gr) for gr in sorted(groups, key=min)]


def _swap_once(groups: list[list[int]], cost) -> bool:
    """Apply the first head swap between two groups that lowers the total cost."""
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            for a in groups[i]:
                for b in groups[j]:
                    gi = [x for x in groups[i] if x != a] + [b]
                    gj = [x for x in groups[j] if x != b] + [a]
                    if cost(gi) + cost(gj) < cost(groups[i]) + cost(groups[j]) - 1e-9:
                        groups[i], groups[j] = gi, gj
                        return True
    return False


# --------------------------------------------------------------------------- weight access
def _rows(proj: Projection, head: int, D: int) -> list[int]:
    return list(proj.channels[head * D:(head + 1) * D])


def head_rows(weights: dict, proj: Projection, head: int, D: int):
    """(rows [D, in], bias [D] or None, width-norm scale [D] or None) of one head."""
    w = weights[proj.weight]
    rows = torch.tensor(_rows(proj, head, D))
    wh = w.data[:, rows].T if proj.transposed else w.data[rows]  # [D, in]
    bh = weights[proj.bias].data[rows] if proj.bias else None
    sh = weights[proj.scale].data[rows] if proj.scale else None
    return wh.clone(), (None if bh is None else bh.clone()), (None if sh is None else sh.clone())


def set_head_rows(weights: dict, proj: Projection, head: int, D: int, wh, bh, sh=None) -> None:
    w = weights[proj.weight]
    rows = torch.tensor(_rows(proj, head, D))
    if proj.transposed:
        w.data[:, rows] = wh.T.to(w.dtype)
    else:
        w.data[rows] = wh.to(w.dtype)
    if proj.bias and bh is not None:
        weights[proj.bias].data[rows] = bh.to(w.dtype)
    if proj.scale and sh is not None:  # a norm over the whole projection: its entries merge too
        weights[proj.scale].data[rows] = sh.to(weights[proj.scale].dtype)


def head_cols(weights: dict, proj: Projection, head: int, D: int) -> torch.Tensor:
    """Output projection: the [out, D] block head ``head`` feeds."""
    w = weights[proj.weight]
    cols = torch.tensor(_rows(proj, head, D))
    return (w.data[cols] .T if proj.transposed else w.data[:, cols]).clone()


def set_head_cols(weights: dict, proj: Projection, head: int, D: int, block) -> None:
    w = weights[proj.weight]
    cols = torch.tensor(_rows(proj, head, D))
    if proj.transposed:
        w.data[cols] = block.T.to(w.dtype)
    else:
        w.data[:, cols] = block.to(w.dtype)


# ------------------------------------------------------------------------------- passes
def relayout(weights: dict, site: AttentionSite, groups: list[list[int]]) -> tuple[tuple[int, ...], list[int]]:
    """Permute KV heads (and the query heads/output columns reading them) so groups are
    contiguous.  Returns the new q→kv head map and the query order (new → old).  Changes no
    output by itself."""
    D = site.head_dim
    kv_order = [h for gr in groups for h in gr]
    kv_new = {old: new for new, old in enumerate(kv_order)}
    q_order = sorted(range(site.num_heads), key=lambda h: (kv_new[site.kv_head_map[h]], h))
    for proj in (site.k_proj, site.v_proj):
        saved = [head_rows(weights, proj, h, D) for h in range(site.num_kv_heads)]
        for new, old in enumerate(kv_order):
            set_head_rows(weights, proj, new, D, *saved[old])
    saved_q = [head_rows(weights, site.q_proj, h, D) for h in range(site.num_heads)]
    saved_o = [head_cols(weights, site.o_proj, h, D) for h in range(site.num_heads)]
    for new, old in enumerate(q_order):
        set_head_rows(weights, site.q_proj, new, D, *saved_q[old])
        set_head_cols(weights, site.o_proj, new, D, saved_o[old])
    return tuple(kv_new[site.kv_head_map[old]] for old in q_order), q_order


def merge(weights: dict, site: AttentionSite, groups: list[list[int]], head_map, how: str, stats=None) -> None:
    """Give every head of a group the merged K and V projection (see module docstring)."""
    D = site.head_dim
    for proj, kind in ((site.k_proj, "k"), (site.v_proj, "v")):
        for gr in groups:
            parts = [head_rows(weights, proj, h, D) for h in gr]
            if how == "mean":
                wg = torch.stack([p[0] for p in parts]).mean(0)
                bg = None if parts[0][1] is None else torch.stack([p[1] for p in parts]).mean(0)
            else:
                cs = [_weighting(weights, site, h, kind, head_map, stats) for h in gr]
                total = sum(cs) + 1e-6 * torch.eye(D) * sum(c.trace() for c in cs) / D
                wg = torch.linalg.solve(total, sum(c @ p[0].double() for c, p in zip(cs, parts)))
                bg = None if parts[0][1] is None else torch.linalg.solve(
                    total, sum(c @ p[1].double() for c, p in zip(cs, parts)))
            sg = None if parts[0][2] is None else torch.stack([p[2] for p in parts]).mean(0)
            for h in gr:
                set_head_rows(weights, proj, h, D, wg, bg, sg)


def _weighting(weights, site, kv_head: int, kind: str, head_map, stats) -> torch.Tensor:
    readers = [h for h in range(site.num_heads) if head_map[h] == kv_head]
    if kind == "k":
        if stats is None or stats.q2 is None:
            raise SiteError(f"{site.name}: merge='calibrated' needs calibration data "
                            "(optimize(..., calibration=...))")
        return sum(stats.q2[h].double() for h in readers) / max(stats.n, 1)
    blocks = [head_cols(weights, site.o_proj, h, site.head_dim).double() for h in readers]
    return sum(b.T @ b for b in blocks)


def _calibrates(form: SharedKV) -> bool:
    return form.grouping == "similarity" or form.merge == "calibrated"


def _structural(form: SharedKV, att) -> SharedKV:
    """The shapes without calibration: the same head counts and sharing, mean merge."""
    return SharedKV(kv_heads=form.kv_heads, ratio=form.ratio, cross_layer=form.cross_layer)


@register_pass(SharedKV,
               changes_weights=True, calibrates=_calibrates, stats=_calibrates,
               streamable=lambda f: f.cross_layer == 1, structural=_structural)
def apply(att: KVAttention, site: AttentionSite, form: SharedKV, ctx) -> LayerPlan:
    """Rewrite one layer for ``form`` (heads only; cross-layer sharing is set up by the caller)."""
    weights, stats = ctx.weights, ctx.stats
    if att.kv_core.latent is not None:
        raise SiteError(f"{site.name}: SharedKV after MHC: the latent is already shared by all heads")
    n = target_heads(site, form)
    head_map = site.kv_head_map
    if n == site.num_kv_heads:
        return att.kv_core.plan
    if site.k_norm is not None and site.k_proj.weight == site.q_proj.weight:
        raise SiteError(f"{site.name}: per-head key norm on a fused projection; cannot merge")
    if form.grouping == "similarity":
        if stats is None or stats.kk is None:
            raise SiteError(f"{site.name}: grouping='similarity' needs calibration data")
        groups = similarity_groups(_head_distances(stats, site.num_kv_heads, site.head_dim), n)
        head_map, q_order = relayout(weights, site, groups)
        groups = contiguous_groups(site.num_kv_heads, n)
        if stats.q2 is not None:  # query statistics follow their heads through the re-layout
            stats = copy.copy(stats)
            stats.q2 = stats.q2[q_order]
    else:
        groups = contiguous_groups(site.num_kv_heads, n)
    merge(weights, site, groups, head_map, form.merge, stats)
    group_of = {h: i for i, gr in enumerate(groups) for h in gr}
    return dataclasses.replace(att.kv_core.plan, keep=tuple(gr[0] for gr in groups),
                               head_map=tuple(group_of[head_map[h]] for h in range(site.num_heads)))
