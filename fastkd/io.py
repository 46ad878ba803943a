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


_created_outputs: list[Path] = []  # folders this command made (removed again if it is refused while they are empty)


def make_dir(path: Path) -> None:
    """mkdir -p that records each folder it made itself (a plain mkdir that succeeded, so a folder
    another process made at the same instant is never counted as ours)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        try:
            p.mkdir()
            _created_outputs.append(p)
        except FileExistsError:
            if not p.is_dir():
                raise


def check_writable_dir(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Create `path` if needed and prove a file can be written in it, before any work is done."""
    from .errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file: give a directory")
    try:
        make_dir(path)
        fd, probe = tempfile.mkstemp(prefix=".fastkd-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written ({exc.strerror or type(exc).__name__}): "
                        "choose a directory you can write to") from None
    return path


def check_writable_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """A file `path` can be written (atomically, beside itself): not a directory, and its folder can
    be made and written in. Checked before any work."""
    from .errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file name (e.g. {path / 'result.json'})")
    parent = path.parent
    for above in (parent, *parent.parents):  # a regular file in the way: "under a file"
        if above.exists():
            if not above.is_dir():
                raise UserError(f"{flag} {path} cannot be written: {above} is a file, not a directory")
            break
    try:
        check_writable_dir(parent, flag)
    except UserError:
        raise UserError(f"{flag} {path} cannot be written (its folder {parent} is not writable): choose a file "
                        "in a directory you can write to") from None
    return path


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
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


_held_locks: list = []  # open lock files of this process (released when it exits, however it exits)


def lock_output(output: Path, command: str, flag: str = "--output") -> None:
    """Keep a second fastkd run off `output` while this process works in it: a POSIX lock on
    OUTPUT/.lock, which the kernel releases when the process ends, kill -9 included. Unlike an flock,
    it is not inherited by forked children (datasets' tokenizing workers), so no orphan of a killed
    run can hold it. The holder's PID and command are in the file, so a refusal names them. Then
    leftovers of an interrupted run are removed."""
    output = Path(output)
    make_dir(output)
    if not _holds_lock(output):
        _take_lock(output, command, flag)  # (a process that holds it already, resuming in-process, keeps it)
    for folder in (output, output / "checkpoints"):
        for p in remove_stale_staging(folder):
            import logging

            logging.getLogger(__name__).info("removed %s, left by an interrupted run", p)


def _holds_lock(output: Path) -> bool:
    return any(Path(f.name).resolve() == (output / ".lock").resolve() for f in _held_locks)


def in_use_by(output: str | os.PathLike) -> str | None:
    """'pid N, fastkd CMD' of another live process holding `output`'s run lock, else None. It asks
    the kernel (F_GETLK) and takes nothing, so a run starting at this instant is never disturbed; it
    never opens the file where this process holds the lock (a POSIX lock is dropped when any of the
    holder's descriptors of the file is closed)."""
    import fcntl
    import struct

    path = Path(output) / ".lock"
    if not path.is_file() or _holds_lock(Path(output)):
        return None
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock: the whole file
        try:
            answer = fcntl.fcntl(f, fcntl.F_GETLK, query)
        except OSError:  # a file system without locks: nothing can be said
            return None
        kind, _, _, _, pid = struct.unpack("hhqqi", answer)
        if kind == fcntl.F_UNLCK:
            return None
        return _holder(f, pid)


def _holder(f, pid: int | None = None) -> str:
    """'pid N, fastkd CMD' from the lock file's words (the kernel's pid for the holder, where known)."""
    f.seek(0)
    words = f.read().split()
    holder = str(pid) if pid else (words[0] if words else "unknown")
    return f"pid {holder}" + (f", fastkd {words[1]}" if len(words) > 1 else "")


