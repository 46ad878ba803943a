"""What the Triton ops share: the device check in front of every launch."""

from __future__ import annotations

import torch


def check_device(interpreted: bool, *tensors: torch.Tensor) -> None:
    """All inputs on one device, and a GPU unless the kernels run under the interpreter."""
    dev = tensors[0].device
    if any(x.device != dev for x in tensors):
        raise ValueError("fastkd.kernels: all inputs must be on the same device")
    if dev.type != "cuda" and not interpreted:
        raise RuntimeError("fastkd.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                           f"is imported, for the CPU interpreter); got {dev}")
