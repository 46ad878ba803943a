"""MiniLM's attention-distribution KL, and MiniLMv2's relation KL built on it.

    A[b,h,i,:] = scale * q_i K^T over real keys (within a local layer's window, on the reference)
    loss       = sum over real queries i and heads of KL(softmax(A_t[i]) || softmax(A_s[i]))
                 / (H * number of real queries)

Relations (MiniLM's value relation, MiniLMv2's Q-Q, K-K and V-V relations) are the same op with
k = q: the concatenated heads X (B, S, H*d) of each model are split into R relation heads of width
H*d/R (R equal on both sides, so head counts and widths may differ), and
    relation_kl(Xs, Xt) = attention_kl(Xs_r, Xs_r, Xt_r, Xt_r, 1/sqrt(ds_r), 1/sqrt(dt_r)).

Backends:
  torch  the reference: materialises (B, H, S, S) scores, log-probabilities and their product;
  cpp    fused (csrc/fused_loss_cpu.cpp): per batch row and chunk of heads, real rows only, tiles of
         64 query rows against every real key, so each row's log-sum-exp is exact in one pass and the
         largest temporary is (heads, 64, S): never S x S. Per tile: both models' scores (two GEMMs),
         log_softmax, the KL sum, G = p_s - p_t and the student's gradients dq = scale G k,
         dk += scale G^T q (two GEMMs), computed in the forward like the other fused ops. It costs
         the eager forward's FLOPs plus the backward's, once; what it saves is memory traffic.
  triton two flash-attention style kernels (below): rows (online log-sum-exp of both models, then the
         KL and dQ) and cols (dK from the stored log-sum-exps); 16-bit inputs go into tl.dot as
         they are. Tested under the interpreter here; no GPU has run it yet.
  cuda   (csrc/fused_loss_cuda*.{cpp,cu}) the cpp form's shape on cuBLAS: by chunks of query rows,
         both models' scores from batched GEMMs (float32 out, 16-bit operands on tensor cores), one
         kernel (a warp per row) for both log-sum-exps, the KL and G in place, two GEMMs for dq, dk.
         Three (B*H, chunk, S) buffers within attention_mse.GEMM_CHUNK_BYTES, or of 16 rows at least
         (all rows in one chunk when they fit, as at short S). Compiled and symbol-checked here
         (tests/test_cuda_compile.py); run by `make gpu-check` where a GPU is lent.
Different head counts compare head-averaged distributions: a different quantity (a mean of
probabilities, not of scores), which only the reference computes (said once).
"""

from __future__ import annotations

import logging
import math

import torch

from . import _extension as ext
from . import attention_mse
from ._triton import check_device, fp32_dot_precision, interpreted, native_dot, pow2_dim, require, tl, triton
from .attention_mse import attention_scores, pair_mask

log = logging.getLogger(__name__)

NAME = "attention_kl"
FUSED: tuple[str, ...] = ("cpp", "triton", "cuda")
_said_heads = False


# --- the torch reference ---------------------------------------------------------------------

def scores_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
              attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) over real keys (within the window of a local layer), mean over
    heads and real queries. Scores (B, H, S, S)."""
    key_valid = pair_mask(attention_mask, window)  # (B, 1, S, S); padded query rows are dropped below
    neg = torch.finfo(torch.float32).min
    s_logp = torch.log_softmax(student_scores.float().masked_fill(~key_valid, neg), dim=-1)
    t_logp = torch.log_softmax(teacher_scores.float().masked_fill(~key_valid, neg), dim=-1)
    if student_scores.shape[1] != teacher_scores.shape[1]:
        # Compare head-averaged distributions.
        s_logp = torch.logsumexp(s_logp, dim=1, keepdim=True) - math.log(s_logp.shape[1])
        t_logp = torch.logsumexp(t_logp, dim=1, keepdim=True) - math.log(t_logp.shape[1])
    kl = torch.where(key_valid, t_logp.exp() * (t_logp - s_logp), torch.zeros((), device=s_logp.device)).sum(-1)
    query_valid = attention_mask.bool()[:, None, :]  # (B, 1, S)
    count = query_valid.sum() * kl.shape[1]
    return torch.where(query_valid, kl, torch.zeros((), device=kl.device)).sum() / count.clamp(min=1)


def reference(qs, ks, qt, kt, mask, scale_s: float, scale_t: float) -> torch.Tensor:
    return scores_kl(attention_scores(qs, ks, scale_s), attention_scores(qt, kt, scale_t), mask)


# --- the compiled extension (cpp) ------------------------------------------------------------------

def query_count(mask: torch.Tensor, heads: int) -> torch.Tensor:
    return (heads * mask.to(torch.float32).sum()).clamp(min=1.0)


def _gemm_operands(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One model's q and k for the cuda form: float16 / bfloat16 kept when both share it, else float32."""
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype else torch.float32
    q_op = q.detach().to(dtype).contiguous()
    return q_op, q_op if k is q else k.detach().to(dtype).contiguous()  # a relation: one copy, not two


