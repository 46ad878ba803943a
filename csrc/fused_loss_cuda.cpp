// CUDA backend of the fused distillation losses: input checks, the row-chunk loop of the projected
// hidden MSE (its GEMMs go to cuBLAS through ATen) and the operator registration (torch.ops.<module
// name>). The kernels are in fused_loss_cuda_kernels.cu. The module exports the functions of the CPU backend (fused_loss_cpu.cpp),
// with the same argument names (attention_kl_qk adds an optional chunk_rows), so one autograd Function per op
// (fastkd/ops/<op>.py) drives both, and attention_mse_qk_gemm, the tensor-core formulation of the attention
// op for 16-bit inputs. Every function returns the *unnormalised* loss sum (a 0-dim float32 tensor) and its
// gradients, or undefined tensors (None in Python) in place of the gradients when need_grad is false.

// ATen and torch/library.h, not torch/extension.h (the C++ frontend and pybind11: a longer build for nothing).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fused_loss_cuda.h"

namespace {

using fastkd::cuda::kMaxHeadDim;

// The Python wrapper passes an empty tensor for "no weight" / "no bias"; an undefined one is accepted too.
bool absent(const at::Tensor& t) { return !t.defined() || t.numel() == 0; }

// A defined, contiguous CUDA tensor of `dtype` with `dim` dimensions.
void check_dense(const at::Tensor& t, const char* op, const char* name, int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (the Python wrapper casts), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  check_dense(t, op, name, dim, at::kFloat);
}

void check_mask(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be torch.bool (the Python wrapper casts), got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ",
              ref.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// The inputs of the cuBLAS formulations: each model's q and k share one of float16, bfloat16 and
// float32 (the two models may differ); one device; qs, ks (B, H, S, ds), qt, kt (B, H, S, dt), mask (B, S).
void check_qk_gemm_inputs(const char* op, const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                          const at::Tensor& kt, const at::Tensor& mask) {
  for (const at::Tensor* q : {&qs, &qt}) {
    const at::ScalarType dtype = q->scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
                ": inputs must be float16, bfloat16 or float32, got ", dtype);
  }
  check_dense(qs, op, "qs", 4, qs.scalar_type());
  check_dense(ks, op, "ks", 4, qs.scalar_type());
  check_dense(qt, op, "qt", 4, qt.scalar_type());
  check_dense(kt, op, "kt", 4, qt.scalar_type());
  check_mask(mask, op, "mask", 2);
  check_same_device(ks, qs, op, "ks");
  check_same_device(qt, qs, op, "qt");
  check_same_device(kt, qs, op, "kt");
  check_same_device(mask, qs, op, "mask");
  const int64_t B = qs.size(0), H = qs.size(1), S = qs.size(2);
  check_shape(ks, qs.sizes(), op, "ks");
  check_shape(qt, {B, H, S, qt.size(3)}, op, "qt (teacher queries: same B, H, S as qs; equal head counts)");
  check_shape(kt, qt.sizes(), op, "kt");
  check_shape(mask, {B, S}, op, "mask");
}

}  // namespace

// qs, ks (B,H,S,ds); qt, kt (B,H,S,dt); mask (B,S) bool -> {loss_sum, dqs, dks}.
std::vector<at::Tensor> attention_mse_qk(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                         const at::Tensor& kt, const at::Tensor& mask, double scale_s,
                                         double scale_t, bool need_grad) {
  constexpr const char* op = "attention_mse_qk";
  check_float(qs, op, "qs", 4);
  check_float(ks, op, "ks", 4);
  check_float(qt, op, "qt", 4);
  check_float(kt, op, "kt", 4);
  check_mask(mask, op, "mask", 2);
  check_same_device(ks, qs, op, "ks");
  check_same_device(qt, qs, op, "qt");
  check_same_device(kt, qs, op, "kt");
  check_same_device(mask, qs, op, "mask");
  const int64_t B = qs.size(0), H = qs.size(1), S = qs.size(2), ds = qs.size(3), dt = qt.size(3);
  check_shape(ks, qs.sizes(), op, "ks");
  check_shape(qt, {B, H, S, dt}, op, "qt (teacher queries: same B, H, S as qs)");
  check_shape(kt, qt.sizes(), op, "kt");
  check_shape(mask, {B, S}, op, "mask");
  TORCH_CHECK(ds <= kMaxHeadDim && dt <= kMaxHeadDim, op, ": head dims up to ", kMaxHeadDim,
              " are supported, got ds=", ds, ", dt=", dt);

  const c10::cuda::CUDAGuard guard(qs.device());
  at::Tensor dqs, dks;
  if (need_grad) {
    dqs = at::empty_like(qs);  // fully written by the kernels
    dks = at::empty_like(ks);
  }
  at::Tensor loss_sum = fastkd::cuda::attention_mse_qk_launch(qs, ks, qt, kt, mask, scale_s, scale_t, dqs, dks);
  return {loss_sum, dqs, dks};
}

