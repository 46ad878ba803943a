"""Op 1: attention-score MSE straight from Q and K, never materialising an S x S tensor.

Contract (see fastkd.losses.attention_mse for the reference):

    D[b,h,i,j] = scale_s * <qs[b,h,i], ks[b,h,j]> - scale_t * <qt[b,h,i], kt[b,h,j]>
    loss       = sum_{valid (b,h,i,j)} D^2 / max(H * sum_b n_b^2, 1)
    dL/dqs_i   = (2 scale_s / count) sum_j valid D_ij ks_j
    dL/dks_j   = (2 scale_s / count) sum_i valid D_ij qs_i

Two flash-attention style kernels, memory O(B*H*S*d):
  kernel A, grid (cdiv(S, BLOCK_M), B*H): a block of query rows, loop over key blocks;
           per-program partial loss (summed by torch afterwards: deterministic, no float atomics)
           and dQs for the row block;
  kernel B, grid (cdiv(S, BLOCK_N), B*H): a block of key rows, loop over query blocks,
           recompute the (transposed) D tile, accumulate dKs.

Gradients are computed in the FORWARD when an input needs them (Liger-Kernel style), backward only
scales the saved buffers by grad_output / count. Why: the loss and dQs come out of the same D tiles,
so forward+backward costs 2 passes over the S x S tiles (A with dQ, then B) instead of 3 with
recompute-in-backward (A for the loss, then A and B again). The saved dQs/dKs buffers are the size
of qs/ks, which is no more than recompute would have to save (qs, ks, qt, kt). The price: no double
backward, and wasted work if a grad-requiring forward is never backpropagated (not a training pattern).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._common import check_device


@triton.jit
def _qk_mse_rows_kernel(
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
    NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr,   # 16-bit tensor-core dot for the scores
    COMPUTE_GRAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)     # (BM,)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_in = offs_m < S
    row_real = tl.load(mask_ptr + b * S + offs_m, mask=row_in, other=0) != 0
    # Keys past the last real token are all padding: stop the loop there (right-padded batches
    # skip their padded tail). A query block wholly past it has no valid pair: zero iterations.
    end = tl.load(end_ptr + b)
    n_end = tl.where(pid_m * BLOCK_M < end, end, 0)

    ds_in = offs_ds < DS
    dt_in = offs_dt < DT
    qs = tl.load(qs_ptr + b * sqs_b + h * sqs_h + offs_m[:, None] * sqs_s + offs_ds[None, :] * sqs_d,
                 mask=row_in[:, None] & ds_in[None, :], other=0.0)          # (BM, BDS)
    qt = tl.load(qt_ptr + b * sqt_b + h * sqt_h + offs_m[:, None] * sqt_s + offs_dt[None, :] * sqt_d,
                 mask=row_in[:, None] & dt_in[None, :], other=0.0)          # (BM, BDT)
    if not NATIVE_S:
        qs = qs.to(tl.float32)
    if not NATIVE_T:
        qt = qt.to(tl.float32)
    ks_base = ks_ptr + b * sks_b + h * sks_h
    kt_base = kt_ptr + b * skt_b + h * skt_h

    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)    # per-row sums: a (BM, BN) accumulator costs registers
    dq = tl.zeros((BLOCK_M, BLOCK_DS), dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)        # (BN,)
        col_in = offs_n < S
        col_real = tl.load(mask_ptr + b * S + offs_n, mask=col_in, other=0) != 0
        ks = tl.load(ks_base + offs_n[:, None] * sks_s + offs_ds[None, :] * sks_d,
                     mask=col_in[:, None] & ds_in[None, :], other=0.0)      # (BN, BDS)
        kt = tl.load(kt_base + offs_n[:, None] * skt_s + offs_dt[None, :] * skt_d,
                     mask=col_in[:, None] & dt_in[None, :], other=0.0)      # (BN, BDT)
        if not NATIVE_S:
            ks = ks.to(tl.float32)
        if not NATIVE_T:
            kt = kt.to(tl.float32)
        # Same order as the reference: each model's score in fp32, scaled, then the difference.
        # 16-bit operands multiply exactly into the fp32 accumulator; fp32 ones need "ieee"
        # (TF32 would round both scores by ~1e-3 before they cancel).
        s = tl.dot(qs, tl.trans(ks), input_precision="ieee") * scale_s     # (BM, BN)
        t = tl.dot(qt, tl.trans(kt), input_precision="ieee") * scale_t
        valid = row_real[:, None] & col_real[None, :]
        d = tl.where(valid, s - t, 0.0)
        loss += tl.sum(d * d, axis=1)
        if COMPUTE_GRAD:
            # D stays fp32: rounding it to 16 bits would break the float32 contract.
            dq += tl.dot(d, ks.to(tl.float32), input_precision="ieee")      # (BM, BDS)

    tl.store(partial_ptr + pid_bh * tl.num_programs(0) + pid_m, tl.sum(loss, axis=0))
    if COMPUTE_GRAD:
        dq_ptrs = dqs_ptr + pid_bh.to(tl.int64) * S * DS + offs_m[:, None] * DS + offs_ds[None, :]
        tl.store(dq_ptrs, dq * (2.0 * scale_s), mask=row_in[:, None] & ds_in[None, :])


@triton.jit
def _qk_mse_cols_kernel(
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
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # (BN,) key rows owned by this program
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    col_in = offs_n < S
    col_real = tl.load(mask_ptr + b * S + offs_n, mask=col_in, other=0) != 0
    end = tl.load(end_ptr + b)
    m_end = tl.where(pid_n * BLOCK_N < end, end, 0)

    ds_in = offs_ds < DS
    dt_in = offs_dt < DT
    ks = tl.load(ks_ptr + b * sks_b + h * sks_h + offs_n[:, None] * sks_s + offs_ds[None, :] * sks_d,
                 mask=col_in[:, None] & ds_in[None, :], other=0.0)          # (BN, BDS)
    kt = tl.load(kt_ptr + b * skt_b + h * skt_h + offs_n[:, None] * skt_s + offs_dt[None, :] * skt_d,
                 mask=col_in[:, None] & dt_in[None, :], other=0.0)          # (BN, BDT)
    if not NATIVE_S:
        ks = ks.to(tl.float32)
    if not NATIVE_T:
        kt = kt.to(tl.float32)
    qs_base = qs_ptr + b * sqs_b + h * sqs_h
    qt_base = qt_ptr + b * sqt_b + h * sqt_h

    dk = tl.zeros((BLOCK_N, BLOCK_DS), dtype=tl.float32)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in = offs_m < S
        row_real = tl.load(mask_ptr + b * S + offs_m, mask=row_in, other=0) != 0
        qs = tl.load(qs_base + offs_m[:, None] * sqs_s + offs_ds[None, :] * sqs_d,
                     mask=row_in[:, None] & ds_in[None, :], other=0.0)      # (BM, BDS)
        qt = tl.load(qt_base + offs_m[:, None] * sqt_s + offs_dt[None, :] * sqt_d,
                     mask=row_in[:, None] & dt_in[None, :], other=0.0)      # (BM, BDT)
        if not NATIVE_S:
            qs = qs.to(tl.float32)
        if not NATIVE_T:
            qt = qt.to(tl.float32)
        # D^T tile directly (keys x queries), so the dK update needs no transpose of D.
        s = tl.dot(ks, tl.trans(qs), input_precision="ieee") * scale_s     # (BN, BM)
        t = tl.dot(kt, tl.trans(qt), input_precision="ieee") * scale_t
        valid = col_real[:, None] & row_real[None, :]
        d_t = tl.where(valid, s - t, 0.0)
        dk += tl.dot(d_t, qs.to(tl.float32), input_precision="ieee")       # (BN, BDS)

    dk_ptrs = dks_ptr + pid_bh.to(tl.int64) * S * DS + offs_n[:, None] * DS + offs_ds[None, :]
    tl.store(dk_ptrs, dk * (2.0 * scale_s), mask=col_in[:, None] & ds_in[None, :])


_INTERPRETED = isinstance(_qk_mse_rows_kernel, InterpretedFunction)
_HALF = (torch.float16, torch.bfloat16)


def _pow2_dim(d: int) -> int:
    """tl.dot wants every dimension >= 16 and tl.arange a power of two."""
    return max(16, triton.next_power_of_2(d))


def _block_sizes(S: int, bds: int, bdt: int, elt_bytes: int, block_m: int | None,
                 block_n: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the GPU (untuned guesses, see below).

    Each loop step streams one (BLOCK, bds + bdt) tile of K (kernel A) or Q (kernel B) and holds one
    of Q (K); capping a tile at 32 KiB keeps 2 pipeline stages plus the held tile well inside the
    shared memory of sm_80 (164 KiB) and sm_90 (228 KiB): 64 for 16-bit head dims up to 128 or fp32
    up to 64, 32 for fp32 at 128. Never more than S rounded up (16 at least, for tl.dot).
    """
    default = 64
    while default > 16 and default * (bds + bdt) * elt_bytes > 32 * 1024:
        default //= 2
    cap = _pow2_dim(S)
    bm = block_m or min(default, cap)
    bn = block_n or min(default, cap)
    for blk in (bm, bn):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {blk}")
    # The fp32 dQ/dK accumulator (BLOCK x bds) and the D tile live in registers: more warps for
    # wide heads or fp32 operands (FMA dots) to stay clear of spills.
    num_warps = 4 if elt_bytes == 2 and max(bds, bdt) <= 64 else 8
    return bm, bn, num_warps, 2


