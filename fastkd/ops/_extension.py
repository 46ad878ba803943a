"""What the compiled (cpp / cuda) halves of the op modules share: the module for a device and the
conventions of their autograd Functions.

Every compiled op returns the *unnormalised* loss sum and, when a gradient is wanted, its gradients
computed in the same pass (Liger-Kernel style: no second pass, nothing of size S x S saved). The
loss is the sum divided by the number of valid elements (`count`, a 0-dim tensor on the device, so
no host sync); backward only scales the stored gradients by grad_output / count. Whether to compute
them is the caller's `grad` flag (torch.is_grad_enabled() outside the Function): inside forward,
grad mode is always off and needs_input_grad stays True even under torch.no_grad(), which would
compute gradients nobody asked for.
"""

from __future__ import annotations

import torch

from . import builder


def module_for(device: torch.device):
    """The compiled extension for `device` (built on first use), or RuntimeError with the reason."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    module = builder.load(kind)
    if module is None:
        raise RuntimeError(f"the {kind} loss extension is unavailable: {builder.unavailable_reason(kind)}")
    return module


def no_autocast(device: torch.device):
    # The kernels choose their own precision; under autocast the ATen GEMMs they call would
    # otherwise be cast down to bf16 behind their back.
    return torch.autocast(device.type, enabled=False)


def f32(x: torch.Tensor) -> torch.Tensor:
    """float32 and contiguous; float64 stays float64 (the C++ kernels take it, for gradcheck)."""
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def empty_like_f32(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=f32(like[:0]).dtype, device=like.device)


def hand_over(ctx, recompute) -> list:
    """The gradients computed in forward, handed over once, so backward scales them in place (no copy
    next to them: at S=512 that copy was as large as the rest of the op's memory). A second backward
    through a retained graph (gradcheck does one) finds them taken and recomputes them."""
    grads, ctx.grads = ctx.grads, None
    return list(grads) if grads is not None else recompute()


def scaled(grad, scale, dtype):
    return None if grad is None else grad.mul_(scale).to(dtype)