class ExtensionAttentionKl(torch.autograd.Function):
    @staticmethod
    def run(qs, ks, qt, kt, mask, scale_s, scale_t, need_grad):
        module = ext.module_for(qs.device)
        with ext.no_autocast(qs.device):
            if qs.device.type == "cuda":
                # cuBLAS takes each model's operands as they are (16-bit on tensor cores), scores in float32.
                B, H, S, _ = qs.shape
                student, teacher = _gemm_operands(qs, ks), _gemm_operands(qt, kt)
                return module.attention_kl_qk(*student, *teacher, mask.bool().contiguous(), float(scale_s),
                                              float(scale_t), need_grad,
                                              attention_mse.gemm_chunk_rows(B, H, S, student[0].element_size()))
            return module.attention_kl_qk(ext.f32(qs), ext.f32(ks), ext.f32(qt), ext.f32(kt), mask.bool().contiguous(),
                                          float(scale_s), float(scale_t), need_grad)

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s: float, scale_t: float, count: torch.Tensor, grad: bool):
        return ext.qk_forward(ctx, ExtensionAttentionKl.run, qs, ks, qt, kt, mask, scale_s, scale_t, count, grad)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are not themselves differentiable
    def backward(ctx, grad_out):
        return ext.qk_backward(ctx, ExtensionAttentionKl.run, grad_out)


# --- Triton --------------------------------------------------------------------------------------
# Flash-attention style, memory O(B*H*S*d), gradients computed in the forward:
#   rows, grid (cdiv(S, BLOCK_M), B*H): a block of query rows; pass 1 over key blocks: online
#         log-sum-exp of both models' scores; pass 2: the KL and dQ = scale_s sum_j (p_s - p_t) k_j;
#         the row log-sum-exps are stored for
#   cols, grid (cdiv(S, BLOCK_N), B*H): a block of keys; loop over query blocks, recompute both
#         transposed score tiles, G^T = p_s^T - p_t^T from the stored log-sum-exps, dK += G^T Q.
# Keys are masked to -inf before the softmax; padded queries contribute nothing.

