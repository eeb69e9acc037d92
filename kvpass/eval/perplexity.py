"""Basic quality measures: perplexity of a decoder, embedding agreement of encoders.

>>> from kvpass.assets.models import load  # doctest: +SKIP
>>> from kvpass.assets.text import load_text, token_chunks, split_sentences  # doctest: +SKIP
>>> model, tokenizer = load("smollm2-135m")  # doctest: +SKIP
>>> chunks = token_chunks(tokenizer, load_text("eval"), length=512, max_chunks=8)  # doctest: +SKIP
>>> round(perplexity(model, chunks), 1)  # doctest: +SKIP
14.2
>>> encoder, tok = load("minilm-l6")  # doctest: +SKIP
>>> embedding_cosine(encoder, encoder, tok, split_sentences(load_text("eval"), 64))  # doctest: +SKIP
1.0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..assets.text import split_sentences, token_chunks
from ..util import device_of, is_causal_lm


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """exp of the mean next-token NLL over every predicted token of every chunk.

    ``chunks`` is ``[N, S]`` token ids (see :func:`kvpass.assets.text.token_chunks`); each
    row is an independent sequence, so ``N * (S - 1)`` tokens are scored.
    """
    device = device_of(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc="perplexity", disable=not progress):
        ids = chunks[start : start + batch_size].to(device)  # [B, S]
        logits = model(input_ids=ids).logits[:, :-1]  # [B, S-1, V]
        targets = ids[:, 1:]  # [B, S-1]
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total += nll.item()
        count += targets.numel()
    return math.exp(total / count)


@torch.inference_mode()
def sentence_embeddings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens) last hidden states, ``[N, hidden]``."""
    device, out = device_of(model), []
    for start in tqdm(range(0, len(sentences), batch_size), desc="embed", disable=not progress):
        batch = sentences[start : start + batch_size]
        enc = tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()  # [B, S, H]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # [B, H]
    return torch.cat(out).cpu()


def embedding_cosine(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    batch_size: int = 32,
    progress: bool = True,
) -> float:
    """Mean cosine similarity of the two models' sentence embeddings (1.0 = same)."""
    a = sentence_embeddings(model_a, tokenizer, sentences, batch_size, progress)
    b = sentence_embeddings(model_b, tokenizer, sentences, batch_size, progress)
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def quality_scorer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, eval_text: str,
                   eval_len: int = 1024, eval_chunks: int = 16):
    """``(name, score)`` for comparing rewrites of ``model`` on held-out text: decoders get
    ``perplexity`` of ``eval_chunks`` × ``eval_len`` tokens, encoders the mean ``cosine`` of
    sentence embeddings (256 sentences) to ``model``'s own."""
    if not is_causal_lm(model):
        sentences = split_sentences(eval_text, 256)
        return "cosine", lambda m: embedding_cosine(model, m, tokenizer, sentences, progress=False)
    chunks = token_chunks(tokenizer, eval_text, eval_len, eval_chunks)
    return "perplexity", lambda m: perplexity(m, chunks, progress=False)
