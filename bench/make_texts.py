"""Rebuild the bundled evaluation / calibration texts in ``kvpass/assets/texts/``.

Source: Jane Austen's novels (public domain) as shipped by the Debian package
``r-cran-janeaustenr`` (the R package ``janeaustenr``, MIT-licensed packaging of
Project Gutenberg texts). The novels sit in R's lazy-load database
``data/Rdata.rdb`` / ``Rdata.rdx``; this script reads that format with the
standard library only (a minimal reader for R's XDR serialization), cleans the
text and writes an excerpt of each chosen novel.

Usage (needs ``apt-get`` only if no ``.deb`` is given)::

    python bench/make_texts.py                      # apt-get download into a temp dir
    python bench/make_texts.py --deb r-cran-janeaustenr_1.0.0-1_all.deb
    python bench/make_texts.py --list               # list the novels and sizes
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent.parent / "kvpass" / "assets" / "texts"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
# file name -> (R object name, excerpt size in characters)
OUTPUTS = {
    "emma.txt": ("emma", 200_000),  # evaluation (default)
    "persuasion.txt": ("persuasion", 200_000),  # calibration
}

# ---------------------------------------------------------------- .deb (ar + tar)


def deb_members(deb: bytes, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """Files under ``DATA_DIR`` named in ``wanted`` from a .deb (ar archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a .deb (ar) archive")
    pos = 8
    while pos < len(deb):
        name = deb[pos : pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48 : pos + 58])
        body = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            return _tar_members(body, wanted)
    raise ValueError("no data.tar.* in .deb")


def _tar_members(blob: bytes, wanted: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if name.startswith(DATA_DIR) and name[len(DATA_DIR) :] in wanted:
                out[name[len(DATA_DIR) :]] = tar.extractfile(member).read()
    return out


# ---------------------------------------------------------------- R serialization

NILVALUE, REF, GLOBALENV, EMPTYENV, BASEENV = 254, 255, 253, 242, 241
PAIRLIST_TYPES = {2, 6, 17, 239, 240}  # LISTSXP, LANGSXP, DOTSXP, ATTRLIST, ATTRLANG


class RReader:
    """Minimal reader for R's XDR ("X\\n") serialization, versions 2 and 3.

    Supports what data objects use: NULL, symbols, pairlists (attributes),
    logical/integer/double/character vectors and lists. Attributes are returned
    only as ``names`` (a list with names becomes a dict).
    """

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("only XDR-format R serialization is supported")
        self.buf, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer / minimal reader R versions
        if version == 3:
            encoding_length = self.int()  # then the native encoding name
            self.pos += encoding_length

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV):
            return None
        if kind == REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            self.refs.append(self.item())
            return self.refs[-1]
        if kind in PAIRLIST_TYPES:
            return self.pairlist(has_attr, has_tag)
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.pos += n
            return self.buf[self.pos - n : self.pos].decode("utf-8", "replace")
        value = self.vector(kind)
        attrs = self.item() if has_attr else {}
        names = attrs.get("names") if isinstance(attrs, dict) else None
        return dict(zip(names, value)) if names else value

    def pairlist(self, has_attr: int, has_tag: int) -> dict:
        if has_attr:
            self.item()
        tag = self.item() if has_tag else None
        head = {tag: self.item()}
        rest = self.item()
        return head | (rest if isinstance(rest, dict) else {})

    def vector(self, kind: int) -> list:
        n = self.length()
        if kind in (10, 13):  # LGLSXP, INTSXP
            self.pos += 4 * n
            return list(struct.unpack_from(f">{n}i", self.buf, self.pos - 4 * n))
        if kind == 14:  # REALSXP
            self.pos += 8 * n
            return list(struct.unpack_from(f">{n}d", self.buf, self.pos - 8 * n))
        if kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            return [self.item() for _ in range(n)]
        raise ValueError(f"unsupported R SEXP type {kind}")


def decompress_rdb_entry(blob: bytes) -> bytes:
    """One rdb record: 4-byte length, then zlib (or a type byte + bzip2/xz/raw)."""
    body = blob[4:]
    if body[:1] in (b"Z", b"2", b"X", b"0") and not body.startswith(b"x"):
        kind, body = body[:1], body[1:]
        return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}.get(kind, bytes)(body)
    return zlib.decompress(body)


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All objects of an R lazy-load database (``.rdx`` index + ``.rdb`` data)."""
    index = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    variables = RReader(index).item()["variables"]
    return {
        name: RReader(decompress_rdb_entry(rdb[start : start + size])).item()
        for name, (start, size) in variables.items()
    }


# ---------------------------------------------------------------- cleaning

HEADER = re.compile(r"^(CHAPTER|VOLUME|Chapter)\s+[\dIVXLC]+\.?$|^(THE )?END\.?$|^FINIS\.?$")


def paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into paragraphs; drop the title page, chapter headers, ``* * *``."""
    lines = [(line or "").strip() for line in lines]
    first_header = next(i for i, line in enumerate(lines) if HEADER.match(line))
    paras, current = [], []
    for line in [*lines[first_header:], ""]:
        if line and not HEADER.match(line):
            current.append(line)
        elif current:
            paras.append(clean(" ".join(current)))
            current = []
    return [p for p in paras if p.strip("* ")]


def clean(paragraph: str) -> str:
    paragraph = paragraph.replace("_", "")  # Gutenberg italics markers
    return re.sub(r"\s+", " ", paragraph).strip()


def excerpt(paras: list[str], max_chars: int) -> str:
    """Whole paragraphs from the start, at most ``max_chars`` characters."""
    out, size = [], 0
    for para in paras:
        if size + len(para) + 2 > max_chars:
            break
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def fetch_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
    return next(workdir.glob("r-cran-janeaustenr_*.deb"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", type=Path, help="r-cran-janeaustenr .deb (default: apt-get download)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--list", action="store_true", help="list the novels and exit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or fetch_deb(Path(tmp))
        files = deb_members(deb.read_bytes(), ("Rdata.rdx", "Rdata.rdb"))
    novels = read_lazyload(files["Rdata.rdx"], files["Rdata.rdb"])
    if args.list:
        for name, lines in novels.items():
            print(f"{name:20s} {len(lines):6d} lines {sum(len(x or '') for x in lines):8d} chars")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, (novel, size) in OUTPUTS.items():
        text = excerpt(paragraphs(novels[novel]), size)
        (args.out / filename).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / filename}: {len(text)} chars", file=sys.stderr)


if __name__ == "__main__":
    main()
