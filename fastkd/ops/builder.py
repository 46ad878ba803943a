"""Build the C++/CUDA loss extensions on first use (torch.utils.cpp_extension + ninja) and cache them.

Modelled on DeepSpeed's op builders: the sources ship with the package, compile once per machine
kind into $FASTKD_CACHE/extensions/<name>-<hash>, and a missing toolchain or device is one clear
log line and a fallback, never a traceback in the middle of a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import types
from importlib import resources
from pathlib import Path

import torch

from ..io import file_sha256

log = logging.getLogger(__name__)

SOURCES = {
    "cpu": ["fused_loss_cpu.cpp"],
    "cuda": ["fused_loss_cuda.cpp", "fused_loss_cuda_kernels.cu"],
}
# The operators each library registers (TORCH_LIBRARY, in the namespace of its module name).
OPS = {
    "cpu": ("attention_mse_qk", "attention_kl_qk", "projected_mse", "dropout_mask_scale"),
    "cuda": ("attention_mse_qk", "attention_mse_qk_gemm", "attention_kl_qk", "projected_mse"),
}
STALE_LOCK_SECONDS = 15 * 60  # a build takes well under a minute; a lock this old belongs to a dead one
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


def source_dir() -> Path:
    """csrc/ as installed (the package fastkd.csrc) or in a source checkout."""
    return Path(str(resources.files("fastkd.csrc")))


def cache_root() -> Path:
    return Path(os.environ.get("FASTKD_CACHE", Path.home() / ".cache" / "fastkd")) / "extensions"


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU kind (a shared cache on a cluster).
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def _flags(kind: str) -> tuple[list[str], list[str], list[str]]:
    cflags = ["-O3", "-std=c++17"]
    ldflags: list[str] = []
    if kind == "cpu":
        if platform.machine() in ("x86_64", "AMD64"):
            cflags.append("-march=native")
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cuda = ["-O3", "-std=c++17", "--use_fast_math"] if kind == "cuda" else []
    return cflags, ldflags, cuda


def _build_key(kind: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES[kind]:
        h.update((source_dir() / name).read_bytes())
    for header in sorted(source_dir().glob("*.h")):
        h.update(header.read_bytes())
    h.update(repr(_flags(kind)).encode())
    h.update(f"{torch.__version__}|{sys.version}|{_cpu_signature() if kind == 'cpu' else ''}".encode())
    return h.hexdigest()[:16]


def _why_not(kind: str) -> str | None:
    """A reason the extension cannot be built here, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    if kind == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
    # pip's ninja lives beside the interpreter, which is not on PATH unless the venv is activated.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def load(kind: str):
    """The compiled module for `kind` ('cpu' or 'cuda'), or None (with one log line) when it cannot be had."""
    if kind in _loaded:
        return _loaded[kind]
    if kind in _failed:
        return None
    reason = _why_not(kind)
    module = None
    if reason is None:
        from torch.utils.cpp_extension import load as cpp_load

        key = _build_key(kind)
        build_dir = cache_root() / f"fastkd_fused_{kind}-{key}"
        cflags, ldflags, cuda = _flags(kind)
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = (f"the extension cache {build_dir.parent} cannot be written ({exc.strerror or exc}); set "
                      "FASTKD_CACHE to a writable directory")
    if reason is None:
        try:
            # One process at a time checks, clears, builds and records (the ranks of a launch arrive together).
            with _build_lock(build_dir) as locked:
                _remove_stale_torch_lock(build_dir, locked)
                if not any(build_dir.glob("*.so")):
                    log.info("building the %s loss extension (first use, about 20 s on 2 cores) in %s", kind, build_dir)
                problem = _cached_library_problem(build_dir)
                if problem is not None:
                    # dlopen of a damaged library kills the process (SIGBUS), and ninja, seeing it newer
                    # than its sources, would never rebuild it: checked before loading, built again.
                    log.warning("the cached %s loss extension in %s is damaged (%s); building it again", kind,
                                build_dir, problem)
                    shutil.rmtree(build_dir, ignore_errors=True)
                    build_dir.mkdir(parents=True, exist_ok=True)
                # The module name carries the key: two versions never collide in one process or one cache
                # (it is also the operators' namespace). A library of torch operators, not a Python module.
                name = f"fastkd_fused_{kind}_{key}"
                cpp_load(name=name, sources=[str(source_dir() / s) for s in SOURCES[kind]], extra_cflags=cflags,
                         extra_ldflags=ldflags, extra_cuda_cflags=cuda or None, build_directory=str(build_dir),
                         verbose=False, is_python_module=False)
                module = _operators(kind, name)
                _record_library(build_dir)
        except Exception as exc:  # a compiler error, a missing header: fall back, say why in one line
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            first = next((line for line in lines if "error:" in line), lines[0] if lines else type(exc).__name__)
            reason = f"the build failed ({first[-200:]}); details: rebuild with FASTKD_VERBOSE_BUILD=1"
            if os.environ.get("FASTKD_VERBOSE_BUILD"):
                raise
    if module is None:
        _failed[kind] = reason  # said once, by fastkd.ops.backends.present_chain, with what runs instead
        log.debug("%s loss extension unavailable: %s", kind, reason)
        return None
    _loaded[kind] = module
    return module