@triton.jit
def _kl_rows_kernel(
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
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_in = offs_m < S
    row_real = tl.load(mask_ptr + b * S + offs_m, mask=row_in, other=0) != 0
    end = tl.load(end_ptr + b)
    end = tl.where(pid_m * BLOCK_M < end, end, 0)  # a block of padded queries only: nothing to do
    ds_in = offs_ds < DS
    dt_in = offs_dt < DT
    qs = tl.load(qs_ptr + b * sqs_b + h * sqs_h + offs_m[:, None] * sqs_s + offs_ds[None, :] * sqs_d,
                 mask=row_in[:, None] & ds_in[None, :], other=0.0)
    qt = tl.load(qt_ptr + b * sqt_b + h * sqt_h + offs_m[:, None] * sqt_s + offs_dt[None, :] * sqt_d,
                 mask=row_in[:, None] & dt_in[None, :], other=0.0)
    if not NATIVE_S:
        qs = qs.to(tl.float32)
    if not NATIVE_T:
        qt = qt.to(tl.float32)
    ks_base = ks_ptr + b * sks_b + h * sks_h
    kt_base = kt_ptr + b * skt_b + h * skt_h

    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, end, BLOCK_N):               # pass 1: both row log-sum-exps
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_in = offs_n < S
        col_real = tl.load(mask_ptr + b * S + offs_n, mask=col_in, other=0) != 0
        ks = tl.load(ks_base + offs_n[:, None] * sks_s + offs_ds[None, :] * sks_d,
                     mask=col_in[:, None] & ds_in[None, :], other=0.0)
        kt = tl.load(kt_base + offs_n[:, None] * skt_s + offs_dt[None, :] * skt_d,
                     mask=col_in[:, None] & dt_in[None, :], other=0.0)
        if NATIVE_S:
            s = tl.dot(qs, tl.trans(ks)) * scale_s
        else:
            s = tl.dot(qs, tl.trans(ks.to(tl.float32)), input_precision=PRECISION) * scale_s
        if NATIVE_T:
            t = tl.dot(qt, tl.trans(kt)) * scale_t
        else:
            t = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision=PRECISION) * scale_t
        s = tl.where(col_real[None, :], s, float("-inf"))
        t = tl.where(col_real[None, :], t, float("-inf"))
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
        col_in = offs_n < S
        col_real = tl.load(mask_ptr + b * S + offs_n, mask=col_in, other=0) != 0
        ks = tl.load(ks_base + offs_n[:, None] * sks_s + offs_ds[None, :] * sks_d,
                     mask=col_in[:, None] & ds_in[None, :], other=0.0)
        kt = tl.load(kt_base + offs_n[:, None] * skt_s + offs_dt[None, :] * skt_d,
                     mask=col_in[:, None] & dt_in[None, :], other=0.0)
        if NATIVE_S:
            s = tl.dot(qs, tl.trans(ks)) * scale_s
        else:
            ks = ks.to(tl.float32)
            s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_s
        if NATIVE_T:
            t = tl.dot(qt, tl.trans(kt)) * scale_t
        else:
            t = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision=PRECISION) * scale_t
        valid = row_real[:, None] & col_real[None, :]
        logp_s = s - lse_s[:, None]
        logp_t = t - lse_t[:, None]
        p_t = tl.where(valid, tl.exp(logp_t), 0.0)
        kl += tl.sum(tl.where(valid, p_t * (logp_t - logp_s), 0.0), axis=1)
        if COMPUTE_GRAD:
            g = tl.where(valid, tl.exp(logp_s) - p_t, 0.0)
            if NATIVE_S:
                dq += tl.dot(g.to(ks.dtype), ks)
            else:
                dq += tl.dot(g, ks, input_precision=PRECISION)

    tl.store(partial_ptr + pid_bh * tl.num_programs(0) + pid_m, tl.sum(kl, axis=0))
    if COMPUTE_GRAD:
        row_off = pid_bh.to(tl.int64) * S + offs_m
        tl.store(lse_ptr + row_off, lse_s, mask=row_in)
        tl.store(lse_ptr + (tl.num_programs(1) * S).to(tl.int64) + row_off, lse_t, mask=row_in)
        dq_ptrs = dqs_ptr + pid_bh.to(tl.int64) * S * DS + offs_m[:, None] * DS + offs_ds[None, :]
        tl.store(dq_ptrs, dq * scale_s, mask=row_in[:, None] & ds_in[None, :])