// a @ b on cuBLAS with a float32 result: 16-bit operands accumulate in float32 on tensor cores.
at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

// The chunk loop of the cuBLAS formulations (attention MSE, attention KL). Per chunk of query rows
// r0 .. r0 + rows - 1: both models' raw scores s, t (B*H, rows, S) from batched GEMMs with float32
// output (16-bit operands on tensor cores); `elementwise(s, t, r0, g)` returns the chunk's loss
// partials and, when g is defined, writes there G = d loss / d (scale_s s), 0 at invalid pairs; then
// the gradients are two more GEMMs: dqs rows = scale_s G ks, dks += scale_s G^T qs. g is a buffer in the
// student's dtype, or s itself when `g_in_scores` and the student is float32 (the kernel allows it).
// Memory: three (B*H, chunk_rows, S) buffers, never S x S per head unless one chunk holds every row.
template <typename Elementwise>
std::vector<at::Tensor> qk_gemm_chunks(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                       const at::Tensor& kt, double scale_s, bool need_grad, int64_t chunk_rows,
                                       bool g_in_scores, Elementwise&& elementwise) {
  const int64_t B = qs.size(0), H = qs.size(1), S = qs.size(2), ds = qs.size(3), dt = qt.size(3);
  const c10::cuda::CUDAGuard guard(qs.device());
  const at::Tensor qs3 = qs.view({B * H, S, ds}), ks3 = ks.view({B * H, S, ds});
  const at::Tensor qt3 = qt.view({B * H, S, dt}), kt3 = kt.view({B * H, S, dt});
  const at::Tensor ks3_t = ks3.transpose(1, 2), kt3_t = kt3.transpose(1, 2);
  const bool in_place = g_in_scores && qs.scalar_type() == at::kFloat;
  at::Tensor dqs, dks;
  if (need_grad) {
    dqs = at::empty({B * H, S, ds}, qs.options().dtype(at::kFloat));  // every chunk writes its rows
    dks = at::zeros({B * H, S, ds}, qs.options().dtype(at::kFloat));
  }
  std::vector<at::Tensor> partials;
  for (int64_t r0 = 0; r0 < S; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, S - r0);
    const at::Tensor qs_c = qs3.narrow(1, r0, rows);
    const at::Tensor s = bmm_f32(qs_c, ks3_t);  // (BH, rows, S) float32
    const at::Tensor t = bmm_f32(qt3.narrow(1, r0, rows), kt3_t);
    at::Tensor g;  // undefined: loss only
    if (need_grad) g = in_place ? s : at::empty({B * H, rows, S}, qs.options());
    partials.push_back(elementwise(s, t, r0, g));
    if (!need_grad) continue;
    dqs.narrow(1, r0, rows).copy_(bmm_f32(g, ks3)).mul_(scale_s);  // (BH, rows, ds)
    dks.add_(bmm_f32(g.transpose(1, 2), qs_c), scale_s);            // (BH, S, ds)
  }
  at::Tensor loss_sum = partials.empty() ? at::zeros({}, qs.options().dtype(at::kFloat)) : at::cat(partials).sum();
  if (need_grad) {
    dqs = dqs.view({B, H, S, ds});
    dks = dks.view({B, H, S, ds});
  }
  return {loss_sum, dqs, dks};
}

