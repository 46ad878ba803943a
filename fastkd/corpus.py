"""Corpus text -> fixed-length token sequences (Arrow, cached) -> a deterministic batch stream.

Text sources: a file, a directory of *.txt files (one paragraph per line), or a `datasets` hub
name `NAME[:CONFIG]` with a `text` column. Blank lines and WikiText ` = Title = ` headings are
dropped and WikiText's ` @-@ ` style escapes undone. Paragraphs are tokenized with the teacher's
tokenizer and packed back to back into [CLS] ... [SEP] sequences of exactly max_seq_len tokens
(the tail of each packing block of PACK_BATCH paragraphs becomes one padded sequence rather than
being thrown away). The packed corpus is saved as Arrow under the cache directory, keyed by the
files' identity, the tokenizer and the length, so a second run does not re-tokenize.

Tokenization, the expensive part, runs in `num_proc` processes (datasets.map), one row per
paragraph, so the shards' boundaries change nothing; packing then runs in one process over fixed
blocks of paragraphs: the cache is the same whatever `num_proc`. A paragraph longer than
PIECE_CHARS characters is tokenized in pieces cut before a space, so one 50 MB line does not hold
gigabytes of tokenizer state (for WordPiece and byte-level BPE the tokens are those of one call;
a SentencePiece tokenizer may differ at a cut, and so may any tokenizer where PIECE_CHARS
characters hold no space at all: there the cut is hard).

Two more corpus modes keep one unit of text per sequence instead of packing, the shape sentence
embeddings are used on (STS, retrieval): `sentences` (paragraphs split into sentences) and `lines`
(one line each). A unit is stored unpadded with its length; one that does not fit max_seq_len is
dropped, not cut. BatchStream then draws length-bucketed batches (padded to their own longest), still
one integer of state, so a resume continues at the exact sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import CORPUS_MODES
from .errors import UserError
from .tokenizer_identity import tokenizer_fingerprint
from .io import check_writable_dir, no_space_is_one_line, verify_checksums, write_checksums
from .padding import pad_batch

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when the packing changes (3: long paragraphs tokenized in pieces; 4: checksums)
UNITS_FORMAT = 2  # bump when the sentence split or the unit rows change (their cache entries are then rebuilt)
PACK_BATCH = 1000  # paragraphs per packing block (the tail of each block is one padded sequence)
PIECE_CHARS = 8192  # longer paragraphs are tokenized in pieces of at most this many characters
PIECES_PER_CALL = 256  # pieces per tokenizer call: bounds the tokenizer's working memory
MAX_NUM_PROC = 8
SMALL_CORPUS_BYTES = 16 * 2 ** 20  # below this, starting worker processes costs more than it saves
MIN_SENTENCE_WORDS = 3  # shorter "sentences" are list items, captions, a split's debris: not what STS inputs look like
UNIT_CHARS_PER_TOKEN = 64  # a unit longer than this many characters per allowed token cannot fit: skip tokenizing it
BUCKET_BATCHES = 64  # global batches whose sequences are length-sorted together (then the batches are shuffled)
_HEADING = re.compile(r"^\s*=(\s*=)*\s.*\s=(\s*=)*\s*$")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTKD_CACHE", Path.home() / ".cache" / "fastkd"))


def _cache_flag(cache_dir) -> str:
    if cache_dir:
        return "--cache-dir"
    return "$FASTKD_CACHE" if os.environ.get("FASTKD_CACHE") else "the default cache (set FASTKD_CACHE or --cache-dir)"


def check_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The corpus cache's folder, usable before any work: a file in its place, or a folder that cannot
    be made (under /proc, under a file), is one line naming where the setting came from. An existing
    read-only cache is fine: its entries are read; building a missing one is checked when it happens."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if root.is_dir():
        return root
    return check_writable_dir(root, _cache_flag(cache_dir))


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


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.endswith(".txt")


def _source_fingerprint(source: str, hub_dataset=None) -> dict:
    if hub_dataset is not None:  # the dataset's own fingerprint changes with its revision
        return {"hub": source, "fingerprint": hub_dataset._fingerprint}
    return {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in corpus_files(source)]}


def corpus_identity(source: str) -> dict:
    """The corpus files' identity (resolved path, size, mtime), or the hub name."""
    return _source_fingerprint(source) if _is_local(source) else {"hub": source}


