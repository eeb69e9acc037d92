"""MHC (multi-head compression): one low-rank latent per token, cached instead of K and V.

The K and V projections of a layer (``W_k``, ``W_v``: rows per (head, dim) found by the site's
channel maps, so separate, fused and interleaved layouts alike) are factorised jointly::

    [K | V] = x · [W_kᵀ | W_vᵀ]  ≈  (x · A) · [B_k | B_v]      c = x · A  (r values, cached)

* ``method="svd"``: truncated SVD of the weights.
* ``method="whitened"``: SVD of ``Lᵀ Wᵀ`` where ``L Lᵀ = E[x xᵀ]`` on calibration text, then
  ``A = L⁻ᵀ U_r``: minimises the error on the layer's real inputs, ``E‖x (Wᵀ − A B)‖²``.
  Inputs have outlier channels (variance 100s× the median), which plain SVD ignores.
* ``method="aware"``: whitened, and the output side weighted too — key rows by the query
  statistics of the heads reading them (score error), value rows by the output projection
  (output error): ``svd(Lᵀ Wᵀ R^½)`` (:func:`output_weights`).
* ``joint=False``: separate K and V latents (ranks split between them); ``groups=g``: one
  latent per group of KV heads (the latent is their concatenation).
* ``refit=True``: after truncation, the output projection is refitted by least squares so
  the layer's output on calibration data is reproduced as well as possible.
* ``allocate=True`` (with ``ratio``): before rewriting, each layer's sensitivity is measured
  (:func:`allocate_ranks`) and the total rank is spent where it buys most.

Then :func:`kvpass.transform.heal` is available as for every lossy pass (it trains the latent too).
How the cached latent is attended (decompress + the site's RoPE/norm, or absorbed in latent
space for sites without RoPE) is in :mod:`kvpass.runtime.latent`.

Example:
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> m = kvpass.optimize(model, kvpass.MHC(rank=32, method="svd"))  # 2·2·8 = 32: exact
    >>> ids = torch.tensor([[1, 2, 3, 4, 5]])
    >>> bool((m(ids).logits - model(ids).logits).abs().max() < 1e-4)
    True
    >>> kvpass.kv_bytes_per_token(m)  # 2 layers x (32 latent floats + one int64 position)
    272
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import PolicyError, SiteError
from ...graph.capture import run_cache_free, sample_env
from ...graph.sites import AttentionSite
from ...ir.forms import MHC
from ...ir.plan import LayerPlan
from ...runtime.attention import KVAttention
from ...runtime.latent import Latent, PathFn, PositionFn, fit_key_path
from ...util import kl_divergence, knapsack
from ..calibrate import LayerFeeder, collect_stats, run_calls
from ..heal import snapshot
from ..registry import register_pass
from . import shared_kv

__all__ = ["apply", "factorize", "kv_weights", "layer_rank", "blocks", "needs_calibration", "allocate_ranks"]


def needs_calibration(form: MHC) -> bool:
    return form.method != "svd" or form.refit or form.allocate


def layer_rank(site: AttentionSite, form: MHC, ctx=None):
    """The latent size of this layer: an int (joint) or (rank_k, rank_v) (``joint=False``)."""
    limit = site.kv_values_per_token()
    if ctx is not None and site.name in ctx.ranks:
        return ctx.ranks[site.name]
    if form.rank is not None:
        if form.rank > limit:
            raise PolicyError(f"MHC.rank: invalid value {form.rank} for {site.name}; allowed: 1..{limit} "
                              f"(2·Hkv·D = 2·{site.num_kv_heads}·{site.head_dim}: a larger latent "
                              "would be bigger than the keys and values it replaces)")
        r = form.rank
    else:
        r = max(1, round(limit / form.ratio))
    if r < form.groups * (1 if form.joint else 2):
        raise PolicyError(f"MHC: rank {r} of {site.name} is smaller than the {form.groups} group(s)"
                          f"{'' if form.joint else ' x (K, V)'} it is split into")
    return r if form.joint else (r - r // 2, r // 2)


def blocks(site: AttentionSite, form: MHC, rank) -> list[tuple[list[int], int]]:
    """(rows of the stacked [W_k; W_v] in (head, dim) order, rank) per factorised block."""
    H, D, g = site.num_kv_heads, site.head_dim, form.groups
    if H % g:
        raise PolicyError(f"MHC.groups: invalid value {g} for {site.name} with {H} KV heads; "
                          f"allowed: {[d for d in range(1, H + 1) if H % d == 0]}")
    per = H // g
    out = []

    def split(total: int) -> list[int]:
        return [total // g + (1 if i < total % g else 0) for i in range(g)]

    kinds = [("kv", rank)] if form.joint else [("k", rank[0]), ("v", rank[1])]
    for kind, total in kinds:
        for i, r in enumerate(split(total)):
            heads = range(i * per, (i + 1) * per)
            rows = []
            if "k" in kind:
                rows += [h * D + d for h in heads for d in range(D)]
            if "v" in kind:
                rows += [H * D + h * D + d for h in heads for d in range(D)]
            out.append((rows, r))
    return out


def kv_weights(weights: dict, site: AttentionSite) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[2·Hkv·D, in] float64: K rows then V rows, (head, dim) order; and the biases (or None)."""
    D = site.head_dim
    rows, bias = [], []
    for proj in (site.k_proj, site.v_proj):
        for h in range(site.num_kv_heads):
            w, b, _ = shared_kv.head_rows(weights, proj, h, D)
            rows.append(w.double())
            bias.append(torch.zeros(D, dtype=torch.float64) if b is None else b.double())
    has_bias = bool(site.k_proj.bias or site.v_proj.bias)
    return torch.cat(rows), (torch.cat(bias) if has_bias else None)


