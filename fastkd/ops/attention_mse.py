"""Attention-score MSE (TinyBERT's attention term) from the student's and teacher's Q and K.

    D[b,h,i,j] = scale_s <qs[b,h,i], ks[b,h,j]> - scale_t <qt[b,h,i], kt[b,h,j]>
    loss       = sum_{valid (b,h,i,j)} D^2 / max(H * sum_b n_b^2, 1),  valid: tokens i and j both real
    dL/dqs_i   = (2 scale_s / count) sum_j valid D_ij ks_j,   dL/dks_j likewise with qs_i

One module per op (Liger-Kernel's layout): the torch reference, the Triton kernels and their
autograd Function, the binding of the compiled extension (csrc/, cpp and cuda backends), the
dispatch over backends, and the small random cases the self-check runs before first use.

Head counts: equal counts compare head by head; different counts compare head-averaged scores. The
head average of q_h k_h^T equals [q_1 .. q_H][k_1 .. k_H]^T / H, so the fused ops see one "head" of
width H*d with the scale divided by H, and never average an S x S tensor. The GPU kernels tile heads
up to GPU_MAX_HEAD_DIM wide; wider (merged) heads use the reference on the single (B, 1, S, S)
merged score tensor, H times smaller than per-head scores.

Precision. The reference computes each model's scores in float32 from the inputs as given (16-bit
inputs are exact in float32). The fused backends:
  cpp     float32 (float64 for gradcheck), OpenMP;
  triton  16-bit inputs go into tl.dot as they are (tensor cores, float32 accumulation: the scores
          are the same products as the reference's); for the gradient the difference D is rounded to
          the inputs' dtype to meet the 16-bit operand in a tensor-core dot, so gradients carry one
          extra 16-bit rounding (tolerance: a few units of the dtype's epsilon, relative to the
          largest entry). float32 inputs use IEEE dots, or TF32 when torch allows TF32 matmuls;
  cuda    16-bit inputs (or float32 with TF32 allowed) take a cuBLAS formulation, chunked over query
          rows (never a whole S x S tensor): scores by batched GEMMs with float32 output, one fused
          kernel for the masked difference, its square sum and its 16-bit copy, gradients by GEMMs;
          other float32 inputs the hand-tiled FMA kernel.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from . import _extension as ext
from ._triton import (check_device, fp32_dot_precision, interpreted, native_dot, pow2_dim, require, tl,
                      triton)

log = logging.getLogger(__name__)

NAME = "attention_mse"
FUSED = ("cpp", "triton", "cuda")
GPU_MAX_HEAD_DIM = 128  # widest head the Triton/CUDA kernels tile (registers / shared memory)
GEMM_CHUNK_BYTES = 64 << 20  # per-chunk working set of the cuda backend's cuBLAS formulation
_chunk_rows_override: int | None = None  # the self-check forces several chunks (see self_check_settings)
_said_wide = False


# --- the torch reference ---------------------------------------------------------------------

def pair_mask(attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, S) token mask -> (B, 1, S, S) bool: query i and key j both real (and |i - j| <= window
    for a local-attention layer)."""
    m = attention_mask.bool()
    valid = (m[:, :, None] & m[:, None, :])[:, None]
    if window is not None:
        pos = torch.arange(m.shape[1], device=m.device)
        valid = valid & ((pos[:, None] - pos[None, :]).abs() <= window)
    return valid


def attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, H, S, d) x2 -> (B, H, S, S) pre-softmax scores, in float32."""
    return torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling


def match_heads(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, H, S, S): as they are for equal head counts, else both head-averaged."""
    if student.shape[1] == teacher.shape[1]:
        return student, teacher
    return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)


