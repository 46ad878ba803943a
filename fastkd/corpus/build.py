"""Corpus text -> token sequences (Arrow, cached under the cache directory).

Paragraphs are tokenized with the teacher's tokenizer and packed back to back into [CLS] ... [SEP]
sequences of exactly max_seq_len tokens (the tail of each packing block of PACK_BATCH paragraphs
becomes one padded sequence rather than being thrown away). The packed corpus is saved as Arrow
under the cache directory, keyed by the files' identity, the tokenizer and the length, so a second
run does not re-tokenize.

Tokenization, the expensive part, runs in `num_proc` processes (datasets.map), one row per
paragraph, so the shards' boundaries change nothing; packing then runs in one process over fixed
blocks of paragraphs: the cache is the same whatever `num_proc`. A paragraph longer than
PIECE_CHARS characters is tokenized in pieces cut before a space, so one 50 MB line does not hold
gigabytes of tokenizer state (for WordPiece and byte-level BPE the tokens are those of one call;
a SentencePiece tokenizer may differ at a cut, and so may any tokenizer where PIECE_CHARS
characters hold no space at all: there the cut is hard).

The `sentences` and `lines` modes keep one unit of text per sequence instead of packing, the shape
sentence embeddings are used on (STS, retrieval): a unit is stored unpadded with its length; one
that does not fit max_seq_len is dropped, not cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..options import CORPUS_MODES
from ..errors import UserError
from ..io import no_space_is_one_line, write_checksums
from ..rundir import check_writable_dir
from .cache import cache_flag, cache_key, default_cache_dir, host_name, is_local, load_cached, remove_dead_builds
from .text import MIN_SENTENCE_WORDS, clean_paragraph, corpus_files, read_paragraphs, split_long, text_units

log = logging.getLogger(__name__)

PACK_BATCH = 1000  # paragraphs per packing block (the tail of each block is one padded sequence)
PIECES_PER_CALL = 256  # pieces per tokenizer call: bounds the tokenizer's working memory
MAX_NUM_PROC = 8
SMALL_CORPUS_BYTES = 16 * 2 ** 20  # below this, starting worker processes costs more than it saves
UNIT_CHARS_PER_TOKEN = 64  # a unit longer than this many characters per allowed token cannot fit: skip tokenizing it


def default_num_proc() -> int:
    """The machine's cores available to this process, at most MAX_NUM_PROC."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_NUM_PROC, cores))


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
    text_ds = None if is_local(source) else _hub_texts(source)
    target = cache_root / "corpus" / cache_key(source, tokenizer, max_seq_len, text_ds, mode)
    remove_dead_builds(target.parent)
    if (target / "dataset_info.json").exists():
        cached = load_cached(target)
        if cached is not None:
            log.info("corpus: cached %s at %s", "packed sequences" if mode == "packed" else mode, target)
            return cached

    if text_ds is None:
        files = corpus_files(source)
        if next(read_paragraphs(files), None) is None:
            raise UserError(f"corpus {source} holds no text (only blank lines or headings): give a non-empty corpus")

    check_writable_dir(target.parent, cache_flag(cache_dir))  # a read-only cache without this entry
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
    build_dir = Path(tempfile.mkdtemp(prefix=f".build-{host_name()}-{os.getpid()}-", dir=target.parent))
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
