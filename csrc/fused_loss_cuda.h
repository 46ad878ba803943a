// Host launchers of the CUDA fused distillation losses (defined in fused_loss_cuda_kernels.cu, called by
// fused_loss_cuda.cpp). The torch reference of the three ops is fastkd/losses.py (attention_mse,
// attention_scores, hidden_mse); every function here works on the *unnormalised* loss sum.
//
// Preconditions (checked by the caller, fused_loss_cuda.cpp, not again here): every tensor is a
// contiguous float32 CUDA tensor on the current device (the caller holds a device guard), masks are
// contiguous torch.bool, shapes are consistent. Work is queued on the current CUDA stream; nothing
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

// Op 2, attention-score MSE from materialised scores. s, t: (B, H, S, S); mask: (B, S) bool.
// grad: undefined or preallocated (B, H, S, S), fully written with 2 * (s - t) * valid.
// Returns loss_sum as a 0-dim float32 tensor.
at::Tensor attention_mse_scores_launch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask,
                                       const at::Tensor& grad);

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