def _sqrt_pair(R: torch.Tensor, damp: float = 1e-6):
    """(R^½, R^-½) of a symmetric PSD matrix (damped)."""
    lam, Q = torch.linalg.eigh(R.double())
    lam = lam.clamp(min=0) + damp * lam.clamp(min=0).mean().clamp(min=1e-12)
    return (Q * lam.sqrt()) @ Q.T, (Q / lam.sqrt()) @ Q.T


def spectra(W: torch.Tensor, C: torch.Tensor | None, rows: list[int], R: torch.Tensor | None = None,
            damp: float = 1e-6):
    """``(A, S, Vh)`` of one block: ``x Wᵀ`` at rank r is ``x A[:, :r] S[:r] Vh[:r]``.

    Minimises ``E‖x (Wᵀ − A B) R^½‖²`` with ``E[x xᵀ] = C`` (``C`` None: plain weights;
    ``R`` None: every output row counts alike)."""
    d_in = W.shape[1]
    Wb = W[rows].double()
    L = None
    if C is not None:
        C = C.double() + damp * C.double().diagonal().mean().clamp(min=1e-12) * torch.eye(d_in, dtype=torch.float64)
        L = torch.linalg.cholesky(C)
    M = Wb.T if L is None else L.T @ Wb.T
    Rinv = None
    if R is not None:
        Rh, Rinv = _sqrt_pair(R[rows][:, rows])
        M = M @ Rh
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    A = U if L is None else torch.linalg.solve_triangular(L.T, U, upper=True)
    return A, S, (Vh if Rinv is None else Vh @ Rinv)


def factorize(W: torch.Tensor, C: torch.Tensor | None, blocks_: list, R: torch.Tensor | None = None):
    """``A`` [in, r], ``B`` [r, rows] with ``x A B ≈ x Wᵀ`` per block (see :func:`spectra`).
    Ranks above a block's size are cut to it."""
    n_out = W.shape[0]
    As, Bs = [], []
    for rows, r in blocks_:
        A, S, Vh = spectra(W, C, rows, R)
        r = min(r, S.numel())
        B = torch.zeros(r, n_out, dtype=torch.float64)
        B[:, rows] = S[:r, None] * Vh[:r]
        As.append(A[:, :r])
        Bs.append(B)
    return torch.cat(As, 1), torch.cat(Bs, 0)


