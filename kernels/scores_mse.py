"""Op 2: attention-score MSE from materialised scores, loss and gradient in one pass.

    s, t: (B, H, S, S) student / teacher pre-softmax scores; mask (B, S), nonzero = real token
    loss  = sum_{valid (b,h,i,j)} (s - t)^2 / max(H * sum_b n_b^2, 1)
    dL/ds = 2 (s - t) valid / count

The kernel reads s and t once and, when s needs a gradient, writes G = 2 (s - t) valid in the same
pass (Liger-Kernel style, in forward), so backward never touches s or t again; it only scales G by
grad_output / count. G is kept in float32 whatever the input dtype: scaling a 16-bit G later would
round twice, and the contract is float32 math with one final cast to the input dtype.
Loss: one partial sum per program, summed by torch (deterministic, no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._common import check_device


@triton.jit
def _scores_mse_kernel(
    s_ptr, t_ptr,                 # (B, H, S, S), contiguous, any float dtype
    mask_ptr,                     # (B, S) int8, contiguous
    grad_ptr,                     # (B, H, S, S) float32: 2 (s - t) valid (unscaled by the count)
    partial_ptr,                  # (B*H*cdiv(S, BLOCK_R),) float32
    S, H,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    base = pid_bh.to(tl.int64) * S * S

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)    # (BR,) query rows
    row_in = offs_r < S
    row_real = tl.load(mask_ptr + b * S + offs_r, mask=row_in, other=0) != 0
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for start_c in range(0, S, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)        # (BC,) key columns
        col_in = offs_c < S
        col_real = tl.load(mask_ptr + b * S + offs_c, mask=col_in, other=0) != 0
        offs = base + offs_r[:, None] * S + offs_c[None, :]
        # Invalid pairs are never read (saves bandwidth on padding); both load as 0, so s - t is
        # already 0 there, and garbage such as -inf in padded scores cannot leak in.
        valid = row_real[:, None] & col_real[None, :]   # implies in bounds
        s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        d = s - t
        acc += d * d
        if WRITE_GRAD:
            tl.store(grad_ptr + offs, 2.0 * d, mask=row_in[:, None] & col_in[None, :])
    tl.store(partial_ptr + pid_bh * tl.num_programs(0) + pid_r, tl.sum(tl.sum(acc, axis=1), axis=0))


_INTERPRETED = isinstance(_scores_mse_kernel, InterpretedFunction)


def _block_sizes(S: int, block_r: int | None, block_c: int | None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): a memory-bound stream, so ~2048 elements per tile (16 per
    thread at 4 warps) with whole-row-wide tiles up to 256 columns for coalesced loads."""
    cap = triton.next_power_of_2(max(S, 1))
    bc = block_c or min(256, max(16, cap))          # floors: tiny S just masks lanes off
    br = block_r or min(2048 // bc, max(2, cap))
    for blk in (br, bc):
        if blk & (blk - 1):
            raise ValueError(f"block sizes must be powers of two, got {blk}")
    return br, bc, 4


def _check_device(*tensors: torch.Tensor) -> None:
    check_device(_INTERPRETED, *tensors)


def _scores_mse_launch(s, t, mask, *, write_grad: bool, block_r: int | None = None,
                       block_c: int | None = None):
    """Returns (loss float32 0-dim, count float32 0-dim >= 1, grad float32 (B, H, S, S) or None);
    the grad is still to be multiplied by grad_output / count."""
    if s.dim() != 4 or s.shape[-1] != s.shape[-2] or t.shape != s.shape:
        raise ValueError(f"s, t must both be (B, H, S, S); got {tuple(s.shape)}, {tuple(t.shape)}")
    B, H, S, _ = s.shape
    if mask.shape != (B, S):
        raise ValueError(f"mask must be (B, S) = {(B, S)}; got {tuple(mask.shape)}")
    _check_device(s, t, mask)
    dev = s.device

    real = mask.bool()
    n = real.sum(1)
    count = (n * n).sum().mul(H).clamp(min=1).to(torch.float32)
    grad = torch.empty((B, H, S, S), device=dev, dtype=torch.float32) if write_grad else None
    if B * H * S == 0:
        return torch.zeros((), device=dev, dtype=torch.float32), count, grad

    br, bc, num_warps = _block_sizes(S, block_r, block_c)
    grid_r = triton.cdiv(S, br)
    partial = torch.empty(B * H * grid_r, device=dev, dtype=torch.float32)
    _scores_mse_kernel[(grid_r, B * H)](
        s.contiguous(), t.contiguous(), real.to(torch.int8).contiguous(),
        grad if write_grad else partial, partial,           # dummy pointer when no grad is written
        S, H, BLOCK_R=br, BLOCK_C=bc, WRITE_GRAD=write_grad, num_warps=num_warps)
    return partial.sum() / count, count, grad


class _ScoresMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, mask, grad_enabled, block_r, block_c):
        write_grad = grad_enabled and ctx.needs_input_grad[0]
        loss, count, grad = _scores_mse_launch(s, t, mask, write_grad=write_grad,
                                               block_r=block_r, block_c=block_c)
        ctx.save_for_backward(count, grad)
        ctx.dtype = s.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        count, grad = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        # Out of place, rounded once into the input dtype: an in-place scale of the saved buffer
        # would be applied again by a second backward (retain_graph=True).
        out = torch.empty(grad.shape, device=grad.device, dtype=ctx.dtype)
        torch.mul(grad, grad_output.float() / count, out=out)
        return out, None, None, None, None, None


def _attention_mse_scores(s, t, mask, *, block_r: int | None = None,
                          block_c: int | None = None) -> torch.Tensor:
    """attention_mse_scores with explicit block sizes (tests use small ones)."""
    return _ScoresMSE.apply(s, t, mask, torch.is_grad_enabled(), block_r, block_c)


def attention_mse_scores(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over heads and valid (query, key) pairs of (s - t)^2.

    s: (B, H, S, S) student scores (differentiable); t: same shape, teacher (no gradient);
    mask: (B, S), nonzero = real token. Returns a float32 0-dim tensor; the gradient for s comes back
    in s's dtype. Equals fastkd.losses.attention_mse with equal head counts.
    """
    return _attention_mse_scores(s, t, mask)