def scores_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
               attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Mean over heads and valid (i, j) of (s - t)^2. Scores: (B, H, S, S); mask (B, S); window: see
    pair_mask. Invalid entries may hold anything (a family's -inf-like padding fill): never read."""
    s, t = match_heads(student_scores.float(), teacher_scores.float())
    valid = pair_mask(attention_mask, window)
    diff = torch.where(valid, s - t, torch.zeros((), device=s.device))
    count = valid.sum() * s.shape[1]
    return diff.pow(2).sum() / count.clamp(min=1)


def reference(qs, ks, qt, kt, mask, scale_s: float, scale_t: float) -> torch.Tensor:
    """The `torch` backend: materialises both models' (B, H, S, S) scores."""
    return scores_mse(attention_scores(qs, ks, scale_s), attention_scores(qt, kt, scale_t), mask)


def merge_heads(q: torch.Tensor, k: torch.Tensor, scaling: float):
    """(B, H, S, d) -> (B, 1, S, H*d) with scaling / H: the head-averaged scores as one head."""
    B, H, S, d = q.shape
    merge = lambda x: x.transpose(1, 2).reshape(B, 1, S, H * d)  # noqa: E731
    return merge(q), merge(k), scaling / H


def pair_count(mask: torch.Tensor, heads: int) -> torch.Tensor:
    n = mask.to(torch.float32).sum(-1)
    return (heads * (n * n).sum()).clamp(min=1.0)


# --- Triton -----------------------------------------------------------------------------------
# Two flash-attention style kernels, memory O(B*H*S*d):
#   rows, grid (cdiv(S, BLOCK_M), B*H): a block of query rows, loop over key blocks; a partial loss
#         per program (summed by torch afterwards: deterministic, no float atomics) and dQs;
#   cols, grid (cdiv(S, BLOCK_N), B*H): a block of key rows, loop over query blocks, recompute the
#         (transposed) D tile, accumulate dKs.
# Gradients are computed in the FORWARD when an input needs them (Liger-Kernel style), backward only
# scales the saved buffers by grad_output / count: 2 passes over the S x S tiles instead of 3 with
# recompute-in-backward. The price: no double backward (refused, like the extension's).

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
    NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr,   # 16-bit operands straight into tl.dot
    PRECISION: tl.constexpr,                          # "ieee" or "tf32": float32 dots
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
        # Same order as the reference: each model's score in fp32, scaled, then the difference.
        if NATIVE_S:
            s = tl.dot(qs, tl.trans(ks)) * scale_s                         # 16-bit in, fp32 out
        else:
            ks = ks.to(tl.float32)
            s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_s
        if NATIVE_T:
            t = tl.dot(qt, tl.trans(kt)) * scale_t
        else:
            t = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision=PRECISION) * scale_t
        valid = row_real[:, None] & col_real[None, :]
        d = tl.where(valid, s - t, 0.0)
        loss += tl.sum(d * d, axis=1)
        if COMPUTE_GRAD:
            if NATIVE_S:
                dq += tl.dot(d.to(ks.dtype), ks)                           # tensor cores, fp32 acc
            else:
                dq += tl.dot(d, ks, input_precision=PRECISION)             # (BM, BDS)

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
    PRECISION: tl.constexpr,
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
        # D^T tile directly (keys x queries), so the dK update needs no transpose of D.
        if NATIVE_S:
            s = tl.dot(ks, tl.trans(qs)) * scale_s                         # (BN, BM)
        else:
            qs = qs.to(tl.float32)
            s = tl.dot(ks, tl.trans(qs), input_precision=PRECISION) * scale_s
        if NATIVE_T:
            t = tl.dot(kt, tl.trans(qt)) * scale_t
        else:
            t = tl.dot(kt, tl.trans(qt.to(tl.float32)), input_precision=PRECISION) * scale_t
        valid = col_real[:, None] & row_real[None, :]
        d_t = tl.where(valid, s - t, 0.0)
        if NATIVE_S:
            dk += tl.dot(d_t.to(qs.dtype), qs)                             # (BN, BDS)
        else:
            dk += tl.dot(d_t, qs, input_precision=PRECISION)

    dk_ptrs = dks_ptr + pid_bh.to(tl.int64) * S * DS + offs_n[:, None] * DS + offs_ds[None, :]
    tl.store(dk_ptrs, dk * (2.0 * scale_s), mask=col_in[:, None] & ds_in[None, :])


_INTERPRETED = interpreted(_qk_mse_rows_kernel)


