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

import torch
from torch import Tensor, fx, nn

from . import graphutil as gu
from .capture import Captured
from .errors import SiteError

__all__ = ["Latent", "PathFn", "PositionFn"]


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

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def absorbed(self) -> bool:
        return self._paths is None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, form={'absorbed' if self.absorbed else 'decompress'}"

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

    def absorbed_output(self, o: Tensor, head_map, q_pos: Tensor) -> Tensor:
        """[B, H, Sq, r] -> [B, H, Sq, D]: ``o · B_v,h + b_v,h`` (zeros for padding queries)."""
        out = torch.einsum("bhsr,hdr->bhsd", o, self._per_head(self.up_v, head_map).to(o.dtype))
        if self.bias_v is not None:
            b = self.bias_v.view(self.kv_heads, self.head_dim)[list(head_map)].to(o.dtype)
            out = out + b[None, :, None, :] * (q_pos >= 0)[:, None, :, None].to(o.dtype)
        return out