def output_weights(site: AttentionSite, stats, weights: dict) -> torch.Tensor:
    """``R`` for ``method="aware"``: per KV head, keys weighted by ``Σ E[q qᵀ]`` of the query
    heads reading it (the score error ``E[(q·Δk)²]``), values by ``Σ W_o,hᵀ W_o,h`` of the
    output-projection columns they feed (the output error); each part scaled to trace = its
    size, so K and V keep their shares of the joint SVD."""
    H, Hkv, D = site.num_heads, site.num_kv_heads, site.head_dim
    if stats is None or stats.q2 is None:
        raise SiteError(f"{site.name}: MHC(method='aware') needs calibration data")
    R = torch.zeros(2 * Hkv * D, 2 * Hkv * D, dtype=torch.float64)
    for kv in range(Hkv):
        readers = [h for h in range(H) if site.kv_head_map[h] == kv]
        k = sum(stats.q2[h].double() for h in readers) / max(stats.n, 1)
        o = [shared_kv.head_cols(weights, site.o_proj, h, D).double() for h in readers]
        v = sum(b.T @ b for b in o)
        R[kv * D:(kv + 1) * D, kv * D:(kv + 1) * D] = k
        off = Hkv * D + kv * D
        R[off:off + D, off:off + D] = v
    n = Hkv * D
    for part in (slice(0, n), slice(n, 2 * n)):
        R[part, part] *= n / R[part, part].trace().clamp(min=1e-30)
    return R


# ------------------------------------------------------------------------------ graph work
class _Tap(nn.Module):
    """Accumulates E[x xᵀ] of the tensor it is given (a temporary graph node)."""

    def __init__(self):
        super().__init__()
        self.xx, self.n = None, 0

    def forward(self, x):
        f = x.detach().reshape(-1, x.shape[-1]).double()
        xx = f.T @ f
        self.xx = xx if self.xx is None else self.xx + xx
        self.n += f.shape[0]
        return x


def input_covariance(att: KVAttention, x, calls: list[dict]) -> torch.Tensor:
    """E[x xᵀ] of graph node ``x`` over the layer's calibration calls."""
    gm = att.graph_module
    tap = _Tap()
    gm.add_submodule("_kvpass_tap", tap)
    with gm.graph.inserting_after(x):
        node = gm.graph.call_module("_kvpass_tap", (x,))
    gm.recompile()
    try:
        with torch.no_grad():
            for c in calls:
                att(**c)
    finally:
        gm.graph.erase_node(node)
        gm.delete_submodule("_kvpass_tap")
        gm.recompile()
    return tap.xx / max(tap.n, 1)


def _proj_input(node):
    data = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return data[0] if len(data) == 1 else None


def _attach_positions(site: AttentionSite, paths: dict, env: dict) -> None:
    """Give each local path's position inputs a :class:`PositionFn` from the model's graph."""
    full = site.nodes
    if full is None:
        raise SiteError(f"{site.name}: MHC with RoPE needs the model's captured graph (use optimize)")
    cap = full.captured
    ends = {"q": (full.q_proj, full.q), "k": (full.k_proj, full.k_pre), "v": (full.v_proj, full.v_pre)}
    for key, path in paths.items():
        if path is None or not path.extras:
            continue
        proj, pre = ends[key]
        ref = PathFn(cap.module, cap.env, proj, pre, f"{site.name} ({key} path, model graph)")
        if len(ref.extras) != len(path.extras):
            raise SiteError(f"{site.name}: {key} path reads {len(path.extras)} position inputs in the "
                            f"layer's graph but {len(ref.extras)} in the model's")
        seq = env[path.proj_node].shape[1]
        fns = []
        for node, local in zip(ref.extras, path.extras):
            fn = PositionFn(cap, node, seq)
            got = fn.gather(torch.arange(seq)[None])
            want = env[local]
            if got.shape != want.shape[:1] + got.shape[1:] or not torch.allclose(got, want[:1], atol=1e-6):
                raise SiteError(f"{site.name}: position input {local.name} of the {key} path does not "
                                f"match the model's {node.name}")
            fns.append(fn)
        path.positions = fns


def _structural(form: MHC, att) -> MHC:
    """The shapes without calibration: the latent's rank, SVD."""
    return MHC(rank=att.kv_core.latent.rank, method="svd")


@register_pass(MHC,
               changes_weights=True, positional=True, calibrates=needs_calibration,
               stats=lambda f: f.method == "aware", streamable=lambda f: not f.allocate,
               in_graph=lambda f: not (f.allocate or f.refit), structural=_structural)
