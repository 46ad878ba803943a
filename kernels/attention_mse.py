"""The attention-score MSE on Triton (fastkd.ops.attention_mse holds the op: formula, reference,
extension, dispatch).

Two flash-attention style kernels, memory O(B*H*S*d):
  rows, grid (cdiv(S, BLOCK_M), B*H): a block of query rows, loop over key blocks; a partial loss
        per program (summed by torch afterwards: deterministic, no float atomics) and dQs;
  cols, grid (cdiv(S, BLOCK_N), B*H): a block of key rows, loop over query blocks, recompute the
        (transposed) D tile, accumulate dKs.
Gradients are computed in the FORWARD when an input needs them (Liger-Kernel style), backward only
scales the saved buffers by grad_output / count: 2 passes over the S x S tiles instead of 3 with
recompute-in-backward. The price: no double backward (refused, like the extension's).
"""

from __future__ import annotations

import torch

from .runtime import interpreted, tl, triton
from .tiles import (accumulate, head_dims, held_block, held_tiles, pair_tiles, prepare_qk, real_tokens, scale_grad,
                    scores)


@triton.jit
def qk_mse_rows_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr,      # (B, H, S, ds) x2, (B, H, S, dt) x2, any strides
    mask_ptr,                            # (B, S) int8, contiguous; != 0 = real token
    end_ptr,                             # (B,) int32: 1 + index of the last real token (0: none)
    partial_ptr,                         # (B*H*cdiv(S, BLOCK_M),) float32
    dqs_ptr,                             # (B, H, S, ds) float32, contiguous; 2*scale_s*sum_j D ks
    S, H, DS, DT,
    scale_s, scale_t,
    sqs_b, sqs_h, sqs_s, sqs_d,
    sks_b, sks_h, sks_s, sks_d,
    sqt_b, sqt_h, sqt_s, sqt_d,
    skt_b, skt_h, skt_s, skt_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,   # next power of two >= max(d, 16)
    NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr,   # 16-bit operands straight into tl.dot
    PRECISION: tl.constexpr,                          # "ieee" or "tf32": float32 dots
    COMPUTE_GRAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, offs_m, row_in, row_real, n_end = held_block(pid_m, pid_bh, H, S, mask_ptr, end_ptr, BLOCK_M)
    offs_ds, ds_in, offs_dt, dt_in = head_dims(DS, DT, BLOCK_DS, BLOCK_DT)
    qs, qt = held_tiles(qs_ptr + b * sqs_b + h * sqs_h,
                        qt_ptr + b * sqt_b + h * sqt_h, offs_m, row_in,
                        offs_ds, ds_in, offs_dt, dt_in, sqs_s, sqs_d, sqt_s, sqt_d, NATIVE_S, NATIVE_T)
    ks_base = ks_ptr + b * sks_b + h * sks_h
    kt_base = kt_ptr + b * skt_b + h * skt_h

    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)    # per-row sums: a (BM, BN) accumulator costs registers
    dq = tl.zeros((BLOCK_M, BLOCK_DS), dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)        # (BN,)
        col_in, col_real = real_tokens(mask_ptr, b, S, offs_n)
        ks, kt = pair_tiles(ks_base, kt_base, offs_n, col_in, offs_ds, ds_in, offs_dt, dt_in,
                            sks_s, sks_d, skt_s, skt_d)
        # Same order as the reference: each model's score in fp32, scaled, then the difference.
        s = scores(qs, ks, scale_s, NATIVE_S, PRECISION)
        t = scores(qt, kt, scale_t, NATIVE_T, PRECISION)
        valid = row_real[:, None] & col_real[None, :]
        d = tl.where(valid, s - t, 0.0)
        loss += tl.sum(d * d, axis=1)
        if COMPUTE_GRAD:
            dq = accumulate(dq, d, ks, NATIVE_S, PRECISION)                       # (BM, BDS)

    tl.store(partial_ptr + pid_bh * tl.num_programs(0) + pid_m, tl.sum(loss, axis=0))
    if COMPUTE_GRAD:
        dq_ptrs = dqs_ptr + pid_bh.to(tl.int64) * S * DS + offs_m[:, None] * DS + offs_ds[None, :]
        tl.store(dq_ptrs, dq * (2.0 * scale_s), mask=row_in[:, None] & ds_in[None, :])


