"""MHC (multi-head compression): one low-rank latent per token, cached instead of K and V.

The K and V projections of a layer (``W_k``, ``W_v``: rows per (head, dim) found by the site's
channel maps, so separate, fused and interleaved layouts alike) are factorised jointly::

    [K | V] = x · [W_kᵀ | W_vᵀ]  ≈  (x · A) · [B_k | B_v]      c = x · A  (r values, cached)

* ``method="svd"``: truncated SVD of the weights.
* ``method="whitened"``: SVD of ``Lᵀ Wᵀ`` where ``L Lᵀ = E[x xᵀ]`` on calibration text, then
  ``A = L⁻ᵀ U_r``: minimises the error on the layer's real inputs, ``E‖x (Wᵀ − A B)‖²``.
  Inputs have outlier channels (variance 100s× the median), which plain SVD ignores.
* ``joint=False``: separate K and V latents (ranks split between them); ``groups=g``: one
  latent per group of KV heads (the latent is their concatenation).
* ``refit=True``: after truncation, the output projection is refitted by least squares so
  the layer's output on calibration data is reproduced as well as possible.
* ``allocate=True`` (with ``ratio``): before rewriting, each layer's sensitivity is measured
  (:func:`allocate_ranks`) and the total rank is spent where it buys most.

Then :func:`kvpass.heal` is available as for every lossy pass (it trains the latent too).
How the cached latent is attended (decompress + the site's RoPE/norm, or absorbed in latent
space for sites without RoPE) is in :mod:`kvpass.latent`.

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

from ..errors import PolicyError, SiteError
from ..heal import snapshot
from ..latent import Latent, PathFn, PositionFn, sample_env
from ..lower import KVAttention, LayerPlan
from ..policy import MHC
from ..sites import AttentionSite
from . import shared_kv

__all__ = ["apply", "factorize", "kv_weights", "layer_rank", "blocks", "needs_calibration", "allocate_ranks"]


def needs_calibration(form: MHC) -> bool:
    return form.method == "whitened" or form.refit or form.allocate


def kv_limit(site: AttentionSite) -> int:
    return 2 * site.num_kv_heads * site.head_dim


def layer_rank(site: AttentionSite, form: MHC, ctx=None):
    """The latent size of this layer: an int (joint) or (rank_k, rank_v) (``joint=False``)."""
    limit = kv_limit(site)
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
            w, b = shared_kv._get(weights, proj, h, D)
            rows.append(w.double())
            bias.append(torch.zeros(D, dtype=torch.float64) if b is None else b.double())
    has_bias = bool(site.k_proj.bias or site.v_proj.bias)
    return torch.cat(rows), (torch.cat(bias) if has_bias else None)


def factorize(W: torch.Tensor, C: torch.Tensor | None, blocks_: list, damp: float = 1e-6):
    """``A`` [in, r], ``B`` [r, rows] with ``x A B ≈ x Wᵀ`` per block (whitened by ``C`` if
    given: ``C = E[x xᵀ]``).  Ranks above a block's size are cut to it."""
    n_out, d_in = W.shape
    L = None
    if C is not None:
        C = C.double()
        C = C + damp * C.diagonal().mean().clamp(min=1e-12) * torch.eye(d_in, dtype=C.dtype)
        L = torch.linalg.cholesky(C)
    As, Bs = [], []
    for rows, r in blocks_:
        Wb = W[rows].double()
        M = Wb.T if L is None else L.T @ Wb.T
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = min(r, S.numel())
        A = U[:, :r] if L is None else torch.linalg.solve_triangular(L.T, U[:, :r], upper=True)
        B = torch.zeros(r, n_out, dtype=torch.float64)
        B[:, rows] = S[:r, None] * Vh[:r]
        As.append(A)
        Bs.append(B)
    return torch.cat(As, 1), torch.cat(Bs, 0)


def spectra(W: torch.Tensor, C: torch.Tensor | None, rows: list[int], damp: float = 1e-6):
    """(U-based A, S, Vh) of one block, for trying many ranks cheaply."""
    d_in = W.shape[1]
    Wb = W[rows].double()
    L = None
    if C is not None:
        C = C.double() + damp * C.double().diagonal().mean().clamp(min=1e-12) * torch.eye(d_in, dtype=torch.float64)
        L = torch.linalg.cholesky(C)
    M = Wb.T if L is None else L.T @ Wb.T
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    A = U if L is None else torch.linalg.solve_triangular(L.T, U, upper=True)
    return A, S, Vh


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


