"""Latent KV storage (MHC): one low-rank vector per token is cached instead of keys and values.

A layer's keys and values come from one projection input ``x`` (the normed hidden state).
MHC replaces the K/V projections by ``c = x · A`` (``r`` values per token, cached) and
``K = c · B_k + b_k``, ``V = c · B_v + b_v`` (:class:`Latent`).  Two ways to attend:

* **decompress** (the key path has RoPE or a per-head norm): keys/values are rebuilt from the
  cached latents, then the site's own key path (views, norm, RoPE) is replayed on them
  (:class:`PathFn`) with the position inputs (cos/sin) of the cached tokens' positions.  Those
  inputs are rebuilt for any position by replaying the part of the *model's* graph that
  computes them (:class:`PositionFn`) — never by knowing the model's RoPE variant.  The query
  path is replayed the same way, so queries and keys are rotated from one table by the
  positions kvpass counts (real tokens; left padding shifts both alike, which RoPE ignores).
* **absorbed** (no RoPE, no norm: BERT, GPT-2): attention runs in latent space, as MLA does:
  ``q_h · k_h = (q_h B_k,hᵀ) · c`` (the key bias adds the same to every score of a query, so it
  drops out of the softmax) and ``Σ p v_h = (Σ p c) B_v,h + b_v,h``.  Nothing is decompressed
  per cached token; ``B_v`` is applied once per query and head (cheaper than folding it into
  the output projection when ``head_dim < hidden``, and the same result).

Example (an exact latent of a 2-head layer, absorbed form):
    >>> import torch
    >>> lat = Latent(torch.eye(4), torch.eye(4), torch.eye(4), None, None, kv_heads=2, head_dim=2)
    >>> c = lat.compress(torch.randn(1, 3, 4), 1, 3)
    >>> c.shape  # [B, 1, S, rank]
    torch.Size([1, 1, 3, 4])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ..errors import SiteError
from ..graph import util as gu
from ..graph.capture import Captured
from ..semantics.reference import LatentWeights

__all__ = ["Latent", "PathFn", "PositionFn", "KeyFit", "fit_key_path"]


class PositionFn:
    """A position-dependent input of a key/query path (e.g. RoPE's cos), for any positions.

    Built from the whole model's captured graph: the nodes that compute ``node`` are replayed
    on a token sequence of length ``n`` (ids 0, mask 1), which gives the value for positions
    ``0 .. n-1``.  Checked at build time against the sample value (positions ``0 .. S-1``).
    ``gather(pos)`` returns the input for positions ``pos`` [B, S] in the layout the path uses.
    """

    def __init__(self, cap: Captured, node: fx.Node, seq: int):
        anc = gu.ancestors(node) | {node}
        nodes = [n for n in cap.graph.nodes if n in anc]
        placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
        g = fx.Graph()
        remap: dict[fx.Node, fx.Node] = {}
        self.inputs: list[tuple[str, object, int | None]] = []
        for n in nodes:
            if n.op == "placeholder":
                remap[n] = g.placeholder(n.name)
                v = cap.env[n]
                axis = None
                if isinstance(v, Tensor) and v.dim() >= 2:
                    axis = next((i for i in range(1, v.dim()) if v.shape[i] == seq), None)
                ids = cap.input_paths[placeholders.index(n)] == "['input_ids']"
                self.inputs.append(("ids" if ids else "ones" if axis is not None else "const", v, axis))
            else:
                if n.op == "get_attr":
                    t = operator.attrgetter(n.target)(cap.module)
                    if isinstance(t, Tensor) and t.numel() > (1 << 20):
                        raise SiteError(f"position input {node.name} is computed from a large tensor "
                                        f"({n.target}); kvpass cannot rebuild it for other positions")
                remap[n] = g.node_copy(n, lambda a: remap[a])
        g.output(remap[node])
        self.module = fx.GraphModule(cap.module, g)
        self.name = node.name
        a, b = self._run(7), self._run(11)
        axes = [i for i in range(min(a.dim(), b.dim())) if a.shape[i] != b.shape[i]]
        if a.dim() != b.dim() or len(axes) != 1 or a.shape[0] != 1 or axes[0] == 0:
            raise SiteError(f"position input {node.name}: not a per-position table (shapes "
                            f"{tuple(a.shape)} / {tuple(b.shape)} for 7 / 11 tokens)")
        self.axis = axes[0]
        sample = cap.env[node]
        if not isinstance(sample, Tensor) or sample.shape[0] != 1 or not torch.allclose(
                self._run(sample.shape[self.axis]), sample, atol=1e-6):
            raise SiteError(f"position input {node.name}: replaying the model's graph does not "
                            "reproduce its sample value (positions not 0..S-1 per row?)")
        self._tables: dict = {}

    def _run(self, n: int) -> Tensor:
        args = []
        for kind, v, axis in self.inputs:
            if kind == "const":
                args.append(v)
                continue
            shape = [1] + list(v.shape[1:])
            shape[axis] = n
            fill = torch.zeros if kind == "ids" else torch.ones
            args.append(fill(shape, dtype=v.dtype, device=v.device))
        with torch.no_grad():
            return self.module(*args)

    def table(self, n: int, device) -> Tensor:
        """[>= n, ...] the input for positions 0..n-1 along dim 0 (cached, grown by doubling)."""
        t = self._tables.get(device)
        if t is None or t.shape[0] < n:
            size = max(256, 1 << max(0, n - 1).bit_length())
            t = self._run(size).movedim(self.axis, 0).select(1, 0).to(device)
            self._tables[device] = t
        return t

    def gather(self, pos: Tensor) -> Tensor:
        """The input for positions ``pos`` [B, S] (-1, padding, reads position 0)."""
        p = pos.clamp(min=0)
        t = self.table(int(p.max()) + 1 if p.numel() else 1, p.device)
        return t[p].movedim(1, self.axis)


class PathFn:
    """A projection → heads path (views, per-head norm, RoPE) of one layer, replayable on new
    projection outputs of any length.

    Built from the layer's own graph ``gm`` (its ``env`` on the sample call): values the path
    reads besides the projection output are either constants (parameters, e.g. a norm's
    scale: copied in), sizes (batch/sequence length, taken from the new projection output) or
    position inputs (cos/sin: ``extras``, given per call through :class:`PositionFn`).  A size
    equal to the sample's batch or sequence length (2 and 13: chosen distinct) follows the new
    projection output; any other size (e.g. the rotary width) is a constant.
    ``movement_only``: the path only moves data (no RoPE, no norm).
    """

    def __init__(self, gm: fx.GraphModule, env: dict, proj: fx.Node, pre: fx.Node, what: str):
        chain = gu.chain_between(proj, pre)
        inside = set(chain)
        g = fx.Graph()
        remap: dict[fx.Node, fx.Node] = {proj: g.placeholder("proj_out")}
        self.inputs: list[tuple[str, int]] = []  # ("size", dim of proj_out) | ("pos", extra index)
        self.extras: list[fx.Node] = []
        self.movement_only = True
        out_shape = tuple(env[proj].shape)
        for n in chain[1:]:
            if not gu.is_movement(n):
                self.movement_only = False
            for a in gu.tensor_args(n):
                if a in inside or a in remap:
                    continue
                anc = gu.ancestors(a) | {a}
                if not any(x.op == "placeholder" for x in anc):  # parameters only: a constant
                    for x in [y for y in gm.graph.nodes if y in anc and y not in remap]:
                        remap[x] = g.node_copy(x, lambda b: remap[b])
                elif isinstance(env[a], Tensor):
                    self.movement_only = False
                    remap[a] = g.placeholder(f"pos{len(self.extras)}")
                    self.inputs.append(("pos", len(self.extras)))
                    self.extras.append(a)
                else:  # a size: batch or sequence length follow the new input, others stay
                    dims = [i for i, s in enumerate(out_shape[:-1]) if s == env[a]]
                    remap[a] = g.placeholder(f"size{len(self.inputs)}")
                    self.inputs.append(("size", dims[0]) if dims else ("const", env[a]))
            remap[n] = g.node_copy(n, lambda a: remap[a])
        g.output(remap[pre])
        self.module = fx.GraphModule(gm, g)
        self.width = out_shape[-1]
        self.what = what
        self.proj_node = proj
        self.positions: list[PositionFn] = []

    def __call__(self, proj_out: Tensor, pos: Tensor) -> Tensor:
        args = [proj_out]
        for kind, i in self.inputs:
            if kind == "const":
                args.append(i)
            else:
                args.append(proj_out.shape[i] if kind == "size" else self.positions[i].gather(pos))
        return self.module(*args)


class Latent(nn.Module):
    """The latent of one layer: ``down`` [r, in], ``up_k``/``up_v`` [Hkv·D, r] (rows in
    (head, dim) order), optional biases [Hkv·D].  ``paths``: (key, value, query)
    :class:`PathFn` for the decompress form, or None (absorbed form)."""

    def __init__(self, down: Tensor, up_k: Tensor, up_v: Tensor, bias_k: Tensor | None,
                 bias_v: Tensor | None, *, kv_heads: int, head_dim: int, paths=None,
                 channels: tuple | None = None):
        super().__init__()
        self.down = nn.Parameter(down.clone())
        self.up_k = nn.Parameter(up_k.clone())
        self.up_v = nn.Parameter(up_v.clone())
        self.bias_k = None if bias_k is None else nn.Parameter(bias_k.clone())
        self.bias_v = None if bias_v is None else nn.Parameter(bias_v.clone())
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self._paths = list(paths) if paths is not None else None  # unregistered (own norm weights)
        self._channels = channels  # (key, value) projection channels per (head, dim)
        # decompress form: the key path as the fused latent kernels compute it (fit_key_path),
        # or why it does not fit (then K/V are decompressed in torch for the attended tokens)
        self.fit: KeyFit | None = None
        self.fit_error: str | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def absorbed(self) -> bool:
        return self._paths is None

    def extra_repr(self) -> str:
        form = "absorbed" if self.absorbed else "decompress"
        if not self.absorbed:
            form += ", fused kernels" if self.fit is not None else f", not fused: {self.fit_error}"
        return f"rank={self.rank}, form={form}"

    def batch_seq(self, q: Tensor, x: Tensor) -> tuple[int, int]:
        if x.dim() == 3:
            return x.shape[0], x.shape[1]
        return q.shape[0], q.shape[2]

    def compress(self, x: Tensor, batch: int, seq: int) -> Tensor:
        """[B, 1, S, r]: the latent of the new tokens (what the cache stores)."""
        return (x.reshape(batch, seq, -1) @ self.down.T.to(x.dtype))[:, None]

    def _flat(self, c: Tensor, up: Tensor, bias: Tensor | None) -> Tensor:
        y = c[:, 0] @ up.T
        return y if bias is None else y + bias

    def _heads(self, y: Tensor, path: PathFn | None, channels, pos: Tensor) -> Tensor:
        B, S, _ = y.shape
        if path is None or path.movement_only:
            return y.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        full = y
        if tuple(channels) != tuple(range(path.width)):
            full = y.new_zeros(B, S, path.width)
            full[..., list(channels)] = y
        return path(full, pos)

    def keys_values(self, c: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Decompress: [B, Hkv, Sk, D] keys (key path replayed) and values."""
        kp, vp, _ = self._paths
        ck, cv = self._channels
        k = self._heads(self._flat(c, self.up_k, self.bias_k), kp, ck, k_pos)
        v = self._heads(self._flat(c, self.up_v, self.bias_v), vp, cv, k_pos)
        return k, v

    def query(self, q: Tensor, q_pos: Tensor) -> Tensor:
        """Decompress: the query path replayed on the query projection output (our positions)."""
        qp = self._paths[2]
        return q if qp is None else qp(q, q_pos)

    def _per_head(self, up: Tensor, head_map) -> Tensor:
        return up.view(self.kv_heads, self.head_dim, -1)[list(head_map)]  # [H, D, r]

    def absorbed_query(self, q: Tensor, head_map) -> Tensor:
        """[B, H, Sq, D] -> [B, H, Sq, r]: ``q_h · B_k,hᵀ`` (scores against latents)."""
        return torch.einsum("bhsd,hdr->bhsr", q, self._per_head(self.up_k, head_map).to(q.dtype))

    def fused_weights(self, fit: KeyFit, dtype: torch.dtype) -> LatentWeights:
        """The weights the fused latent kernels read (``up_*`` in ``dtype``, the rest fp32)."""
        hkv, D = self.kv_heads, self.head_dim

        def per_head(up: Tensor) -> Tensor:  # [Hkv·D, r] -> [Hkv, r, D]
            return up.detach().view(hkv, D, -1).transpose(1, 2).to(dtype).contiguous()

        def bias(b: Tensor | None) -> Tensor:
            return torch.zeros(hkv * D, device=self.up_k.device) if b is None else b.detach().float()

        part = fit.partner.to(self.up_k.device)
        bk, bv = bias(self.bias_k), bias(self.bias_v)
        f32 = dict(dtype=torch.float32, device=self.up_k.device)
        return LatentWeights(
            per_head(self.up_k), per_head(self.up_k[part]), bk.view(hkv, D), bk[part].view(hkv, D),
            per_head(self.up_v), bv.view(hkv, D), fit.freq.to(**f32), fit.cos_coef.to(**f32),
            fit.sin_coef.to(**f32))

    def absorbed_output(self, o: Tensor, head_map, q_pos: Tensor) -> Tensor:
        """[B, H, Sq, r] -> [B, H, Sq, D]: ``o · B_v,h + b_v,h`` (zeros for padding queries)."""
        out = torch.einsum("bhsr,hdr->bhsd", o, self._per_head(self.up_v, head_map).to(o.dtype))
        if self.bias_v is not None:
            b = self.bias_v.view(self.kv_heads, self.head_dim)[list(head_map)].to(o.dtype)
            out = out + b[None, :, None, :] * (q_pos >= 0)[:, None, :, None].to(o.dtype)
        return out


# positions probed when fitting a key path (0: rotation-free; 1: angles; large: pairing),
# capped by the positions the model's tables cover
_PROBE_POS = (0, 1, 2, 3, 17, 300, 4095)


@dataclass(frozen=True)
class KeyFit:
    """A decompress key path in the form the fused latent kernels compute
    (:func:`kvpass.semantics.reference.latent_keys_values`): per key dimension ``i`` (flat (head, dim)
    index) a rotation ``partner[i]`` (itself when the dimension is not rotated), ``freq``,
    ``cos_coef``, ``sin_coef`` ([Hkv, D], fp32; a norm's weight and RoPE's attention scaling are
    folded in), whether any dimension rotates, and the RMS norm's epsilon (None: no norm)."""

    partner: Tensor
    freq: Tensor
    cos_coef: Tensor
    sin_coef: Tensor
    rope: bool
    norm_eps: float | None
    max_error: float  # relative error of the fit, measured on random inputs and positions < 4096


def fit_key_path(lat: Latent) -> KeyFit:
    """Fit the layer's replayed key path to ``norm? → RoPE`` by probing it (no model knowledge).

    The path is run on basis vectors at a few positions: at position 0 it must be diagonal
    (the cos coefficients), at other positions each dimension may mix with exactly one partner
    dimension of its head (a rotation pair, any pairing).  Angles per position give the
    frequencies.  A norm is detected as scale invariance and its epsilon from a tiny-input probe.
    Frequencies are snapped to the fp32 value whose products ``fl(f·p)`` reproduce the probed
    angles (the model computes them as fp32 products too), which recovers its own frequencies
    bit for bit in the tested families.  The fit is then checked on random inputs at random
    positions up to 4095: relative error <= 5e-4 (measured ~1e-7 after snapping; an unsnapped
    frequency is off by ~2.5e-4 rad at p=4095, so an angle computed another way still fits).

    Raises:
        SiteError: saying which part of the path does not fit (the layer then keeps the
            decompress-then-attend path).
    """
    kp, vp, _ = lat._paths
    if kp is None:
        raise SiteError("no key path to fit")
    if vp is not None and not vp.movement_only:
        raise SiteError("the value path is not data movement only (a value norm or rotation)")
    hkv, D = lat.kv_heads, lat.head_dim
    N = hkv * D
    ck, _ = lat._channels
    dev = lat.up_k.device

    def run(y: Tensor, pos: Tensor) -> Tensor:  # [B, S, N] -> [B, S, N] float64
        with torch.no_grad():
            out = lat._heads(y.to(dev), kp, ck, pos.to(dev))  # [B, Hkv, S, D]
        return torch.nan_to_num(out.double().transpose(1, 2).reshape(y.shape[0], y.shape[1], N).cpu())

    g = torch.Generator().manual_seed(0)
    top_pos = min([4096] + [p.table(4096, dev).shape[0] for p in kp.positions]) - 1
    S = len(_PROBE_POS)
    pos = torch.tensor(_PROBE_POS).clamp(max=top_pos)[None]
    y = torch.randn(4, S, N, generator=g)
    pos4 = pos.expand(4, S)
    o1, o3 = run(y, pos4), run(3 * y, pos4)
    top = o1.abs().max().item()
    if (o1 - o3).abs().max() <= 1e-4 * top:
        norm = True
    elif (3 * o1 - o3).abs().max() <= 3e-4 * top:
        norm = False
    else:
        raise SiteError("key path is neither linear in the projection output nor a scale-invariant "
                        "norm followed by a linear map")
    eps = None
    if norm:  # ratio of outputs for t·y and y gives eps (per token and head, median)
        yh = y.double().view(4, S, hkv, D)
        m = yh.pow(2).mean(-1)
        t = (1e-6 / m.mean()).sqrt().item()
        ot = run(t * y, pos4).view(4, S, hkv, D)
        rho2 = (ot.pow(2).sum(-1) / o1.view(4, S, hkv, D).pow(2).sum(-1).clamp(min=1e-300))
        est = t * t * m * (1 - rho2) / (rho2 - t * t)
        eps = max(0.0, float(est.median()))
    # the linear part per position, from basis inputs: M[s, out, in]
    basis = torch.eye(N)[:, None, :].expand(N, S, N)
    out = run(basis, pos.expand(N, S))  # [in, S, out]
    M = out.permute(1, 2, 0)
    if norm:
        M = M * (1.0 / D + eps) ** 0.5
    big = M.abs().max().item()
    tol = 1e-5 * big
    diag = torch.diagonal(M, dim1=1, dim2=2)  # [S, N]
    ca = diag[0]
    if (M[0] - torch.diag(ca)).abs().max() > tol:
        raise SiteError("key path mixes dimensions at position 0 (not a rotation by position)")
    off = (M - torch.diag_embed(diag)).abs().amax(0)  # [out, in], max over positions
    partner = torch.arange(N)
    freq = torch.zeros(N, dtype=torch.float64)
    sin_coef = torch.zeros(N, dtype=torch.float64)
    rows = torch.nonzero(off.amax(1) > tol).flatten().tolist()
    for i in rows:
        j = int(off[i].argmax())
        rest = off[i].clone()
        rest[j] = 0
        if rest.max() > tol or j // D != i // D:
            raise SiteError(f"key dimension {i % D} of head {i // D} mixes with more than one "
                            "dimension, or across heads (not a RoPE rotation pair)")
        partner[i] = j
    for i in rows:
        j = int(partner[i])
        if int(partner[j]) != i:
            raise SiteError(f"key dimensions {i} and {j} are not a rotation pair")
        if abs(ca[i]) < tol or abs(ca[j]) < tol:
            raise SiteError(f"key dimension {i % D} of head {i // D} is zero at position 0")
        cosf, sinf = M[1, i, i] / ca[i], M[1, i, j] / ca[j]
        freq[i] = torch.atan2(sinf.abs(), cosf)
        sin_coef[i] = torch.sign(sinf) * ca[j]
    freq = _snap_frequencies(freq.float(), M, diag[0], partner, pos[0], rows)
    fit = KeyFit(partner=partner, freq=freq.view(hkv, D), cos_coef=ca.float().view(hkv, D),
                 sin_coef=sin_coef.float().view(hkv, D), rope=bool(rows), norm_eps=eps, max_error=0.0)
    # check on random inputs (per-head scales over 4 decades) at random positions
    yc = torch.randn(2, 64, N, generator=g) * 10 ** torch.randint(-2, 2, (2, 64, hkv), generator=g
                                                                   ).repeat_interleave(D, -1)
    pc = torch.randint(0, top_pos + 1, (2, 64), generator=g)
    want = run(yc, pc)
    got = _fit_apply(fit, yc.double(), pc, hkv, D)
    scale = want.view(2, 64, hkv, D).abs().amax(-1, keepdim=True).clamp(min=1e-30)
    err = ((got - want).view(2, 64, hkv, D).abs() / scale).max().item()
    if not err <= 5e-4:
        raise SiteError(f"key path is not RMS-norm + RoPE of the projection: fitted form is off by "
                        f"{err:.2g} (relative)")
    return KeyFit(partner, fit.freq, fit.cos_coef, fit.sin_coef, fit.rope, eps, err)


def _snap_frequencies(freq: Tensor, M: Tensor, ca: Tensor, partner: Tensor, pos: Tensor,
                      rows: list[int]) -> Tensor:
    """Move each fp32 frequency by up to 16 ulps to the value whose fp32 angles ``fl(f·p)``
    best reproduce the probed rotations at every probe position: the model computes its
    angles as fp32 products too, so this usually recovers its own frequency bit for bit
    (angles from ``atan2`` at p=1 are off by ~1e-7 relative, ~4e-4 rad at p=4095)."""
    if not rows:
        return freq
    idx = torch.tensor(rows)
    f = freq[idx]
    cand = [f]
    up, down = f.clone(), f.clone()
    for _ in range(16):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, float("-inf")))
        cand += [up, down]
    cand = torch.stack(cand)  # [C, n]
    p = pos.to(torch.float32)  # [S]
    ang = (cand[:, None, :] * p[None, :, None]).double()  # fp32 products, [C, S, n]
    want = M[:, idx, idx] / ca[idx]  # cos(θ) at each probe position, [S, n]
    err = (torch.cos(ang) - want[None]).abs().amax(1)  # [C, n]
    out = freq.clone()
    out[idx] = cand.gather(0, err.argmin(0)[None])[0]
    return out


def _fit_apply(fit: KeyFit, y: Tensor, pos: Tensor, hkv: int, D: int) -> Tensor:
    """The fitted key path on projection outputs ``y`` [B, S, N] (float64), as the kernels."""
    ang = pos.to(torch.float32)[..., None] * fit.freq.view(-1)  # fp32 angle, as in the kernel
    ang = ang.double()
    k = y * fit.cos_coef.view(-1).double() * torch.cos(ang) + \
        y[..., fit.partner] * fit.sin_coef.view(-1).double() * torch.sin(ang)
    if fit.norm_eps is not None:
        yh = y.view(*y.shape[:2], hkv, D)
        k = (k.view_as(yh) * torch.rsqrt(yh.pow(2).mean(-1, keepdim=True) + fit.norm_eps)).view_as(y)
    return k
