"""Long-range quality measures: late-position perplexity, perplexity by position, passkey retrieval.

They compare an original model with a rewritten one (windowed or sparse attention)
on what such rewrites can lose: tokens far from the start of a long context.

>>> from kvpass.assets.models import load  # doctest: +SKIP
>>> from kvpass.assets.text import load_text, token_chunks  # doctest: +SKIP
>>> model, tokenizer = load("smollm2-135m")  # doctest: +SKIP
>>> chunks = token_chunks(tokenizer, load_text("eval"), length=4096, max_chunks=4)  # doctest: +SKIP
>>> long_range_perplexity(model, chunks, start=1024) > 1  # doctest: +SKIP
True
>>> result = passkey_accuracy(model, tokenizer, lengths=[512, 1024], depths=[0.1, 0.5, 0.9])  # doctest: +SKIP
>>> sorted(result)  # doctest: +SKIP
['accuracy', 'depths', 'grid', 'lengths', 'trials']
>>> passkey_retained(result, result)["retained"]  # doctest: +SKIP
1.0
"""

from __future__ import annotations

import bisect
import inspect
import math
import os
import random
import re
import textwrap
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..assets.text import prefix_ids, split_sentences
from ..util import device_of

__all__ = [
    "DEFAULT_FILLER",
    "long_range_perplexity",
    "perplexity_by_position",
    "passkey_prompt",
    "passkey_accuracy",
    "passkey_retained",
    "plot_passkey",
]

#: The classic passkey filler (Landmark Attention, Mohtashami & Jaggi 2023), repeated as needed.
DEFAULT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back and again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


# ---------------------------------------------------------------- perplexity


@torch.inference_mode()
def long_range_perplexity(
    model: nn.Module, chunks: torch.Tensor, start: int = 1024, batch_size: int = 1, progress: bool = True
) -> float:
    """exp of the mean next-token NLL over the tokens at positions ``>= start`` of each chunk.

    ``chunks`` is ``[N, S]`` token ids (see :func:`kvpass.assets.text.token_chunks`); token
    ``t`` is predicted from tokens ``0..t-1`` of its own row, and only targets with
    ``t >= start`` count, so ``N * (S - start)`` tokens are scored. ``start=1``
    scores every token, like :func:`kvpass.eval.perplexity.perplexity`.

    >>> long_range_perplexity(None, torch.zeros(1, 8, dtype=torch.long), start=8)
    Traceback (most recent call last):
    ...
    ValueError: start 8 must be in [1, 8) for chunks of 8 tokens
    """
    seq = chunks.shape[1]
    if not 1 <= start < seq:
        raise ValueError(f"start {start} must be in [1, {seq}) for chunks of {seq} tokens")
    device = device_of(model)
    total, count = 0.0, 0
    for row in tqdm(range(0, len(chunks), batch_size), desc="long-range perplexity", disable=not progress):
        ids = chunks[row : row + batch_size].to(device)  # [B, S]
        logits = last_logits(model, ids, seq - start + 1)[:, :-1]  # [B, S-start, V]: predict start..S-1
        targets = ids[:, start:]  # [B, S-start]
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


@torch.inference_mode()
def perplexity_by_position(
    model: nn.Module, chunks: torch.Tensor, bucket: int = 256, batch_size: int = 1, progress: bool = True
) -> list[tuple[int, float]]:
    """Perplexity of the targets in each run of ``bucket`` positions: ``[(bucket start, ppl), ...]``.

    Target position ``t`` (predicted from ``0..t-1``) falls in bucket ``t // bucket``;
    position 0 is never predicted, so the first bucket holds ``bucket - 1`` positions.
    A bucket ``(b, ppl)`` whose positions run to the end of the chunks has the same
    ``ppl`` as ``long_range_perplexity(model, chunks, start=b)``.
    """
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    device = device_of(model)
    seq = chunks.shape[1]
    nll = torch.zeros(seq - 1, dtype=torch.float64)  # summed over rows, per target position 1..S-1
    for row in tqdm(range(0, len(chunks), batch_size), desc="perplexity by position", disable=not progress):
        ids = chunks[row : row + batch_size].to(device)  # [B, S]
        logits = model(input_ids=ids).logits[:, :-1].float()  # [B, S-1, V]
        per_token = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, S-1]
        nll += per_token.sum(0).double().cpu()
    out = []
    for first in range(0, seq, bucket):
        lo, hi = max(first, 1), min(first + bucket, seq)  # target positions [lo, hi)
        if lo < hi:
            out.append((first, math.exp(nll[lo - 1 : hi - 1].sum().item() / ((hi - lo) * len(chunks)))))
    return out


# ---------------------------------------------------------------- passkey retrieval


