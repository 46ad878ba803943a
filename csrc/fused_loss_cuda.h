// Host launchers of the CUDA fused distillation losses (defined in fused_loss_cuda_kernels.cu, called by
// fused_loss_cuda.cpp). The torch reference of each op is in its module, fastkd/ops/<op>.py; every
// function here works on the *unnormalised* loss sum.
//
// Preconditions (checked by the caller, fused_loss_cuda.cpp, not again here): every tensor is a
// contiguous CUDA tensor on the current device (the caller holds a device guard), float32 unless
// stated otherwise; masks are contiguous torch.bool; shapes are consistent. Work is queued on the current CUDA stream; nothing
// here synchronises with the host. Reductions are deterministic: per-block partial sums reduced by
// at::sum, never float atomics.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastkd {
namespace cuda {

// Largest student / teacher head dimension the tiled Q/K kernel accepts (each side separately).
constexpr int64_t kMaxHeadDim = 128;

// Op 1, attention-score MSE from Q/K without materialising S x S:
//   D[b,h,i,j] = scale_s <qs_i, ks_j> - scale_t <qt_i, kt_j>, counted where mask[b,i] && mask[b,j].
// qs, ks: (B, H, S, ds); qt, kt: (B, H, S, dt); mask: (B, S) bool.
// dqs, dks: undefined (no gradient) or preallocated (B, H, S, ds); every element is written
//   (d loss_sum / d qs and d ks; zero rows for padded tokens).
// Returns loss_sum as a 0-dim float32 tensor.
at::Tensor attention_mse_qk_launch(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                   const at::Tensor& kt, const at::Tensor& mask, double scale_s, double scale_t,
                                   const at::Tensor& dqs, const at::Tensor& dks);

// Op 1, cuBLAS formulation (16-bit inputs, or float32 with TF32), the elementwise half of one chunk
// of query rows r0 .. r0 + rows - 1. s, t: (B*H, rows, S) float32 raw scores of the chunk; mask (B, S)
// bool; heads = H. d: undefined (no gradient) or (B*H, rows, S) float16 / bfloat16 / float32, written
// with 2 * (scale_s s - scale_t t) * valid. Returns per-block partial sums of the masked squared
// difference (1-D float32, possibly empty); the caller reduces all chunks' partials with one at::sum.
at::Tensor qk_chunk_residual_launch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, int64_t r0,
                                    int64_t heads, double scale_s, double scale_t, const at::Tensor& d);

// Op 2, the row half of the attention-distribution KL of one chunk of query rows r0 .. r0 + rows - 1.
// s, t: (B*H, rows, S) float32 raw scores of the chunk (student, teacher); mask (B, S) bool; heads = H.
// Per real query row: KL(softmax(scale_t t) || softmax(scale_s s)) over the real keys. d: undefined (no
// gradient) or (B*H, rows, S) float16 / bfloat16 / float32 (may be s itself when float32), written
// with G = softmax(scale_s s) - softmax(scale_t t) at real (query, key) pairs, 0 elsewhere. Returns
// per-block partial sums of the KL (1-D float32, possibly empty); the caller reduces them with at::sum.
at::Tensor attention_kl_rows_launch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, int64_t r0,
                                   int64_t heads, double scale_s, double scale_t, const at::Tensor& d);

// Op 3, the elementwise half of one row chunk of the projected hidden MSE.
// p: (rows, Dt) the projection P = hs W^T + b of the chunk; ht: (rows, Dt); row_mask: (rows,) bool.
// g: undefined (no gradient) or (rows, Dt), written with G = 2 * (p - ht) * row_mask; g may be p itself
//   (in place: each element is read before it is overwritten by the same thread).
// Returns the chunk's per-block partial sums of the masked squared error (1-D float32, possibly
// empty); the caller reduces all chunks' partials with one at::sum.
at::Tensor projected_mse_residual_launch(const at::Tensor& p, const at::Tensor& ht, const at::Tensor& row_mask,
                                         const at::Tensor& g);

}  // namespace cuda
}  // namespace fastkd