def _operators(kind: str, namespace: str):
    """The loaded library's operators as attributes (module.attention_mse_qk(...), as the op modules call
    them); an operator the library lacks is an AttributeError here, at load, not in a run."""
    registered = getattr(torch.ops, namespace)
    return types.SimpleNamespace(**{op: getattr(registered, op) for op in OPS[kind]})


LIBRARY_RECORD = "fastkd-library.sha256"  # the built library's name and SHA-256, written after a good load


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """An flock beside the build folder (released when the process ends, however it ends); yields
    whether it is held (not where the file system takes no locks: torch's own lock file still
    serialises the build there)."""
    try:
        f = open(build_dir.parent / f".{build_dir.name}.lock", "a")
    except OSError:
        yield False
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True


def _remove_stale_torch_lock(build_dir: Path, locked: bool) -> None:
    """torch waits on build_dir/lock without a timeout, and a build killed half-way (SIGKILL, a
    scheduler's SIGTERM) leaves it behind. Holding the flock, no fastkd build can be inside torch's
    lock: it goes. Without the flock, only one old enough to belong to a dead build goes."""
    lock = build_dir / "lock"
    try:
        if lock.exists() and (locked or time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS):
            log.warning("removing a build lock left by an interrupted build: %s", lock)
            lock.unlink(missing_ok=True)
    except OSError:
        pass


def _record_library(build_dir: Path) -> None:
    """What the library was, for the next process to check before dlopen (after a load that worked,
    so a library built before records existed gets one too)."""
    libraries = sorted(build_dir.glob("*.so"), key=lambda p: p.stat().st_mtime)
    if not libraries:
        return
    record = build_dir / LIBRARY_RECORD
    text = f"{libraries[-1].name} {file_sha256(libraries[-1])}\n"
    try:
        if record.is_file() and record.read_text() == text:
            return
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache: the library still loads, unrecorded


def _cached_library_problem(build_dir: Path) -> str | None:
    """Why the recorded library must not be loaded (changed or missing since it was built), or None.
    Nothing recorded: nothing to compare (a build killed before its link finished is rebuilt by
    ninja, whose log lacks it)."""
    record = build_dir / LIBRARY_RECORD
    if not record.is_file():
        return None
    name, _, digest = record.read_text().strip().partition(" ")
    if not (build_dir / name).is_file():
        return f"{name} is missing"
    if file_sha256(build_dir / name) != digest:
        return f"{name} changed since it was built"
    return None


def unavailable_reason(kind: str) -> str | None:
    return _failed.get(kind)
