"""Capture: a model (or one module call of it) traced into an FX graph with ``torch.export``.

``torch.fx.symbolic_trace`` fails on Hugging Face models, so kvpass never uses it.  Capture is
non-strict ``torch.export`` with every tensor dimension ``Dim.AUTO`` (dynamic where the model
allows), falling back to strict export (dynamo) when that fails.  The graph is the unlifted
``ExportedProgram.module()`` graph: parameters appear as ``get_attr`` nodes named by their
qualified names, and each node keeps ``nn_module_stack`` / ``val`` metadata.

Example:
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> cap = kvpass.capture(LlamaForCausalLM(cfg).eval())
    >>> any(n.op == "call_function" for n in cap.graph.nodes)
    True
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CaptureError

__all__ = ["Captured", "capture", "capture_call", "default_example_inputs", "bind_call", "cache_free_call",
           "run_cache_free", "sample_env"]

SAMPLE_BATCH, SAMPLE_SEQ = 2, 13  # distinct, > 1: no dimension gets specialised by accident


@dataclass
class Captured:
    """A traced graph with the sample values of every node.

    ``input_paths[i]`` is the key path (``pytree.keystr``) of the i-th graph input inside the
    flattened keyword arguments; ``env`` maps each node to its value on the sample inputs.
    """

    module: fx.GraphModule
    input_paths: list[str]
    out_spec: pytree.TreeSpec
    env: dict[fx.Node, object] = field(default_factory=dict, repr=False)
    sample: dict = field(default_factory=dict, repr=False)
    #: the graph returns ``(output, writes)``: ``writes[arg][key]`` is what the module stored
    #: into its mapping argument ``arg`` (state containers, e.g. K/V shared across layers)
    writes: bool = False

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph


def default_example_inputs(model: nn.Module) -> dict:
    """Token ids [2, 13] for models that embed tokens (HF LMs and encoders, hand-written models).

    The token input is the model's own ``get_input_embeddings()`` where it has one; otherwise
    the integer input that feeds an ``nn.Embedding`` lookup: the forward's one required
    argument is given token ids, and a hook checks that an embedding received exactly them.
    When that cannot be found, the error says what to pass.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        name = _first_required(model) or "input_ids"
        name = "input_ids" if "input_ids" in inspect.signature(model.forward).parameters else name
    else:
        name, emb = _token_input(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.num_embeddings, (SAMPLE_BATCH, SAMPLE_SEQ), generator=g)
    out = {name: ids.to(emb.weight.device)}
    if "attention_mask" in inspect.signature(model.forward).parameters:
        # one left-padded row: models then build a real mask tensor, so every traced attention
        # has its mask as an input (a mask-free trace could not see padding later)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        out["attention_mask"] = mask.to(emb.weight.device)
    return out


def _required(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _first_required(model: nn.Module) -> str | None:
    req = _required(model)
    return req[0] if req else None


def _token_input(model: nn.Module) -> tuple[str, nn.Embedding]:
    """(the forward argument holding token ids, the embedding it feeds), found by running it."""
    what = f"{type(model).__name__}: no example inputs given"
    embs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not embs:
        raise CaptureError(f"{what} and the model has no nn.Embedding to make token ids for; pass "
                           "example_inputs=(tensor, ...) or a dict of keyword arguments")
    req = _required(model)
    try:
        sig = str(inspect.signature(model.forward))
    except (TypeError, ValueError):
        sig = "(...)"
    if len(req) != 1:
        raise CaptureError(f"{what}; forward{sig} needs {len(req)} arguments, so kvpass cannot guess which "
                           "one holds token ids; pass example_inputs=(...) with every one of them")
    rows = min(m.num_embeddings for _, m in embs)
    ids = torch.randint(0, rows, (SAMPLE_BATCH, SAMPLE_SEQ), generator=torch.Generator().manual_seed(0))
    device = embs[0][1].weight.device
    ids = ids.to(device)
    fed: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=n: fed.append(name) if a and a[0] is ids else None)
             for n, m in embs]
    try:
        with torch.no_grad():
            model(**{req[0]: ids})
    except Exception as e:  # noqa: BLE001 - reported with what to pass instead
        raise CaptureError(f"{what}; token ids [{SAMPLE_BATCH}, {SAMPLE_SEQ}] as '{req[0]}' failed "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass "
                           f"example_inputs=(...) for forward{sig}") from e
    finally:
        for h in hooks:
            h.remove()
    if not fed:
        raise CaptureError(f"{what}; '{req[0]}' of forward{sig} does not feed an nn.Embedding directly; "
                           "pass example_inputs=(...)")
    return req[0], dict(embs)[fed[0]]


@functools.lru_cache(maxsize=512)
def _method_signature(func) -> inspect.Signature:
    """A method's signature without ``self`` (cached: ``inspect.signature`` costs ~0.1 ms, and
    every rewritten layer binds its call on each forward)."""
    sig = inspect.signature(func)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Bind a call to ``module.forward``'s signature: one flat dict of keyword arguments."""
    fwd = getattr(module, "_forward_of", None) or module.forward
    func = getattr(fwd, "__func__", None)
    sig = _method_signature(func) if func is not None else inspect.signature(fwd)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"{type(module).__name__}.forward: {e}") from e
    out: dict = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise CaptureError(f"{type(module).__name__}.forward takes *args; not supported")
        else:
            out[name] = value
    return out


