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
    """Whether bf16 autocast has native kernels on `device`, so that it pays: a GPU of compute
    capability 8.0 or newer (Ampere on; older ones emulate it), or a CPU whose oneDNN takes bf16 GEMMs
    (AVX512 / AMX). On an AVX2-only CPU bf16 GEMMs fall back to ATen's reference loops: a distillation
    step measured about 16x slower than float32 (README, The whole pipeline)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators: trust the user's flag


def bf16_absence(device: torch.device) -> str:
    """What the machine lacks, for the one line that says bf16 is emulated here."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}, bf16 needs 8.0) emulates bf16"
    return f"this CPU (capability {torch.backends.cpu.get_cpu_capability()}) has no oneDNN bf16 kernels"


def warn_if_bf16_emulated(device: torch.device) -> None:
    """One line per process when --bf16 was asked for where it runs emulated (kept: the user asked)."""
    global _said_bf16
    if _said_bf16 or bf16_is_native(device):
        return
    _said_bf16 = True
    import logging

    logging.getLogger(__name__).warning("--bf16: %s, so bf16 runs far slower than float32 here (about 16x measured on an "
                                        "AVX2 CPU); drop --bf16 on this machine", bf16_absence(device))


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for `device` here (one line), or None: inductor writes C++ for a
    CPU (a compiler, $CXX or c++) and Triton for a GPU."""
    import os
    import shutil

    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "--compile on a GPU needs Triton (pip install triton, or a torch build that brings it); drop --compile"
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"--compile on a CPU needs a C++ compiler ({compiler!r} not found; set $CXX); drop --compile"
    return None


def isolate_compile_cache() -> str | None:
    """Point torch.compile's kernel cache ($TORCHINDUCTOR_CACHE_DIR) at a folder of the fastkd cache for this
    CPU (model and kernel-deciding flags), its ISA caps and torch version; a folder the user chose, other than
    torch's default, is left alone. Inductor's own cache keys missed ATEN_CPU_CAPABILITY: a run capped to AVX2
    after an uncapped one reused its kernels and its first loss came out as 2e26 (torch 2.13, measured).
    Returns the folder chosen, or None."""
    import hashlib
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    from .file_identity import default_cache_dir
    from .machine import ISA_CAPS, cpu_flags, cpu_name

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # (torch writes its default into the variable when it first asks: that one is not the user's choice)
    if chosen and os.path.abspath(chosen) != os.path.abspath(torch_default()):
        return None
    caps = {name: os.environ.get(name, "") for name in ISA_CAPS}
    key = hashlib.sha256(repr((cpu_name(), cpu_flags(), caps, torch.__version__)).encode()).hexdigest()[:16]
    folder = str(default_cache_dir() / "inductor" / key)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
