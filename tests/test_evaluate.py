"""Long-range metrics: late-position perplexity, perplexity by position, passkey retrieval."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kvpass.assets import models
from kvpass.assets.text import load_text
from kvpass.eval.long_range import (
    NEEDLE,
    long_range_perplexity,
    passkey_accuracy,
    passkey_prompt,
    passkey_retained,
    perplexity_by_position,
    plot_passkey,
)
from kvpass.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = models.cache_dir() / "models" / "smollm2-135m"
    if not (folder / "kvpass-conversion.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not cached in {folder}: run kvpass.assets.models.load('smollm2-135m') once")
    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"), local_files_only=True)


class Oracle(nn.Module):
    """Logits that put all mass on the true next token (``shift`` ids off, mod vocab)."""

    def __init__(self, vocab: int, shift: int = 0):
        super().__init__()
        self.vocab, self.shift = vocab, shift
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # [B, S]
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, ((nxt + self.shift) % self.vocab).unsqueeze(-1), 10.0)
        return SimpleNamespace(logits=logits)


class Bigram(nn.Module):
    """Logits depending only on the current token: a known next-token distribution."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table(input_ids))


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


class NoKeep(nn.Module):
    """Hides ``logits_to_keep``: forces the full-logits path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


# ---------------------------------------------------------------- perplexity


def hand_nll(model: Bigram, chunks: torch.Tensor, start: int) -> float:
    logp = torch.log_softmax(model.table.weight.detach().double(), dim=-1)
    terms = [logp[row[t - 1], row[t]].item() for row in chunks for t in range(start, chunks.shape[1])]
    return -sum(terms) / len(terms)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_long_range_perplexity_matches_hand_computation(batch_size: int):
    model = Bigram(11)
    chunks = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    for start in (1, 5, 19):
        got = long_range_perplexity(model, chunks, start=start, batch_size=batch_size, progress=False)
        assert got == pytest.approx(math.exp(hand_nll(model, chunks, start)), rel=1e-5)
    full = perplexity(model, chunks, batch_size=batch_size, progress=False)
    assert long_range_perplexity(model, chunks, start=1, progress=False) == pytest.approx(full, rel=1e-6)
    # the late tokens differ from the whole: start really selects positions
    assert long_range_perplexity(model, chunks, start=15, progress=False) != pytest.approx(full, rel=1e-3)


def test_long_range_perplexity_rejects_bad_start():
    chunks = torch.zeros(2, 16, dtype=torch.long)
    for start in (0, 16, 40):
        with pytest.raises(ValueError, match="start"):
            long_range_perplexity(Bigram(4), chunks, start=start, progress=False)


def test_oracle_perplexity_is_near_one():
    chunks = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(2))
    assert long_range_perplexity(Oracle(50), chunks, start=8, progress=False) < 1.01
    assert long_range_perplexity(Oracle(50, shift=1), chunks, start=8, progress=False) > 1000


def test_logits_to_keep_path_matches_full_logits():
    model = tiny_llama(97)
    chunks = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(3))
    kept = long_range_perplexity(model, chunks, start=30, progress=False)
    full = long_range_perplexity(NoKeep(model), chunks, start=30, progress=False)
    assert kept == pytest.approx(full, rel=1e-5)
    assert perplexity(model, chunks, progress=False) == pytest.approx(
        long_range_perplexity(model, chunks, start=1, progress=False), rel=1e-5)


def test_perplexity_by_position_buckets():
    model = Bigram(13)
    chunks = torch.randint(0, 13, (3, 50), generator=torch.Generator().manual_seed(4))
    buckets = perplexity_by_position(model, chunks, bucket=16, progress=False)
    assert [b for b, _ in buckets] == [0, 16, 32, 48]
    for first, ppl in buckets[1:]:
        end = min(first + 16, 50)
        logp = torch.log_softmax(model.table.weight.detach().double(), dim=-1)
        terms = [-logp[row[t - 1], row[t]].item() for row in chunks for t in range(first, end)]
        assert ppl == pytest.approx(math.exp(sum(terms) / len(terms)), rel=1e-5)
    # the last bucket runs to the end: same as long_range_perplexity from its start
    assert buckets[-1][1] == pytest.approx(long_range_perplexity(model, chunks, start=48, progress=False), rel=1e-5)
    # token-weighted buckets give back the whole-sequence perplexity (targets 1-15, 16-31, 32-47, 48-49)
    sizes = [15, 16, 16, 2]
    mean = sum(n * math.log(p) for n, (_, p) in zip(sizes, buckets)) / sum(sizes)
    assert math.exp(mean) == pytest.approx(perplexity(model, chunks, progress=False), rel=1e-5)


# ---------------------------------------------------------------- passkey prompt


def find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub)


@pytest.mark.parametrize("filler", ["default", "emma"])
@pytest.mark.parametrize("length", [128, 700, 2048])
def test_passkey_prompt_length_depth_roundtrip(tokenizer, filler: str, length: int):
    text = None if filler == "default" else load_text("eval")
    key = 48213
    needle = tokenizer(" " + NEEDLE.format(key=key), add_special_tokens=False)["input_ids"][1:]  # drop " The"
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        prompt, answer = passkey_prompt(tokenizer, length, depth, key, filler=text)
        ids = prompt[0].tolist()
        assert prompt.dtype == answer.dtype == torch.long and prompt.shape[0] == 1
        assert abs(len(ids) - length) <= 3, (len(ids), length, depth)
        # prompt + " " + key tokenizes to exactly prompt_ids + answer_ids, and the answer is the key
        joined = tokenizer.decode(ids) + f" {key}"
        assert tokenizer(joined, add_special_tokens=False)["input_ids"] == ids + answer.tolist()
        assert tokenizer.decode(answer).strip() == str(key)
        assert tokenizer.decode(ids).endswith("What is the pass key? The pass key is")
        # the key sentence sits at `depth` of the filler tokens
        at = find(ids, needle) - 1  # its " The"
        question = len(tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
        n_filler = len(ids) - question - len(needle) - 1
        assert abs(at / n_filler - depth) <= 0.05, (at, n_filler, depth)


def test_passkey_prompt_checks_arguments(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 512, 1.5, 12345)
    with pytest.raises(ValueError, match="shorter"):
        passkey_prompt(tokenizer, 10, 0.5, 12345)
    a, _ = passkey_prompt(tokenizer, 300, 0.5, 11111)
    b, _ = passkey_prompt(tokenizer, 300, 0.5, 11111)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- passkey accuracy


def test_passkey_accuracy_oracle_and_wrong(tokenizer):
    vocab = len(tokenizer)
    kwargs = dict(lengths=[96, 160], depths=[0.0, 0.5, 1.0], trials=2, seed=3, progress=False)
    good = passkey_accuracy(Oracle(vocab), tokenizer, **kwargs)
    bad = passkey_accuracy(Oracle(vocab, shift=1), tokenizer, **kwargs)
    assert good == {"lengths": [96, 160], "depths": [0.0, 0.5, 1.0], "grid": [[1.0] * 3] * 2,
                    "accuracy": 1.0, "trials": 2}
    assert bad["grid"] == [[0.0] * 3] * 2 and bad["accuracy"] == 0.0
    assert passkey_retained(good, bad) == {"cells": 6, "original": 1.0, "rewritten": 0.0, "retained": 0.0}
    assert passkey_retained(good, good)["retained"] == 1.0
    assert passkey_retained(bad, good) == {"cells": 0, "original": None, "rewritten": None, "retained": None}


class WrongOnLastDigit(nn.Module):
    """The oracle, except the last answer token: one wrong digit must fail the trial."""

    def __init__(self, vocab: int):
        super().__init__()
        self.oracle = Oracle(vocab)

    def forward(self, input_ids):
        logits = self.oracle(input_ids).logits.clone()
        logits[:, -2] = logits[:, -2].roll(1, dims=-1)
        return SimpleNamespace(logits=logits)


def test_passkey_accuracy_needs_every_answer_token(tokenizer):
    out = passkey_accuracy(WrongOnLastDigit(len(tokenizer)), tokenizer, [96], [0.5], progress=False)
    assert out["accuracy"] == 0.0


def test_passkey_accuracy_keys_are_seeded(tokenizer, monkeypatch):
    import kvpass.eval.long_range as ev

    seen = []
    real = ev.passkey_prompt
    monkeypatch.setattr(ev, "passkey_prompt", lambda tok, n, d, key, filler=None: seen.append(key) or real(
        tok, n, d, key, filler))
    model = tiny_llama(len(tokenizer))
    runs = [passkey_accuracy(model, tokenizer, [80], [0.2, 0.8], trials=2, seed=s, progress=False) for s in (7, 7, 8)]
    assert seen[:4] == seen[4:8] != seen[8:]
    assert all(10_000 <= k <= 99_999 for k in seen)
    assert runs[0] == runs[1] and 0.0 <= runs[0]["accuracy"] <= 1.0


def test_passkey_retained_partial_cells():
    original = {"lengths": [1, 2], "depths": [0.0, 1.0], "grid": [[1.0, 0.25], [0.5, 0.0]]}
    rewritten = {"lengths": [1, 2], "depths": [0.0, 1.0], "grid": [[0.5, 1.0], [0.0, 1.0]]}
    out = passkey_retained(original, rewritten)
    assert out == {"cells": 2, "original": 0.75, "rewritten": 0.25, "retained": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="depths"):
        passkey_retained(original, {**rewritten, "depths": [0.0, 0.5]})


def test_plot_passkey(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"lengths": [512, 1024], "depths": [0.1, 0.5, 0.9], "grid": [[1.0, 1.0, 0.0], [1.0, 0.5, 0.0]]}
    path = plot_passkey({"original": res, "windowed": res}, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").stat().st_size > 1000 and path.endswith("passkey.png")