@triton.jit
def _kl_cols_kernel(
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
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    col_in = offs_n < S
    col_real = tl.load(mask_ptr + b * S + offs_n, mask=col_in, other=0) != 0
    end = tl.load(end_ptr + b)
    m_end = tl.where(pid_n * BLOCK_N < end, end, 0)
    ds_in = offs_ds < DS
    dt_in = offs_dt < DT
    ks = tl.load(ks_ptr + b * sks_b + h * sks_h + offs_n[:, None] * sks_s + offs_ds[None, :] * sks_d,
                 mask=col_in[:, None] & ds_in[None, :], other=0.0)
    kt = tl.load(kt_ptr + b * skt_b + h * skt_h + offs_n[:, None] * skt_s + offs_dt[None, :] * skt_d,
                 mask=col_in[:, None] & dt_in[None, :], other=0.0)
    if not NATIVE_S:
        ks = ks.to(tl.float32)
    if not NATIVE_T:
        kt = kt.to(tl.float32)
    qs_base = qs_ptr + b * sqs_b + h * sqs_h
    qt_base = qt_ptr + b * sqt_b + h * sqt_h
    lse_t_base = lse_ptr + (tl.num_programs(1) * S).to(tl.int64)

    dk = tl.zeros((BLOCK_N, BLOCK_DS), dtype=tl.float32)
    for start_m in range(0, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in = offs_m < S
        row_real = tl.load(mask_ptr + b * S + offs_m, mask=row_in, other=0) != 0
        qs = tl.load(qs_base + offs_m[:, None] * sqs_s + offs_ds[None, :] * sqs_d,
                     mask=row_in[:, None] & ds_in[None, :], other=0.0)
        qt = tl.load(qt_base + offs_m[:, None] * sqt_s + offs_dt[None, :] * sqt_d,
                     mask=row_in[:, None] & dt_in[None, :], other=0.0)
        row_off = pid_bh.to(tl.int64) * S + offs_m
        lse_s = tl.load(lse_ptr + row_off, mask=row_in, other=0.0)
        lse_t = tl.load(lse_t_base + row_off, mask=row_in, other=0.0)
        if NATIVE_S:
            s = tl.dot(ks, tl.trans(qs)) * scale_s                         # (BN, BM): transposed scores
        else:
            qs = qs.to(tl.float32)
            s = tl.dot(ks, tl.trans(qs), input_precision=PRECISION) * scale_s
        if NATIVE_T:
            t = tl.dot(kt, tl.trans(qt)) * scale_t
        else:
            t = tl.dot(kt, tl.trans(qt.to(tl.float32)), input_precision=PRECISION) * scale_t
        valid = col_real[:, None] & row_real[None, :]
        g_t = tl.where(valid, tl.exp(s - lse_s[None, :]) - tl.exp(t - lse_t[None, :]), 0.0)
        if NATIVE_S:
            dk += tl.dot(g_t.to(qs.dtype), qs)
        else:
            dk += tl.dot(g_t, qs, input_precision=PRECISION)

    dk_ptrs = dks_ptr + pid_bh.to(tl.int64) * S * DS + offs_n[:, None] * DS + offs_ds[None, :]
    tl.store(dk_ptrs, dk * scale_s, mask=col_in[:, None] & ds_in[None, :])


_INTERPRETED = interpreted(_kl_rows_kernel)


def _triton_launch(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, grad_q: bool, grad_k: bool,
                   block_m: int | None = None, block_n: int | None = None):
    """Returns (loss float32 0-dim, count, dqs or None, dks or None), the gradients float32 and still to
    be multiplied by grad_output / count."""
    require()
    B, H, S, DS = qs.shape
    DT = qt.shape[-1]
    if ks.shape != qs.shape or kt.shape != qt.shape or qt.shape[:3] != qs.shape[:3] or mask.shape != (B, S):
        raise ValueError("qs, ks (B, H, S, ds), qt, kt (B, H, S, dt) and mask (B, S) expected")
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the CUDA grid's y limit (65535); split the batch")
    check_device(_INTERPRETED, qs, ks, qt, kt, mask)
    dev = qs.device
    real = mask.bool()
    count = query_count(real, H).to(dev)
    grad = grad_q or grad_k
    dqs = torch.zeros((B, H, S, DS), device=dev, dtype=torch.float32) if grad else None
    dks = torch.zeros((B, H, S, DS), device=dev, dtype=torch.float32) if grad_k else None
    if B * H * S == 0:
        return torch.zeros((), device=dev, dtype=torch.float32), count, dqs if grad_q else None, dks
    end = (real.to(torch.int32) * torch.arange(1, S + 1, device=dev, dtype=torch.int32)).amax(1).to(torch.int32)
    mask8 = real.to(torch.int8).contiguous()
    native_s = native_dot(qs.dtype, ks.dtype, _INTERPRETED)
    native_t = native_dot(qt.dtype, kt.dtype, _INTERPRETED)
    bds, bdt = pow2_dim(DS), pow2_dim(DT)
    bm, bn, num_warps, num_stages = attention_mse.block_sizes(S, bds, bdt, 2 if native_s and native_t else 4,
                                                               block_m, block_n)
    strides = (*qs.stride(), *ks.stride(), *qt.stride(), *kt.stride())
    precision = fp32_dot_precision()
    lse = torch.empty((2, B, H, S), device=dev, dtype=torch.float32) if grad else None
    grid_m = triton.cdiv(S, bm)
    partial = torch.empty(B * H * grid_m, device=dev, dtype=torch.float32)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=bds, BLOCK_DT=bdt, NATIVE_S=native_s, NATIVE_T=native_t,
                  PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    _kl_rows_kernel[(grid_m, B * H)](
        qs, ks, qt, kt, mask8, end, partial, lse if grad else partial, dqs if grad else partial,
        S, H, DS, DT, float(scale_s), float(scale_t), *strides, COMPUTE_GRAD=grad, **common)
    if grad_k:
        _kl_cols_kernel[(triton.cdiv(S, bn), B * H)](
            qs, ks, qt, kt, mask8, end, lse, dks, S, H, DS, DT, float(scale_s), float(scale_t), *strides, **common)
    return partial.sum() / count, count, dqs if grad_q else None, dks


class TritonAttentionKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask, scale_s, scale_t, grad_enabled, block_m, block_n):
        grad_q = grad_enabled and ctx.needs_input_grad[0]
        grad_k = grad_enabled and ctx.needs_input_grad[1]
        loss, count, dqs, dks = _triton_launch(qs, ks, qt, kt, mask, scale_s, scale_t, grad_q=grad_q, grad_k=grad_k,
                                               block_m=block_m, block_n=block_n)
        ctx.save_for_backward(count, dqs, dks)
        ctx.dtypes = (qs.dtype, ks.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        count, dqs, dks = ctx.saved_tensors
        scale = grad_output.float() / count
        return (attention_mse.scale_grad(dqs, scale, ctx.dtypes[0]),
                attention_mse.scale_grad(dks, scale, ctx.dtypes[1]), None, None, None, None, None, None, None, None)


def triton_attention_kl(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, *, block_m: int | None = None,
                        block_n: int | None = None) -> torch.Tensor:
    """The Triton op on equal head counts, any strides; float32 0-dim loss, gradients in the inputs' dtypes."""
    return TritonAttentionKl.apply(qs, ks, qt, kt, mask, float(scale_s), float(scale_t), torch.is_grad_enabled(),
                                   block_m, block_n)


# --- dispatch ------------------------------------------------------------------------------------

def reference_reason(qs, qt, backend: str) -> str | None:
    """Why `backend` hands these inputs to the reference, or None when it runs them itself."""
    if backend == "torch":
        return None
    if qs.shape[1] != qt.shape[1]:
        return "head counts differ: head-averaged distributions"
    if backend == "triton" and attention_mse.merged_too_wide(qs, qt, backend):  # cpp and cuda take any width
        return "heads too wide for the GPU tiles"
    return None


def attention_kl_qk(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, backend: str) -> torch.Tensor:
    """The term on `backend`. qs, ks: (B, Hs, S, ds); qt, kt: (B, Ht, S, dt); mask (B, S). ks may be
    qs itself (a relation): the gradients of both arguments then add up in autograd."""
    if backend != "torch" and backend not in FUSED:
        raise ValueError(f"{NAME}: no {backend!r} backend (torch, {', '.join(FUSED)})")
    why = reference_reason(qs, qt, backend)
    if backend == "torch" or why is not None:
        if qs.shape[1] != qt.shape[1]:
            global _said_heads
            if not _said_heads:
                _said_heads = True
                log.info("%s: %d student heads against %d teacher heads compare head-averaged distributions, "
                         "which only the reference computes", NAME, qs.shape[1], qt.shape[1])
        return reference(qs, ks, qt, kt, mask, scale_s, scale_t)
    if backend == "triton":
        return triton_attention_kl(qs, ks, qt, kt, mask, scale_s, scale_t)
    return ExtensionAttentionKl.apply(qs, ks, qt, kt, mask, scale_s, scale_t, query_count(mask, qs.shape[1]),
                                      torch.is_grad_enabled())


def relation_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, S, d) per-head vectors -> (B, R, S, H*d/R): the concatenated heads split into R."""
    B, H, S, d = x.shape
    if (H * d) % heads:
        raise ValueError(f"{H * d} wide vectors do not split into {heads} relation heads")
    return x.transpose(1, 2).reshape(B, S, heads, H * d // heads).transpose(1, 2)


def relation_kl(xs: torch.Tensor, xt: torch.Tensor, mask: torch.Tensor, heads: int, backend: str) -> torch.Tensor:
    """KL between the teacher's and the student's self-relations softmax(X_r X_r^T / sqrt(d_r)) over R
    relation heads. xs: (B, Hs, S, ds), xt: (B, Ht, S, dt), per-head Q, K or V of each model."""
    rs, rt = relation_heads(xs, heads), relation_heads(xt, heads)
    return attention_kl_qk(rs, rs, rt, rt, mask, rs.shape[-1] ** -0.5, rt.shape[-1] ** -0.5, backend)


# --- self-check -------------------------------------------------------------------------------------

def self_check_cases(device: torch.device, dtype: torch.dtype, teacher_dtype: torch.dtype, gen: torch.Generator):
    """An odd length past one 64-row tile (83), a padded row and an all-padded row; a BERT-sized student
    head against a narrower teacher head; narrow heads; a relation (k = q) with different widths."""
    B, S = 3, 83
    lengths = torch.tensor([S, 37, 0])
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long().to(device)

    def qk(heads, d, dt):
        return tuple(torch.randn(B, heads, S, d, generator=gen).to(device, dt) for _ in range(2))

    cases = []
    for h, ds, dt in ((2, 64, 32), (3, 4, 4)):
        qs, ks = qk(h, ds, dtype)
        qt, kt = qk(h, dt, teacher_dtype)
        cases.append(((qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5), (0, 1)))
    xs = torch.randn(B, 2, S, 24, generator=gen).to(device, dtype)
    xt = torch.randn(B, 2, S, 40, generator=gen).to(device, teacher_dtype)
    cases.append(((xs, xs, xt, xt, mask, 24 ** -0.5, 40 ** -0.5), (0,)))
    return cases
