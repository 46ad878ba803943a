"""MiniLM's attention-distribution term: KL(softmax(A_t) || softmax(A_s)) from Q and K.

    A[b,h,i,:] = scale * q_i K^T over real keys; KL summed over real keys, mean over heads and real
    queries. Different head counts compare head-averaged distributions.

Only the torch reference exists so far (it materialises B x H x S x S scores); every backend request
runs it, and the selection says so once (fastkd.ops.select). A fused form is future work.
"""

from __future__ import annotations

import math

import torch

from .attention_mse import attention_scores, pair_mask

NAME = "attention_kl"
FUSED: tuple[str, ...] = ()


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


def attention_kl_qk(qs, ks, qt, kt, mask, scale_s: float, scale_t: float, backend: str) -> torch.Tensor:
    """The term on `backend` (only `torch` exists for it)."""
    if backend != "torch":
        raise ValueError(f"{NAME}: no {backend!r} backend (only the torch reference)")
    return reference(qs, ks, qt, kt, mask, scale_s, scale_t)