def passkey_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, key: int | str, filler: str | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """A passkey-retrieval prompt of about ``length`` tokens and the ids of its answer.

    The prompt is ``filler`` (default :data:`DEFAULT_FILLER`; any text, cut into
    sentences and cycled as needed), with ``"The pass key is {key}. Remember it.
    {key} is the pass key."`` inserted at the sentence boundary nearest to the
    fraction ``depth`` of the filler's tokens (or the nearest word start, when
    sentences are long next to the prompt), then ``"What is the pass key? The
    pass key is"``. Returns ``(prompt_ids [1, L], answer_ids [k])``: tokenizing
    ``prompt + " " + key`` gives exactly ``prompt_ids`` followed by ``answer_ids``
    (should the tokenizer merge a token across that boundary, the merged token
    moves into the answer). ``L`` is ``length`` to within a few tokens; special
    tokens the tokenizer puts before a text (e.g. ``<bos>``) count.

    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> from kvpass.assets.models import resolve  # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))  # doctest: +SKIP
    >>> prompt, answer = passkey_prompt(tokenizer, 1024, 0.5, 12345)  # doctest: +SKIP
    >>> prompt.shape, tokenizer.decode(answer)  # doctest: +SKIP
    (torch.Size([1, 1024]), ' 12345')
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    sentences = _sentences(DEFAULT_FILLER if filler is None else filler)
    if not sentences:
        raise ValueError("filler has no text")
    prefix = prefix_ids(tokenizer)
    needle = NEEDLE.format(key=key)
    fixed = len(prefix) + len(_ids(tokenizer, " " + needle)) + len(_ids(tokenizer, " " + QUESTION))
    if length < fixed:
        raise ValueError(f"length {length} is shorter than the passkey sentence and question ({fixed} tokens)")
    stream = _filler_stream(tokenizer, sentences, length)
    best, n_filler = None, length - fixed
    for _ in range(4):  # tokens do not add exactly across the joins: correct the filler size
        text = _assemble(stream, n_filler, depth, needle)
        size = len(prefix) + len(_ids(tokenizer, text))
        if best is None or abs(size - length) < abs(best[1] - length):
            best = (text, size)
        if size == length:
            break
        n_filler = max(0, min(len(stream.ends), n_filler + length - size))
    text = best[0]
    alone = _ids(tokenizer, text)
    joined = _ids(tokenizer, f"{text} {key}")
    same = next((i for i, (a, b) in enumerate(zip(alone, joined)) if a != b), min(len(alone), len(joined)))
    prompt = torch.tensor([prefix + joined[:same]], dtype=torch.long)
    return prompt, torch.tensor(joined[same:], dtype=torch.long)


@torch.inference_mode()
def passkey_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 1,
    seed: int = 0,
    progress: bool = True,
    filler: str | None = None,
) -> dict:
    """Passkey retrieval accuracy on a grid of prompt lengths (tokens) and key depths.

    Each ``(length, depth, trial)`` draws a 5-digit key from ``random.Random(seed)``
    (in that loop order, so every model sees the same keys), builds
    :func:`passkey_prompt` and runs one forward over prompt + answer: a trial
    succeeds when the argmax at every answer position is the answer token, which is
    what greedy generation of the answer would give.

    Returns ``{"lengths", "depths", "grid": [[accuracy per depth] per length],
    "accuracy": mean of the grid, "trials"}``.
    """
    device, rng = device_of(model), random.Random(seed)
    grid = [[0.0] * len(depths) for _ in lengths]
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    bar = tqdm(total=len(cells) * trials, desc="passkey", disable=not progress)
    for i, j in cells:
        hits = 0
        for _ in range(trials):
            key = rng.randint(10_000, 99_999)
            prompt, answer = passkey_prompt(tokenizer, lengths[i], depths[j], key, filler)
            ids = torch.cat([prompt[0], answer])[None].to(device)  # [1, L + k]
            guess = last_logits(model, ids, len(answer) + 1)[0, :-1].argmax(-1)  # [k]
            hits += bool((guess.cpu() == answer).all())
            bar.update()
        grid[i][j] = hits / trials
    bar.close()
    flat = [acc for row in grid for acc in row]
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "grid": grid,
        "accuracy": sum(flat) / len(flat) if flat else float("nan"),
        "trials": trials,
    }


def passkey_retained(original: dict, rewritten: dict, threshold: float = 0.5) -> dict:
    """Compare two :func:`passkey_accuracy` results only where the original succeeds.

    A cell counts when the original's accuracy there is ``>= threshold``. Returns
    ``{"cells": n, "original": its mean accuracy on those cells, "rewritten": the
    rewritten model's mean accuracy on them, "retained": rewritten / original}``
    (the last three ``None`` when no cell counts).

    >>> a = {"lengths": [512], "depths": [0.1, 0.9], "grid": [[1.0, 0.0]]}
    >>> b = {"lengths": [512], "depths": [0.1, 0.9], "grid": [[0.5, 1.0]]}
    >>> passkey_retained(a, b)
    {'cells': 1, 'original': 1.0, 'rewritten': 0.5, 'retained': 0.5}
    """
    for field in ("lengths", "depths"):
        if list(original[field]) != list(rewritten[field]):
            raise ValueError(f"results differ in {field}: {original[field]} vs {rewritten[field]}")
    pairs = [
        (a, b)
        for row_a, row_b in zip(original["grid"], rewritten["grid"])
        for a, b in zip(row_a, row_b)
        if a >= threshold
    ]
    if not pairs:
        return {"cells": 0, "original": None, "rewritten": None, "retained": None}
    acc_a = sum(a for a, _ in pairs) / len(pairs)
    acc_b = sum(b for _, b in pairs) / len(pairs)
    return {"cells": len(pairs), "original": acc_a, "rewritten": acc_b, "retained": acc_b / acc_a}


def plot_passkey(results: dict[str, dict], path: str | os.PathLike) -> str:
    """One accuracy heatmap (length x depth) per label of ``results``, saved to ``path``.

    >>> r = {"lengths": [512, 1024], "depths": [0.1, 0.9], "grid": [[1.0, 1.0], [1.0, 0.0]]}
    >>> plot_passkey({"original": r, "windowed": r}, "/tmp/passkey.png")  # doctest: +SKIP
    '/tmp/passkey.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.9, 3.5 * rows), squeeze=False)
    flat = axes.ravel().tolist()
    for n, (ax, (label, res)) in enumerate(zip(flat, results.items())):
        image = ax.imshow(res["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]])
        ax.set_yticks(range(len(res["lengths"])), [str(n) for n in res["lengths"]])
        ax.set_xlabel("key depth")
        if n % cols == 0:
            ax.set_ylabel("prompt tokens")
        ax.set_title(textwrap.fill(label, 34), fontsize=9)
        for i, row in enumerate(res["grid"]):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.2g}", ha="center", va="center", fontsize=8)
    for ax in flat[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.colorbar(image, ax=flat, label="passkey accuracy", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


# ---------------------------------------------------------------- helpers


class _Stream:
    """Filler text, its tokens' end offsets, and where its sentences and words start (characters)."""

    def __init__(self, text: str, ends: list[int], sentences: list[int]):
        self.text, self.ends, self.sentences = text, ends, sentences
        self.words = [m.start() for m in re.finditer(r"(?<=\s)\S", text)]


def _filler_stream(tokenizer: PreTrainedTokenizerBase, sentences: tuple[str, ...], n_tokens: int) -> _Stream:
    """Sentences cycled and joined by spaces until at least ``n_tokens`` tokens."""
    chars = 6 * n_tokens + 256  # English runs about 4 characters a token
    while True:
        parts, size, k = [], 0, 0
        while size < chars:
            parts.append(sentences[k % len(sentences)])
            size += len(parts[-1]) + 1
            k += 1
        text = " ".join(parts)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if len(enc["input_ids"]) >= n_tokens:
            break
        chars *= 2
    starts, pos = [], 0
    for part in parts:
        starts.append(pos)
        pos += len(part) + 1
    return _Stream(text, [end for _, end in enc["offset_mapping"]], starts)


def _assemble(stream: _Stream, n_filler: int, depth: float, needle: str) -> str:
    """``n_filler`` filler tokens with ``needle`` inserted at ``depth`` of them, then the question.

    The needle goes at the nearest sentence start, or the nearest word start when no
    sentence starts within 2% (at least 4 tokens) of the target, as with long sentences.
    """
    cut = stream.ends[n_filler - 1] if n_filler > 0 else 0  # filler text is stream.text[:cut]
    target = depth * n_filler

    def nearest(starts: list[int]) -> tuple[float, int]:
        bounds = [*starts[: bisect.bisect_left(starts, cut)], cut]
        return min((abs(bisect.bisect_right(stream.ends, c) - target), c) for c in bounds)

    off, at = nearest(stream.sentences)
    if off > max(4.0, 0.02 * n_filler):
        off, at = nearest(stream.words)
    parts = [stream.text[:at].strip(), needle, stream.text[at:cut].strip(), QUESTION]
    return " ".join(p for p in parts if p)


@lru_cache(maxsize=8)
def _sentences(text: str) -> tuple[str, ...]:
    return tuple(split_sentences(text, min_chars=1))


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def last_logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits at the last ``keep`` positions of ``ids``, ``[B, keep, V]``.

    HF causal LMs take ``logits_to_keep`` and skip the LM head elsewhere (a 4k-token
    row of a 49k vocabulary is 0.8 GB of fp32 logits); other modules get sliced.
    """
    forward = getattr(model, "forward", model)
    try:
        takes_keep = "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_keep = False
    out = model(input_ids=ids, logits_to_keep=keep) if takes_keep else model(input_ids=ids)
    return out.logits[:, -keep:]


