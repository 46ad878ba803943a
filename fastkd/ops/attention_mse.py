"""Attention-score MSE (TinyBERT's attention term) from the student's and teacher's Q and K.

    D[b,h,i,j] = scale_s <qs[b,h,i], ks[b,h,j]> - scale_t <qt[b,h,i], kt[b,h,j]>
    loss       = sum_{valid (b,h,i,j)} D^2 / max(H * sum_b n_b^2, 1),  valid: tokens i and j both real
    dL/dqs_i   = (2 scale_s / count) sum_j valid D_ij ks_j,   dL/dks_j likewise with qs_i

One module per op (Liger-Kernel's layout): the torch reference, the binding of the compiled extension
(csrc/, cpp and cuda backends), the dispatch over backends, and the small random cases the self-check
runs before first use; the Triton kernels and their autograd Function are in kernels/attention_mse.py
(fastkd.kernels).

Head counts: equal counts compare head by head; different counts compare head-averaged scores. The
head average of q_h k_h^T equals [q_1 .. q_H][k_1 .. k_H]^T / H, so the fused ops see one "head" of
width H*d with the scale divided by H, and never average an S x S tensor. The GPU kernels tile heads
up to GPU_MAX_HEAD_DIM wide; wider (merged) heads use the reference on the single (B, 1, S, S)
merged score tensor, H times smaller than per-head scores.

Precision. The reference computes each model's scores in float32 from the inputs as given (16-bit
inputs are exact in float32). The fused backends:
  cpp     float32 (float64 for gradcheck), OpenMP; bf16 inputs of both models stay bf16 on a CPU whose
          oneDNN has bf16 GEMMs (AVX512, AMX: device.bf16_is_native), into bf16 GEMMs with
          float32 accumulation. ATen's CPU GEMMs return bf16, so the kernel rounds the scores'
          *difference* once (one GEMM over the concatenated operands, the teacher's scaled by
          scale_t / scale_s exactly: split in two bf16 parts where that ratio is not a power of two),
          never each model's scores, and its gradients once more (tolerance as the GPU 16-bit paths).
          Elsewhere, or when any of the four inputs is not bf16, they are upcast;
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

from ..kernels.attention_mse import triton_attention_mse
from ..device import bf16_is_native
from . import _extension as ext

log = logging.getLogger(__name__)

NAME = "attention_mse"
FUSED = ("cpp", "triton", "cuda")
GPU_MAX_HEAD_DIM = 128  # widest head the Triton/CUDA kernels tile (registers / shared memory)
GEMM_CHUNK_BYTES = 64 << 20  # per-chunk working set of the cuda backend's cuBLAS formulation
native_bf16: bool | None = None  # the cpp backend's bf16 GEMMs: None = where the CPU has them; tests force it
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


# --- the compiled extension (cpp, cuda) -----------------------------------------------------------

def uses_gemm(qs, qt) -> bool:
    """Whether the cuda backend takes its cuBLAS (tensor-core) formulation for these inputs."""
    if qs.dtype in (torch.float16, torch.bfloat16):
        return qt.dtype == qs.dtype
    return qs.dtype == torch.float32 and qt.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def cpu_bf16(*inputs) -> bool:
    """Whether the cpp backend keeps these inputs (Q and K of both models) bf16: all of them are, on a CPU
    with bf16 GEMMs (see Precision above)."""
    if not all(x.device.type == "cpu" and x.dtype == torch.bfloat16 for x in inputs):
        return False
    return bf16_is_native(inputs[0].device) if native_bf16 is None else native_bf16


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
            if cpu_bf16(qs, ks, qt, kt):
                same = lambda x: x.detach().contiguous()  # noqa: E731
                return module.attention_mse_qk(same(qs), same(ks), same(qt), same(kt), mask.bool().contiguous(),
                                               float(scale_s), float(scale_t), need_grad)
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