def cache_key(source: str, tokenizer, max_seq_len: int, hub_dataset=None, mode: str = "packed") -> str:
    ident = {"source": _source_fingerprint(source, hub_dataset), "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_seq_len": max_seq_len, "format": CACHE_FORMAT}
    if mode != "packed":  # (packed keeps the key it always had: existing caches stay valid)
        ident.update(mode=mode, units_format=UNITS_FORMAT)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def default_num_proc() -> int:
    """The machine's cores available to this process, at most MAX_NUM_PROC."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_NUM_PROC, cores))


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


def _tokenize_batch(batch, tokenizer):
    """datasets.map function, one row per paragraph (so any sharding gives the same rows): a batch of
    paragraphs -> their token ids (empty for a blank line or a heading)."""
    owners, pieces = [], []
    # Cleaning here covers hub corpora too (local files arrive clean; cleaning is idempotent).
    for row, raw in enumerate(batch["text"]):
        text = clean_paragraph(raw) if raw else None
        for piece in split_long(text) if text else ():
            owners.append(row)
            pieces.append(piece)
    parts: list[list[np.ndarray]] = [[] for _ in batch["text"]]
    for start in range(0, len(pieces), PIECES_PER_CALL):
        ids = tokenizer(pieces[start:start + PIECES_PER_CALL], add_special_tokens=False, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for row, piece_ids in zip(owners[start:start + PIECES_PER_CALL], ids):
            parts[row].append(np.asarray(piece_ids, dtype=np.int32))
    empty = np.zeros(0, dtype=np.int32)
    return {"ids": [np.concatenate(p) if len(p) > 1 else (p[0] if p else empty) for p in parts]}


def _pack_batch(batch, cls: int, sep: int, pad: int, max_seq_len: int):
    """datasets.map function over blocks of PACK_BATCH tokenized paragraphs: their tokens back to back
    in [CLS] ... [SEP] sequences of max_seq_len, the block's tail one padded sequence."""
    body = max_seq_len - 2
    arrays = [np.asarray(x, dtype=np.int32) for x in batch["ids"] if len(x)]
    stream = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    full, tail = divmod(len(stream), body)
    rows = full + (tail > 0)
    input_ids = np.full((rows, max_seq_len), pad, dtype=np.int32)
    attention_mask = np.zeros((rows, max_seq_len), dtype=np.int8)
    input_ids[:, 0] = cls
    input_ids[:full, 1:body + 1] = stream[:full * body].reshape(full, body)
    input_ids[:full, body + 1] = sep
    attention_mask[:full] = 1
    if tail:
        input_ids[full, 1:tail + 1] = stream[full * body:]
        input_ids[full, tail + 1] = sep
        attention_mask[full, :tail + 2] = 1
    return {"input_ids": list(input_ids), "attention_mask": list(attention_mask)}


