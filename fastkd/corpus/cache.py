"""The corpus cache: where it lives, what keys an entry (the files' identity, the tokenizer, the length,
the format), and its housekeeping (build folders of killed tokenizations removed, a damaged entry
set aside and rebuilt)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ..file_identity import default_cache_dir, file_identity, legacy_file_identity
from ..io import verify_checksums

from ..rundir import check_writable_dir
from ..tokenizer_identity import tokenizer_fingerprint
from .text import corpus_files

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when the packing changes (3: long paragraphs tokenized in pieces; 4: checksums)
UNITS_FORMAT = 2  # bump when the sentence split or the unit rows change (their cache entries are then rebuilt)

def cache_flag(cache_dir) -> str:
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
    return check_writable_dir(root, cache_flag(cache_dir))


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.endswith(".txt")


def source_fingerprint(source: str, hub_dataset=None) -> dict:
    if hub_dataset is not None:  # the dataset's own fingerprint changes with its revision
        return {"hub": source, "fingerprint": hub_dataset._fingerprint}
    root = Path(source).expanduser()
    return {"files": [file_identity(p, p.relative_to(root).as_posix() if root.is_dir() else p.name)
                      for p in corpus_files(source)]}


def check_corpus_source(source: str) -> None:
    """A corpus given as a path that is not there: one line from the settings' check, before the teacher
    and the heavy libraries load. (What is there, files and their readability, is checked once, when
    the corpus is loaded; a hub name too.)"""
    if is_local(source) and not Path(source).expanduser().exists():
        corpus_files(source)  # (raises its one line: not found)


def corpus_identity(source: str) -> dict:
    """The corpus files' identity (each file's name within the corpus, size and SHA-256: see
    file_identity), or the hub name."""
    return source_fingerprint(source) if is_local(source) else {"hub": source}


def legacy_corpus_identity(source: str) -> dict:
    """The identity runs recorded before it was a digest: [resolved path, size, mtime] per file."""
    if not is_local(source):
        return {"hub": source}
    return {"files": [legacy_file_identity(p) for p in corpus_files(source)]}


def same_corpus(saved: dict, source: str) -> bool:
    """Whether `source` is the corpus a run recorded as `saved` (corpus_identity, as stored in JSON).
    Runs recorded before identities were digests are compared the old way, so an unchanged corpus still
    resumes them."""
    files = saved.get("files")
    if files and isinstance(files[0][2], int):  # the old record: a modification time, not a digest
        return saved == legacy_corpus_identity(source)
    return saved == json.loads(json.dumps(corpus_identity(source)))  # (tuples stored as lists)


def cache_key(source: str, tokenizer, max_seq_len: int, hub_dataset=None, mode: str = "packed") -> str:
    ident = {"source": source_fingerprint(source, hub_dataset), "tokenizer": tokenizer_fingerprint(tokenizer),
             "max_seq_len": max_seq_len, "format": CACHE_FORMAT}
    if mode != "packed":  # (packed keeps the key it always had: existing caches stay valid)
        ident.update(mode=mode, units_format=UNITS_FORMAT)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def remove_dead_builds(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Build folders left by a tokenization killed half-way (kill -9, a preempted job): those of a
    process of this host that no longer exists, and any older than a day (a shared cache on a
    cluster: the other hosts' processes cannot be asked)."""
    if not folder.is_dir():
        return
    for p in folder.glob(".build-*"):
        parts = p.name.split("-")
        dead = False
        if len(parts) >= 4 and parts[1] == host_name() and parts[2].isdigit():
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


def load_cached(target: Path):
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
