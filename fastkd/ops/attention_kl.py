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
  triton two flash-attention style kernels (kernels/attention_kl.py): rows (online log-sum-exp of both models, then the
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

from ..kernels.attention_kl import triton_attention_kl
from . import _extension as ext
from . import attention_mse
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
