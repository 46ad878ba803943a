"""Atomic file writes: a reader never sees half a file, a crash never leaves one.

Files and folders made here follow the process umask like any `open()` would (tempfile makes them
0600 / 0700, which would hide a model from the other users of a shared machine).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask: from /proc on Linux, which reads it without setting it (os.umask would set
    it to 0 for an instant, under any thread creating files then)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


# How writers say it: the OS (errno 28, 122), safetensors' Rust I/O, SQLite (the search's store).
FULL_DISK_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "database or disk is full")
# torch.save's zip writer says only this when a write came up short (a full disk among other causes).
TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing")
PROBE_BYTES = 1 << 16


def _cannot_write_more(folder: Path) -> bool:
    """Whether a small write (and its fsync) into `folder`, or its nearest existing parent, fails or
    comes back short for want of space or quota: asked of the disk itself, so a quota counts as well
    as a full disk. Never raises."""
    for above in (folder, *folder.parents):
        try:
            fd, probe = tempfile.mkstemp(prefix=".fastkd-space-probe-", dir=above)
            break
        except FileNotFoundError:
            continue  # (removed meanwhile, or never made): the next folder up is on the same disk
        except OSError as exc:
            return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    else:
        return False
    try:
        written = os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
        return written < PROBE_BYTES
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def is_full_disk(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether `exc` is a full disk (or a full quota). Writers report it in their own words: OSError
    ENOSPC/EDQUOT from Python, "os error 28" from safetensors, SQLite's "database or disk is full";
    torch.save's zip writer only "unexpected pos N vs M", so that one, raised writing under `where`,
    counts when the disk there takes no more bytes. Errors wrapped by a library (datasets wraps
    pyarrow's ENOSPC in a DatasetGenerationError) are followed to their cause."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(cause) for words in FULL_DISK_WORDS):
            return True
        # (a context the code chose to hide, `raise ... from None`, was dealt with: not this error's cause)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    text = str(exc)
    if where is None or not isinstance(exc, RuntimeError) or not any(w in text for w in TORCH_SHORT_WRITE):
        return False
    return _cannot_write_more(Path(where).parent if not Path(where).is_dir() else Path(where))


@contextlib.contextmanager
def no_space_is_one_line(what: Path, advice: str = "free some space (or choose another --output) and --resume"):
    """A full disk while writing `what` becomes one user-facing line (the caller removes its staging);
    any other error passes through untouched."""
    from .errors import UserError

    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 (re-raised unless the disk is full)
        if is_full_disk(exc, what):
            where = getattr(exc, "filename", None) or what
            raise UserError(f"no space left on device writing {where}: {advice}") from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> None:
    """durable=False skips the fsync: for cache entries a crash may lose (and a reader then recomputes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, what: str) -> dict | None:
    """A run's JSON record, None when absent; a damaged one is a user error, never silently replaced."""
    from .errors import UserError

    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON: the output directory holds a damaged {what}; "
                        "choose another --output") from None


def atomic_write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir(staged: Path, target: Path) -> None:
    """Move a fully written directory into place, replacing an older one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(target: Path) -> Path:
    """A fresh folder beside `target`, to be renamed onto it once complete (see stale_staging)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staged.chmod(0o777 & ~_umask())
    return staged


def file_follows_umask(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would have (safetensors writes 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain open()/mkdir() would (some writers, the
    safetensors one among them, make their files 0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


CHECKSUMS = "fastkd-checksums.json"  # in a cached folder: its files' sizes and SHA-256, checked when read back


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(folder: Path) -> dict:
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)}


def write_checksums(folder: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file of a cached folder (before it is renamed into place):
    damage that leaves a file's header and length intact (a bad sector, a partial overwrite) shows
    when it is read back, where the reader would take the damaged bytes."""
    folder = Path(folder)
    atomic_write_text(folder / CHECKSUMS, json.dumps({"files": _digests(folder)}, indent=1) + "\n")


def verify_checksums(folder: str | os.PathLike) -> None:
    """Raise ValueError naming the first file of `folder` that is not as it was written (or the
    missing record). Reads every byte: about a second per GB."""
    folder = Path(folder)
    record = folder / CHECKSUMS
    if not record.is_file():
        raise ValueError(f"{CHECKSUMS} is missing")
    want = json.loads(record.read_text())["files"]
    got = _digests(folder)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            what = "missing" if name not in got else "not listed" if name not in want else "changed since it was written"
            raise ValueError(f"{name} is {what}")
