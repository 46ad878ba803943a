"""Which loss backends exist, which are present on a device, and the order `auto` tries them.

    torch   the reference (each op module's `reference`), always present; materialises S x S scores
    cpp     csrc/fused_loss_cpu.cpp, OpenMP; built on first use
    triton  the Triton kernels in the op modules (GPU; on a CPU only under TRITON_INTERPRET=1, for tests)
    cuda    csrc/fused_loss_cuda*.{cpp,cu}; built on first use on a GPU machine

`auto` takes the fastest present for the device: on a CPU cpp, then torch (measured:
benchmarks/loss_kernels.py); on a GPU triton, then cuda, then torch. A backend asked for but missing
is one log line and the next one in that order. FASTKD_LOSS_BACKEND sets the default request.
Presence is only the first gate: fastkd.ops.select self-checks each op on each backend before use.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import UserError
from ..kernels import runtime as triton_runtime
from . import builder

log = logging.getLogger(__name__)

from ..options import BACKENDS, LOSS_BACKENDS as CHOICES  # noqa: E402,F401  (one list of names, for the CLI too)
ENV = "FASTKD_LOSS_BACKEND"

_chains: dict[tuple[str, str], list[str]] = {}


def auto_order(device: torch.device) -> list[str]:
    # The interpreted Triton path on a CPU is correct but slow: only ever used when asked for by name.
    return ["triton", "cuda", "torch"] if device.type == "cuda" else ["cpp", "torch"]


def unavailable(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run on `device`, or None when it can (building an extension if needed)."""
    device = torch.device(device)
    if name == "torch":
        return None
    if name == "triton":
        if not triton_runtime.AVAILABLE:
            return triton_runtime.UNAVAILABLE_REASON
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a GPU (or TRITON_INTERPRET=1 on a CPU, slow, for tests)"
        return None
    if name == "cuda" and device.type != "cuda":
        return "the CUDA kernels need a GPU"
    if name == "cpp" and device.type != "cpu":
        return "the C++ kernels run on the CPU; this run is on " + device.type
    kind = "cuda" if name == "cuda" else "cpu"
    return None if builder.load(kind) is not None else builder.unavailable_reason(kind)


def requested(name: str | None) -> str:
    """The request: `name`, else $FASTKD_LOSS_BACKEND, else auto; refused in one line if unknown."""
    name = (name or os.environ.get(ENV) or "auto").lower()
    if name not in CHOICES:
        raise UserError(f"loss backend {name!r} is not one of {', '.join(CHOICES)} (--loss-backend or ${ENV})")
    return name


def present_chain(name: str | None, device: torch.device | str) -> list[str]:
    """The backends present for this request on this device, most wanted first; always ends in torch.
    A missing one is said once per process, with what runs instead."""
    device = torch.device(device)
    name = requested(name)
    key = (name, device.type)
    if key in _chains:
        return _chains[key]
    order = auto_order(device)
    wanted = order if name == "auto" else [name] + [b for b in order if b != name]
    chain, missing = [], []
    for candidate in wanted:
        why = unavailable(candidate, device)
        if why is None:
            chain.append(candidate)
        elif not chain:  # only what was skipped before the first present one is worth a line
            missing.append(f"{candidate}: {why}")
    if "torch" not in chain:
        chain.append("torch")
    if missing:
        log.warning("loss backend %s on %s: %s; using %s", name, device.type, "; ".join(missing), chain[0])
    _chains[key] = chain
    return chain


def resolve_backend(name: str | None, device: torch.device | str) -> str:
    """The first backend present for the request (before any op's self-check)."""
    return present_chain(name, device)[0]
