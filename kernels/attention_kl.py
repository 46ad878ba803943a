"""The attention-distribution KL (MiniLM; MiniLMv2's relations with k = q) on Triton
(fastkd.ops.attention_kl holds the op: formula, reference, extension, dispatch).

Flash-attention style, memory O(B*H*S*d), gradients computed in the forward:
  rows, grid (cdiv(S, BLOCK_M), B*H): a block of query rows; pass 1 over key blocks: online
        log-sum-exp of both models' scores; pass 2: the KL and dQ = scale_s sum_j (p_s - p_t) k_j;
        the row log-sum-exps are stored for
  cols, grid (cdiv(S, BLOCK_N), B*H): a block of keys; loop over query blocks, recompute both
        transposed score tiles, G^T = p_s^T - p_t^T from the stored log-sum-exps, dK += G^T Q.
Keys are masked to -inf before the softmax; padded queries contribute nothing.
"""

from __future__ import annotations

import torch

from .runtime import interpreted, tl, triton
from .tiles import (accumulate, head_dims, held_block, held_tiles, pair_tiles, prepare_qk, real_tokens, scale_grad,
                    scores)


@triton.jit
def kl_rows_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, end_ptr,
    partial_ptr,                         # (B*H*cdiv(S, BLOCK_M),) float32
    lse_ptr,                             # (2, B, H, S) float32: student's, teacher's row log-sum-exps
    dqs_ptr,                             # (B, H, S, ds) float32; scale_s * sum_j G k_j
    S, H, DS, DT, scale_s, scale_t,
    sqs_b, sqs_h, sqs_s, sqs_d, sks_b, sks_h, sks_s, sks_d,
    sqt_b, sqt_h, sqt_s, sqt_d, skt_b, skt_h, skt_s, skt_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, offs_m, row_in, row_real, end = held_block(pid_m, pid_bh, H, S, mask_ptr, end_ptr, BLOCK_M)
    offs_ds, ds_in, offs_dt, dt_in = head_dims(DS, DT, BLOCK_DS, BLOCK_DT)
    qs, qt = held_tiles(qs_ptr + b * sqs_b + h * sqs_h,
                        qt_ptr + b * sqt_b + h * sqt_h, offs_m, row_in,
                        offs_ds, ds_in, offs_dt, dt_in, sqs_s, sqs_d, sqt_s, sqt_d, NATIVE_S, NATIVE_T)
    ks_base = ks_ptr + b * sks_b + h * sks_h
    kt_base = kt_ptr + b * skt_b + h * skt_h

    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, end, BLOCK_N):               # pass 1: both row log-sum-exps
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_in, col_real = real_tokens(mask_ptr, b, S, offs_n)
        ks, kt = pair_tiles(ks_base, kt_base, offs_n, col_in, offs_ds, ds_in, offs_dt, dt_in,
                            sks_s, sks_d, skt_s, skt_d)
        s = tl.where(col_real[None, :], scores(qs, ks, scale_s, NATIVE_S, PRECISION), float("-inf"))
        t = tl.where(col_real[None, :], scores(qt, kt, scale_t, NATIVE_T, PRECISION), float("-inf"))
        new_s = tl.maximum(m_s, tl.max(s, axis=1))
        new_t = tl.maximum(m_t, tl.max(t, axis=1))
        safe_s = tl.where(new_s == float("-inf"), 0.0, new_s)   # a block of padded keys only
        safe_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        l_s = l_s * tl.exp(m_s - safe_s) + tl.sum(tl.exp(s - safe_s[:, None]), axis=1)
        l_t = l_t * tl.exp(m_t - safe_t) + tl.sum(tl.exp(t - safe_t[:, None]), axis=1)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(tl.maximum(l_s, 1e-30))  # l = 0 only where m = -inf (no real key): lse -inf
    lse_t = m_t + tl.log(tl.maximum(l_t, 1e-30))

    kl = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_DS), dtype=tl.float32)
    for start_n in range(0, end, BLOCK_N):               # pass 2: the KL and dQ
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_in, col_real = real_tokens(mask_ptr, b, S, offs_n)
        ks, kt = pair_tiles(ks_base, kt_base, offs_n, col_in, offs_ds, ds_in, offs_dt, dt_in,
                            sks_s, sks_d, skt_s, skt_d)
        s = scores(qs, ks, scale_s, NATIVE_S, PRECISION)
        t = scores(qt, kt, scale_t, NATIVE_T, PRECISION)
        valid = row_real[:, None] & col_real[None, :]
        logp_s = s - lse_s[:, None]
        logp_t = t - lse_t[:, None]
        p_t = tl.where(valid, tl.exp(logp_t), 0.0)
        kl += tl.sum(tl.where(valid, p_t * (logp_t - logp_s), 0.0), axis=1)
        if COMPUTE_GRAD:
            g = tl.where(valid, tl.exp(logp_s) - p_t, 0.0)
            dq = accumulate(dq, g, ks, NATIVE_S, PRECISION)

    tl.store(partial_ptr + pid_bh * tl.num_programs(0) + pid_m, tl.sum(kl, axis=0))
    if COMPUTE_GRAD:
        row_off = pid_bh.to(tl.int64) * S + offs_m
        tl.store(lse_ptr + row_off, lse_s, mask=row_in)
        tl.store(lse_ptr + (tl.num_programs(1) * S).to(tl.int64) + row_off, lse_t, mask=row_in)
        dq_ptrs = dqs_ptr + pid_bh.to(tl.int64) * S * DS + offs_m[:, None] * DS + offs_ds[None, :]
        tl.store(dq_ptrs, dq * scale_s, mask=row_in[:, None] & ds_in[None, :])