def apply(att: KVAttention, site: AttentionSite, form: MHC, ctx) -> LayerPlan:
    """Replace the layer's K/V projections by a latent (see module docstring)."""
    core = att.kv_core
    plan = core.plan
    if plan.keep is not None or core.producer is not None or core.latent is not None:
        raise SiteError(f"{site.name}: MHC cannot follow SharedKV or another MHC on one layer (the "
                        "latent is shared by all heads already); compose MHC with Window or Sparse")
    if site.sink_logits is not None:
        raise SiteError(f"{site.name}: MHC with the model's sink logits ({site.sink_logits}) is not supported "
                        "yet (the latent's value bias assumes probabilities that sum to one)")
    rank = layer_rank(site, form, ctx)
    bl = blocks(site, form, rank)
    h = att.handles()
    gm = att.graph_module
    if h["k_proj"] is None or h["v_proj"] is None:
        raise SiteError(f"{site.name}: MHC needs the key and value projections; not found")
    x = _proj_input(h["k_proj"])
    if x is None or _proj_input(h["v_proj"]) is not x:
        raise SiteError(f"{site.name}: keys and values are not projected from one input; MHC needs "
                        "a shared input (self-attention)")
    env = sample_env(gm, att.sample_leaves())
    xs, qs = tuple(env[x].shape), tuple(env[h["q"]].shape)
    if not (len(xs) == 3 and xs[:2] == (qs[0], qs[2]) or len(xs) == 2 and xs[0] == qs[0] * qs[2]):
        raise SiteError(f"{site.name}: the K/V projection input {x.name} has shape {list(xs)}; MHC's latent "
                        f"needs it as [batch, seq, features] or [batch·seq, features] ([{qs[0]}, {qs[2]}, ...] in "
                        "the sample call): a sequence-first layout (nn.MultiheadAttention's) is not supported")
    kpath = PathFn(gm, env, h["k_proj"], h["k_pre"], f"{site.name} key path")
    vpath = PathFn(gm, env, h["v_proj"], h["v_pre"], f"{site.name} value path")
    paths = None
    if not (kpath.movement_only and vpath.movement_only):
        if env[x].dim() != 3:
            raise SiteError(f"{site.name}: the K/V projection input is {env[x].dim()}-D; the "
                            "decompress form (RoPE / per-head norm) needs [batch, seq, features]")
        qpath = None
        if kpath.extras or vpath.extras:  # positions: queries must be rotated from the same table
            if h["q_proj"] is None:
                raise SiteError(f"{site.name}: the query projection was not found; MHC with RoPE "
                                "re-applies the query's RoPE itself")
            qpath = PathFn(gm, env, h["q_proj"], h["q"], f"{site.name} query path")
        paths = {"k": kpath, "v": vpath, "q": qpath}
        _attach_positions(site, paths, env)
        paths = (kpath, vpath, qpath)
    if needs_calibration(form) and not ctx.calls:
        raise SiteError(f"{site.name}: MHC(method={form.method!r}, refit={form.refit}) needs calibration "
                        "data (optimize(..., calibration=...))")
    C = input_covariance(att, x, ctx.calls) if form.method != "svd" else None
    R = output_weights(site, ctx.stats, ctx.weights) if form.method == "aware" else None
    W, bias = kv_weights(ctx.weights, site)
    A, B = factorize(W, C, bl, R)
    teacher = snapshot(att) if form.refit else None
    HD = site.num_kv_heads * site.head_dim
    dtype = ctx.weights[site.k_proj.weight].dtype
    device = ctx.weights[site.k_proj.weight].device
    to = dict(dtype=dtype, device=device)
    lat = Latent(A.T.to(**to), B[:, :HD].T.to(**to), B[:, HD:].T.to(**to),
                 None if bias is None else bias[:HD].to(**to), None if bias is None else bias[HD:].to(**to),
                 kv_heads=site.num_kv_heads, head_dim=site.head_dim, paths=paths,
                 channels=(site.k_proj.channels, site.v_proj.channels))
    if paths is not None:
        try:
            lat.fit = fit_key_path(lat)
        except SiteError as e:
            lat.fit_error = str(e)
        except RuntimeError as e:  # the path cannot even run at the probe length (a graph
            # specialised to its sample's sizes, e.g. inside torch.compile): not fused either
            lat.fit_error = f"the key path cannot be replayed at other lengths ({str(e).splitlines()[0]})"
    core.latent = lat
    call = att.core_call()
    q_src = h["q_proj"] if paths is not None and paths[2] is not None else call.args[0]
    call.args = (q_src, x, None, *call.args[3:])
    ctx.removed += att.remove_unused_parameters()
    core.plan = dataclasses.replace(plan, latent=lat.rank, window=plan.kept_window(site.window))
    if form.refit:
        refit_output(att, teacher, site, ctx)
    return core.plan


