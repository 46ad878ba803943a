"""Corpus text -> fixed-length token sequences (Arrow, cached) -> a deterministic batch stream.

Text sources: a file, a directory of *.txt files (one paragraph per line), or a `datasets` hub
name `NAME[:CONFIG]` with a `text` column. Blank lines and WikiText ` = Title = ` headings are
dropped and WikiText's ` @-@ ` style escapes undone. Paragraphs are tokenized with the teacher's
tokenizer and packed back to back into [CLS] ... [SEP] sequences of exactly max_seq_len tokens
(the tail of each packing batch becomes one padded sequence rather than being thrown away).
The packed corpus is saved as Arrow under the cache directory, keyed by the files' identity,
the tokenizer and the length, so a second run does not re-tokenize.
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

from .errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the packing changes
PACK_BATCH = 1000  # paragraphs per datasets.map batch
_HEADING = re.compile(r"^\s*=(\s*=)*\s.*\s=(\s*=)*\s*$")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTKD_CACHE", Path.home() / ".cache" / "fastkd"))


def clean_paragraph(line: str) -> str | None:
    """A paragraph ready for the tokenizer, or None for blank lines and headings."""
    text = line.strip()
    if not text or _HEADING.match(text):
        return None
    for escaped, plain in _WIKITEXT_ESCAPES:
        text = text.replace(escaped, plain)
    return text


def corpus_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"corpus directory {path} holds no .txt files: give a text file or a directory of them")
        return files
    if path.exists():  # /dev/null, a FIFO, a socket: there, but not a file to read paragraphs from
        raise UserError(f"corpus {source} is not a regular file or directory: give a text file or a directory "
                        "of .txt files")
    raise UserError(f"corpus {source} not found: give a text file, a directory of .txt files, or a hub dataset NAME[:CONFIG]")


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
                        "convert the corpus to UTF-8, e.g. iconv -f latin1 -t utf-8"
                    ) from None
                text = clean_paragraph(line)
                if text is not None:
                    yield text


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.endswith(".txt")


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: class, vocabulary, casing, backend pipeline."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        # Without the truncation/padding settings: each call of the tokenizer sets them on the
        # backend, so they would change the key between two loads of one corpus in one process.
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("truncation", None)
        backend.pop("padding", None)
        h.update(json.dumps(backend, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _source_fingerprint(source: str, hub_dataset=None) -> dict:
    if hub_dataset is not None:  # the dataset's own fingerprint changes with its revision
        return {"hub": source, "fingerprint": hub_dataset._fingerprint}
    return {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in corpus_files(source)]}


def corpus_identity(source: str) -> dict:
    """The corpus files' identity (resolved path, size, mtime), or the hub name."""
    return _source_fingerprint(source) if _is_local(source) else {"hub": source}


def cache_key(source: str, tokenizer, max_seq_len: int, hub_dataset=None) -> str:
    ident = {"source": _source_fingerprint(source, hub_dataset), "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_seq_len": max_seq_len, "format": CACHE_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _pack_batch(batch, tokenizer, max_seq_len: int):
    """datasets.map function: a batch of paragraphs -> packed, padded sequences."""
    body = max_seq_len - 2
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    # Cleaning here covers hub corpora too (local files arrive clean; cleaning is idempotent).
    texts = [t for t in (clean_paragraph(x) for x in batch["text"] if x) if t]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    stream = [t for paragraph in ids for t in paragraph]
    input_ids, attention_mask = [], []
    for start in range(0, len(stream), body):
        chunk = [cls, *stream[start:start + body], sep]
        real = len(chunk)
        input_ids.append(chunk + [pad] * (max_seq_len - real))
        attention_mask.append([1] * real + [0] * (max_seq_len - real))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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
                num_proc: int = 1):
    """The packed corpus as a datasets.Dataset with input_ids and attention_mask (int32 lists)."""
    import datasets

    if max_seq_len < 8:
        raise UserError(f"--max-seq-len {max_seq_len} is too short: use at least 8 tokens")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    text_ds = None if _is_local(source) else _hub_texts(source)
    target = cache_root / "corpus" / cache_key(source, tokenizer, max_seq_len, text_ds)
    _remove_dead_builds(target.parent)
    if (target / "dataset_info.json").exists():
        cached = _load_cached(target)
        if cached is not None:
            log.info("corpus: cached packed sequences at %s", target)
            return cached

    if text_ds is None:
        files = corpus_files(source)
        if next(read_paragraphs(files), None) is None:
            raise UserError(f"corpus {source} holds no text (only blank lines or headings): give a non-empty corpus")

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
        packed = text_ds.map(
            _pack_batch, batched=True, batch_size=PACK_BATCH, remove_columns=text_ds.column_names,
            fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len}, num_proc=num_proc if num_proc > 1 else None,
            features=packed_features(), desc="tokenize+pack", new_fingerprint=target.name,
            cache_file_name=str(build_dir / "packed.arrow"))
        if len(packed) == 0:
            raise UserError(f"corpus {source} produced no sequences: give a non-empty corpus")
        staged = build_dir / "dataset"
        with _quiet_datasets():
            packed.save_to_disk(str(staged))
        del packed
        try:
            os.replace(staged, target)  # atomic: a cache entry is whole or absent
        except OSError:
            if not (target / "dataset_info.json").exists():  # another process won the race otherwise
                raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    log.info("corpus: packed sequences cached at %s", target)
    return datasets.load_from_disk(str(target))


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


class BatchStream:
    """Endless deterministic batches: epoch e visits the sequences in permutation(seed, e).

    Position p of the global stream is sequence perm_{p // n}[p % n]; global batch k covers
    positions [k*G, (k+1)*G) with G = batch_size * world_size, and rank r takes its own
    batch_size slice. So the state is one integer, and a resume continues at the exact sequence.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset = dataset.with_format("torch")
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
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, batch: int) -> list[int]:
        global_size = self.batch_size * self.world_size
        start = batch * global_size + self.rank * self.batch_size
        out = []
        for p in range(start, start + self.batch_size):
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out

    def next(self) -> dict[str, torch.Tensor]:
        rows = self.dataset[self.indices(self.state.batches_done)]
        self.state.batches_done += 1
        return {"input_ids": rows["input_ids"].long(), "attention_mask": rows["attention_mask"].long()}

    def state_dict(self) -> dict:
        return {"batches_done": self.state.batches_done, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise UserError(f"cannot resume: the checkpoint's data stream had {key}={state[key]}, this run has {getattr(self, key)}")
        self.state.batches_done = state["batches_done"]