@triton.jit
def kl_cols_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, mask_ptr, end_ptr, lse_ptr,
    dks_ptr,                             # (B, H, S, ds) float32; scale_s * sum_i G_ij q_i
    S, H, DS, DT, scale_s, scale_t,
    sqs_b, sqs_h, sqs_s, sqs_d, sks_b, sks_h, sks_s, sks_d,
    sqt_b, sqt_h, sqt_s, sqt_d, skt_b, skt_h, skt_s, skt_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr, PRECISION: tl.constexpr,
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
    lse_t_base = lse_ptr + (tl.num_programs(1) * S).to(tl.int64)

    dk = tl.zeros((BLOCK_N, BLOCK_DS), dtype=tl.float32)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in, row_real = real_tokens(mask_ptr, b, S, offs_m)
        qs, qt = pair_tiles(qs_base, qt_base, offs_m, row_in, offs_ds, ds_in, offs_dt, dt_in,
                            sqs_s, sqs_d, sqt_s, sqt_d)
        row_off = pid_bh.to(tl.int64) * S + offs_m
        lse_s = tl.load(lse_ptr + row_off, mask=row_in, other=0.0)
        lse_t = tl.load(lse_t_base + row_off, mask=row_in, other=0.0)
        s = scores(ks, qs, scale_s, NATIVE_S, PRECISION)                  # (BN, BM): transposed scores
        t = scores(kt, qt, scale_t, NATIVE_T, PRECISION)
        valid = col_real[:, None] & row_real[None, :]
        g_t = tl.where(valid, tl.exp(s - lse_s[None, :]) - tl.exp(t - lse_t[None, :]), 0.0)
        dk = accumulate(dk, g_t, qs, NATIVE_S, PRECISION)

    dk_ptrs = dks_ptr + pid_bh.to(tl.int64) * S * DS + offs_n[:, None] * DS + offs_ds[None, :]
    tl.store(dk_ptrs, dk * scale_s, mask=col_in[:, None] & ds_in[None, :])


INTERPRETED = interpreted(kl_rows_kernel)


def launch(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, grad_q: bool, grad_k: bool,
           block_m: int | None = None, block_n: int | None = None):
    """Returns (loss float32 0-dim, count, dqs or None, dks or None), the gradients float32 and still to
    be multiplied by grad_output / count (count: heads x real queries, at least 1)."""
    run = prepare_qk(qs, ks, qt, kt, mask, INTERPRETED, block_m, block_n)
    B, H, S, DS, DT = run.B, run.H, run.S, run.DS, run.DT
    dev = qs.device
    count = (H * run.real.to(torch.float32).sum()).clamp(min=1.0)
    grad = grad_q or grad_k
    dqs = torch.zeros((B, H, S, DS), device=dev, dtype=torch.float32) if grad else None
    dks = torch.zeros((B, H, S, DS), device=dev, dtype=torch.float32) if grad_k else None
    if run.empty:
        return torch.zeros((), device=dev, dtype=torch.float32), count, dqs if grad_q else None, dks
    lse = torch.empty((2, B, H, S), device=dev, dtype=torch.float32) if grad else None
    partial = torch.empty(B * H * run.grid_m, device=dev, dtype=torch.float32)
    kl_rows_kernel[(run.grid_m, B * H)](
        qs, ks, qt, kt, run.mask8, run.end, partial, lse if grad else partial, dqs if grad else partial,
        S, H, DS, DT, float(scale_s), float(scale_t), *run.strides, COMPUTE_GRAD=grad, **run.constexprs)
    if grad_k:
        kl_cols_kernel[(run.grid_n, B * H)](
            qs, ks, qt, kt, run.mask8, run.end, lse, dks, S, H, DS, DT, float(scale_s), float(scale_t),
            *run.strides, **run.constexprs)
    return partial.sum() / count, count, dqs if grad_q else None, dks


class TritonAttentionKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s, scale_t, grad_enabled, block_m, block_n):
        grad_q = grad_enabled and ctx.needs_input_grad[0]
        grad_k = grad_enabled and ctx.needs_input_grad[1]
        loss, count, dqs, dks = launch(qs, ks, qt, kt, mask, scale_s, scale_t, grad_q=grad_q, grad_k=grad_k,
                                       block_m=block_m, block_n=block_n)
        ctx.save_for_backward(count, dqs, dks)
        ctx.dtypes = (qs.dtype, ks.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        count, dqs, dks = ctx.saved_tensors
        scale = grad_output.float() / count
        return (scale_grad(dqs, scale, ctx.dtypes[0]), scale_grad(dks, scale, ctx.dtypes[1]),
                None, None, None, None, None, None, None, None)


def triton_attention_kl(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, block_m: int | None = None,
                        block_n: int | None = None) -> torch.Tensor:
    """The Triton op on equal head counts, any strides; float32 0-dim loss, gradients in the inputs' dtypes."""
    return TritonAttentionKl.apply(qs, ks, qt, kt, mask, float(scale_s), float(scale_t), torch.is_grad_enabled(),
                                   block_m, block_n)
