"""Calibration: the inputs each attention layer sees on real text, collected layer by layer.

Every lossy pass calibrates the same way: layers are processed **in order**, and layer ``i``'s
inputs are recorded by running the model *as rewritten so far* (layers ``< i`` already in their
new form), so errors do not compound unseen.  A forward pre-hook records the owning module's
call and stops the forward there (nothing after layer ``i`` runs).  Per-layer statistics are
covariances accumulated from :class:`~kvpass.lower.KVCore` taps, not stored activations.

Example:
    >>> import torch
    >>> from kvpass.calibrate import calibration_ids
    >>> calibration_ids(torch.arange(10), length=4).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .capture import bind_call
from .errors import KVPassError

__all__ = ["calibration_ids", "layer_inputs", "KVStats", "collect_stats"]


def calibration_ids(calibration, tokenizer=None, *, length: int = 256, max_chunks: int = 16) -> torch.Tensor:
    """Token ids [N, length] from ids, a string, a list of strings, or a text-file path.

    A 2-D tensor is used as given (its rows are the chunks, at most ``max_chunks``)."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 2:
            return calibration[:max_chunks]
        ids = calibration.reshape(-1)
        n = min(max_chunks, ids.numel() // length)
        if n == 0:
            raise KVPassError(f"calibration: {ids.numel()} tokens, need at least {length}")
        return ids[: n * length].view(n, length)
    if isinstance(calibration, (list, tuple)):
        calibration = "\n\n".join(calibration)
    if isinstance(calibration, (str, os.PathLike)):
        text = str(calibration)
        if len(text) < 4096 and Path(text).expanduser().is_file():
            text = Path(text).expanduser().read_text(encoding="utf-8")
        if tokenizer is None:
            raise KVPassError("calibration: text given but no tokenizer; pass tokenizer=... "
                              "(kvpass.models.load returns one) or token ids")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        return calibration_ids(ids, length=length, max_chunks=max_chunks)
    raise KVPassError(f"calibration: expected token ids, text, or a file path; got {type(calibration).__name__}")


class _Stop(Exception):
    pass


def layer_inputs(model: nn.Module, module_name: str, ids: torch.Tensor, batch_size: int = 4) -> list[dict]:
    """The calls (flat keyword dicts) ``module_name`` receives on ``ids``, batch by batch."""
    mod = model.get_submodule(module_name)
    calls: list[dict] = []

    def hook(m, args, kwargs):
        calls.append({k: _detach(v) for k, v in bind_call(m, args, kwargs).items()})
        raise _Stop

    h = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                try:
                    model(input_ids=ids[start:start + batch_size], use_cache=False) \
                        if _takes(model, "use_cache") else model(ids[start:start + batch_size])
                except _Stop:
                    pass
    finally:
        h.remove()
    return calls


def _takes(model: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


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
        if k is None:
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
