"""Distillation-loss ops behind one interface, on several backends.

    torch   the reference (fastkd.losses), always present; materialises B x H x S x S scores
    cpp     csrc/fused_loss_cpu.cpp, OpenMP; built on first use
    triton  fastkd.kernels (GPU; on a CPU only under TRITON_INTERPRET=1, for tests)
    cuda    csrc/fused_loss_cuda*.{cpp,cu}; built on first use on a GPU machine

`auto` takes the fastest present for the device: on a CPU cpp, then torch (measured:
benchmarks/loss_kernels.py); on a GPU triton, then cuda, then torch. A backend asked for but missing
is one log line and the next one in that order. The environment variable FASTKD_LOSS_BACKEND sets
the default.

Head counts: equal counts compare head by head; different counts compare head-averaged scores. The
head average of q_h k_h^T equals [q_1 .. q_H][k_1 .. k_H]^T / H, so the fused ops see one "head" of
width H*d with the scale divided by H, and never average an S x S tensor. (The GPU kernels tile heads
up to 128 wide; wider merged heads use the reference on the single (B, 1, S, S) merged score tensor.)
"""

from __future__ import annotations

import logging
import os

import torch

from .. import losses as reference
from ..errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "cpp", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV = "FASTKD_LOSS_BACKEND"
GPU_MAX_HEAD_DIM = 128  # widest head the Triton/CUDA attention kernels tile (registers / shared memory)
HIDDEN_CHUNK_ROWS = 4096  # rows of the projected hidden state alive at once in the fused hidden loss (12 MiB at 768 wide)

_resolved: dict[tuple[str, str], str] = {}


def _auto_order(device: torch.device) -> list[str]:
    # The interpreted Triton path on a CPU is correct but slow: only ever used when asked for by name.
    return ["triton", "cuda", "torch"] if device.type == "cuda" else ["cpp", "torch"]


def unavailable(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run on `device`, or None when it can (building an extension if needed)."""
    if name == "torch":
        return None
    if name == "triton":
        from .. import kernels

        if not kernels.AVAILABLE:
            return kernels.UNAVAILABLE_REASON
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a GPU (or TRITON_INTERPRET=1 on a CPU, slow, for tests)"
        return None
    if name == "cuda" and device.type != "cuda":
        return "the CUDA kernels need a GPU"
    if name == "cpp" and device.type != "cpu":
        return "the C++ kernels run on the CPU; this run is on " + device.type
    from . import builder

    kind = "cuda" if name == "cuda" else "cpu"
    return None if builder.load(kind) is not None else builder.unavailable_reason(kind)


def resolve_backend(name: str | None, device: torch.device | str) -> str:
    """The backend that will run: `name` (or $FASTKD_LOSS_BACKEND, or auto) if present, else the next one."""
    device = torch.device(device)
    name = (name or os.environ.get(ENV) or "auto").lower()
    if name not in CHOICES:
        raise UserError(f"loss backend {name!r} is not one of {', '.join(CHOICES)} (--loss-backend or ${ENV})")
    key = (name, device.type)
    if key in _resolved:
        return _resolved[key]
    # A named backend that is missing falls back along the auto order.
    auto_order = _auto_order(device)
    candidates = auto_order if name == "auto" else [name] + [b for b in auto_order if b != name]
    chosen, missing = "torch", []
    for candidate in candidates:
        why = unavailable(candidate, device)
        if why is None:
            chosen = candidate
            break
        missing.append(f"{candidate}: {why}")
    if missing:
        # One line: what was asked for, why it (and any next one) is missing, what runs instead.
        log.warning("loss backend %s on %s: %s; using %s", name, device.type, "; ".join(missing), chosen)
    _resolved[key] = chosen
    return chosen


# --- the ops --------------------------------------------------------------------------------

def _merge_heads(q: torch.Tensor, k: torch.Tensor, scaling: float):
    """(B, H, S, d) -> (B, 1, S, H*d) with scaling / H: the head-averaged scores as one head."""
    B, H, S, d = q.shape
    merge = lambda x: x.transpose(1, 2).reshape(B, 1, S, H * d)  # noqa: E731
    return merge(q), merge(k), scaling / H


def _pair_count(mask: torch.Tensor, heads: int) -> torch.Tensor:
    n = mask.to(torch.float32).sum(-1)
    return (heads * (n * n).sum()).clamp(min=1.0)


def attention_mse_qk(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, backend: str) -> torch.Tensor:
    """Mean over heads and valid (i, j) of (scale_s qs ks^T - scale_t qt kt^T)^2, as losses.attention_mse."""
    if backend == "torch":
        return reference.attention_mse(reference.attention_scores(qs, ks, scale_s),
                                       reference.attention_scores(qt, kt, scale_t), mask)
    if qs.shape[1] != qt.shape[1]:
        qs, ks, scale_s = _merge_heads(qs, ks, scale_s)
        qt, kt, scale_t = _merge_heads(qt, kt, scale_t)
    if backend in ("triton", "cuda") and max(qs.shape[-1], qt.shape[-1]) > GPU_MAX_HEAD_DIM:
        # Heads too wide for the GPU tiles (merged heads, mostly: their scores are one (B, 1, S, S)
        # tensor, H times smaller than per-head scores, so the reference on them is affordable).
        return reference.attention_mse(reference.attention_scores(qs, ks, scale_s),
                                       reference.attention_scores(qt, kt, scale_t), mask)
    if backend == "triton":
        from .. import kernels

        return kernels.attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t)  # any strides: no copy
    from .extension import AttentionMseQK

    return AttentionMseQK.apply(qs, ks, qt, kt, mask, scale_s, scale_t, _pair_count(mask, qs.shape[1]),
                                torch.is_grad_enabled())


def attention_mse_scores(s, t, mask, backend: str) -> torch.Tensor:
    """losses.attention_mse for scores already held, in one fused pass."""
    if backend == "torch":
        return reference.attention_mse(s, t, mask)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    if backend == "triton":
        from .. import kernels

        return kernels.attention_mse_scores(s.contiguous(), t.contiguous(), mask)
    from .extension import AttentionMseScores

    return AttentionMseScores.apply(s, t, mask, _pair_count(mask, s.shape[1]), torch.is_grad_enabled())


def hidden_mse(hs, ht, mask, projection, backend: str) -> torch.Tensor:
    """losses.hidden_mse: mean over real tokens and teacher dims of (proj(hs) - ht)^2, never holding proj(hs) whole."""
    if backend == "torch":
        return reference.hidden_mse(hs, ht, mask, projection)
    weight = None if projection is None else projection.weight
    bias = None if projection is None else projection.bias
    if backend == "triton":
        from .. import kernels

        return kernels.hidden_mse(hs.contiguous(), ht.contiguous(), mask, weight, bias, chunk_rows=HIDDEN_CHUNK_ROWS)
    from .extension import ProjectedMse

    Ds, Dt = hs.shape[-1], ht.shape[-1]
    rows = mask.reshape(-1)
    count = (rows.to(torch.float32).sum() * Dt).clamp(min=1.0)
    return ProjectedMse.apply(hs.reshape(-1, Ds), ht.reshape(-1, Dt), rows, weight, bias, count, HIDDEN_CHUNK_ROWS,
                              torch.is_grad_enabled())
