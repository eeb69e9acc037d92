"""Healing: local distillation of one rewritten attention block.

After a lossy rewrite, the new block is trained (Adam with a cosine schedule, CPU) to reproduce
the original block's output on that layer's calibration inputs.  Given the original model,
the target is the original model's own activation at that layer (computed from the original
inputs) while the student sees the rewritten model's inputs, so healing also corrects what
earlier rewritten layers changed.  Trainable: the layer's K/V projections, optionally
its query and output projections; everything else is frozen.  The loss is the mean squared
error normalised by the teacher output's mean square (so 1.0 = predicting zeros).  The best
parameters seen are kept, so healing never makes the calibration loss worse.

Example (a do-nothing heal of a block against itself):
    >>> import torch
    >>> from kvpass.transform.heal import heal_block
    >>> lin = torch.nn.Linear(4, 4)
    >>> calls = [{"input": torch.randn(3, 4)}]
    >>> before, after = heal_block(lin, lin, calls, ["weight"], steps=2)
    >>> after <= before
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["heal_block", "HEAL_DEFAULT_STEPS"]

HEAL_DEFAULT_STEPS = 150


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(student: nn.Module, calls: list[dict], targets: list[torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for c, t in zip(calls, targets):
        y = _first(student(**c)).float()
        total = total + ((y - t) ** 2).mean() / (t ** 2).mean().clamp(min=1e-12)
    return total / len(calls)


def heal_block(student: nn.Module, teacher: nn.Module | None, calls: list[dict], trainable: list[str],
               steps: int = HEAL_DEFAULT_STEPS, lr: float = 2e-3, desc: str = "heal",
               progress: bool = False, targets: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """Train ``trainable`` parameters of ``student`` toward ``teacher`` on ``calls``.

    ``targets`` (instead of ``teacher``): the outputs to reproduce, e.g. the original model's
    activations at this layer, so the student also corrects errors of earlier layers.
    Returns (loss before, loss after); after <= before always (best parameters are kept).
    """
    if targets is None:
        with torch.no_grad():
            targets = [_first(teacher(**c)).float() for c in calls]
    params = dict(student.named_parameters())
    train = [params[n] for n in trainable]
    saved = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    try:
        with torch.no_grad():
            before = float(_loss(student, calls, targets))
        best, best_state = before, [p.detach().clone() for p in train]
        opt = torch.optim.Adam(train, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for step in bar:
            c = [calls[step % len(calls)]]
            t = [targets[step % len(targets)]]
            opt.zero_grad()
            loss = _loss(student, c, t)
            loss.backward()
            opt.step()
            sched.step()
            if (step + 1) % max(1, steps // 10) == 0 or step == steps - 1:
                with torch.no_grad():
                    full = float(_loss(student, calls, targets))
                bar.set_postfix(loss=f"{full:.4f}")
                if full < best:
                    best, best_state = full, [p.detach().clone() for p in train]
        with torch.no_grad():
            for p, b in zip(train, best_state):
                p.copy_(b)
        return before, best
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])


def snapshot(module: nn.Module) -> nn.Module:
    """A frozen copy of a block (the teacher), taken before a pass changes its weights."""
    t = copy.deepcopy(module)
    for p in t.parameters():
        p.requires_grad_(False)
    return t
