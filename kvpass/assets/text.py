"""Bundled text for evaluation and calibration, and helpers to cut it into inputs.

Two cleaned public-domain excerpts ship in ``kvpass/assets/texts/`` (rebuilt by
``bench/make_texts.py``): Jane Austen's *Emma* for evaluation and *Persuasion*
for calibration, so a pass is never judged on the text it was fitted to.

>>> from kvpass.assets.text import load_text, split_sentences
>>> load_text("eval")[:24]
'Emma Woodhouse, handsome'
>>> load_text("calibration")[:18]
'Sir Walter Elliot,'
>>> split_sentences("It rained. Nobody came! Then, at last, the sun.", min_chars=5)
['It rained.', 'Nobody came!', 'Then, at last, the sun.']
>>> from kvpass.assets.models import load  # doctest: +SKIP
>>> _, tokenizer = load("smollm2-135m")  # doctest: +SKIP
>>> token_chunks(tokenizer, load_text("eval"), length=512, max_chunks=8).shape  # doctest: +SKIP
torch.Size([8, 512])
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import InputError

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
ALIASES = {"eval": "emma", "calibration": "persuasion"}
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def bundled_texts() -> list[str]:
    """Names accepted by :func:`load_text` besides file paths.

    >>> bundled_texts()
    ['calibration', 'emma', 'eval', 'persuasion', 'wikipedia']
    """
    novels = [path.stem for path in TEXTS_DIR.glob("*.txt")]
    return sorted([*ALIASES, *novels, "wikipedia"])


def load_text(name_or_path: str | os.PathLike = "eval") -> str:
    """A bundled text (``"eval"``, ``"calibration"``, a novel name), or a UTF-8 file.

    ``"wikipedia"`` gives :func:`wikipedia_excerpt` (needs gensim installed).

    >>> len(load_text("emma")) > 150_000
    True
    """
    key = os.fspath(name_or_path)
    name = ALIASES.get(key, key)
    if name == "wikipedia":
        return wikipedia_excerpt()
    bundled = TEXTS_DIR / f"{name}.txt"
    if "/" not in name and bundled.is_file():
        return bundled.read_text(encoding="utf-8")
    path = Path(key).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__}: {e})") from e
    raise InputError(f"unknown text {key!r}; bundled: {', '.join(bundled_texts())} (or a file path)")


def token_chunks(
    tokenizer: PreTrainedTokenizerBase, text: str, length: int, max_chunks: int | None = None
) -> torch.LongTensor:
    """Consecutive, non-overlapping ``[N, length]`` token windows of ``text``.

    Each row starts with the ids the tokenizer puts before a text (e.g. Gemma's
    ``<bos>``; nothing for SmolLM2), followed by the next run of text tokens, so
    every row looks like the start of a document. A trailing partial window is
    dropped.
    """
    prefix = prefix_ids(tokenizer)
    body = length - len(prefix)
    if body < 1:
        raise ValueError(f"length {length} leaves no room after prefix {prefix}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // body if max_chunks is None else min(max_chunks, len(ids) // body)
    if n < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one chunk of {body}")
    rows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)  # [N, body]
    head = torch.tensor(prefix, dtype=torch.long).expand(n, len(prefix))  # [N, P]
    return torch.cat([head, rows], dim=1)  # [N, length]


def split_sentences(text: str, max_sentences: int | None = None, min_chars: int = 20) -> list[str]:
    """Sentences of ``text`` (split after ``.!?``), at least ``min_chars`` long."""
    pieces = re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+", text)
    sentences = [p.strip() for p in pieces if len(p.strip()) >= min_chars]
    return sentences[:max_sentences]


def prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special ids a tokenizer adds in front of a text (``[bos]``, ``[cls]`` or none)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


# ---------------------------------------------------------------- Wikipedia (optional)


def wikipedia_excerpt(max_chars: int = 200_000, source: str | os.PathLike | None = None) -> str:
    """Plain text of the English Wikipedia sample shipped in the gensim wheel.

    Text is CC BY-SA (Wikipedia contributors, https://en.wikipedia.org); say so
    wherever results on it are published. gensim is not a dependency: this reads
    ``gensim/test/test_data/...-shortened.bz2`` from an installed gensim (found
    without importing it), or ``source`` if given.
    """
    path = Path(source) if source else _gensim_wiki_file()
    root = ET.fromstring(bz2.decompress(path.read_bytes()))
    out, size = [], 0
    for article in _articles(root):
        for para in strip_wiki_markup(article).split("\n\n"):
            if size + len(para) + 2 > max_chars:
                return "\n\n".join(out) + "\n"
            out.append(para)
            size += len(para) + 2
    return "\n\n".join(out) + "\n"


def _gensim_wiki_file() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Wikipedia excerpt needs gensim: pip install --no-deps gensim==4.4.0")
    return Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE


def _articles(root: ET.Element) -> list[str]:
    """Wiki source of the main-namespace, non-redirect pages of a MediaWiki dump."""
    ns = root.tag.partition("}")[0] + "}"
    texts = []
    for page in root.iter(f"{ns}page"):
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") == "0" and page.find(f"{ns}redirect") is None and text:
            texts.append(text)
    return texts


def strip_wiki_markup(source: str) -> str:
    """Rough wiki markup to plain paragraphs: drop templates, tables, refs, files.

    >>> strip_wiki_markup("'''Albedo''' {{IPA|x}} is [[light|reflected light]].<ref>R</ref>")
    'Albedo is reflected light.'
    """
    text = re.sub(r"<!--.*?-->|<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", source, flags=re.S)
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")  # templates
    text = _remove_nested(text, r"\{\|.*?\|\}", flags=re.S)  # tables
    text = _unlink(text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'{2,}", "", html.unescape(text))
    lines = [re.sub(r"^[*#:;]+\s*", "", line).strip() for line in text.splitlines()]
    paras = "\n".join("" if line.startswith("=") else line for line in lines).split("\n\n")
    paras = [re.sub(r"\s+", " ", p).strip() for p in paras]
    return "\n\n".join(p for p in paras if len(p) >= 40 or (p and len(paras) == 1))


def _remove_nested(text: str, pattern: str, flags: int = 0) -> str:
    while True:
        text, count = re.subn(pattern, "", text, flags=flags)
        if not count:
            return text


def _unlink(text: str) -> str:
    """``[[a|b]]`` -> ``b``, ``[[a]]`` -> ``a``; files, categories, interwiki -> ``""``."""

    def replace(match: re.Match) -> str:
        target, _, label = match.group(1).partition("|")
        if re.match(r"(File|Image|Category|[a-z-]{2,12}):", target):
            return ""
        return label.rpartition("|")[2] or target

    while True:
        text, count = re.subn(r"\[\[([^\[\]]*)\]\]", replace, text)
        if not count:
            return text
