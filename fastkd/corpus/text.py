"""Corpus text: where it comes from and what is kept of it.

Text sources: a file, a directory of *.txt files (one paragraph per line), or a `datasets` hub
name `NAME[:CONFIG]` with a `text` column. Blank lines and WikiText ` = Title = ` headings are
dropped and WikiText's ` @-@ ` style escapes undone. The `sentences` mode splits paragraphs into
sentences, the `lines` mode keeps each line; a paragraph longer than PIECE_CHARS characters is cut
into pieces before a space for the tokenizer (fastkd.corpus.build).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator


from ..errors import UserError

PIECE_CHARS = 8192  # longer paragraphs are tokenized in pieces of at most this many characters
MIN_SENTENCE_WORDS = 3  # shorter "sentences" are list items, captions, a split's debris: not what STS inputs look like
_HEADING = re.compile(r"^\s*=(\s*=)*\s.*\s=(\s*=)*\s*$")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def clean_paragraph(line: str) -> str | None:
    """A paragraph ready for the tokenizer, or None for blank lines and headings."""
    text = line.strip()
    if not text or _HEADING.match(text):
        return None
    for escaped, plain in _WIKITEXT_ESCAPES:
        text = text.replace(escaped, plain)
    return text


# A sentence ends at . ! or ? (WikiText writes them apart: "the series . Next"), before a capital, a digit
# or an opening quote or bracket, after any closing brackets ("2003 . )"); not after an initial ("J. K.") or a
# common abbreviation the period is attached to (a period written apart always ends one: "World War I .").
_SENTENCE_END = re.compile(r"""[.!?](?:\s?[)\]]|["'])*\s+(?=["'(\[]?\s?[A-Z0-9])""")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr vs etc no nos vol fig gen col lt sgt capt rev hon inc ltd co "
                           "corp jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e u.s u.k a.m p.m c ca".split())


def split_sentences(paragraph: str) -> list[str]:
    """A cleaned paragraph's sentences, in order (rule-based: fast, deterministic, good on encyclopedic text)."""
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        before = paragraph[start:m.start()]
        word = before.rsplit(None, 1)[-1] if before.strip() else ""
        attached = bool(before) and not before[-1].isspace()  # "Mr." vs WikiText's "World War I ."
        if attached and ((len(word) == 1 and word.isupper()) or word.lower() in _ABBREVIATIONS):
            continue  # "J. K. Rowling", "Mr. Smith": the period ends a word, not the sentence
        sentences.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def text_units(paragraph: str, mode: str) -> list[str]:
    """What one sequence holds in a unit mode: the paragraph's sentences of MIN_SENTENCE_WORDS words or more,
    or the whole line."""
    if mode == "lines":
        return [paragraph]
    return [t for t in split_sentences(paragraph) if len(t.split()) >= MIN_SENTENCE_WORDS]


def corpus_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file() or path.is_symlink() and not path.exists():
        _check_readable(path)
        return [path]
    if path.is_dir():
        # rglob lists dangling symlinks too (exists() False), which is_file() alone would skip silently.
        files = sorted(p for p in path.rglob("*.txt") if p.is_file() or not p.exists())
        for p in files:
            _check_readable(p)
        if not files:
            raise UserError(f"corpus directory {path} holds no .txt files: give a text file or a directory of them")
        return files
    if path.exists():  # /dev/null, a FIFO, a socket: there, but not a file to read paragraphs from
        raise UserError(f"corpus {source} is not a regular file or directory: give a text file or a directory "
                        "of .txt files")
    raise UserError(f"corpus {source} not found: give a text file, a directory of .txt files, or a hub dataset NAME[:CONFIG]")


def _check_readable(path: Path) -> None:
    """A corpus file (a .txt of a corpus directory) that cannot be read is one line, never skipped: a dangling
    symlink (a moved or unmounted target, a loop) or a file without read permission is almost surely
    a mistake, and training on part of a corpus without a word would be a silently different run."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"corpus file {path} is a broken symlink (to {os.readlink(path)}): point the link at "
                        "an existing file, or remove it")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"corpus file {path} cannot be read ({exc.strerror or exc}): make it readable "
                        "(chmod a+r), or leave it out of the corpus") from None


def _iconv_advice(path: Path) -> str:
    """The iconv line that converts `path`, guessed from its first bytes: a UTF-16/32 byte-order mark,
    or NULs between letters (UTF-16 without one); else the legacy single-byte encodings."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        source = "utf-32"
    elif head.startswith((b"\xff\xfe", b"\xfe\xff")):
        source = "utf-16"
    elif head[1::2].count(0) > len(head) // 4:
        source = "utf-16le"
    elif head[0::2].count(0) > len(head) // 4:
        source = "utf-16be"
    else:
        source = "cp1252"  # (latin1's superset, what most non-UTF-8 text on disk is)
    return f"iconv -f {source} -t utf-8 {path.name} > {path.stem}.utf8 && mv {path.stem}.utf8 {path.name}"


def read_paragraphs(files: list[Path]) -> Iterator[str]:
    """Paragraphs of UTF-8 files (a leading BOM is dropped); non-UTF-8 input is a user error."""
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}): "
                        f"convert the corpus to UTF-8, e.g. {_iconv_advice(path)}"
                    ) from None
                if "\x00" in line:  # UTF-16 without a byte-order mark decodes as UTF-8 with NULs between letters
                    raise UserError(f"{path}:{lineno}: holds NUL bytes, which text does not: convert the corpus to "
                                    f"UTF-8, e.g. {_iconv_advice(path)}")
                text = clean_paragraph(line)
                if text is not None:
                    yield text


def split_long(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of at most `limit` characters, each cut just before a space (which starts the
    next piece, where byte-level BPE tokenizers want it; other whitespace and control characters are
    not cut at: some tokenizers drop them or add a prefix space after them); a run of `limit`
    characters without a space is cut hard."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit)  # a space: what every tokenizer splits on
        cut = cut if cut > start else start
        if cut == start:
            cut = start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