def refuse_busy_output(output: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse, first of all, an output a live fastkd run works in: whatever else the folder holds,
    the user must wait for that run or choose another folder (not --resume, not remove it)."""
    holder = in_use_by(output)
    if holder is not None:
        raise _busy(output, holder, flag)


def _busy(output, holder: str, flag: str):
    from .errors import UserError

    return UserError(f"{flag} {output} is in use by a running fastkd run ({holder}): wait for it to finish, or "
                     "choose another directory")


def _take_lock(output: Path, command: str, flag: str) -> None:
    import fcntl

    from .errors import UserError

    try:
        f = open(output / ".lock", "a+")
    except PermissionError:
        raise UserError(f"{flag} {output}/.lock belongs to another user: choose another directory") from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # (EAGAIN or EACCES, as the system reports a held lock)
        holder = _holder(f)
        f.close()
        raise _busy(output, holder, flag) from None
    except OSError as exc:  # Lustre mounted noflock (ENOSYS), NFS without lockd (ENOLCK), ...
        if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            raise
        import logging

        logging.getLogger(__name__).warning("%s: this file system takes no locks (%s): nothing keeps a second run "
                                            "off %s", flag, exc.strerror, output)
        f.close()
        return
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {command}\n")
    f.flush()
    _held_locks.append(f)


def untouched(folder: Path) -> bool:
    """A folder holding nothing but bookkeeping (its lock, staging of an interrupted first write) and
    untouched folders this command made (the corpus cache's `corpus/` in a new --cache-dir)."""
    return folder.is_dir() and all(is_bookkeeping(p.name) or (p in _created_outputs and untouched(p))
                                   for p in folder.iterdir())


def made_nothing_yet() -> bool:
    """This command made its output folder and has written nothing there yet (so a stop keeps nothing)."""
    return bool(_created_outputs) and all(untouched(p) for p in _created_outputs)


def end_of_command(failed: bool) -> None:
    """At the end of a command: if it was refused or failed, every folder it made that holds only its
    lock is removed, so the user's next command meets no folder they never asked for; then its run
    locks are released (a process that runs several commands, a notebook, holds none between them)."""
    for output in reversed(_created_outputs) if failed else ():  # (the deepest first, then its parents)
        if untouched(output) and in_use_by(output) is None:  # (a run that started there since is not ours)
            shutil.rmtree(output, ignore_errors=True)
    _created_outputs.clear()
    while _held_locks:
        _held_locks.pop().close()  # (closing the descriptor drops the POSIX lock)


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain open()/mkdir() would (some writers, the
    safetensors one among them, make their files 0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _is_staging(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or name.endswith(".tmp") or ".old-" in name)


def is_bookkeeping(name: str) -> bool:
    """A name fastkd may leave in an output that holds no run yet: its lock, another rank's write
    probe of this instant, the staging of an interrupted first write. Such a folder is still empty."""
    return name in (".gitkeep", ".lock") or name.startswith(".fastkd-write-probe-") or _is_staging(name)


# The files that mark a folder as one command's run (distill's config.json must also say it is one:
# a Hugging Face model folder has a config.json too).
RUN_RECORDS = {"distill": ("config.json",), "search": ("search.sqlite", "search-config.json"),
               "glue": ("glue.json", "glue-config.json")}


def holds_run_of(output: Path, command: str) -> bool:
    if command == "distill":
        try:
            saved = json.loads((output / "config.json").read_text())
            return saved.get("command", "distill" if "fastkd_version" in saved else None) == "distill"
        except (OSError, ValueError, AttributeError):
            return False
    return any((output / record).exists() for record in RUN_RECORDS[command])


def refuse_foreign_output(output: str | os.PathLike, command: str, flag: str = "--output") -> None:
    """An output folder must be new, empty, or hold a run of this command: anything else (a user's
    notes, another command's run) would be overwritten or mixed with this run's files, and one a live
    run works in is refused first of all. Read-only, so every rank of a launch decides alike, before
    anything is written."""
    from .errors import UserError

    output = Path(output)
    if not output.is_dir():
        return
    refuse_busy_output(output, flag)
    names = sorted(p.name for p in output.iterdir() if not is_bookkeeping(p.name))
    if not names or holds_run_of(output, command):
        return
    other = next((c for c in RUN_RECORDS if holds_run_of(output, c)), None)
    if other is not None:
        raise UserError(f"{flag} {output} holds a fastkd {other} run, not a {command} run: choose an empty or new "
                        "directory")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(f"{flag} {output} holds files that are not a fastkd {command} run ({shown}): choose an "
                    "empty or new directory")


def remove_stale_staging(folder: Path) -> list[Path]:
    """Staging folders and temporary files left in `folder` by a process killed while writing. Only
    call it while holding the folder's run lock: nothing else can be writing there then."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if _is_staging(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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