// Same contract as attention_mse_qk, for 16-bit inputs (or float32 with TF32), on qk_gemm_chunks: one
// kernel per chunk forms the masked difference D = scale_s s - scale_t t, sums its square and keeps
// G = 2 D in the inputs' type.
std::vector<at::Tensor> attention_mse_qk_gemm(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                              const at::Tensor& kt, const at::Tensor& mask, double scale_s,
                                              double scale_t, bool need_grad, int64_t chunk_rows) {
  constexpr const char* op = "attention_mse_qk_gemm";
  check_qk_gemm_inputs(op, qs, ks, qt, kt, mask);
  TORCH_CHECK(chunk_rows > 0, op, ": chunk_rows must be positive, got ", chunk_rows);
  const int64_t H = qs.size(1);
  // The residual kernel's s and d are __restrict__: never in place.
  return qk_gemm_chunks(qs, ks, qt, kt, scale_s, need_grad, chunk_rows, false,
                        [&](const at::Tensor& s, const at::Tensor& t, int64_t r0, const at::Tensor& g) {
                          return fastkd::cuda::qk_chunk_residual_launch(s, t, mask, r0, H, scale_s, scale_t, g);
                        });
}

// KL(softmax(A_t) || softmax(A_s)) summed over real query rows and heads, A = scale q k^T over real keys,
// equal head counts; {loss_sum, dqs, dks} like the CPU backend's attention_kl_qk, on qk_gemm_chunks
// (chunk_rows <= 0: all rows at once): one kernel per chunk for the rows' log-sum-exps, the KL and
// G = p_s - p_t, in place of the student's scores when float32. The log-sum-exp of a row needs all its
// keys, so a chunk spans every key; the Python side sizes chunk_rows (attention_mse.gemm_chunk_rows).
std::vector<at::Tensor> attention_kl_qk(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                        const at::Tensor& kt, const at::Tensor& mask, double scale_s,
                                        double scale_t, bool need_grad, int64_t chunk_rows) {
  constexpr const char* op = "attention_kl_qk";
  check_qk_gemm_inputs(op, qs, ks, qt, kt, mask);
  const int64_t H = qs.size(1), S = qs.size(2);
  if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(S, 1);
  return qk_gemm_chunks(qs, ks, qt, kt, scale_s, need_grad, chunk_rows, true,
                        [&](const at::Tensor& s, const at::Tensor& t, int64_t r0, const at::Tensor& g) {
                          return fastkd::cuda::attention_kl_rows_launch(s, t, mask, r0, H, scale_s, scale_t, g);
                        });
}

