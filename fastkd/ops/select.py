"""The backend each op runs on: the first present one (fastkd.ops.backends) that passes a self-check.

The first time a process uses a fused backend for an op on a (device, student dtype, teacher dtype),
it runs the op on the op module's small random padded cases (an odd length past one tile, an
all-padded row, both head-count cases, a BERT-sized head, several chunks) against the torch
reference on the same values, loss and gradients. A mismatch or an exception is
one log line naming the op, backend, device, dtype and the error, and the op falls back to the next
present backend (checked in turn; torch, the reference itself, needs none). The outcome is kept for
the process and listed by `selections()` (fastkd.json and the run's config.json record it).

The check draws from its own generator (never the global RNG: runs stay exactly reproducible), runs
without autocast (the reference must be float32) and with gradients on, outside inference mode (it
may be first reached under torch.no_grad). Its compute is a few milliseconds; a Triton backend compiles its kernels for
the check's shapes the first time (seconds, cached on disk by triton afterwards).
FASTKD_SELF_CHECK=0 skips it and trusts the first present backend.

`auto` then picks by measurement, not by a fixed order: where the run says its shapes (DistillLoss.prepare,
before the first step), every present backend that passes its check is timed on random inputs of the run's
shapes (DistillLoss builds them: forward and backward through torch.autograd.grad, so nothing lands in a
.grad; one warm-up, the median of TIMING_REPEATS), and the fastest runs. The timings and the shapes
are kept in the Selection, and in this machine's store in the fastkd cache: the next run with the same shapes
reads the choice instead of timing again, so two runs of one command on one machine compute alike (timing
noise would otherwise flip near-equal backends between runs, and with them the last bits of the student).
A resumed run pins the choice its start made (`pin`), even where the store is gone. Asked for by name, a
backend is never second-guessed.

Tolerances, relative to the largest reference entry: float32 1e-4 (TF32 allowed: 1e-2); 16-bit
inputs: the loss 1e-3 (the products are exact in float32, only the summation order differs), the
gradients one unit of the dtype's epsilon (0.78% for bf16): they are rounded once into the input
dtype, half an epsilon, and a 16-bit tensor-core gradient rounds the score difference once more;
emulating that path on the check's cases gives at most 0.46 epsilon, so a 1% error is caught.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..file_identity import default_cache_dir
from ..io import atomic_write_json
from . import attention_kl, attention_mse, hidden_mse
from .backends import present_chain, requested

log = logging.getLogger(__name__)

ENV = "FASTKD_SELF_CHECK"
OPS = {attention_mse.NAME: (attention_mse, attention_mse.attention_mse_qk),
       hidden_mse.NAME: (hidden_mse, hidden_mse.hidden_mse),
       attention_kl.NAME: (attention_kl, attention_kl.attention_kl_qk)}
SEED = 20240607


@dataclass
class Selection:
    op: str
    device: str
    dtype: str
    requested: str
    backend: str
    check: str  # passed | skipped ($FASTKD_SELF_CHECK=0) | reference, then "after <backend>: <why>" for each failure
    shape: str | None = None  # auto: the run's shapes it was decided for (timed where two or more passed)
    timings_ms: dict[str, float] = field(default_factory=dict)  # auto, timed: each passing backend's fwd+bwd
    # How auto chose: order (no shapes: the first that passes, as auto_order ranks them) | only (one passed) |
    # timed | stored (this machine's earlier timing of the same shapes) | resumed (the resumed run's start's
    # choice)
    decided: str = "order"
    passed: dict[str, str] = field(default_factory=dict)  # backend -> its check's outcome (all checked, if timed)
    failed: list[str] = field(default_factory=list)  # "<backend>: <why>" of each that failed its check


@dataclass
class Timing:
    """The run's shapes, for `auto` to time the backends on: `shape` labels them in the records, `cases(device,
    dtype, teacher_dtype, gen)` builds the op's inputs at those shapes (as self_check_cases does)."""

    shape: str
    cases: Callable


TIMING_REPEATS = 3
_selected: dict[tuple[str, str, str, str, str | None], Selection] = {}  # (op, request, device, dtypes, shapes)
_pinned: dict[tuple[str, str, str, str | None], str] = {}  # (op, device type, dtypes, shapes) -> backend: resumed run
_stale: set = set()  # keys of _selected an earlier run decided: decided again (their checks reused) by this one


def tolerances(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(loss, gradient) relative tolerances for inputs of `dtype` on `device`."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-3, torch.finfo(dtype).eps
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 1e-2, 1e-2
    return 1e-4, 1e-4


def _evaluate(fn, args, grad_idx, leaf):
    args = list(args)
    leaves = []
    for i in grad_idx:
        original, args[i] = args[i], leaf(args[i])
        # The same tensor passed twice (a relation: k = q) stays one leaf, so both gradients add up.
        args = [args[i] if a is original else a for a in args]
        leaves.append(args[i])
    for a in args:
        if isinstance(a, nn.Module):
            leaves += list(a.parameters())
    value = fn(*args)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach().float(), [None if g is None else g.detach().float() for g in grads]


def _relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    if got.shape != want.shape:
        return float("inf")
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-12)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    return err / scale if err == err else float("inf")  # NaN -> inf


def dtype_label(dtype: torch.dtype, teacher_dtype: torch.dtype | None = None) -> str:
    """'bfloat16', or 'float32/bfloat16' (student/teacher) when they differ."""
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return name(dtype) if teacher_dtype in (None, dtype) else f"{name(dtype)}/{name(teacher_dtype)}"


def check(op: str, backend: str, device: torch.device, dtype: torch.dtype,
          teacher_dtype: torch.dtype | None = None) -> str | None:
    """None when `backend` matches the reference on the op's self-check cases (student inputs in
    `dtype`, teacher inputs in `teacher_dtype`, default the same), else why not (one line)."""
    module, run = OPS[op]
    gen = torch.Generator().manual_seed(SEED)
    value_tol, grad_tol = tolerances(device, dtype)
    settings = getattr(module, "self_check_settings", contextlib.nullcontext)
    try:
        with torch.inference_mode(False), torch.autocast(device.type, enabled=False), torch.enable_grad(), settings():
            cases = module.self_check_cases(device, dtype, teacher_dtype or dtype, gen)
            for case, (args, grad_idx) in enumerate(cases):
                want, want_grads = _evaluate(module.reference, args, grad_idx,
                                             lambda x: x.detach().float().requires_grad_())
                got, got_grads = _evaluate(lambda *a: run(*a, backend), args, grad_idx,
                                           lambda x: x.detach().clone().requires_grad_())
                err = _relative_error(got, want)
                if err > value_tol:
                    return f"loss off by {err:.1e} (relative; tolerance {value_tol:.0e}) on case {case}"
                for n, (g, w) in enumerate(zip(got_grads, want_grads)):
                    err = _relative_error(g, w)
                    if err > grad_tol:
                        return f"gradient {n} off by {err:.1e} (relative; tolerance {grad_tol:.0e}) on case {case}"
    except Exception as exc:  # a compile error, too little shared memory, a launch failure: fall back
        first = " ".join(str(exc).split())[:300]
        return f"raised {type(exc).__name__}: {first}"
    return None


def backend_for(op: str, request: str | None, device: torch.device | str, dtype: torch.dtype,
                teacher_dtype: torch.dtype | None = None, timing: Timing | None = None) -> str:
    """The backend `op` runs on for student inputs of `dtype` and teacher inputs of `teacher_dtype`
    (default the same) on `device`, decided once per process (what a loss ran: DistillLoss.ran_on).
    Under `auto` with `timing`, the fastest of the backends that pass their check, timed on those shapes
    (decided once per shapes: a run's loss passes the same `timing` at every step)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = requested(request)
    teacher_dtype = teacher_dtype or dtype
    label = dtype_label(dtype, teacher_dtype)
    timed = timing is not None and name == "auto"
    key = (op, name, str(device), label, timing.shape if timed else None)
    known = _selected.get(key)
    if known is not None and key not in _stale:
        return known.backend
    _stale.discard(key)
    module, _ = OPS[op]
    chain = [b for b in present_chain(name, device) if b in module.FUSED or b == "torch"]
    if chain == ["torch"] and name not in ("torch", "auto"):
        log.info("loss op %s has no %s backend; the torch reference runs", op, name)
    skip = os.environ.get(ENV, "1").strip() == "0"
    failures, passing = [], []
    if known is not None:  # an earlier run's decision: its checks stand, the choice is made again
        chain, passing, failures = [], list(known.passed.items()), list(known.failed)
    for backend in chain:
        if backend == "torch":
            passing.append((backend, "reference"))
        elif skip:
            passing.append((backend, f"skipped (${ENV}=0)"))
        else:
            why = check(op, backend, device, dtype, teacher_dtype)
            if why is None:
                passing.append((backend, "passed"))
            else:
                following = chain[chain.index(backend) + 1]
                log.warning("loss op %s: the %s backend on %s (%s) failed its self-check: %s; using %s",
                            op, backend, device, label, why, following)
                failures.append(f"{backend}: {why}")
        if passing and not timed:
            break  # untimed: the first that passes, as `auto_order` ranks them
    passed = dict(passing)
    selection = Selection(op, str(device), label, name, *passing[0], passed=dict(passed), failed=list(failures))
    if timed:
        selection.shape, selection.decided = timing.shape, "only" if len(passed) == 1 else "order"
        resumed = _pinned.get((op, device.type, label, timing.shape), _pinned.get((op, device.type, label, None)))
        stored = _read_store(_store_key(op, device, label, timing.shape))
        if resumed is not None and resumed not in passed:
            log.warning("loss op %s (%s): the resumed run started on %s, which does not pass its check now; "
                        "it continues on another backend, so not on the same arithmetic", op, label, resumed)
        if len(passed) == 1:
            pass
        elif resumed in passed:
            selection.backend, selection.check, selection.decided = resumed, passed[resumed], "resumed"
        elif stored.get("backend") in passed and set(stored.get("timings_ms") or ()) == set(passed):
            selection.backend, selection.check, selection.decided = stored["backend"], passed[stored["backend"]], "stored"
            selection.timings_ms = stored["timings_ms"]
        else:
            timings = _timings(op, list(passed), timing, device, dtype, teacher_dtype)
            if timings:
                fastest = min(timings, key=timings.get)
                selection.backend, selection.check, selection.decided = fastest, passed[fastest], "timed"
                selection.timings_ms = timings
                _write_store(_store_key(op, device, label, timing.shape), {"backend": fastest, "timings_ms": timings})
                log.info("loss op %s on %s (%s): %s timed fastest on %s (%s)", op, device, label, fastest,
                         timing.shape, ", ".join(f"{b} {t:.2f} ms" for b, t in timings.items()))
    if failures:
        selection.check = f"{selection.check} after {'; '.join(failures)}"
    _selected[key] = selection
    return selection.backend


def _timings(op: str, backends: list[str], timing: Timing, device: torch.device, dtype: torch.dtype,
             teacher_dtype: torch.dtype) -> dict[str, float]:
    """{backend: ms} on the run's shapes. A backend that raises there (out of memory at the run's size: the
    reference holds B x H x S x S scores that a fused kernel never forms) is left out, with one line;
    {} when none could be (the order's first then runs)."""
    try:
        cases = timing.cases(device, dtype, teacher_dtype, torch.Generator().manual_seed(SEED))
    except Exception as exc:
        log.warning("loss op %s: its timing inputs at %s could not be built (%s); auto takes the first "
                    "backend that passed its check", op, timing.shape, " ".join(str(exc).split())[:200])
        return {}
    timings = {}
    for backend in backends:
        try:
            timings[backend] = round(time_backend(op, backend, cases, device), 3)
        except Exception as exc:  # out of memory, a Triton compile error at shapes the check never tried
            log.warning("loss op %s: the %s backend failed when timed at %s (%s); it is not chosen", op, backend,
                        timing.shape, " ".join(str(exc).split())[:200])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timings


def time_backend(op: str, backend: str, cases, device: torch.device) -> float:
    """Milliseconds of one forward and backward of `op` on `backend` over `cases` (each case's median of
    TIMING_REPEATS, after a warm-up that also builds or compiles what the first call needs), summed.
    Gradients come from torch.autograd.grad, so no parameter's .grad is touched."""
    _, run = OPS[op]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    total = 0.0
    with torch.inference_mode(False), torch.autocast(device.type, enabled=False), torch.enable_grad():
        for args, grad_idx in cases:
            once = lambda: _evaluate(lambda *a: run(*a, backend), args, grad_idx,  # noqa: E731
                                     lambda x: x.detach().requires_grad_())
            once()
            samples = []
            for _ in range(TIMING_REPEATS):
                sync(device)
                started = time.perf_counter()
                once()
                sync(device)
                samples.append(time.perf_counter() - started)
            total += statistics.median(samples)
    return 1000 * total


def _backends_code_digest() -> str:
    """The code the backends run (csrc/, fastkd/ops/, the Triton kernels): a changed kernel is timed again,
    not judged by what its predecessor measured."""
    from importlib import resources

    from . import builder

    digest = hashlib.sha256()
    for folder in (builder.source_dir(), Path(__file__).parent, Path(str(resources.files("fastkd.kernels")))):
        for path in sorted(folder.glob("*.*")):
            if path.suffix in (".py", ".cpp", ".cu", ".h"):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _store_dir() -> Path:
    """This machine's timed `auto` choices: a folder per CPU kind (model and flags), thread count, torch
    and fastkd version, in the fastkd cache ($FASTKD_CACHE/auto-backends/; like the compiled extensions,
    a cache shared by a cluster's machines must not mix kinds). Removing it makes the next runs time again."""
    from .. import __version__
    from ..device import bf16_is_native
    from ..machine import cpu_flags, cpu_name

    # (bf16_is_native: an ISA cap changes which path the cpp op takes under bf16, and its speed)
    ident = [cpu_name(), sorted(f for f, on in cpu_flags().items() if on), torch.get_num_threads(),
             torch.__version__, __version__, _backends_code_digest(), bf16_is_native(torch.device("cpu"))]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    return default_cache_dir() / "auto-backends" / digest


def _store_key(op: str, device: torch.device, dtypes: str, shape: str) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{op} | {where} | {dtypes} | {shape}"


def _store_path(key: str) -> Path:
    # One file per choice: concurrent runs each add their own, none rewrites another's.
    return _store_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_store(key: str) -> dict:
    """The stored choice for `key` ({} where there is none, or it is unreadable or foreign: a cache)."""
    try:
        entry = json.loads(_store_path(key).read_text())
    except (OSError, ValueError):
        return {}
    if not (isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("backend"), str)
            and isinstance(entry.get("timings_ms"), dict)):
        return {}
    return entry


def _write_store(key: str, entry: dict) -> None:
    """Store one choice (written whole or not at all); a store that cannot be written costs the next run a
    timing, never this run its result."""
    try:
        atomic_write_json(_store_path(key), {"key": key, **entry})
    except OSError as exc:
        log.info("the timed loss-backend choice was not stored (%s): the next run times again", exc)


def pin(records: list[dict]) -> None:
    """Keep the `auto` choices of a run's start (its config.json's loss_selections) for its resume, and only
    those (earlier pins are dropped): the op then runs on the same backend, if it still passes its check,
    without timing again. A record without shapes (a run started before auto was timed: its loss_ops)
    pins the op at any shapes."""
    _pinned.clear()
    # The process's earlier `auto` decisions for run shapes are made again for this run (its pins first),
    # on the checks they ran: nothing of another run's choice carries over, and nothing is checked twice.
    _stale.update(k for k, s in _selected.items() if s.requested == "auto" and s.shape is not None)
    for r in records:
        try:
            if r.get("requested", "auto") == "auto" and (r.get("decided", "order") != "order" or r.get("shape")):
                _pinned[(str(r["op"]), torch.device(r["device"]).type, str(r["dtype"]), r.get("shape"))] = str(r["backend"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            log.warning("a loss-op choice in the resumed run's config.json is malformed (%r): that op decides "
                        "afresh", r)


def selections() -> list[dict]:
    """Every decision of this process."""
    return [asdict(s) for s in _selected.values()]


def reset() -> None:
    """Forget every decision, check and pin (tests)."""
    _selected.clear()
    _pinned.clear()
    _stale.clear()