def _check_device(*tensors: torch.Tensor) -> None:
    check_device(_INTERPRETED, *tensors)


def _qk_mse_launch(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, grad_q: bool, grad_k: bool,
                   block_m: int | None = None, block_n: int | None = None):
    """Run the kernels. Returns (loss float32 0-dim, count float32 0-dim >= 1,
    dqs_unscaled or None, dks_unscaled or None); the grads are float32 (B, H, S, ds) and still to be
    multiplied by grad_output / count."""
    if qs.dim() != 4 or ks.shape != qs.shape:
        raise ValueError(f"qs, ks must both be (B, H, S, ds); got {tuple(qs.shape)}, {tuple(ks.shape)}")
    B, H, S, DS = qs.shape
    if qt.dim() != 4 or kt.shape != qt.shape or qt.shape[:3] != qs.shape[:3]:
        raise ValueError(f"qt, kt must both be (B, H, S, dt) with the student's B, H, S; "
                         f"got {tuple(qt.shape)}, {tuple(kt.shape)}")
    DT = qt.shape[-1]
    if mask.shape != (B, S):
        raise ValueError(f"mask must be (B, S) = {(B, S)}; got {tuple(mask.shape)}")
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the CUDA grid's y limit (65535); split the batch")
    _check_device(qs, ks, qt, kt, mask)
    dev = qs.device

    real = mask.bool()
    n = real.sum(1)                                                         # (B,)
    count = (n * n).sum().mul(H).clamp(min=1).to(torch.float32)
    dqs = torch.empty((B, H, S, DS), device=dev, dtype=torch.float32) if grad_q else None
    dks = torch.empty((B, H, S, DS), device=dev, dtype=torch.float32) if grad_k else None
    if B * H * S == 0:
        zero = torch.zeros((), device=dev, dtype=torch.float32)
        return zero, count, None if dqs is None else dqs.zero_(), None if dks is None else dks.zero_()
    positions = torch.arange(1, S + 1, device=dev, dtype=torch.int32)
    end = (real.to(torch.int32) * positions).amax(1).to(torch.int32)   # (B,)
    mask8 = real.to(torch.int8).contiguous()

    native_s = qs.dtype in _HALF and ks.dtype == qs.dtype and not _INTERPRETED
    native_t = qt.dtype in _HALF and kt.dtype == qt.dtype and not _INTERPRETED
    # (The interpreter multiplies 16-bit dot operands as raw integers, so it always upcasts.)
    bds, bdt = _pow2_dim(DS), _pow2_dim(DT)
    bm, bn, num_warps, num_stages = _block_sizes(S, bds, bdt, 2 if native_s and native_t else 4,
                                                 block_m, block_n)
    strides = (*qs.stride(), *ks.stride(), *qt.stride(), *kt.stride())

    grid_m = triton.cdiv(S, bm)
    partial = torch.empty(B * H * grid_m, device=dev, dtype=torch.float32)
    _qk_mse_rows_kernel[(grid_m, B * H)](
        qs, ks, qt, kt, mask8, end, partial, dqs if grad_q else partial,   # dummy pointer when unused
        S, H, DS, DT, float(scale_s), float(scale_t), *strides,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=bds, BLOCK_DT=bdt,
        NATIVE_S=native_s, NATIVE_T=native_t, COMPUTE_GRAD=grad_q, num_warps=num_warps, num_stages=num_stages)
    if grad_k:
        _qk_mse_cols_kernel[(triton.cdiv(S, bn), B * H)](
            qs, ks, qt, kt, mask8, end, dks,
            S, H, DS, DT, float(scale_s), float(scale_t), *strides,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=bds, BLOCK_DT=bdt,
            NATIVE_S=native_s, NATIVE_T=native_t, num_warps=num_warps, num_stages=num_stages)
    return partial.sum() / count, count, dqs, dks


