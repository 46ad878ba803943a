"""Autograd functions over the compiled loss extensions: one wrapper for the `cpp` and `cuda` backends.

Both modules export the same three functions, which return the *unnormalised* loss sum and, when a
gradient is wanted, its gradients computed in the same pass (Liger-Kernel style: no second pass,
nothing of size S x S saved). The loss is the sum divided by the number of valid elements (`count`, a
0-dim tensor on the device, so no host sync); backward only scales the stored gradients by
grad_output / count. Whether to compute them is the caller's `grad` flag (torch.is_grad_enabled()
outside the Function): inside forward, grad mode is always off and needs_input_grad stays True even
under torch.no_grad(), which would compute gradients nobody asked for.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import builder


def module_for(device: torch.device):
    return builder.load("cuda" if device.type == "cuda" else "cpu")


def _no_autocast(device: torch.device):
    # The kernels compute in float32 by design; under autocast the ATen GEMMs they call would
    # otherwise be cast down to bf16 behind their back.
    return torch.autocast(device.type, enabled=False)


def _f32(x: torch.Tensor) -> torch.Tensor:
    # The kernels compute in float32; float64 stays float64 (the C++ kernels take it, for gradcheck).
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=_f32(like[:0]).dtype, device=like.device)


def _hand_over(ctx, recompute) -> list:
    """The gradients computed in forward, handed over once, so backward scales them in place (no copy
    next to them: at S=512 that copy was as large as the rest of the op's memory). A second backward
    through a retained graph (gradcheck does one) finds them taken and recomputes them."""
    grads, ctx.grads = ctx.grads, None
    return list(grads) if grads is not None else recompute()


def _scaled(grad, scale, dtype):
    return None if grad is None else grad.mul_(scale).to(dtype)


class AttentionMseQK(torch.autograd.Function):
    @staticmethod
    def run(qs, ks, qt, kt, mask, scale_s, scale_t, need_grad):
        with _no_autocast(qs.device):
            return module_for(qs.device).attention_mse_qk(
                _f32(qs), _f32(ks), _f32(qt), _f32(kt), mask.bool().contiguous(), float(scale_s), float(scale_t),
                need_grad)

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s: float, scale_t: float, count: torch.Tensor, grad: bool):
        need_grad = grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        loss_sum, dqs, dks = AttentionMseQK.run(qs, ks, qt, kt, mask, scale_s, scale_t, need_grad)
        ctx.count, ctx.scales, ctx.grads = count, (scale_s, scale_t), (dqs, dks) if need_grad else None
        ctx.save_for_backward(qs, ks, qt, kt, mask)
        return loss_sum / count

    @staticmethod
    @once_differentiable  # the gradients are not themselves differentiable: no double backward
    def backward(ctx, grad_out):
        qs, ks, qt, kt, mask = ctx.saved_tensors
        dqs, dks = _hand_over(ctx, lambda: AttentionMseQK.run(qs, ks, qt, kt, mask, *ctx.scales, True)[1:])
        scale = grad_out / ctx.count
        return _scaled(dqs, scale, qs.dtype), _scaled(dks, scale, ks.dtype), None, None, None, None, None, None, None


class AttentionMseScores(torch.autograd.Function):
    @staticmethod
    def run(s, t, mask, need_grad):
        with _no_autocast(s.device):
            return module_for(s.device).attention_mse_scores(_f32(s), _f32(t), mask.bool().contiguous(), need_grad)

    @staticmethod
    def forward(ctx, s, t, mask, count: torch.Tensor, grad: bool):
        need_grad = grad and ctx.needs_input_grad[0]
        loss_sum, grad = AttentionMseScores.run(s, t, mask, need_grad)
        ctx.count, ctx.grads = count, (grad,) if need_grad else None
        ctx.save_for_backward(s, t, mask)
        return loss_sum / count

    @staticmethod
    @once_differentiable  # the gradients are not themselves differentiable: no double backward
    def backward(ctx, grad_out):
        s, t, mask = ctx.saved_tensors
        (grad,) = _hand_over(ctx, lambda: AttentionMseScores.run(s, t, mask, True)[1:])
        return _scaled(grad, grad_out / ctx.count, s.dtype), None, None, None, None


class ProjectedMse(torch.autograd.Function):
    @staticmethod
    def run(hs, ht, row_mask, weight, bias, chunk_rows, need_grad):
        w = _f32(weight) if weight is not None else _empty(hs)
        b = _f32(bias) if bias is not None else _empty(hs)
        with _no_autocast(hs.device):
            loss_sum, dhs, dw, db = module_for(hs.device).projected_mse(
                _f32(hs), _f32(ht), row_mask.bool().contiguous(), w, b, need_grad, int(chunk_rows))
        return loss_sum, dhs, dw if weight is not None else None, db if bias is not None else None

    @staticmethod
    def forward(ctx, hs, ht, row_mask, weight, bias, count: torch.Tensor, chunk_rows: int, grad: bool):
        need_grad = grad and any(ctx.needs_input_grad[i] for i in (0, 3, 4))
        loss_sum, *grads = ProjectedMse.run(hs, ht, row_mask, weight, bias, chunk_rows, need_grad)
        ctx.count, ctx.chunk_rows, ctx.grads = count, chunk_rows, grads if need_grad else None
        ctx.save_for_backward(hs, ht, row_mask, weight, bias)
        return loss_sum / count

    @staticmethod
    @once_differentiable  # the gradients are not themselves differentiable: no double backward
    def backward(ctx, grad_out):
        hs, ht, row_mask, weight, bias = ctx.saved_tensors
        dhs, dw, db = _hand_over(ctx, lambda: ProjectedMse.run(hs, ht, row_mask, weight, bias, ctx.chunk_rows, True)[1:])
        scale = grad_out / ctx.count
        return (_scaled(dhs, scale, hs.dtype), None, None, _scaled(dw, scale, None if weight is None else weight.dtype),
                _scaled(db, scale, None if bias is None else bias.dtype), None, None, None)