def apply(att: KVAttention, site: AttentionSite, form: MHC, ctx) -> LayerPlan:
    """Replace the layer's K/V projections by a latent (see module docstring)."""
    core = att.kv_core
    plan = core.plan
    if plan.keep is not None or core.producer is not None or core.latent is not None:
        raise SiteError(f"{site.name}: MHC cannot follow SharedKV or another MHC on one layer (the "
                        "latent is shared by all heads already); compose MHC with Window or Sparse")
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
    C = None
    if form.method == "whitened" or form.refit:
        if not ctx.calls:
            raise SiteError(f"{site.name}: MHC(method='whitened' / refit) needs calibration data "
                            "(optimize(..., calibration=...))")
    if form.method == "whitened":
        C = input_covariance(att, x, ctx.calls)
    W, bias = kv_weights(ctx.weights, site)
    A, B = factorize(W, C, bl)
    teacher = snapshot(att) if form.refit else None
    HD = site.num_kv_heads * site.head_dim
    dtype = ctx.weights[site.k_proj.weight].dtype
    device = ctx.weights[site.k_proj.weight].device
    to = dict(dtype=dtype, device=device)
    lat = Latent(A.T.to(**to), B[:, :HD].T.to(**to), B[:, HD:].T.to(**to),
                 None if bias is None else bias[:HD].to(**to), None if bias is None else bias[HD:].to(**to),
                 kv_heads=site.num_kv_heads, head_dim=site.head_dim, paths=paths,
                 channels=(site.k_proj.channels, site.v_proj.channels))
    core.latent = lat
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "kv_core")
    q_src = h["q_proj"] if paths is not None and paths[2] is not None else call.args[0]
    call.args = (q_src, x, None, call.args[3])
    ctx.removed += att.remove_unused_parameters()
    window = plan.window if plan.window is not None or plan.pattern is not None else site.window
    core.plan = dataclasses.replace(plan, latent=lat.rank, window=window)
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
    return (out[0] if isinstance(out, (tuple, list)) else out), False


def _divergence(clean: torch.Tensor, noisy: torch.Tensor, is_logits: bool) -> float:
    if is_logits:  # KL(clean || noisy) per token
        lp, lq = clean.float().log_softmax(-1), noisy.float().log_softmax(-1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())
    return float(((noisy - clean).float() ** 2).mean() / (clean.float() ** 2).mean().clamp(min=1e-12))


def layer_sensitivity(model: nn.Module, names: list[str], ids: torch.Tensor, eps: float = 0.1,
                      seed: int = 0) -> dict[str, float]:
    """Per attention module: how much the model's output moves (KL of the next-token
    distribution, or relative MSE for non-LM outputs) per unit of relative error energy added
    to that module's output (Gaussian noise of ``eps`` × its RMS)."""
    from ..capture import run_cache_free

    with torch.no_grad():
        clean, is_logits = _output_of(run_cache_free(model, ids))
    out = {}
    for name in names:
        g = torch.Generator().manual_seed(seed)

        def hook(m, a, o, g=g):
            t = o[0] if isinstance(o, (tuple, list)) else o
            noise = torch.randn(t.shape, generator=g).to(t) * t.float().pow(2).mean().sqrt() * eps
            return (t + noise, *o[1:]) if isinstance(o, (tuple, list)) else t + noise

        hk = model.get_submodule(name).register_forward_hook(hook)
        try:
            with torch.no_grad():
                noisy, _ = _output_of(run_cache_free(model, ids))
        finally:
            hk.remove()
        out[name] = _divergence(clean, noisy, is_logits) / eps ** 2
    return out


