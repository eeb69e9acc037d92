"""Calibration: the inputs each attention layer sees on real text, collected layer by layer.

Every lossy pass calibrates the same way: layers are processed **in order**, and layer ``i``'s
inputs are recorded by running the model *as rewritten so far* (layers ``< i`` already in their
new form), so errors do not compound unseen.  A forward pre-hook records the owning module's
call and stops the forward there (nothing after layer ``i`` runs).  Per-layer statistics are
covariances accumulated from :class:`~kvpass.runtime.core.KVCore` taps, not stored activations.

Example:
    >>> import torch
    >>> from kvpass.transform.calibrate import calibration_ids
    >>> calibration_ids(torch.arange(10), length=4).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import KVPassError
from ..graph.capture import bind_call, run_cache_free

__all__ = ["calibration_ids", "layer_inputs", "KVStats", "collect_stats", "RecordedCalls"]


def calibration_ids(calibration, tokenizer=None, *, length: int = 256, max_chunks: int = 16) -> torch.Tensor:
    """Token ids [N, length] from ids, a string, a list of strings, or a text-file path.

    A 2-D tensor is used as given (its rows are the chunks, all of them)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 2:
            return calibration
        ids = calibration.reshape(-1)
        n = min(max_chunks, ids.numel() // length)
        if n == 0:
            raise KVPassError(f"calibration: {ids.numel()} tokens, need at least {length}")
        return ids[: n * length].view(n, length)
    if isinstance(calibration, (list, tuple)):
        calibration = "\n\n".join(calibration)
    if isinstance(calibration, (str, os.PathLike)):
        text = str(calibration)
        if is_path_like(text):
            text = Path(text).expanduser().read_text(encoding="utf-8")
        if tokenizer is None:
            raise KVPassError("calibration: text given but no tokenizer; pass tokenizer=... "
                              "(kvpass.assets.models.load returns one) or token ids")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        return calibration_ids(ids, length=length, max_chunks=max_chunks)
    raise KVPassError(f"calibration: expected token ids, text, or a file path; got {type(calibration).__name__}")


class _Stop(Exception):
    pass


def calls_into(module: nn.Module, runs) -> list[dict]:
    """The calls (flat keyword dicts) ``module`` receives while each of ``runs`` (callables)
    runs; each run is stopped there (nothing after ``module`` runs)."""
    calls: list[dict] = []

    def hook(m, args, kwargs):
        calls.append({k: _detach(v) for k, v in bind_call(m, args, kwargs).items()})
        raise _Stop

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for run in runs:
                try:
                    run()
                except _Stop:
                    pass
    finally:
        h.remove()
    return calls


def layer_inputs(model: nn.Module, module_name: str, ids: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """The calls (flat keyword dicts) ``module_name`` receives on ``ids``, batch by batch."""
    return calls_into(model.get_submodule(module_name),
                      [partial(_forward, model, ids[s:s + batch_size]) for s in range(0, len(ids), batch_size)])


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    return v


class KVStats:
    """Second moments of what one attention uses, accumulated over calibration tokens.

    ``q2[h]``: E[q qᵀ] per query head [H, D, D]; ``kk``/``vv``: E[k kᵀ] over all KV heads
    stacked ([Hkv·D, Hkv·D]), so head-to-head similarity needs no stored activations.
    """

    def __init__(self):
        self.n = 0
        self.q2 = self.kk = self.vv = None

    def __call__(self, q, k, v):
        if k is None or v is None:  # a cross-layer consumer, or a latent layer (k is its input)
            return
        B, H, S, D = q.shape
        qf = q.detach().float().permute(1, 0, 2, 3).reshape(H, -1, D)  # [H, N, D]
        kf = k.detach().float().permute(0, 2, 1, 3).reshape(B * S, -1)  # [N, Hkv*D]
        vf = v.detach().float().permute(0, 2, 1, 3).reshape(B * S, -1)
        q2 = torch.einsum("hnd,hne->hde", qf, qf)
        kk, vv = kf.T @ kf, vf.T @ vf
        if self.q2 is None:
            self.q2, self.kk, self.vv = q2, kk, vv
        else:
            self.q2 += q2
            self.kk += kk
            self.vv += vv
        self.n += B * S


@contextmanager
def collect_stats(core) -> Iterator[KVStats]:
    """Attach a :class:`KVStats` tap to a KVCore for the duration of a block."""
    stats = KVStats()
    core.taps.append(stats)
    try:
        yield stats
    finally:
        core.taps.remove(stats)


def run_calls(module: nn.Module, calls: list[dict]) -> list:
    """Run ``module`` on recorded calls; the first tensor output of each."""
    outs = []
    for c in calls:
        out = module(**c)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def record_all(model: nn.Module, names: list[str], ids: torch.Tensor, batch_size: int = 4) -> dict[str, list[dict]]:
    """One pass: the calls every named module receives on ``ids`` (the original model's
    activations, used as healing targets)."""
    calls: dict[str, list[dict]] = {n: [] for n in names}
    hooks = []
    for n in names:
        def hook(m, args, kwargs, n=n):
            calls[n].append({k: _detach(v) for k, v in bind_call(m, args, kwargs).items()})

        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                _forward(model, ids[start:start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return calls


def _forward(model: nn.Module, ids: torch.Tensor):
    return run_cache_free(model, {"input_ids": ids} if "input_ids" in _params(model) else (ids,))


def _params(model: nn.Module):
    import inspect

    return inspect.signature(model.forward).parameters


class LayerFeeder:
    """Inputs of each attention layer of the model *as rewritten so far*, in O(layers) work.

    Where the attention modules sit in the blocks of one ``nn.ModuleList`` (the usual stack of
    decoder/encoder layers), the blocks' calls are recorded once and the hidden state is carried
    from block to block as layers are rewritten: block ``i`` is re-run only after layer ``i``
    changed.  The hidden-state argument is found by data (the input of block ``i+1`` that equals
    block ``i``'s output), not by name.  Otherwise every request re-runs the model up to the
    layer (:func:`layer_inputs`).
    """

    def __init__(self, model: nn.Module, names: list[str], ids: torch.Tensor, batch_size: int = 4):
        self.model, self.names, self.ids, self.batch = model, names, ids, batch_size
        self.blocks = _block_list(model, names)
        self.calls = self.key = None
        self.ready = 0  # blocks before this one have been re-run since their layers changed
        if self.blocks is not None:
            block_names = [b for b, _ in self.blocks]
            self.calls = record_all(model, block_names, ids, batch_size)
            self.key = hidden_key(model, block_names, self.calls)
            if self.key is None:
                self.blocks = None

    def inputs(self, name: str) -> list[dict]:
        """The calls attention ``name`` receives now (earlier layers as rewritten so far)."""
        if self.blocks is None:
            return layer_inputs(self.model, name, self.ids, self.batch)
        names = [b for b, _ in self.blocks]
        target = next(i for i, (_, sites) in enumerate(self.blocks) if name in sites)
        with torch.no_grad():
            for i in range(self.ready, target):  # carry the hidden state to block `target`
                for c, nxt in zip(self.calls[names[i]], self.calls[names[i + 1]]):
                    out = self.model.get_submodule(names[i])(**c)
                    nxt[self.key] = out[0] if isinstance(out, (tuple, list)) else out
        self.ready = target
        block = self.model.get_submodule(names[target])
        return calls_into(self.model.get_submodule(name), [partial(block, **c) for c in self.calls[names[target]]])


class RecordedCalls:
    """Calibration given as the calls each attention module receives, recorded elsewhere,
    instead of token ids: ``{attention module name: [call kwargs, ...]}``.

    :func:`kvpass.optimize` takes one as ``calibration=`` for per-layer passes (not for MHC
    rank allocation or healing, which run the whole model).  The streaming checkpoint rewrite
    (:mod:`kvpass.checkpoint.stream`) uses it: it carries the calibration activations through the layers
    itself, one layer in memory, and hands each layer's attention its recorded inputs.

    Example:
        >>> import torch
        >>> rec = RecordedCalls({"model.layers.0.self_attn": [{"hidden_states": torch.zeros(1, 4, 8)}]})
        >>> rec.inputs("model.layers.0.self_attn")[0]["hidden_states"].shape
        torch.Size([1, 4, 8])
    """

    def __init__(self, calls: dict[str, list[dict]]):
        self.calls = calls

    def inputs(self, name: str) -> list[dict]:
        if not self.calls.get(name):
            raise KVPassError(f"{name}: no recorded calibration calls (recorded: {sorted(self.calls)})")
        return self.calls[name]


def _block_list(model: nn.Module, names: list[str]):
    """[(block name, [attention names inside])] for the ModuleList holding the attentions."""
    for lname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            blocks = [(f"{lname}.{i}", [n for n in names if n.startswith(f"{lname}.{i}.")])
                      for i in range(len(mod))]
            covered = [n for _, inside in blocks for n in inside]
            if sorted(covered) == sorted(names):
                return blocks
    return None


def hidden_key(model, block_names: list[str], calls: dict[str, list[dict]]) -> str | None:
    """The keyword through which a block passes its hidden state to the next one."""
    if len(block_names) < 2:
        return next((k for k, v in calls[block_names[0]][0].items() if isinstance(v, torch.Tensor)), None)
    with torch.no_grad():
        out = model.get_submodule(block_names[0])(**calls[block_names[0]][0])
    out = out[0] if isinstance(out, (tuple, list)) else out
    for k, v in calls[block_names[1]][0].items():
        if isinstance(v, torch.Tensor) and v.shape == out.shape and torch.equal(v, out):
            return k
    return None


def is_path_like(text: str) -> bool:
    """Whether ``text`` names an existing file (False for text that cannot be a path)."""
    if "\n" in text or len(text) >= 4096:
        return False
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # e.g. a name longer than the filesystem allows
        return False