def _unit_batch(batch, tokenizer, mode: str, max_seq_len: int):
    """datasets.map function for the unit modes: paragraphs -> one row per sentence (or line) that fits,
    [CLS] ids [SEP] unpadded with its length; a unit that does not fit is a row of length -1 (counted, then
    filtered out), so the cache can say how much of the corpus was left out."""
    units = []
    for raw in batch["text"]:
        text = clean_paragraph(raw) if raw else None
        units += text_units(text, mode) if text else []
    body = max_seq_len - 2
    input_ids, lengths = [], []
    for start in range(0, len(units), PIECES_PER_CALL):
        chunk = units[start:start + PIECES_PER_CALL]
        fits = [len(u) <= body * UNIT_CHARS_PER_TOKEN for u in chunk]
        ids = iter(tokenizer([u for u, f in zip(chunk, fits) if f], add_special_tokens=False, verbose=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"] if any(fits) else [])
        for fit in fits:
            unit_ids = next(ids) if fit else None
            if unit_ids is not None and not unit_ids:
                continue  # nothing the tokenizer keeps (control characters): not a unit at all
            if unit_ids is None or len(unit_ids) > body:
                input_ids.append(np.zeros(0, dtype=np.int32))
                lengths.append(-1)
            else:
                input_ids.append(np.asarray([tokenizer.cls_token_id, *unit_ids, tokenizer.sep_token_id], dtype=np.int32))
                lengths.append(len(unit_ids) + 2)
    return {"input_ids": input_ids, "length": lengths}


def unit_features():
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")), "length": datasets.Value("int32")})


def unit_lengths(dataset) -> np.ndarray:
    """A unit corpus's `length` column as numpy, read through Arrow (a Python list of millions of rows would
    take seconds, on every rank and every resume)."""
    return dataset.with_format("arrow")["length"].to_numpy().astype(np.int64)


def corpus_layout(dataset) -> dict:
    """How a loaded corpus is laid out: {"mode": "packed"}, or a unit mode's {"mode", "pad_id", "units",
    "too_long", "max_seq_len"} (kept in the dataset's description, so it travels with the cache entry)."""
    try:
        layout = json.loads(dataset.info.description or "{}")
    except (TypeError, ValueError):
        layout = {}
    return layout if isinstance(layout, dict) and layout.get("mode") in CORPUS_MODES else {"mode": "packed"}


def describe_corpus(dataset, max_seq_len: int) -> str:
    """"1,234 sequences of 128 tokens" or "9,263 sentences of at most 128 tokens (mean 31)", for summaries."""
    layout = corpus_layout(dataset)
    if layout["mode"] == "packed":
        return f"{len(dataset):,} sequences of {max_seq_len} tokens"
    unit = "sentences" if layout["mode"] == "sentences" else "lines"
    mean = float(unit_lengths(dataset).mean()) if len(dataset) else 0.0
    return f"{len(dataset):,} {unit} of at most {max_seq_len} tokens (mean {mean:.0f})"


def _corpus_bytes(source: str, text_ds) -> int:
    if text_ds is not None:
        return int(text_ds.data.nbytes)
    return sum(p.stat().st_size for p in corpus_files(source))


def _hub_texts(source: str):
    import datasets

    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # datasets raises many types for "not there / offline"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"corpus {source!r} is not a local path and the hub dataset could not be loaded ({first})") from None
    if "text" not in ds.column_names:
        raise UserError(f"hub dataset {source!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return ds


def load_corpus(source: str, tokenizer, max_seq_len: int, cache_dir: str | os.PathLike | None = None,
                num_proc: int | None = None, progress: bool = True, mode: str = "packed",
                length_flag: str = "--max-seq-len"):
    """The corpus as a datasets.Dataset: packed, input_ids and attention_mask (int32 lists of max_seq_len);
    in a unit mode ("sentences", "lines"), unpadded input_ids and their length (see corpus_layout).
    `num_proc`: tokenizing processes (None: the machine's cores, at most MAX_NUM_PROC, and one for a
    small corpus); the result is the same whatever it is. `progress`: the tokenize and pack bars.
    `length_flag`: the flag that set max_seq_len, for messages (the search's is --proxy-seq-len)."""
    import datasets

    if num_proc is not None and num_proc < 1:
        raise UserError(f"--num-proc must be at least 1 (got {num_proc})")
    if mode not in CORPUS_MODES:
        raise UserError(f"--corpus-mode {mode!r} is not one of {', '.join(CORPUS_MODES)}")

    if max_seq_len < 8:
        raise UserError(f"{length_flag} {max_seq_len} is too short: use at least 8 tokens")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    text_ds = None if _is_local(source) else _hub_texts(source)
    target = cache_root / "corpus" / cache_key(source, tokenizer, max_seq_len, text_ds, mode)
    _remove_dead_builds(target.parent)
    if (target / "dataset_info.json").exists():
        cached = _load_cached(target)
        if cached is not None:
            log.info("corpus: cached %s at %s", "packed sequences" if mode == "packed" else mode, target)
            return cached

    if text_ds is None:
        files = corpus_files(source)
        if next(read_paragraphs(files), None) is None:
            raise UserError(f"corpus {source} holds no text (only blank lines or headings): give a non-empty corpus")

    check_writable_dir(target.parent, _cache_flag(cache_dir))  # a read-only cache without this entry
    with no_space_is_one_line(target, "free some space, or give --cache-dir (or $FASTKD_CACHE) on a larger disk"), \
            (contextlib.nullcontext() if progress else _quiet_datasets()):
        _build(source, text_ds, files if text_ds is None else None, tokenizer, max_seq_len, num_proc, target, mode,
               length_flag)
    log.info("corpus: %s cached at %s", "packed sequences" if mode == "packed" else mode, target)
    return datasets.load_from_disk(str(target))


def _build(source: str, text_ds, files, tokenizer, max_seq_len: int, num_proc: int | None, target: Path,
           mode: str = "packed", length_flag: str = "--max-seq-len") -> None:
    """Tokenize and pack into a build folder beside `target`, then rename it into place with its
    checksums (a cache entry is whole or absent)."""
    import datasets

    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".build-{_host()}-{os.getpid()}-", dir=target.parent))
    try:
        if text_ds is None:
            with _quiet_datasets():
                try:
                    text_ds = datasets.Dataset.from_generator(
                        _paragraph_rows, gen_kwargs={"files": [str(f) for f in files]}, cache_dir=str(build_dir / "raw"))
                except datasets.exceptions.DatasetGenerationError as exc:
                    # datasets wraps errors raised by the generator; a bad corpus stays a user error.
                    if isinstance(exc.__cause__, UserError):
                        raise exc.__cause__ from None
                    raise
        procs = num_proc or (default_num_proc() if _corpus_bytes(source, text_ds) >= SMALL_CORPUS_BYTES else 1)
        procs = min(procs, max(1, len(text_ds)))
        if mode != "packed":
            packed = _build_units(source, text_ds, tokenizer, max_seq_len, procs, target, build_dir, mode, length_flag)
        else:
            packed = _build_packed(text_ds, tokenizer, max_seq_len, procs, target, build_dir)
        if len(packed) == 0:
            raise UserError(f"corpus {source} produced no sequences: give a non-empty corpus")
        staged = build_dir / "dataset"
        with _quiet_datasets():
            packed.save_to_disk(str(staged))
        del packed
        write_checksums(staged)
        try:
            os.replace(staged, target)  # atomic: a cache entry is whole or absent
        except OSError:
            if not (target / "dataset_info.json").exists():  # another process won the race otherwise
                raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _build_packed(text_ds, tokenizer, max_seq_len: int, procs: int, target: Path, build_dir: Path):
    import datasets

    with _tokenizer_threads(procs == 1):
        tokenized = text_ds.map(
            _tokenize_batch, batched=True, batch_size=PACK_BATCH, remove_columns=text_ds.column_names,
            fn_kwargs={"tokenizer": tokenizer}, num_proc=procs if procs > 1 else None,
            features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
            desc=f"tokenize ({procs} process{'es' if procs > 1 else ''})", new_fingerprint=target.name + "-ids",
            cache_file_name=str(build_dir / "ids.arrow"))
    packed = tokenized.map(
        _pack_batch, batched=True, batch_size=PACK_BATCH, remove_columns=tokenized.column_names,
        fn_kwargs={"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id,
                   "max_seq_len": max_seq_len},
        features=packed_features(), desc="pack", new_fingerprint=target.name,
        cache_file_name=str(build_dir / "packed.arrow"))
    return packed


def _build_units(source: str, text_ds, tokenizer, max_seq_len: int, procs: int, target: Path, build_dir: Path,
                 mode: str, length_flag: str):
    """One row per sentence (or line) that fits max_seq_len, in corpus order whatever `procs`; the count left
    out as too long goes into the layout. None fitting is a user error naming both numbers."""
    with _tokenizer_threads(procs == 1):
        units = text_ds.map(
            _unit_batch, batched=True, batch_size=PACK_BATCH, remove_columns=text_ds.column_names,
            fn_kwargs={"tokenizer": tokenizer, "mode": mode, "max_seq_len": max_seq_len},
            num_proc=procs if procs > 1 else None, features=unit_features(),
            desc=f"tokenize {mode} ({procs} process{'es' if procs > 1 else ''})", new_fingerprint=target.name + "-units",
            cache_file_name=str(build_dir / "units.arrow"))
    lengths = unit_lengths(units)
    too_long = int((lengths < 0).sum())
    kind = "sentence" if mode == "sentences" else "line"
    if too_long == len(lengths):
        found = (f"all {len(lengths):,} of its {kind}s are longer than {max_seq_len - 2} tokens" if len(lengths)
                 else f"it holds no sentence of {MIN_SENTENCE_WORDS} words or more" if mode == "sentences"
                 else "it holds no line with a token the tokenizer keeps")
        raise UserError(f"corpus {source} has no {kind} that fits {length_flag} {max_seq_len}: {found}; raise "
                        f"{length_flag}, or use --corpus-mode packed")
    with _quiet_datasets():
        kept = units.select(np.flatnonzero(lengths > 0)).flatten_indices(
            cache_file_name=str(build_dir / "kept.arrow"), new_fingerprint=target.name)
    if too_long:
        log.info("corpus: %d of %d %ss are longer than %s %d and are left out", too_long, len(lengths),
                 kind, length_flag, max_seq_len)
    kept.info.description = json.dumps({"mode": mode, "pad_id": tokenizer.pad_token_id, "units": len(kept),
                                         "too_long": too_long, "max_seq_len": max_seq_len})
    return kept


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _remove_dead_builds(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Build folders left by a tokenization killed half-way (kill -9, a preempted job): those of a
    process of this host that no longer exists, and any older than a day (a shared cache on a
    cluster: the other hosts' processes cannot be asked)."""
    if not folder.is_dir():
        return
    for p in folder.glob(".build-*"):
        parts = p.name.split("-")
        dead = False
        if len(parts) >= 4 and parts[1] == _host() and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass  # alive, another user's
        try:
            old = time.time() - p.stat().st_mtime > max_age_s
        except OSError:
            continue
        if dead or old:
            log.info("corpus: removing %s, left by an interrupted tokenization", p)
            shutil.rmtree(p, ignore_errors=True)


def _load_cached(target: Path):
    """The cached packed corpus, or None (after one warning, the entry set aside) when its files are
    damaged: it is then rebuilt like a missing one."""
    import datasets

    try:
        verify_checksums(target)
        ds = datasets.load_from_disk(str(target))
        if len(ds):  # arrow files are memory-mapped: touch the first and last records too
            ds[0], ds[len(ds) - 1]
        return ds
    except Exception as exc:  # ArrowInvalid, OSError, a JSON error in the metadata, ...
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        log.warning("corpus: the cache %s is damaged (%s: %s); rebuilding it", target, type(exc).__name__, first)
        aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
        try:
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
        return None


def packed_features():
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "attention_mask": datasets.Sequence(datasets.Value("int8"))})


@contextlib.contextmanager
def _tokenizer_threads(enabled: bool):
    """The fast tokenizer's own thread pool for batches where there is one tokenizing process (the CLI
    turns it off by default: forked datasets workers must not inherit a used pool)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@contextlib.contextmanager
def _quiet_datasets():
    """Hide datasets' bookkeeping bars (generate, save); the tokenize+pack bar stays."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _paragraph_rows(files: list[str]):
    for text in read_paragraphs([Path(f) for f in files]):
        yield {"text": text}


def parse_sample(spec: str | float | int | None) -> float | int | None:
    """'5000' -> 5000 sequences (an integer is a count); '0.1', '1e-1', '1.0' -> a fraction in (0, 1]."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        count = int(spec)
        if count < 1:
            raise UserError(f"corpus sample {spec!r} must be at least 1 sequence")
        return count
    try:
        value = float(spec)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UserError(f"corpus sample {spec!r}: give a fraction in (0, 1] like 0.1, or a whole number of sequences like 5000")
    return value


def sample_indices(total: int, spec: float | int | None, seed: int) -> np.ndarray:
    """Deterministic sorted subset of range(total): a fraction or a count, chosen by seed."""
    if spec is None:
        return np.arange(total)
    k = max(1, round(total * spec)) if isinstance(spec, float) else spec
    if k > total:
        log.warning("corpus sample: asked for %d sequences, the corpus has %d; using all", k, total)
        k = total
    return np.sort(np.random.default_rng(seed).permutation(total)[:k])


def sample_corpus(dataset, spec, seed: int):
    spec = parse_sample(spec) if isinstance(spec, str) else spec
    if spec is None:
        return dataset
    return dataset.select(sample_indices(len(dataset), spec, seed))


@dataclass
class StreamState:
    batches_done: int = 0
    tokens_served: int = 0  # this rank's real (unpadded) tokens since the process started: a rate, not state


class BatchStream:
    """Endless deterministic batches: epoch e visits the sequences in order_e, a permutation of them.

    Position p of the global stream is sequence order_{p // n}[p % n]; global batch k covers
    positions [k*G, (k+1)*G) with G = batch_size * world_size, and rank r takes its own
    batch_size slice. So the state is one integer, and a resume continues at the exact sequence.

    Packed corpora: order_e = permutation(seed, e). Unit corpora (sentences, lines): that permutation
    cut into chunks of BUCKET_BATCHES global batches, each chunk sorted by length and its batches
    shuffled (the chunks aligned to the global batch boundaries), so a batch holds sentences of
    similar length, padded to its own longest.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        layout = corpus_layout(dataset)
        self.mode = layout["mode"]
        self.bucketed = self.mode != "packed"
        self.pad_id = layout.get("pad_id") or 0
        self.lengths = unit_lengths(dataset) if self.bucketed else None
        self.dataset = dataset if self.bucketed else dataset.with_format("torch")
        self.n = len(dataset)
        if self.n < batch_size * world_size:
            log.warning("the corpus holds %d sequence(s), fewer than one global batch (%d): every batch repeats "
                        "them; --corpus-sample N is a count of sequences (1.0 is the whole corpus)",
                        self.n, batch_size * world_size)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.state = StreamState()
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm = self._bucket(perm, epoch) if self.bucketed else perm
            self._perm_epoch = epoch
        return self._perm

    def _bucket(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        """`perm` with each chunk of BUCKET_BATCHES global batches sorted by length, its whole batches shuffled."""
        size = self.batch_size * self.world_size
        first = (-epoch * self.n) % size  # this epoch's positions before the first global batch boundary
        bounds = sorted({0, self.n, *range(first, self.n, size)})
        blocks = list(zip(bounds[:-1], bounds[1:]))
        rng = np.random.default_rng([self.seed, epoch, 1])
        out = perm.copy()
        for c in range(0, len(blocks), BUCKET_BATCHES):
            chunk = blocks[c:c + BUCKET_BATCHES]
            lo, hi = chunk[0][0], chunk[-1][1]
            rows = perm[lo:hi]
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            pieces = np.split(rows, np.cumsum([b - a for a, b in chunk])[:-1])
            whole = [i for i, (a, b) in enumerate(chunk) if b - a == size]  # a part batch keeps its place
            for slot, src in zip(whole, rng.permutation(whole)):
                out[chunk[slot][0]:chunk[slot][1]] = pieces[src]
            for i, (a, b) in enumerate(chunk):
                if b - a != size:
                    out[a:b] = pieces[i]
        return out

    def indices(self, batch: int) -> list[int]:
        global_size = self.batch_size * self.world_size
        start = batch * global_size + self.rank * self.batch_size
        out = []
        for p in range(start, start + self.batch_size):
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The sequences at `indices` as one batch (unit corpora padded to their longest)."""
        if not self.bucketed:
            rows = self.dataset[indices]
            return {"input_ids": rows["input_ids"].long(), "attention_mask": rows["attention_mask"].long()}
        return pad_batch(self.dataset[indices]["input_ids"], self.pad_id)

    def take(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """The next batch and the corpus rows it holds (for a run that reads the teacher's labels of them)."""
        rows = self.indices(self.state.batches_done)
        batch = self.rows(rows)
        self.state.batches_done += 1
        # (host memory, before the engine moves it: counting its tokens never waits for a device)
        self.state.tokens_served += int(batch["attention_mask"].numpy().sum())
        return rows, batch

    def next(self) -> dict[str, torch.Tensor]:
        return self.take()[1]

    def real_tokens(self) -> int:
        """Real (unpadded) tokens this rank has served since the process started."""
        return self.state.tokens_served

    def sample(self, count: int = 8) -> dict[str, torch.Tensor]:
        """The corpus's first `count` sequences, as a batch; the stream's position is left alone."""
        return self.rows(list(range(min(count, self.n))))

    def state_dict(self) -> dict:
        return {"batches_done": self.state.batches_done, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size, "corpus_mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        state = {"corpus_mode": "packed", **state}  # (checkpoints from before the unit modes)
        if state["corpus_mode"] != self.mode:
            raise UserError(f"cannot resume: the checkpoint's run read its corpus as {state['corpus_mode']}, this run as "
                            f"{self.mode}: give --corpus-mode {state['corpus_mode']}")
        for key in ("seed", "n", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise UserError(f"cannot resume: the checkpoint's data stream had {key}={state[key]}, this run has {getattr(self, key)}")
        self.state.batches_done = state["batches_done"]
