"""A command's run directory: what may run there, who works there, what it may resume.

One folder per run of `distill`, `glue` or `search`. Before any work: a folder a live run works in
is refused first of all (its POSIX lock, asked of the kernel), then one holding anything but a run
of this command, then one this process cannot write. While the run works: its lock keeps a second
run out, and staging left by a killed writer is removed. A --resume continues only a run with the
same settings (those that change what is computed); each command's resolved config is written beside
its results. A command that is refused or fails removes the folders it made and never wrote in.
`RunDir` ties these together for one folder; the functions remain for the places that need one step.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .io import atomic_write_json
from .options import differing_settings

log = logging.getLogger(__name__)

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
            log.info("removed %s, left by an interrupted run", p)


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
    return UserError(f"{flag} {output} is in use by a running fastkd run ({holder}): wait for it to finish, or "
                     "choose another directory")


def _take_lock(output: Path, command: str, flag: str) -> None:
    import fcntl

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
        log.warning("%s: this file system takes no locks (%s): nothing keeps a second run "
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




def other_run_refusal(where, saved: dict, now: dict, resume: bool, ignored: frozenset = frozenset(),
                      holds: str = "a run", flag: str = "--output") -> str | None:
    """Why a command may not work in `where`, which holds a run saved with the settings `saved`, or None
    when it may (--resume, same settings but for the `ignored` ones). The one wording of every command
    (distill's config.json, glue's glue.json, the search's store)."""
    diffs = "; ".join(differing_settings(saved, now, ignored))
    if diffs and resume:
        return (f"cannot --resume {where}: settings differ from the saved run: {diffs}; give the saved settings, "
                f"or choose another {flag}")
    if diffs:
        return (f"{flag} {where} holds {holds} with other settings: {diffs}; give the saved settings with --resume "
                f"to continue it, or choose another {flag}")
    if not resume:
        return f"{flag} {where} holds {holds} already: pass --resume to continue it, or choose another {flag}"
    return None


@dataclass(frozen=True)
class RunDir:
    """One command's output folder (`flag` names it in messages)."""

    path: Path
    command: str
    flag: str = "--output"

    def refuse_unusable(self) -> Path:
        """Before any work: busy (a live run works there), foreign (anything but a run of this command),
        not writable: each one line. Read-only but for the write probe, so every rank decides alike."""
        refuse_busy_output(self.path, self.flag)
        refuse_foreign_output(self.path, self.command, self.flag)
        return check_writable_dir(self.path, self.flag)

    def claim(self) -> Path:
        """This process's lock on the folder, held until the command ends."""
        lock_output(self.path, self.command, self.flag)
        return self.path

    def refuse_other_run(self, saved: dict | None, now: dict, resume: bool, ignored: frozenset = frozenset(),
                         holds: str = "a run") -> None:
        """A saved run (its settings `saved`, None for none) is continued only by --resume with the same
        settings but for the `ignored` ones: never overwritten, never mixed with another run's."""
        if saved is not None:
            why = other_run_refusal(self.path, saved, now, resume, ignored, holds, self.flag)
            if why is not None:
                raise UserError(why)

    def write_config(self, resolved: dict, name: str | None = None) -> Path:
        """The command's resolved settings beside its results (`--config` with it reruns the run)."""
        path = self.path / (name or f"{self.command}-config.json")
        atomic_write_json(path, resolved)
        return path