def _core_outputs(att: KVAttention, calls: list[dict]) -> list[torch.Tensor]:
    outs = []
    hook = att.kv_core.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    try:
        with torch.no_grad():
            for c in calls:
                att(**c)
    finally:
        hook.remove()
    return outs


def refit_output(att: KVAttention, teacher: KVAttention, site: AttentionSite, ctx) -> None:
    """Least-squares refit of the output projection's columns: the new attention outputs
    ``O'`` through ``W'`` reproduce the original ``O`` through ``W`` (``W'ᵀ = (O'ᵀO')⁻¹ O'ᵀ O Wᵀ``)."""
    H, D = site.num_heads, site.head_dim
    G = X = None
    for o, o2 in zip(_core_outputs(teacher, ctx.calls), _core_outputs(att, ctx.calls)):
        a = o.permute(0, 2, 1, 3).reshape(-1, H * D).double()
        b = o2.permute(0, 2, 1, 3).reshape(-1, H * D).double()
        G = b.T @ b if G is None else G + b.T @ b
        X = b.T @ a if X is None else X + b.T @ a
    w = ctx.weights[site.o_proj.weight]
    cols = torch.tensor(site.o_proj.channels)
    Wc = (w.data[cols].T if site.o_proj.transposed else w.data[:, cols]).double()  # [out, H·D]
    G = G + 1e-6 * G.diagonal().mean().clamp(min=1e-12) * torch.eye(H * D, dtype=G.dtype)
    new = torch.linalg.solve(G, X @ Wc.T).T  # [out, H·D]
    if site.o_proj.transposed:
        w.data[cols] = new.T.to(w.dtype)
    else:
        w.data[:, cols] = new.to(w.dtype)


# ------------------------------------------------------------------------------ allocation
def _output_of(out):
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, True
    return (out if isinstance(out, torch.Tensor) else out[0]), False  # tuples and HF ModelOutputs


def _divergence(clean: torch.Tensor, other: torch.Tensor, is_logits: bool) -> float:
    """KL(clean || other) of next-token distributions per token, or relative MSE (encoders)."""
    if is_logits:
        return kl_divergence(clean, other)
    return float(((other - clean).float() ** 2).mean() / (clean.float() ** 2).mean().clamp(min=1e-12))


def _swap_kv(weights: dict, site: AttentionSite, W: torch.Tensor) -> None:
    D, H = site.head_dim, site.num_kv_heads
    for i, p in enumerate((site.k_proj, site.v_proj)):
        for h in range(H):
            rows = W[i * H * D + h * D: i * H * D + (h + 1) * D]
            shared_kv.set_head_rows(weights, p, h, D, rows, None)


def _approx(W: torch.Tensor, spec: dict, part_ranks: dict) -> torch.Tensor:
    """``W`` with each part's rows replaced by their rank-``part_ranks[key]`` approximation."""
    out = W.clone()
    for key, (rows, A, S, Vh) in spec.items():
        r = min(part_ranks[key], S.numel())
        out[rows] = ((A[:, :r] * S[:r]) @ Vh[:r]).T
    return out