def _scale_grad(buf: torch.Tensor | None, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """buf * scale computed in fp32 and rounded once into `dtype` (no fp32 temporary for 16-bit)."""
    if buf is None:
        return None
    out = torch.empty(buf.shape, device=buf.device, dtype=dtype)
    return torch.mul(buf, scale, out=out)


class _AttentionMSEQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s, scale_t, grad_enabled, block_m, block_n):
        grad_q = grad_enabled and ctx.needs_input_grad[0]
        grad_k = grad_enabled and ctx.needs_input_grad[1]
        loss, count, dqs, dks = _qk_mse_launch(qs, ks, qt, kt, mask, scale_s, scale_t, grad_q=grad_q,
                                               grad_k=grad_k, block_m=block_m, block_n=block_n)
        ctx.save_for_backward(count, dqs, dks)
        ctx.dtypes = (qs.dtype, ks.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        count, dqs, dks = ctx.saved_tensors
        scale = grad_output.float() / count
        return (_scale_grad(dqs, scale, ctx.dtypes[0]), _scale_grad(dks, scale, ctx.dtypes[1]),
                None, None, None, None, None, None, None, None)


def _attention_mse_qk(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *,
                      block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """attention_mse_qk with explicit block sizes (tests use small ones to exercise the tiling)."""
    # Under torch.no_grad needs_input_grad still reports requires_grad; skip the grad kernels then.
    return _AttentionMSEQK.apply(qs, ks, qt, kt, mask, float(scale_s), float(scale_t),
                                 torch.is_grad_enabled(), block_m, block_n)


def attention_mse_qk(qs: torch.Tensor, ks: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor,
                     mask: torch.Tensor, scale_s: float, scale_t: float) -> torch.Tensor:
    """Mean over heads and valid (query, key) pairs of (scale_s qs ks^T - scale_t qt kt^T)^2.

    qs, ks: (B, H, S, ds) student (differentiable); qt, kt: (B, H, S, dt) teacher (no gradient);
    mask: (B, S), nonzero = real token. Returns a float32 0-dim tensor; gradients for qs and ks come
    back in their dtypes. Equals fastkd.losses.attention_mse on attention_scores(...) with equal heads.
    """
    return _attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t)
