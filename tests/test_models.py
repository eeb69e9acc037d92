"""Loading the bundled real models, their architecture facts, errors, basic metrics.

Tests marked ``real`` need the one-time GGUF conversion of SmolLM2 (~30 s) or
Gemma 3 (~100 s) on first run; afterwards they load from the cache in < 1 s.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpass.assets import models
from kvpass.assets.models import ModelLoadError
from kvpass.assets.text import load_text, split_sentences, token_chunks
from kvpass.errors import KVPassError
from kvpass.eval.perplexity import embedding_cosine, perplexity


@pytest.fixture(scope="module")
def minilm():
    return models.load("minilm-l6")


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m")


def test_bundled_names():
    assert sorted(models.BUNDLED) == ["gemma3-270m", "minilm-l6", "smollm2-135m"]


def test_unknown_name_lists_bundled():
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        models.load("gpt-17")
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, KVPassError)


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p / "notes.txt"], ids=["dir", "file"])
def test_non_model_path(tmp_path: Path, make):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a model"):
        models.resolve(make(tmp_path))


def test_broken_model_folder(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="could not load"):
        models.load(tmp_path)


def test_minilm_architecture(minilm):
    model, tokenizer = minilm
    config = model.config
    assert type(model).__name__ == "BertModel"
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 12, 384)
    assert config._attn_implementation == "sdpa" and not model.training
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_minilm_from_folder_path_and_attn_override():
    model, _ = models.load(models.resolve("minilm-l6"), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_embedding_cosine(minilm):
    model, tokenizer = minilm
    sentences = split_sentences(load_text("eval"), max_sentences=16)
    assert embedding_cosine(model, model, tokenizer, sentences, progress=False) == pytest.approx(1.0)
    noisy = copy.deepcopy(model)
    weight = noisy.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight.add_(0.05 * torch.randn_like(weight))
    cosine = embedding_cosine(model, noisy, tokenizer, sentences, progress=False)
    assert 0.0 < cosine < 0.999


def test_perplexity_of_uniform_model_is_vocab_size():
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: uniform over 50 tokens
    chunks = torch.randint(0, 50, (5, 9))
    assert perplexity(model, chunks, batch_size=2, progress=False) == pytest.approx(50.0, rel=1e-5)


def test_gguf_path_converted_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_convert(source: Path, out: Path, label: str) -> None:
        calls.append(source)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / models._MARKER).write_text(json.dumps({"format": models._FORMAT}))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    first = models.resolve(gguf)
    assert models.resolve(str(gguf)) == first and calls == [gguf]
    assert first.parent == tmp_path / "cache" / "models" and (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left


@pytest.mark.real
def test_smollm2_architecture(smollm2):
    model, _ = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.head_dim) == (3, 64)
    assert config._attn_implementation == "sdpa" and not model.training
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    folder = models.resolve("smollm2-135m")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@pytest.mark.real
def test_smollm2_perplexity_on_eval_text(smollm2):
    model, tokenizer = smollm2
    chunks = token_chunks(tokenizer, load_text("eval"), length=256, max_chunks=2)
    ppl = perplexity(model, chunks, progress=False)
    print(f"SmolLM2-135M perplexity on 2x256 tokens of the eval text: {ppl:.2f}")
    assert 3.0 < ppl < 100.0


@pytest.mark.real
def test_gemma3_architecture():
    model, tokenizer = models.load("gemma3-270m")
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads) == (18, 4)
    assert (config.num_key_value_heads, config.head_dim) == (1, 256)
    assert config.sliding_window == 512
    assert config.layer_types.count("sliding_attention") == 15
    assert config.layer_types.count("full_attention") == 3
    assert config._attn_implementation == "sdpa" and not model.training
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