def allocate_ranks(model: nn.Module, sites: list[AttentionSite], forms: dict, lowered: dict, ids: torch.Tensor,
                   progress: bool = False, chunks: int = 2) -> tuple[dict, dict]:
    """Spend the total rank of the ``MHC(ratio=x, allocate=True)`` layers where it buys most.

    Damage is *measured* around the uniform operating point: with every layer's K/V cut to
    its uniform rank ``r̄ = 2·Hkv·D / x`` (whitened approximations swapped into the weights),
    each layer in turn is moved over a grid of ranks in ``[r̄/2, 2r̄]`` and the model's
    next-token KL divergence from the original (``chunks`` calibration chunks) is recorded.
    A dynamic programme then picks one grid rank per layer (per K and V when not joint)
    minimising the summed damage change within the budget ``Σ r̄`` — exact for that additive
    model, whatever the curves' shape.  Ranks stay within ``[r̄/2, 2r̄]`` (larger moves break
    the additive model).  Returns (ranks by site name, details for the report).
    """
    from tqdm.auto import tqdm

    names = [s.name for s in sites]
    weights = dict(model.named_parameters())
    probe = ids[: min(len(ids), chunks)]
    with torch.no_grad():
        clean = _output_of(run_cache_free(model, probe))
    feeder = LayerFeeder(model, names, ids)
    specs, base, grids, originals = {}, {}, {}, {}
    budget = 0
    for s in sites:  # factorise every layer once (on the original model's inputs)
        form = forms[s.name]
        r = layer_rank(s, form)
        share = {"kv": r} if form.joint else dict(zip("kv", r))
        budget += sum(share.values())
        H, D = s.num_kv_heads, s.head_dim
        parts = {"kv": list(range(2 * H * D))} if form.joint else {
            "k": list(range(H * D)), "v": list(range(H * D, 2 * H * D))}
        C = R = None
        if form.method != "svd":
            att, calls = lowered[s.name], feeder.inputs(s.name)
            C = input_covariance(att, _proj_input(att.handles()["k_proj"]), calls)
            if form.method == "aware":
                with torch.no_grad(), collect_stats(att.kv_core) as stats:
                    run_calls(att, calls)
                R = output_weights(s, stats, weights)
        W, _ = kv_weights(weights, s)
        originals[s.name] = W
        specs[s.name] = {k: (rows, *spectra(W, C, rows, R)) for k, rows in parts.items()}
        base[s.name] = share
        unit = form.groups
        grids[s.name] = {k: sorted({min(len(parts[k]), max(unit, round(r * f / unit) * unit))
                                    for f in (0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5, 1.75, 2)})
                         for k, r in share.items()}
    damage: dict = {}
    try:
        for s in sites:
            _swap_kv(weights, s, _approx(originals[s.name], specs[s.name], base[s.name]))
        with torch.no_grad():
            at_base = _divergence(clean[0], _output_of(run_cache_free(model, probe))[0], clean[1])
        for s in tqdm(sites, desc="kvpass: MHC rank allocation", disable=not progress):
            damage[s.name] = {}
            for key, grid in grids[s.name].items():
                vals = []
                for r in grid:
                    ranks = dict(base[s.name], **{key: r})
                    if ranks == base[s.name]:
                        vals.append(0.0)
                        continue
                    _swap_kv(weights, s, _approx(originals[s.name], specs[s.name], ranks))
                    with torch.no_grad():
                        got = _output_of(run_cache_free(model, probe))[0]
                    vals.append(_divergence(clean[0], got, clean[1]) - at_base)
                damage[s.name][key] = vals
            _swap_kv(weights, s, _approx(originals[s.name], specs[s.name], base[s.name]))
    finally:  # the original weights (float64 copies of them: exact); biases were never touched
        for s in sites:
            _swap_kv(weights, s, originals[s.name])
    items = [(n, key, grids[n][key], damage[n][key]) for n in names for key in grids[n]]
    idx = knapsack([g for _, _, g, _ in items], [d for _, _, _, d in items], budget)
    if idx is None:
        raise PolicyError(f"MHC.allocate: the budget of {budget} latent values cannot hold the "
                          "smallest ranks of every layer")
    picked = [g[j] for (_, _, g, _), j in zip(items, idx)]
    ranks: dict = {}
    for (n, key, _, _), r in zip(items, picked):
        ranks.setdefault(n, {})[key] = r
    ranks = {n: v["kv"] if "kv" in v else (v["k"], v["v"]) for n, v in ranks.items()}
    spent = sum(picked)
    details = {"budget": budget, "spent": spent, "ranks": ranks, "kl_at_uniform": at_base,
               "damage": {n: {k: {"ranks": grids[n][k], "kl_change": damage[n][k]} for k in grids[n]}
                          for n in names}}
    return ranks, details