def _rel_error(att: nn.Module, calls: list[dict], targets: list[torch.Tensor]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for c, t in zip(calls, targets):
            y = att(**c)
            y = (y[0] if isinstance(y, (tuple, list)) else y).float()
            num += float(((y - t) ** 2).sum())
            den += float((t ** 2).sum())
    return num / max(den, 1e-30)


def error_curves(att: KVAttention, site: AttentionSite, form: MHC, weights: dict, calls: list[dict],
                 grid: list[int]) -> dict[str, list[float]]:
    """Relative error of the layer's output with K/V replaced by their rank-``r`` (whitened)
    approximation, for each ``r`` in ``grid``: ``{"kv": [...]}`` (joint) or ``{"k", "v"}``."""
    D, H = site.head_dim, site.num_kv_heads
    with torch.no_grad():
        targets = [(o[0] if isinstance(o, (tuple, list)) else o).float() for o in (att(**c) for c in calls)]
    x = _proj_input(att.handles()["k_proj"])
    C = input_covariance(att, x, calls) if form.method == "whitened" else None
    W, _ = kv_weights(weights, site)
    saved = [[shared_kv._get(weights, p, h, D) for h in range(H)] for p in (site.k_proj, site.v_proj)]
    parts = {"kv": list(range(2 * H * D))} if form.joint else {
        "k": list(range(H * D)), "v": list(range(H * D, 2 * H * D))}
    out = {}
    try:
        for key, rows in parts.items():
            A, S, Vh = spectra(W, C, rows)
            errs = []
            for r in grid:
                r = min(r, S.numel())
                approx = W.clone()
                approx[rows] = ((A[:, :r] * S[:r]) @ Vh[:r]).T
                for i, p in enumerate((site.k_proj, site.v_proj)):
                    for h in range(H):
                        shared_kv._set(weights, p, h, D, approx[i * H * D + h * D: i * H * D + (h + 1) * D], None)
                errs.append(_rel_error(att, calls, targets))
            out[key] = errs
            for i, p in enumerate((site.k_proj, site.v_proj)):
                for h in range(H):
                    shared_kv._set(weights, p, h, D, *saved[i][h])
    finally:
        for i, p in enumerate((site.k_proj, site.v_proj)):
            for h in range(H):
                shared_kv._set(weights, p, h, D, *saved[i][h])
    return out


def allocate_ranks(model: nn.Module, sites: list[AttentionSite], forms: dict, lowered: dict, ids: torch.Tensor,
                   progress: bool = False, feeder=None) -> tuple[dict, dict]:
    """Spend the total rank of the ``MHC(ratio=x, allocate=True)`` layers where it buys most.

    Predicted damage of layer ``l`` at rank ``r``: ``s_l · e_l(r)`` — ``s_l`` the model's
    sensitivity to error at that layer's output (:func:`layer_sensitivity`), ``e_l(r)`` the
    layer's own relative output error at rank ``r`` (:func:`error_curves`, on the layer's
    calibration inputs).  Greedy: every layer starts at the smallest rank step; steps go one at
    a time to the (layer, K|V) with the largest damage reduction per latent value, until the
    budget ``Σ 2·Hkv·D / x`` is spent.  Returns (ranks by site name, details for the report).
    """
    from tqdm.auto import tqdm

    from ..calibrate import LayerFeeder

    names = [s.name for s in sites]
    sens = layer_sensitivity(model, names, ids[: min(len(ids), 4)])
    feeder = feeder or LayerFeeder(model, names, ids)
    curves, grids, budget = {}, {}, 0
    for s in tqdm(sites, desc="kvpass: MHC rank allocation", disable=not progress):
        form = forms[s.name]
        limit = kv_limit(s)
        budget += max(1, round(limit / form.ratio))
        part = limit if form.joint else limit // 2
        step = max(form.groups, part // 24)
        grids[s.name] = list(range(step, part + 1, step))
        calls = feeder.inputs(s.name)[:2]
        curves[s.name] = error_curves(lowered[s.name], s, form, dict(model.named_parameters()), calls,
                                      grids[s.name])
    idx = {(n, key): 0 for n in names for key in curves[n]}
    spent = sum(grids[n][0] for n, _ in idx)
    while True:
        best, gain = None, 0.0
        for (n, key), i in idx.items():
            g = grids[n]
            if i + 1 >= len(g) or spent + g[i + 1] - g[i] > budget:
                continue
            drop = sens[n] * (curves[n][key][i] - curves[n][key][i + 1]) / (g[i + 1] - g[i])
            if best is None or drop > gain:
                best, gain = (n, key), drop
        if best is None:
            break
        n, key = best
        spent += grids[n][idx[best] + 1] - grids[n][idx[best]]
        idx[best] += 1
    ranks = {}
    for n in names:
        got = {key: grids[n][idx[(n, key)]] for key in curves[n]}
        ranks[n] = got["kv"] if "kv" in got else (got["k"], got["v"])
    details = {"sensitivity": sens, "budget": budget, "spent": spent, "ranks": ranks}
    return ranks, details
