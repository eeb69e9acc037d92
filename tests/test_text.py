"""Bundled texts: present, clean, disjoint; token chunking; optional Wikipedia."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kvpass.assets import models
from kvpass.assets.text import (
    TEXTS_DIR,
    bundled_texts,
    load_text,
    split_sentences,
    strip_wiki_markup,
    token_chunks,
    wikipedia_excerpt,
)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve("minilm-l6"), local_files_only=True)


def test_aliases_and_sizes():
    assert load_text("eval") == load_text("emma") == load_text()
    assert load_text("calibration") == load_text("persuasion")
    for name in ("emma", "persuasion"):
        size = (TEXTS_DIR / f"{name}.txt").stat().st_size
        assert 150_000 <= size <= 250_000, (name, size)
    assert {"eval", "calibration", "emma", "persuasion"} <= set(bundled_texts())


@pytest.mark.parametrize("name", ["eval", "calibration"])
def test_texts_are_clean(name: str):
    text = load_text(name)
    assert "_" not in text and "CHAPTER" not in text and "Chapter " not in text
    paragraphs = text.strip().split("\n\n")
    assert all(p and "\n" not in p and p == p.strip() for p in paragraphs)
    assert "  " not in text and len(paragraphs) > 300


def test_eval_and_calibration_do_not_overlap():
    # Any common substring of length >= 200 contains one of the 100-char windows of
    # `calibration` that start at a multiple of 100; so check every 100-char window
    # of `evaluation` against those (a stronger, still cheap, condition).
    evaluation, calibration = load_text("eval"), load_text("calibration")
    assert evaluation[:1000] != calibration[:1000]
    anchors = {calibration[i : i + 100] for i in range(0, len(calibration) - 99, 100)}
    shared = [i for i in range(len(evaluation) - 99) if evaluation[i : i + 100] in anchors]
    assert not shared, evaluation[shared[0] : shared[0] + 100]


def test_load_text_from_path_and_unknown(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("Some text.", encoding="utf-8")
    assert load_text(path) == load_text(str(path)) == "Some text."
    with pytest.raises(ValueError, match="eval"):
        load_text("ulysses")


def test_token_chunks_shape_and_content(bert_tokenizer):
    text = load_text("eval")
    chunks = token_chunks(bert_tokenizer, text, length=64, max_chunks=5)
    assert chunks.shape == (5, 64) and chunks.dtype == torch.long
    assert (chunks[:, 0] == bert_tokenizer.cls_token_id).all()  # prefix kept per row
    body = bert_tokenizer(text[:2000], add_special_tokens=False)["input_ids"]
    assert chunks[:, 1:].flatten().tolist() == body[: 5 * 63]  # consecutive, no overlap


def test_token_chunks_all_and_too_short(bert_tokenizer):
    text = load_text("calibration")[:5000]
    chunks = token_chunks(bert_tokenizer, text, length=100)
    n_tokens = len(bert_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    assert chunks.shape == (n_tokens // 99, 100)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        token_chunks(bert_tokenizer, "Too short.", length=100)


@pytest.mark.real
def test_token_chunks_decoder_tokenizers():
    from transformers import AutoTokenizer

    for name, has_bos in [("smollm2-135m", False), ("gemma3-270m", True)]:
        tokenizer = AutoTokenizer.from_pretrained(models.resolve(name), local_files_only=True)
        chunks = token_chunks(tokenizer, load_text("eval"), length=128, max_chunks=3)
        assert chunks.shape == (3, 128)
        assert ((chunks[:, 0] == tokenizer.bos_token_id).all().item()) == has_bos, name


def test_split_sentences():
    sentences = split_sentences(load_text("eval"), max_sentences=50)
    assert len(sentences) == 50 and all(len(s) >= 20 for s in sentences)
    expected = ['"Yes."', "She left.", "Then what?"]
    assert split_sentences('"Yes." She left. Then what?', min_chars=1) == expected


def test_strip_wiki_markup():
    source = (
        "{{Infobox|name={{nested}}}}\n'''Anarchism''' is a [[political philosophy]] that "
        "advocates [[self-governance|self-governed]] societies.<ref name=a>Cite</ref>\n\n"
        "[[File:A.jpg|thumb|A [[caption]]]]\n== History ==\n"
        "{| class=wikitable\n| cell\n|}\nThe term comes from Greek, see [http://x.org the site] here.\n"
        "[[Category:Anarchism]]"
    )
    text = strip_wiki_markup(source)
    assert text == (
        "Anarchism is a political philosophy that advocates self-governed societies.\n\n"
        "The term comes from Greek, see the site here."
    )


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim not installed")
def test_wikipedia_excerpt():
    text = wikipedia_excerpt(max_chars=50_000)
    assert 40_000 < len(text) <= 50_000 and text.startswith("Anarchism")
    assert "{{" not in text and "[[" not in text
