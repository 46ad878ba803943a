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

Tolerances, relative to the largest reference entry: float32 1e-4 (TF32 allowed: 1e-2); 16-bit
inputs: the loss 1e-3 (the products are exact in float32, only the summation order differs), the
gradients one unit of the dtype's epsilon (0.78% for bf16): they are rounded once into the input
dtype, half an epsilon, and a 16-bit tensor-core gradient rounds the score difference once more;
emulating that path on the check's cases gives at most 0.46 epsilon, so a 1% error is caught.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

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


_selected: dict[tuple[str, str, str, str], Selection] = {}


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
                teacher_dtype: torch.dtype | None = None) -> str:
    """The backend `op` runs on for student inputs of `dtype` and teacher inputs of `teacher_dtype`
    (default the same) on `device`, decided once per process (what a loss ran: DistillLoss.ran_on)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = requested(request)
    teacher_dtype = teacher_dtype or dtype
    key = (op, name, str(device), dtype_label(dtype, teacher_dtype))
    if key in _selected:
        return _selected[key].backend
    module, _ = OPS[op]
    chain = [b for b in present_chain(name, device) if b in module.FUSED or b == "torch"]
    if chain == ["torch"] and name not in ("torch", "auto"):
        log.info("loss op %s has no %s backend; the torch reference runs", op, name)
    skip = os.environ.get(ENV, "1").strip() == "0"
    failures = []
    for backend in chain:
        if backend == "torch":
            outcome = "reference"
        elif skip:
            outcome = f"skipped (${ENV}=0)"
        else:
            why = check(op, backend, device, dtype, teacher_dtype)
            if why is not None:
                following = chain[chain.index(backend) + 1]
                log.warning("loss op %s: the %s backend on %s (%s) failed its self-check: %s; using %s",
                            op, backend, device, dtype_label(dtype, teacher_dtype), why, following)
                failures.append(f"{backend}: {why}")
                continue
            outcome = "passed"
        if failures:
            outcome = f"{outcome} after {'; '.join(failures)}"
        _selected[key] = Selection(op, str(device), dtype_label(dtype, teacher_dtype), name, backend, outcome)
        return backend
    raise AssertionError("unreachable: the chain always ends in torch")


def selections() -> list[dict]:
    """Every decision of this process."""
    return [asdict(s) for s in _selected.values()]


def reset() -> None:
    """Forget every decision (tests)."""
    _selected.clear()
