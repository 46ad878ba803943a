"""A file's identity by its content (name, size, SHA-256), not by its modification time.

Runs, caches and search stores remember which files made them: a --resume refuses a corpus that
changed, a corpus cache or a store of teacher labels is rebuilt when its source changes, a search's
fitness store does not mix teachers or task files. The modification time is the wrong witness for
that: a copy (`cp`, rsync without -t, a dataset synced again to a node, a restored backup, a
container's data volume mounted afresh) changes it and keeps every byte, and a run hours in would
then be refused its --resume and its teacher labels computed again.

The digest of a large file is memoised in the fastkd cache ($FASTKD_CACHE, whatever --cache-dir says:
the identity is asked for before a command's settings are) per (path, device, inode, size,
modification and change times), so each version of it is read once (about a second per GB); an
edited file has a new memo key. A small file is simply read again (cheaper than a memo entry: a
corpus of a million small files would otherwise make a million), and every digest is also kept
for the life of the process (a run asks for its corpus's identity several times).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .io import atomic_write_text, file_sha256

DIGESTS = "file-digests"  # the memo's folder in the fastkd cache
MEMO_MIN_BYTES = 4 << 20  # smaller files are read again rather than memoised on disk (a few ms at most)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_in_process: dict[tuple, str] = {}


def default_cache_dir() -> Path:
    """The fastkd cache: $FASTKD_CACHE, else ~/.cache/fastkd."""
    return Path(os.environ.get("FASTKD_CACHE", Path.home() / ".cache" / "fastkd"))


def _version(path: Path, st: os.stat_result) -> tuple:
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read once per version of the file (see the module's note)."""
    path = Path(path)
    st = path.stat()
    version = _version(path, st)
    if version in _in_process:
        return _in_process[version]
    memo = None
    if st.st_size >= MEMO_MIN_BYTES:
        memo = default_cache_dir() / DIGESTS / hashlib.sha256(json.dumps(version).encode()).hexdigest()[:32]
        try:
            known = memo.read_text().strip()
            if _SHA256.fullmatch(known):
                _in_process[version] = known
                return known
        except (OSError, UnicodeDecodeError):
            pass  # none yet, or damaged: computed again below
    digest = file_sha256(path)
    if _version(path, path.stat()) != version:  # written to while it was read: nothing is kept
        return digest
    _in_process[version] = digest
    if memo is not None:
        try:
            # no fsync: a memo lost or torn by a crash fails the digest pattern and is computed again
            atomic_write_text(memo, digest + "\n", durable=False)
        except OSError:
            pass  # a read-only cache: the digest is computed again by the next process, nothing else changes
    return digest


def legacy_file_identity(path: str | os.PathLike) -> list:
    """[resolved path, size, mtime]: how files were known before (run records and search stores of that time)."""
    path = Path(path)
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def file_identity(path: str | os.PathLike, name: str | None = None) -> list:
    """[name, size, sha256]: `name` is how the file is known within what it belongs to (a corpus file
    relative to the corpus, a model file by its name), so a moved or copied whole keeps its identity."""
    path = Path(path)
    return [name if name is not None else path.name, path.stat().st_size, content_digest(path)]