def _dynamic_shapes(kwargs: dict):
    def spec(x):
        return {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    return pytree.tree_map(spec, kwargs)


class _Root(nn.Module):
    """Calls the captured module with one dict of keyword arguments (export-friendly).

    ``states``: the mapping arguments.  A module may store into one (Gemma 4 keeps the K/V a
    later layer reuses in a dict passed down the layers); export rebuilds its inputs, so such
    a store would vanish from the graph.  The entries stored are returned as a second output,
    ``{arg: {key: value}}``, for the caller to store into the real container."""

    def __init__(self, mod: nn.Module, states: tuple[str, ...] = ()):
        super().__init__()
        self.kvroot = mod
        self.states = states

    def forward(self, inputs: dict):
        if not self.states:
            return self.kvroot(**inputs)
        before = {n: dict(inputs[n]) for n in self.states}
        out = self.kvroot(**inputs)
        writes = {n: {k: v for k, v in inputs[n].items() if k not in before[n] or v is not before[n][k]}
                  for n in self.states}
        return out, writes


def _export(module: nn.Module, kwargs: dict, states: tuple[str, ...] = ()):
    logging.getLogger("torch._export").setLevel(logging.ERROR)  # 0/1 specialisation notes
    shapes = (_dynamic_shapes(kwargs),)
    errors = []
    for strict in (False, True):
        try:
            return torch.export.export(_Root(module, states), (kwargs,), dynamic_shapes=shapes, strict=strict)
        except Exception as e:  # noqa: BLE001 - report both attempts below
            errors.append(f"{'strict' if strict else 'non-strict'} export: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")
    raise CaptureError(f"could not capture {type(module).__name__}: " + "; ".join(errors))


def _unlifted(ep) -> fx.GraphModule:
    gm = ep.module()
    gm._forward_pre_hooks.clear()  # input guards of the sample shapes: kvpass checks its own
    for n in list(gm.graph.nodes):
        guard = n.op == "call_module" and n.target == "_guards_fn"  # sample-shape guards
        if (guard or (n.op == "call_function" and "_assert_tensor_metadata" in str(n.target))) and not n.users:
            gm.graph.erase_node(n)
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs -> flat outputs
    gm.recompile()
    return gm


def sample_env(gm: fx.GraphModule, leaves: list) -> dict:
    """Every node's value when ``gm`` runs on ``leaves``."""
    env: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            env[n] = super().run_node(n)
            return env[n]

    with torch.no_grad():
        Recorder(gm).run(*leaves)
    return env


def capture_call(module: nn.Module, kwargs: dict, *, run: bool = True) -> Captured:
    """Capture ``module(**kwargs)`` (a flat keyword dict, see :func:`bind_call`).

    Mapping arguments are traced as plain dicts (export flattens no other mapping type), and
    what the module stores into them comes back as a second graph output (:class:`_Root`)."""
    states = tuple(k for k, v in kwargs.items() if isinstance(v, Mapping))
    kwargs = {k: dict(v) if k in states else v for k, v in kwargs.items()}
    leaves_with_paths, _ = pytree.tree_flatten_with_path(kwargs)
    ep = _export(module, kwargs, states)
    gm = _unlifted(ep)
    paths = [pytree.keystr(p) for p, _ in leaves_with_paths]
    leaves = [v for _, v in leaves_with_paths]
    n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_in != len(leaves):
        raise CaptureError(f"{type(module).__name__}: graph has {n_in} inputs, call has {len(leaves)}")
    cap = Captured(gm, paths, ep.call_spec.out_spec, sample=kwargs, writes=bool(states))
    if run:
        cap.env = sample_env(gm, leaves)
    return cap


def cache_free_call(model: nn.Module, inputs) -> tuple[tuple, dict]:
    """(args, kwargs) for calling ``model`` on ``inputs`` (a tensor, a tuple of positional args
    or a dict of keyword args) without a KV cache (``use_cache=False`` where accepted)."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return args, kwargs


def run_cache_free(model: nn.Module, inputs):
    """Call ``model`` on ``inputs`` without a KV cache (see :func:`cache_free_call`)."""
    args, kwargs = cache_free_call(model, inputs)
    return model(*args, **kwargs)


def capture(model: nn.Module, example_inputs=None) -> Captured:
    """Trace ``model`` into an FX graph (dynamic batch and sequence length).

    ``example_inputs``: a tensor, a tuple of positional args, or a dict of keyword args;
    default: token ids for models with an input embedding.  HF models are traced without a
    KV cache (``use_cache=False``).
    """
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    flat = bind_call(model, *cache_free_call(model, example_inputs))
    with torch.no_grad():
        return capture_call(model, flat)
