"""Which device a command runs on."""

from __future__ import annotations

import torch

from .errors import UserError


def pick_device(name: str) -> torch.device:
    """auto -> cuda when a GPU is visible, else cpu; cuda without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible to this torch build; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None


_said_bf16 = False


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 autocast has native kernels on `device`, so that it pays: a GPU that supports bf16,
    or a CPU whose oneDNN takes bf16 GEMMs (AVX512 / AMX). On an AVX2-only CPU bf16 GEMMs fall back to
    ATen's reference loops: a distillation step measured 18x slower than float32 (README, Distill)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators: trust the user's flag


def warn_if_bf16_emulated(device: torch.device) -> None:
    """One line per process when --bf16 was asked for where it runs emulated (kept: the user asked)."""
    global _said_bf16
    if _said_bf16 or bf16_is_native(device):
        return
    _said_bf16 = True
    import logging

    logging.getLogger(__name__).warning(
        "--bf16 on this %s: no native bf16 kernels (oneDNN reports none; CPU capability %s), so bf16 GEMMs run "
        "ATen's slow reference loops (a distillation step measured 18x slower than float32); drop --bf16 here",
        device.type, torch.backends.cpu.get_cpu_capability())
