"""What machine and software a run, a benchmark or a CI log came from: the CPU and the instruction
sets that change which kernels run (AVX2, AVX512, AVX512-BF16, AMX), the torch build and what it
dispatches to, and the libraries' versions. `python -m fastkd.machine` prints it (CI does, before
the tests), so a red run on one kind of machine can be told from its log."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

# CPU flags (as /proc/cpuinfo names them) that decide which kernels torch and oneDNN run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
# Environment variables that cap those kernels (the AVX2 runs on a newer CPU set both).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")
LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "sentence-transformers", "deepspeed", "triton",
             "safetensors", "numpy", "scipy", "scikit-learn", "huggingface-hub", "accelerate", "pytest")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux), empty elsewhere."""
    out = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough: they are alike
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """Each flag of ISA_FLAGS: does this CPU have it."""
    present = set(_cpuinfo().get("flags", "").split())
    return {flag: flag in present for flag in ISA_FLAGS}


def cores() -> int:
    """The cores this process may use (a container or a job's affinity may give fewer than the host has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _probe(read, default=None):
    """One torch probe (some are private APIs that a torch release may drop): never the reason a CI
    log or a benchmark fails to say what machine it ran on."""
    try:
        return read()
    except Exception:  # noqa: BLE001
        return default


def describe() -> dict:
    """Everything above, JSON-ready (benchmarks store it beside their numbers)."""
    import torch

    info = {"cpu": cpu_name(), "cores": cores(), "isa": [f for f, on in cpu_flags().items() if on],
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "aten_cpu_capability": _probe(torch.backends.cpu.get_cpu_capability, "unknown"),
            "onednn_bf16": _probe(lambda: bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())),
            "torch_cuda_build": torch.version.cuda, "versions": versions()}
    if _probe(torch.cuda.is_available, False):
        info["gpu"] = _probe(torch.cuda.get_device_name)
    return info


def summary(info: dict | None = None) -> str:
    info = info or describe()
    onednn = {True: "native", False: "absent", None: "unknown"}[info["onednn_bf16"]]
    build = f"CUDA {info['torch_cuda_build']}" if info["torch_cuda_build"] else "CPU build"
    lines = [f"cpu: {info['cpu']}, {info['cores']} cores available",
             "isa: " + ", ".join(f"{f} {'yes' if f in info['isa'] else 'no'}" for f in ISA_FLAGS),
             f"caps: {', '.join(f'{k}={v}' for k, v in info['isa_caps'].items()) or 'none'}",
             f"torch: {info['versions']['torch']} ({build}), ATen kernels {info['aten_cpu_capability']}, "
             f"oneDNN bf16 {onednn}, {info['torch_threads']} threads, python {info['python']}"]
    if info.get("gpu"):
        lines.append(f"gpu: {info['gpu']}")
    lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v is not None))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