// hs (N,Ds), ht (N,Dt), row_mask (N,) bool, weight (Dt,Ds) or empty (identity), bias (Dt,) or empty
// -> {loss_sum, dhs, dweight or undefined, dbias or undefined}, loss_sum = sum over masked rows of
// |hs W^T + b - ht|^2. Rows go by chunks of chunk_rows so the projection P is never held whole.
std::vector<at::Tensor> projected_mse(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& row_mask,
                                      const at::Tensor& weight, const at::Tensor& bias, bool need_grad,
                                      int64_t chunk_rows) {
  constexpr const char* op = "projected_mse";
  check_float(hs, op, "hs", 2);
  check_float(ht, op, "ht", 2);
  check_mask(row_mask, op, "row_mask", 1);
  check_same_device(ht, hs, op, "ht");
  check_same_device(row_mask, hs, op, "row_mask");
  const int64_t N = hs.size(0), Ds = hs.size(1), Dt = ht.size(1);
  TORCH_CHECK(ht.size(0) == N, op, ": ht must have as many rows as hs (", N, "), got shape ", ht.sizes());
  check_shape(row_mask, {N}, op, "row_mask");
  const bool has_weight = !absent(weight), has_bias = !absent(bias);
  if (has_weight) {
    check_float(weight, op, "weight", 2);
    check_same_device(weight, hs, op, "weight");
    check_shape(weight, {Dt, Ds}, op, "weight (Dt, Ds)");
  } else {
    TORCH_CHECK(Ds == Dt, op, ": without a weight (identity) the widths must match, got Ds=", Ds, ", Dt=", Dt);
  }
  if (has_bias) {
    check_float(bias, op, "bias", 1);
    check_same_device(bias, hs, op, "bias");
    check_shape(bias, {Dt}, op, "bias (Dt,)");
  }
  TORCH_CHECK(chunk_rows > 0, op, ": chunk_rows must be positive, got ", chunk_rows);

  const c10::cuda::CUDAGuard guard(hs.device());
  at::Tensor dhs, dweight, dbias;
  if (need_grad) {
    dhs = at::empty_like(hs);  // every chunk writes its rows
    if (has_weight) dweight = at::zeros_like(weight);
    if (has_bias) dbias = at::zeros_like(bias);
  }
  // P = hs_chunk W^T + b, reused by every chunk. With a weight the residual kernel overwrites P by
  // G = 2 (P - ht) mask in place; with the identity G is dhs_chunk itself and is written there.
  // Identity without bias needs no buffer: P is hs_chunk, read only.
  const int64_t buffer_rows = std::min(chunk_rows, N);
  at::Tensor buffer;
  if (has_weight || has_bias) buffer = at::empty({buffer_rows, Dt}, hs.options());

  std::vector<at::Tensor> partials;
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - r0);
    const at::Tensor hs_c = hs.narrow(0, r0, rows);  // row slices of contiguous tensors: contiguous
    const at::Tensor ht_c = ht.narrow(0, r0, rows);
    const at::Tensor mask_c = row_mask.narrow(0, r0, rows);
    at::Tensor p = hs_c;
    if (has_weight || has_bias) {
      p = buffer.narrow(0, 0, rows);
      if (has_weight && has_bias) at::addmm_out(p, bias, hs_c, weight.t());
      else if (has_weight) at::mm_out(p, hs_c, weight.t());
      else at::add_out(p, hs_c, bias);
    }
    at::Tensor g;  // undefined: loss only
    if (need_grad) g = has_weight ? p : dhs.narrow(0, r0, rows);
    partials.push_back(fastkd::cuda::projected_mse_residual_launch(p, ht_c, mask_c, g));
    if (!need_grad) continue;
    if (has_weight) {
      at::Tensor dhs_c = dhs.narrow(0, r0, rows);
      at::mm_out(dhs_c, g, weight);      // (rows, Dt) @ (Dt, Ds)
      dweight.addmm_(g.t(), hs_c);       // += (Dt, rows) @ (rows, Ds)
    }
    if (has_bias) dbias.add_(g.sum(0));  // += (Dt,)
  }
  at::Tensor loss_sum = partials.empty() ? at::zeros({}, hs.options()) : at::cat(partials).sum();
  return {loss_sum, dhs, dweight, dbias};
}

// TORCH_LIBRARY pastes its namespace argument unexpanded: one more macro level expands TORCH_EXTENSION_NAME
// (the build's module name, so two builds never share a namespace in one process).
#define FASTKD_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

FASTKD_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // attention-score MSE from Q/K without an S x S tensor: [loss_sum, dqs, dks]
  m.def("attention_mse_qk(Tensor qs, Tensor ks, Tensor qt, Tensor kt, Tensor mask, float scale_s, float scale_t, "
        "bool need_grad) -> Tensor[]", &attention_mse_qk);
  // attention-score MSE from 16-bit Q/K on tensor cores, by query-row chunks: [loss_sum, dqs, dks]
  m.def("attention_mse_qk_gemm(Tensor qs, Tensor ks, Tensor qt, Tensor kt, Tensor mask, float scale_s, "
        "float scale_t, bool need_grad, int chunk_rows) -> Tensor[]", &attention_mse_qk_gemm);
  // attention-distribution KL from Q/K by query-row chunks, no S x S tensor per head: [loss_sum, dqs, dks]
  m.def("attention_kl_qk(Tensor qs, Tensor ks, Tensor qt, Tensor kt, Tensor mask, float scale_s, float scale_t, "
        "bool need_grad, int chunk_rows=0) -> Tensor[]", &attention_kl_qk);
  // hidden-state MSE through a projection, by row chunks: [loss_sum, dhs, dweight, dbias]
  m.def("projected_mse(Tensor hs, Tensor ht, Tensor row_mask, Tensor weight, Tensor bias, bool need_grad, "
        "int chunk_rows) -> Tensor[]", &projected_mse);
}