@triton.jit
def qk_mse_cols_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, end_ptr,
    dks_ptr,                             # (B, H, S, ds) float32, contiguous; 2*scale_s*sum_i D qs
    S, H, DS, DT,
    scale_s, scale_t,
    sqs_b, sqs_h, sqs_s, sqs_d,
    sks_b, sks_h, sks_s, sks_d,
    sqt_b, sqt_h, sqt_s, sqt_d,
    skt_b, skt_h, skt_s, skt_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, offs_n, col_in, col_real, m_end = held_block(pid_n, pid_bh, H, S, mask_ptr, end_ptr, BLOCK_N)
    offs_ds, ds_in, offs_dt, dt_in = head_dims(DS, DT, BLOCK_DS, BLOCK_DT)
    ks, kt = held_tiles(ks_ptr + b * sks_b + h * sks_h,
                        kt_ptr + b * skt_b + h * skt_h, offs_n, col_in,
                        offs_ds, ds_in, offs_dt, dt_in, sks_s, sks_d, skt_s, skt_d, NATIVE_S, NATIVE_T)
    qs_base = qs_ptr + b * sqs_b + h * sqs_h
    qt_base = qt_ptr + b * sqt_b + h * sqt_h

    dk = tl.zeros((BLOCK_N, BLOCK_DS), dtype=tl.float32)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in, row_real = real_tokens(mask_ptr, b, S, offs_m)
        qs, qt = pair_tiles(qs_base, qt_base, offs_m, row_in, offs_ds, ds_in, offs_dt, dt_in,
                            sqs_s, sqs_d, sqt_s, sqt_d)
        # D^T tile directly (keys x queries), so the dK update needs no transpose of D.
        s = scores(ks, qs, scale_s, NATIVE_S, PRECISION)                           # (BN, BM)
        t = scores(kt, qt, scale_t, NATIVE_T, PRECISION)
        valid = col_real[:, None] & row_real[None, :]
        d_t = tl.where(valid, s - t, 0.0)
        dk = accumulate(dk, d_t, qs, NATIVE_S, PRECISION)                          # (BN, BDS)

    dk_ptrs = dks_ptr + pid_bh.to(tl.int64) * S * DS + offs_n[:, None] * DS + offs_ds[None, :]
    tl.store(dk_ptrs, dk * (2.0 * scale_s), mask=col_in[:, None] & ds_in[None, :])


INTERPRETED = interpreted(qk_mse_rows_kernel)


def launch(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, grad_q: bool, grad_k: bool,
           block_m: int | None = None, block_n: int | None = None):
    """Run the kernels. Returns (loss float32 0-dim, count float32 0-dim >= 1,
    dqs_unscaled or None, dks_unscaled or None); the grads are float32 (B, H, S, ds) and still to be
    multiplied by grad_output / count."""
    run = prepare_qk(qs, ks, qt, kt, mask, INTERPRETED, block_m, block_n)
    B, H, S, DS, DT = run.B, run.H, run.S, run.DS, run.DT
    dev = qs.device
    n = run.real.sum(1)                                                     # (B,)
    count = (n * n).sum().mul(H).clamp(min=1).to(torch.float32)
    dqs = torch.empty((B, H, S, DS), device=dev, dtype=torch.float32) if grad_q else None
    dks = torch.empty((B, H, S, DS), device=dev, dtype=torch.float32) if grad_k else None
    if run.empty:
        zero = torch.zeros((), device=dev, dtype=torch.float32)
        return zero, count, None if dqs is None else dqs.zero_(), None if dks is None else dks.zero_()
    partial = torch.empty(B * H * run.grid_m, device=dev, dtype=torch.float32)
    qk_mse_rows_kernel[(run.grid_m, B * H)](
        qs, ks, qt, kt, run.mask8, run.end, partial, dqs if grad_q else partial,   # dummy pointer when unused
        S, H, DS, DT, float(scale_s), float(scale_t), *run.strides, COMPUTE_GRAD=grad_q, **run.constexprs)
    if grad_k:
        qk_mse_cols_kernel[(run.grid_n, B * H)](
            qs, ks, qt, kt, run.mask8, run.end, dks,
            S, H, DS, DT, float(scale_s), float(scale_t), *run.strides, **run.constexprs)
    return partial.sum() / count, count, dqs, dks


class TritonAttentionMse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s, scale_t, grad_enabled, block_m, block_n):
        grad_q = grad_enabled and ctx.needs_input_grad[0]
        grad_k = grad_enabled and ctx.needs_input_grad[1]
        loss, count, dqs, dks = launch(qs, ks, qt, kt, mask, scale_s, scale_t, grad_q=grad_q,
                                       grad_k=grad_k, block_m=block_m, block_n=block_n)
        ctx.save_for_backward(count, dqs, dks)
        ctx.dtypes = (qs.dtype, ks.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are not themselves differentiable
    def backward(ctx, grad_output):
        count, dqs, dks = ctx.saved_tensors
        scale = grad_output.float() / count
        return (scale_grad(dqs, scale, ctx.dtypes[0]), scale_grad(dks, scale, ctx.dtypes[1]),
                None, None, None, None, None, None, None, None)


def triton_attention_mse(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *,
                         block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """The Triton op on equal head counts, any strides (tests pass small blocks to exercise the tiling).

    qs, ks: (B, H, S, ds) student (differentiable); qt, kt: (B, H, S, dt) teacher (no gradient);
    mask: (B, S), nonzero = real token. Returns a float32 0-dim tensor; gradients for qs and ks come
    back in their dtypes."""
    # Under torch.no_grad needs_input_grad still reports requires_grad; skip the grad kernels then.
    return TritonAttentionMse.apply(qs, ks, qt, kt, mask, float(scale_s), float(scale_t),
                                    torch.is_grad_enabled(), block_m, block_n)