def block_sizes(S: int, bds: int, bdt: int, elt_bytes: int, block_m: int | None,
                 block_n: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the GPU (untuned guesses, see below).

    Each loop step streams one (BLOCK, bds + bdt) tile of K (rows kernel) or Q (cols kernel) and holds
    one of Q (K); capping a tile at 32 KiB keeps 2 pipeline stages plus the held tile well inside the
    shared memory of sm_80 (164 KiB) and sm_90 (228 KiB): 64 for 16-bit head dims up to 128 or fp32
    up to 64, 32 for fp32 at 128. Never more than S rounded up (16 at least, for tl.dot).
    """
    default = 64
    while default > 16 and default * (bds + bdt) * elt_bytes > 32 * 1024:
        default //= 2
    cap = pow2_dim(S)
    bm = block_m or min(default, cap)
    bn = block_n or min(default, cap)
    for blk in (bm, bn):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {blk}")
    # The fp32 dQ/dK accumulator (BLOCK x bds) and the D tile live in registers: more warps for
    # wide heads or fp32 operands (FMA dots) to stay clear of spills.
    num_warps = 4 if elt_bytes == 2 and max(bds, bdt) <= 64 else 8
    return bm, bn, num_warps, 2


def _triton_launch(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, grad_q: bool, grad_k: bool,
                   block_m: int | None = None, block_n: int | None = None):
    """Run the kernels. Returns (loss float32 0-dim, count float32 0-dim >= 1,
    dqs_unscaled or None, dks_unscaled or None); the grads are float32 (B, H, S, ds) and still to be
    multiplied by grad_output / count."""
    require()
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
    check_device(_INTERPRETED, qs, ks, qt, kt, mask)
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

    native_s = native_dot(qs.dtype, ks.dtype, _INTERPRETED)
    native_t = native_dot(qt.dtype, kt.dtype, _INTERPRETED)
    bds, bdt = pow2_dim(DS), pow2_dim(DT)
    bm, bn, num_warps, num_stages = block_sizes(S, bds, bdt, 2 if native_s and native_t else 4,
                                                 block_m, block_n)
    strides = (*qs.stride(), *ks.stride(), *qt.stride(), *kt.stride())
    precision = fp32_dot_precision()

    grid_m = triton.cdiv(S, bm)
    partial = torch.empty(B * H * grid_m, device=dev, dtype=torch.float32)
    _qk_mse_rows_kernel[(grid_m, B * H)](
        qs, ks, qt, kt, mask8, end, partial, dqs if grad_q else partial,   # dummy pointer when unused
        S, H, DS, DT, float(scale_s), float(scale_t), *strides,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=bds, BLOCK_DT=bdt, NATIVE_S=native_s, NATIVE_T=native_t,
        PRECISION=precision, COMPUTE_GRAD=grad_q, num_warps=num_warps, num_stages=num_stages)
    if grad_k:
        _qk_mse_cols_kernel[(triton.cdiv(S, bn), B * H)](
            qs, ks, qt, kt, mask8, end, dks,
            S, H, DS, DT, float(scale_s), float(scale_t), *strides,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=bds, BLOCK_DT=bdt, NATIVE_S=native_s, NATIVE_T=native_t,
            PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return partial.sum() / count, count, dqs, dks


def scale_grad(buf: torch.Tensor | None, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """buf * scale computed in fp32 and rounded once into `dtype` (no fp32 temporary for 16-bit)."""
    if buf is None:
        return None
    out = torch.empty(buf.shape, device=buf.device, dtype=dtype)
    return torch.mul(buf, scale, out=out)


class TritonAttentionMse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s, scale_t, grad_enabled, block_m, block_n):
        grad_q = grad_enabled and ctx.needs_input_grad[0]
        grad_k = grad_enabled and ctx.needs_input_grad[1]
        loss, count, dqs, dks = _triton_launch(qs, ks, qt, kt, mask, scale_s, scale_t, grad_q=grad_q,
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


# --- the compiled extension (cpp, cuda) -----------------------------------------------------------

def uses_gemm(qs, qt) -> bool:
    """Whether the cuda backend takes its cuBLAS (tensor-core) formulation for these inputs."""
    if qs.dtype in (torch.float16, torch.bfloat16):
        return qt.dtype == qs.dtype
    return qs.dtype == torch.float32 and qt.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def gemm_chunk_rows(B: int, H: int, S: int, operand_bytes: int) -> int:
    """Query rows per chunk of the cuBLAS formulation: two float32 score chunks and one copy of their
    difference in the operands' dtype, (B*H, rows, S) each, within GEMM_CHUNK_BYTES (16 rows at least)."""
    if _chunk_rows_override is not None:
        return _chunk_rows_override
    per_row = max(1, B * H * S * (4 + 4 + operand_bytes))
    return int(max(16, min(S, GEMM_CHUNK_BYTES // per_row)))


class ExtensionAttentionMse(torch.autograd.Function):
    @staticmethod
    def run(qs, ks, qt, kt, mask, scale_s, scale_t, need_grad):
        module = ext.module_for(qs.device)
        with ext.no_autocast(qs.device):
            if qs.device.type == "cuda" and uses_gemm(qs, qt):
                B, H, S, _ = qs.shape
                return module.attention_mse_qk_gemm(
                    qs.detach().contiguous(), ks.detach().to(qs.dtype).contiguous(), qt.detach().contiguous(),
                    kt.detach().to(qt.dtype).contiguous(), mask.bool().contiguous(), float(scale_s),
                    float(scale_t), need_grad, gemm_chunk_rows(B, H, S, qs.element_size()))
            return module.attention_mse_qk(
                ext.f32(qs), ext.f32(ks), ext.f32(qt), ext.f32(kt), mask.bool().contiguous(), float(scale_s),
                float(scale_t), need_grad)

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s: float, scale_t: float, count: torch.Tensor, grad: bool):
        return ext.qk_forward(ctx, ExtensionAttentionMse.run, qs, ks, qt, kt, mask, scale_s, scale_t, count, grad)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are not themselves differentiable
    def backward(ctx, grad_out):
        return ext.qk_backward(ctx, ExtensionAttentionMse.run, grad_out)


# --- dispatch -------------------------------------------------------------------------------------

def merged_too_wide(qs, qt, backend: str) -> bool:
    """Whether `backend` hands these inputs to the reference: a GPU backend whose tiles the (merged,
    when the head counts differ) heads exceed."""
    if backend not in ("triton", "cuda"):
        return False
    width = lambda x, other: x.shape[-1] * (x.shape[1] if x.shape[1] != other.shape[1] else 1)  # noqa: E731
    return max(width(qs, qt), width(qt, qs)) > GPU_MAX_HEAD_DIM


def attention_mse_qk(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, backend: str) -> torch.Tensor:
    """Mean over heads and valid (i, j) of (scale_s qs ks^T - scale_t qt kt^T)^2 on `backend`.

    qs, ks: (B, Hs, S, ds) student; qt, kt: (B, Ht, S, dt) teacher; mask (B, S). Hs != Ht compares
    head-averaged scores. Returns a float32 0-dim tensor."""
    if backend == "torch":
        return reference(qs, ks, qt, kt, mask, scale_s, scale_t)
    too_wide = merged_too_wide(qs, qt, backend)
    if qs.shape[1] != qt.shape[1]:
        qs, ks, scale_s = merge_heads(qs, ks, scale_s)
        qt, kt, scale_t = merge_heads(qt, kt, scale_t)
    if too_wide:
        global _said_wide
        if not _said_wide:
            _said_wide = True
            log.info("%s: heads %d / %d wide (merged: the head counts differ) exceed the %s tiles (%d); "
                     "the reference runs on the merged (B, 1, S, S) scores", NAME, qs.shape[-1], qt.shape[-1],
                     backend, GPU_MAX_HEAD_DIM)
        return reference(qs, ks, qt, kt, mask, scale_s, scale_t)
    if backend == "triton":
        return triton_attention_mse(qs, ks, qt, kt, mask, scale_s, scale_t)  # any strides: no copy
    if backend not in ("cpp", "cuda"):
        raise ValueError(f"{NAME}: unknown backend {backend!r}")
    return ExtensionAttentionMse.apply(qs, ks, qt, kt, mask, scale_s, scale_t, pair_count(mask, qs.shape[1]),
                                       torch.is_grad_enabled())


# --- self-check -------------------------------------------------------------------------------------

def self_check_cases(device: torch.device, dtype: torch.dtype, teacher_dtype: torch.dtype, gen: torch.Generator):
    """Small random padded inputs that still reach the code most likely to break: an odd length past
    one 64-row tile (83), a row padded to an odd length and an all-padded row, a BERT-sized student
    head (64) against a narrower teacher one (32), different head counts, 4-wide and 128-wide heads.
    Each case: (args for
    attention_mse_qk without the backend, indices of the student inputs)."""
    B, S = 3, 83
    lengths = torch.tensor([S, 37, 0])  # full, padded, all padded
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long().to(device)

    def qk(heads, d, dt):
        return tuple(torch.randn(B, heads, S, d, generator=gen).to(device, dt) for _ in range(2))

    cases = []
    # BERT-sized against a narrower teacher; different head counts; narrow heads (the C++ kernel's
    # Gram form); the widest head the GPU tiles take.
    for hs, ht, ds, dt in ((2, 2, 64, 32), (2, 3, 16, 16), (2, 2, 4, 4), (1, 1, 128, 64)):
        qs, ks = qk(hs, ds, dtype)
        qt, kt = qk(ht, dt, teacher_dtype)
        cases.append(((qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5), (0, 1)))
    return cases


@contextlib.contextmanager
def self_check_settings():
    """The cuBLAS formulation in chunks of 32 query rows during the check, so chunks after the first
    (their row offset) are checked too."""
    global _chunk_rows_override
    old, _chunk_rows_override = _chunk_rows_override, 32
    try:
        yield
    finally:
        _chunk_rows_override = old
