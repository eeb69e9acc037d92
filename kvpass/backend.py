"""The ``torch.compile`` backend ``"kvpass"``.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="kvpass")`` works in a process that never imported kvpass,
and through :func:`register_backend`.

What it does today (issue 7, first part):

- On a model already rewritten by :func:`kvpass.optimize`, every attention is one
  ``kvpass::attention`` / ``kvpass::latent_attention`` node in the dynamo graph.  The backend
  counts them (:data:`counters`) and hands the graph to inductor (``options={"inductor":
  False}``: run the captured graph as is).  Inductor keeps each kvpass op as one extern call,
  which dispatches to the generated Triton kernels on CUDA (the reference on CPU).
- On a plain model with ``options={"policy": ...}`` it refuses with a clear message: rewriting
  attention *inside* a dynamo graph (parameters arrive as placeholders, the cache layout
  changes) is not implemented yet; ``kvpass.optimize(model, policy)`` first, then compile.

Example:
    >>> import torch, kvpass
    >>> register_backend()
    >>> "kvpass" in torch._dynamo.list_backends()
    True
"""

from __future__ import annotations

import collections

from torch import fx

from .errors import KVPassError

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
    ``policy`` (refused on plain models, see above)."""
    options = dict(options or {})
    unknown = set(options) - {"inductor", "policy", "calibration"}
    if unknown:
        raise KVPassError(f"backend='kvpass': unknown options {sorted(unknown)} "
                          "(known: inductor, policy, calibration)")
    nodes = _kvpass_nodes(gm)
    counters["graphs"] += 1
    counters["attention_ops"] += sum("latent" not in str(n.target) for n in nodes)
    counters["latent_ops"] += sum("latent" in str(n.target) for n in nodes)
    if options.get("policy") is not None and not nodes and _attention_like(gm):
        raise KVPassError(
            "backend='kvpass' got a policy for a model that kvpass has not rewritten: applying a "
            "policy inside a dynamo graph is not implemented yet. Rewrite first, then compile: "
            "fast = kvpass.optimize(model, policy); torch.compile(fast, backend='kvpass')")
    if not options.get("inductor", True):
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    counters["inductor"] += 1
    return compile_fx(gm, example_inputs)


def register_backend() -> None:
    """Register ``"kvpass"`` with dynamo (idempotent; the entry point does this lazily)."""
    from torch._dynamo.backends import registry

    if "kvpass" not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=kvpass_backend, name="kvpass")
