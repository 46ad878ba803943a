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


# The forward and backward of a compiled Q/K op (attention MSE, attention KL): `run(qs, ks, qt, kt,
# mask, scale_s, scale_t, need_grad)` returns (loss_sum, dqs, dks); the loss is loss_sum / count.
# Each op's Function passes its own `run`, looked up at call time (tests replace it).

def qk_forward(ctx, run, qs, ks, qt, kt, mask, scale_s: float, scale_t: float, count: torch.Tensor, grad: bool):
    need_grad = grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
    loss_sum, dqs, dks = run(qs, ks, qt, kt, mask, scale_s, scale_t, need_grad)
    ctx.count, ctx.scales, ctx.grads = count, (scale_s, scale_t), (dqs, dks) if need_grad else None
    ctx.save_for_backward(qs, ks, qt, kt, mask)
    return loss_sum / count


def qk_backward(ctx, run, grad_out):
    """Gradients for (qs, ks) and None for the other seven arguments of qk_forward."""
    qs, ks, qt, kt, mask = ctx.saved_tensors
    dqs, dks = hand_over(ctx, lambda: run(qs, ks, qt, kt, mask, *ctx.scales, True)[1:])
    scale = grad_out / ctx.count
    return (scaled(dqs, scale, qs.dtype), scaled(dks, scale, ks.dtype)) + (None,) * 7
