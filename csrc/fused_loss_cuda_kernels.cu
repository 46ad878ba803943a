// CUDA kernels of the fused distillation losses and their host launchers (declared in
// fused_loss_cuda.h). The torch reference of each op is in fastkd/ops/<op>.py; everything here computes the
// *unnormalised* loss sum and its gradients, the Python wrapper divides by the count.
//
// Design rules shared by all kernels:
// - float32 math throughout (16-bit values only as GEMM operands), inputs contiguous (checked in
//   fused_loss_cuda.cpp);
// - deterministic: each block writes one partial sum, the partials are reduced by at::sum on the
//   same stream (no float atomics, so the loss is bit-identical run to run on one device);
// - masked elements contribute exactly 0 to the loss and the gradient, selected (not multiplied),
//   so NaN/Inf sitting in padded positions never leaks into the result (except on the cuBLAS path
//   of Op 1, whose gradient GEMMs multiply the zeroed D by the padded rows of Q and K: those are
//   projections of real embeddings, finite, so this costs nothing in practice);
// - work goes to the current CUDA stream, every launch is checked.
//
// Headers: only c10/cuda ones (CUDAStream, CUDAException, CUDAFunctions). ATen/cuda/CUDAContext.h
// would pull cublas_v2.h / cusparse.h, which a bare toolkit install (nvcc + cudart) may lack, and
// at::cuda::getCurrentCUDAStream is the same function as c10::cuda::getCurrentCUDAStream. Of ATen only
// the Tensor class and at::empty: ATen/ATen.h would be parsed by cudafe++, by cicc once per architecture
// and by the host compiler, a third of the build's time (measured with nvcc --time).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fused_loss_cuda.h"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // every kernel below runs 1-D blocks of this size
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;  // hardware limit of gridDim.y

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int current_device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sum of `v` over the block (kThreads threads, all must call); the result is valid in thread 0.
// `scratch` holds kWarps floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// VEC consecutive floats moved as one 16-byte (VEC = 4) or 4-byte (VEC = 1) access.
template <int VEC>
struct alignas(sizeof(float) * VEC) Pack {
  float v[VEC];
};

// ---------------------------------------------------------------------------------------------
// Op 1: attention-score MSE from Q/K, flash-attention style (never an S x S tensor).
//
// With the concatenations   A_i = [scale_s qs_i | -scale_t qt_i]   (length ds + dt)
//                           K_j = [ks_j | kt_j]
// D[i,j] = <A_i, K_j> is one dot product of length ds + dt. A pass keeps one block of BM rows of
// one side ("fixed") in shared memory and streams BN-row tiles of the other side past it:
//   pass 1 (query rows fixed): fixed = A, streamed = K; accumulates
//       loss partial = sum D^2 and dqs_i = 2 scale_s sum_j D[i,j] ks_j;
//   pass 2 (key rows fixed):   fixed = K, streamed = A (D^T, the same numbers); accumulates
//       dks_j = 2 sum_i D[i,j] (scale_s qs_i)   (the streamed side is already scaled).
// Both passes are the same kernel; the fixed side's gradient sits in registers for the whole pass,
// so dq and dk need no atomics (pass 2 costs a second D computation instead).
//
// Masking is done once, while staging: a padded (or out-of-range) row is staged as zeros, so D is
// exactly 0 wherever valid(i, j) is false and the inner loops test nothing. A block whose fixed rows
// are all padded (e.g. an all-padded batch row) only writes zeros; an all-padded streamed tile is
// skipped by the whole block (__syncthreads_or).
//
// Thread layout: 16 x 16 threads (tx = tid % 16, ty = tid / 16). Thread (ty, tx) owns the TM x TN
// patch of the D tile at rows ty + 16a, columns tx + 16b: strided (not blocked) so that in a warp
// (two ty values, sixteen tx values) the shared-memory reads fall in distinct banks given an odd
// row stride `ld` (see qk_row_stride), or are broadcasts. For the gradient the same thread owns
// rows ty + 16a and head-dim columns tx + 16n (n < NC, NC * 16 >= ds).
// ---------------------------------------------------------------------------------------------

struct QKPassParams {
  const float* fixed_s;   // (BH, S, ds)  side whose rows are fixed and whose gradient is accumulated
  const float* fixed_t;   // (BH, S, dt)
  const float* stream_s;  // (BH, S, ds)  side streamed tile by tile
  const float* stream_t;  // (BH, S, dt)
  const bool* mask;       // (B, S)
  float* grad;            // (BH, S, ds) gradient of the fixed student side, or nullptr
  float* partials;        // (BH * gridDim.x) loss partial per block, or nullptr (pass 2)
  float fixed_scale_s, fixed_scale_t;    // staged fixed row = [fixed_scale_s x_s | fixed_scale_t x_t]
  float stream_scale_s, stream_scale_t;  // same for streamed rows
  float grad_scale;                      // grad = grad_scale * sum_j D[i,j] * staged_stream_s[j]
  int S, ds, dt, heads;
  int ld;             // shared-memory row stride in floats: ds + dt rounded up to odd
  int64_t bh_offset;  // first (b, h) of this launch (gridDim.y is capped at 65535)
};

// Row stride of the staged tiles: the concatenated head dim rounded up to an odd number, so that
// sixteen different rows read at the same column hit sixteen different banks.
int qk_row_stride(int dcat) { return dcat % 2 == 0 ? dcat + 1 : dcat; }

// Dynamic shared memory of one block: fixed tile [BM][ld] + streamed tile [BN][ld]
// (+ the D tile [BM][BN + 1] when the gradient is wanted, to hand D from its owner to the threads
// that own the gradient columns).
size_t qk_smem_bytes(int bm, int bn, int ld, bool with_grad) {
  size_t floats = static_cast<size_t>(bm + bn) * ld;
  if (with_grad) floats += static_cast<size_t>(bm) * (bn + 1);
  return floats * sizeof(float);
}

// dst[r][k] for r < ROWS:  scale_s * xs[row0 + r][k]       (k < ds)
//                          scale_t * xt[row0 + r][k - ds]  (ds <= k < ds + dt)
// or 0 for a padded / out-of-range row (row_valid[r] false). xs, xt point at one (b, h).
// The two halves are copied separately: each is one contiguous run of global memory, so the reads
// coalesce whatever ds and dt are.
template <int ROWS>
__device__ __forceinline__ void qk_stage_rows(float* dst, int ld, const float* __restrict__ xs,
                                              const float* __restrict__ xt, int ds, int dt, int row0,
                                              const bool* row_valid, float scale_s, float scale_t) {
  const float* src_s = xs + static_cast<int64_t>(row0) * ds;
  for (int idx = threadIdx.x; idx < ROWS * ds; idx += kThreads) {
    const int r = idx / ds, k = idx - r * ds;
    dst[r * ld + k] = row_valid[r] ? scale_s * src_s[idx] : 0.f;
  }
  const float* src_t = xt + static_cast<int64_t>(row0) * dt;
  for (int idx = threadIdx.x; idx < ROWS * dt; idx += kThreads) {
    const int r = idx / dt, k = idx - r * dt;
    dst[r * ld + ds + k] = row_valid[r] ? scale_t * src_t[idx] : 0.f;
  }
}

// grid (ceil(S / BM), #(b, h) in this launch); block kThreads; dynamic smem qk_smem_bytes(BM, BN, ld,
// WITH_GRAD). TM x TN = D entries per thread, NC = gradient columns per thread (16 NC >= ds).
// Budget (ptxas, CUDA 13, sm_80/sm_90): at most 117 registers (64 x 64 tiles, NC = 8), no spills;
// __launch_bounds__(256, 2) caps them at 128 so two blocks share an SM. Shared memory for 64 x 64
// tiles with the gradient: 81 KiB at ds + dt = 128 (two blocks per SM on sm_80 and sm_90), 145 KiB
// at ds + dt = 256 (one block).
template <int TM, int TN, int NC, bool WITH_GRAD>
__global__ void __launch_bounds__(kThreads, 2) attention_mse_qk_pass_kernel(const QKPassParams p) {
  constexpr int BM = 16 * TM;  // fixed rows per block
  constexpr int BN = 16 * TN;  // streamed rows per tile
  constexpr int DLD = BN + 1;  // row stride of the D tile (odd: conflict-free column reads)

  extern __shared__ float smem[];
  float* fixed = smem;               // [BM][ld]
  float* stream = fixed + BM * p.ld;  // [BN][ld]
  float* dtile = stream + BN * p.ld;  // [BM][DLD], WITH_GRAD only
  __shared__ bool fixed_valid[BM];
  __shared__ bool stream_valid[BN];
  __shared__ float scratch[kWarps];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int S = p.S, ds = p.ds, dt = p.dt, dcat = ds + dt, ld = p.ld;
  const int64_t bh = p.bh_offset + blockIdx.y;
  const bool* mask = p.mask + (bh / p.heads) * S;  // this batch row's (S,) token mask
  const int row0 = blockIdx.x * BM;

  const float* fixed_s = p.fixed_s + bh * S * ds;
  const float* fixed_t = p.fixed_t + bh * S * dt;
  const float* stream_s = p.stream_s + bh * S * ds;
  const float* stream_t = p.stream_t + bh * S * dt;

  bool valid = false;
  if (tid < BM) {
    valid = row0 + tid < S && mask[row0 + tid];
    fixed_valid[tid] = valid;
  }
  const bool any_fixed = __syncthreads_or(valid);

  float loss = 0.f;            // this thread's share of sum D^2
  float acc[TM][NC] = {};      // gradient of rows ty + 16a, columns tx + 16n (unscaled)
  if (any_fixed) {  // block-uniform; an all-padded fixed block falls through and writes zeros
    qk_stage_rows<BM>(fixed, ld, fixed_s, fixed_t, ds, dt, row0, fixed_valid, p.fixed_scale_s,
                      p.fixed_scale_t);

    for (int col0 = 0; col0 < S; col0 += BN) {
      // This barrier also retires the previous tile's readers of `stream` and `dtile`.
      valid = false;
      if (tid < BN) {
        valid = col0 + tid < S && mask[col0 + tid];
        stream_valid[tid] = valid;
      }
      if (!__syncthreads_or(valid)) continue;  // an all-padded key (query) tile: D == 0 there
      qk_stage_rows<BN>(stream, ld, stream_s, stream_t, ds, dt, col0, stream_valid, p.stream_scale_s,
                        p.stream_scale_t);
      __syncthreads();

      // D tile: d[a][b] = <fixed row ty + 16a, streamed row tx + 16b> over the concatenated head dim.
      float d[TM][TN] = {};
      const float* frow = fixed + ty * ld;
      const float* srow = stream + tx * ld;
#pragma unroll 4
      for (int k = 0; k < dcat; ++k) {
        float f[TM], s[TN];
#pragma unroll
        for (int a = 0; a < TM; ++a) f[a] = frow[a * 16 * ld + k];
#pragma unroll
        for (int b = 0; b < TN; ++b) s[b] = srow[b * 16 * ld + k];
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
          for (int b = 0; b < TN; ++b) d[a][b] = fmaf(f[a], s[b], d[a][b]);
      }
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) loss = fmaf(d[a][b], d[a][b], loss);

      if constexpr (WITH_GRAD) {
        // grad[i, c] += sum_j D[i, j] * streamed_s[j, c]: D changes owner through shared memory
        // (its owner holds columns j, the gradient needs whole rows).
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
          for (int b = 0; b < TN; ++b) dtile[(ty + 16 * a) * DLD + tx + 16 * b] = d[a][b];
        __syncthreads();
        bool col_ok[NC];
#pragma unroll
        for (int n = 0; n < NC; ++n) col_ok[n] = tx + 16 * n < ds;
        for (int j = 0; j < BN; ++j) {
          float dv[TM], sv[NC];
#pragma unroll
          for (int a = 0; a < TM; ++a) dv[a] = dtile[(ty + 16 * a) * DLD + j];  // 2 addresses a warp
#pragma unroll
          for (int n = 0; n < NC; ++n) sv[n] = col_ok[n] ? stream[j * ld + tx + 16 * n] : 0.f;
#pragma unroll
          for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int n = 0; n < NC; ++n) acc[a][n] = fmaf(dv[a], sv[n], acc[a][n]);
        }
      }
    }
  }

  if constexpr (WITH_GRAD) {
    // Every row of the block is written (zeros for padded rows): the output is at::empty.
    float* grad = p.grad + bh * S * ds;
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int row = row0 + ty + 16 * a;
      if (row >= S) continue;
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int c = tx + 16 * n;
        if (c < ds) grad[static_cast<int64_t>(row) * ds + c] = p.grad_scale * acc[a][n];
      }
    }
  }
  if (p.partials != nullptr) {  // block-uniform
    const float total = block_sum(loss, scratch);
    if (tid == 0) p.partials[bh * gridDim.x + blockIdx.x] = total;
  }
}

// Launches one pass over all (b, h), in slices of at most 65535 along gridDim.y.
template <int TM, int TN, int NC, bool WITH_GRAD>
void launch_qk_pass(QKPassParams p, int64_t bh_total, cudaStream_t stream) {
  constexpr int BM = 16 * TM, BN = 16 * TN;
  auto kernel = attention_mse_qk_pass_kernel<TM, TN, NC, WITH_GRAD>;
  const size_t smem = qk_smem_bytes(BM, BN, p.ld, WITH_GRAD);
  // Above 48 KiB a kernel must opt in to its dynamic shared memory (sm_80: up to 163 KiB, sm_90: 227).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const unsigned tiles = static_cast<unsigned>(ceil_div(p.S, BM));
  for (int64_t first = 0; first < bh_total; first += kMaxGridY) {
    p.bh_offset = first;
    const dim3 grid(tiles, static_cast<unsigned>(std::min(kMaxGridY, bh_total - first)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Picks the gradient width NC (columns per thread, 16 NC >= ds) at compile time.
template <int TM, int TN>
void dispatch_qk_pass(const QKPassParams& p, bool with_grad, int64_t bh_total, cudaStream_t stream) {
  if (!with_grad) return launch_qk_pass<TM, TN, 2, false>(p, bh_total, stream);
  if (p.ds <= 32) return launch_qk_pass<TM, TN, 2, true>(p, bh_total, stream);
  if (p.ds <= 64) return launch_qk_pass<TM, TN, 4, true>(p, bh_total, stream);
  if (p.ds <= 96) return launch_qk_pass<TM, TN, 6, true>(p, bh_total, stream);
  return launch_qk_pass<TM, TN, 8, true>(p, bh_total, stream);
}

// ---------------------------------------------------------------------------------------------
// Op 1, cuBLAS formulation (16-bit inputs, or float32 with TF32): the elementwise half of one chunk
// of query rows. s, t: (BH, rows, S) float32 raw scores q.k of the chunk (cuBLAS, float32 output),
// rows r0 .. r0 + rows - 1 of every (b, h). In one pass: the scaled, masked difference
// D = scale_s s - scale_t t (0 where query or key is padding), its square summed into one partial
// per block, and (WITH_GRAD) 2 D rounded once into out_t, the inputs' type, ready to meet the
// 16-bit operand in the gradient GEMMs.
// ---------------------------------------------------------------------------------------------
template <typename out_t, bool WITH_GRAD, typename index_t>
__global__ void __launch_bounds__(kThreads) qk_chunk_residual_kernel(
    const float* __restrict__ s,    // (BH, rows, S)
    const float* __restrict__ t,    // (BH, rows, S)
    const bool* __restrict__ mask,  // (B, S)
    out_t* __restrict__ d,          // (BH, rows, S) or unused
    float* __restrict__ partials,   // (gridDim.x)
    index_t n, index_t S, index_t rows, index_t r0, index_t heads, float scale_s, float scale_t) {
  __shared__ float scratch[kWarps];
  float loss = 0.f;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; e < n; e += stride) {
    const index_t row = e / S;  // (bh, local query row) flattened
    const index_t j = e - row * S;
    const index_t bh = row / rows;
    const index_t i = r0 + (row - bh * rows);
    const bool* m = mask + (bh / heads) * S;
    const float diff = (m[i] && m[j]) ? scale_s * s[e] - scale_t * t[e] : 0.f;
    loss = fmaf(diff, diff, loss);
    if constexpr (WITH_GRAD) d[e] = static_cast<out_t>(2.f * diff);
  }
  const float total = block_sum(loss, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// ---------------------------------------------------------------------------------------------
// Op 2 (row half): the attention-distribution KL of one chunk of query rows, given both models' raw
// scores of the chunk (cuBLAS GEMMs in the .cpp, float32 output). One warp per query row:
//   pass 1: online log-sum-exp of a_s = scale_s s and a_t = scale_t t over the real keys (each lane
//           its own keys j = lane + 32k, merged across the warp by shuffles);
//   pass 2: KL += p_t (log p_t - log p_s) over real keys and, for the gradient, G = p_s - p_t
//           (d KL / d a_s), 0 at padded keys and on padded query rows.
// A real query row has at least one real key (itself), so both sums are positive. d may alias s
// (float32 gradients): every lane reads s[j] before writing d[j] at the same j, and no lane reads
// another lane's keys, so no __restrict__ on either.
// ---------------------------------------------------------------------------------------------
struct LogSumExp {
  float max, sum;  // sum of exp(x - max); max = -inf, sum = 0 for an empty set
};

__device__ __forceinline__ LogSumExp lse_merge(LogSumExp a, LogSumExp b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return a;
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// One more term x: one exp per term (the running sum is rescaled only when the maximum moves).
__device__ __forceinline__ void lse_add(LogSumExp& v, float x) {
  if (x > v.max) {
    v.sum = v.sum * expf(v.max - x) + 1.f;  // v.max = -inf at first: 0 * 0 + 1
    v.max = x;
  } else {
    v.sum += expf(x - v.max);
  }
}

__device__ __forceinline__ LogSumExp lse_warp_merge(LogSumExp v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const LogSumExp other{__shfl_xor_sync(0xffffffffu, v.max, off), __shfl_xor_sync(0xffffffffu, v.sum, off)};
    v = lse_merge(v, other);
  }
  return v;
}

template <typename out_t, bool WITH_GRAD>
__global__ void __launch_bounds__(kThreads) attention_kl_rows_kernel(
    const float* s,                  // (BH, rows, S) student raw scores
    const float* __restrict__ t,     // (BH, rows, S) teacher raw scores
    const bool* __restrict__ mask,   // (B, S)
    out_t* d,                        // (BH, rows, S) G, or unused; may be s
    float* __restrict__ partials,    // (gridDim.x)
    int64_t n_rows, int64_t S, int64_t rows, int64_t r0, int64_t heads, float scale_s, float scale_t) {
  __shared__ float scratch[kWarps];
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  float kl = 0.f;
  if (row < n_rows) {  // uniform across the warp: the shuffles below see all 32 lanes
    const int64_t bh = row / rows;
    const int64_t i = r0 + (row - bh * rows);
    const bool* m = mask + (bh / heads) * S;
    const float* sr = s + row * S;
    const float* tr = t + row * S;
    out_t* dr = WITH_GRAD ? d + row * S : nullptr;
    if (m[i]) {
      LogSumExp ls{-INFINITY, 0.f}, lt{-INFINITY, 0.f};
      for (int64_t j = lane; j < S; j += 32) {
        if (!m[j]) continue;
        lse_add(ls, scale_s * sr[j]);
        lse_add(lt, scale_t * tr[j]);
      }
      ls = lse_warp_merge(ls);
      lt = lse_warp_merge(lt);
      const float lse_s = ls.max + logf(ls.sum), lse_t = lt.max + logf(lt.sum);
      for (int64_t j = lane; j < S; j += 32) {
        float g = 0.f;
        if (m[j]) {
          const float logp_s = scale_s * sr[j] - lse_s, logp_t = scale_t * tr[j] - lse_t;
          const float p_t = expf(logp_t);
          kl = fmaf(p_t, logp_t - logp_s, kl);
          g = expf(logp_s) - p_t;
        }
        if constexpr (WITH_GRAD) dr[j] = static_cast<out_t>(g);
      }
    } else if constexpr (WITH_GRAD) {
      for (int64_t j = lane; j < S; j += 32) dr[j] = static_cast<out_t>(0.f);
    }
  }
  const float total = block_sum(kl, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// ---------------------------------------------------------------------------------------------
// Op 3 (elementwise half): given P = hs W^T + b of one row chunk (a cuBLAS GEMM in the .cpp),
// partial sums of the masked squared error and, in the same pass, G = 2 (P - ht) row_mask.
// g may alias p: each thread reads its pack before writing the same pack, so no __restrict__ there.
// ---------------------------------------------------------------------------------------------
template <int VEC, bool WITH_GRAD, typename index_t>
__global__ void __launch_bounds__(kThreads) projected_mse_residual_kernel(
    const float* p,                     // (rows, Dt)
    const float* __restrict__ ht,       // (rows, Dt)
    const bool* __restrict__ row_mask,  // (rows,)
    float* g,                           // (rows, Dt), may be p, or unused
    float* __restrict__ partials,       // (gridDim.x)
    index_t n_packs, index_t cols) {
  __shared__ float scratch[kWarps];
  float loss = 0.f;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; v < n_packs; v += stride) {
    const index_t e = v * VEC;
    const bool row_ok = row_mask[e / cols];  // VEC divides cols: a pack never straddles two rows
    const Pack<VEC> pv = *reinterpret_cast<const Pack<VEC>*>(p + e);
    const Pack<VEC> hv = *reinterpret_cast<const Pack<VEC>*>(ht + e);
    Pack<VEC> gv;
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      const float d = row_ok ? pv.v[q] - hv.v[q] : 0.f;
      loss = fmaf(d, d, loss);
      gv.v[q] = 2.f * d;
    }
    if constexpr (WITH_GRAD) *reinterpret_cast<Pack<VEC>*>(g + e) = gv;
  }
  const float total = block_sum(loss, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Grid of a memory-bound grid-stride kernel: enough blocks to fill every SM (8 x 256 threads each),
// no more (the partials buffer stays small and the per-thread loop amortises the index math).
int64_t elementwise_blocks(int64_t n_packs) {
  const int64_t fill = static_cast<int64_t>(current_device_attribute(cudaDevAttrMultiProcessorCount)) * 8;
  return std::min(ceil_div(n_packs, kThreads), fill);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------------------------

at::Tensor attention_mse_qk_launch(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                   const at::Tensor& kt, const at::Tensor& mask, double scale_s, double scale_t,
                                   const at::Tensor& dqs, const at::Tensor& dks) {
  const int64_t B = qs.size(0), H = qs.size(1), S = qs.size(2), ds = qs.size(3), dt = qt.size(3);
  const int64_t bh_total = B * H;
  const bool with_grad = dqs.defined();
  TORCH_CHECK(S <= std::numeric_limits<int>::max() / 2, "attention_mse_qk: sequence length ", S, " too large");
  TORCH_CHECK(ds <= kMaxHeadDim && dt <= kMaxHeadDim, "attention_mse_qk: head dims must be <= ", kMaxHeadDim);

  const int ld = qk_row_stride(static_cast<int>(ds + dt));
  // 64 x 64 tiles (4 x 4 D entries per thread) unless the sequence is short (a 64-row block would be
  // mostly padding) or the tiles do not fit this device's shared memory (e.g. sm_86/89 cap a block
  // at 99 KiB: ds + dt = 256 needs 145 KiB there); then 32 x 32 tiles (2 x 2 per thread).
  // The opt-in limit covers static shared memory too (row flags and the reduction scratch, < 256 B).
  const size_t smem_limit =
      static_cast<size_t>(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)) - 256;
  const bool large = S > 32 && qk_smem_bytes(64, 64, ld, with_grad) <= smem_limit;
  const int bm = large ? 64 : 32;
  TORCH_CHECK(large || qk_smem_bytes(32, 32, ld, with_grad) <= smem_limit,
              "attention_mse_qk: head dims ds=", ds, ", dt=", dt, " need ", qk_smem_bytes(32, 32, ld, with_grad),
              " bytes of shared memory per block, the device allows ", smem_limit);

  const int64_t tiles = ceil_div(S, bm);
  at::Tensor partials = at::empty({bh_total * tiles}, qs.options());
  if (partials.numel() == 0) return partials.sum();  // B, H or S is 0: loss 0, grads are empty

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](const QKPassParams& p, bool grad) {
    if (large) dispatch_qk_pass<4, 4>(p, grad, bh_total, stream);
    else dispatch_qk_pass<2, 2>(p, grad, bh_total, stream);
  };

  QKPassParams p{};
  p.mask = mask.data_ptr<bool>();
  p.S = static_cast<int>(S);
  p.ds = static_cast<int>(ds);
  p.dt = static_cast<int>(dt);
  p.heads = static_cast<int>(H);
  p.ld = ld;

  // Pass 1, query rows fixed: loss partials and dqs = 2 scale_s sum_j D ks_j.
  p.fixed_s = qs.data_ptr<float>();
  p.fixed_t = qt.data_ptr<float>();
  p.stream_s = ks.data_ptr<float>();
  p.stream_t = kt.data_ptr<float>();
  p.fixed_scale_s = static_cast<float>(scale_s);
  p.fixed_scale_t = static_cast<float>(-scale_t);
  p.stream_scale_s = 1.f;
  p.stream_scale_t = 1.f;
  p.grad = with_grad ? dqs.data_ptr<float>() : nullptr;
  p.grad_scale = static_cast<float>(2.0 * scale_s);
  p.partials = partials.data_ptr<float>();
  run(p, with_grad);

  if (with_grad) {
    // Pass 2, key rows fixed: dks = 2 sum_i D (scale_s qs_i); the loss is already counted.
    p.fixed_s = ks.data_ptr<float>();
    p.fixed_t = kt.data_ptr<float>();
    p.stream_s = qs.data_ptr<float>();
    p.stream_t = qt.data_ptr<float>();
    p.fixed_scale_s = 1.f;
    p.fixed_scale_t = 1.f;
    p.stream_scale_s = static_cast<float>(scale_s);
    p.stream_scale_t = static_cast<float>(-scale_t);
    p.grad = dks.data_ptr<float>();
    p.grad_scale = 2.f;
    p.partials = nullptr;
    run(p, true);
  }
  return partials.sum();
}

at::Tensor qk_chunk_residual_launch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, int64_t r0,
                                    int64_t heads, double scale_s, double scale_t, const at::Tensor& d) {
  const int64_t rows = s.size(1), S = s.size(2), n = s.numel();
  const bool with_grad = d.defined();
  const int64_t blocks = elementwise_blocks(n);
  at::Tensor partials = at::empty({blocks}, s.options());
  if (blocks == 0) return partials;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto out_tag, auto grad_tag, auto index_tag) {
    using out_t = decltype(out_tag);
    constexpr bool WITH_GRAD = decltype(grad_tag)::value;
    using index_t = decltype(index_tag);
    out_t* dp = WITH_GRAD ? static_cast<out_t*>(d.data_ptr()) : nullptr;
    qk_chunk_residual_kernel<out_t, WITH_GRAD, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s.data_ptr<float>(), t.data_ptr<float>(), mask.data_ptr<bool>(), dp, partials.data_ptr<float>(),
        static_cast<index_t>(n), static_cast<index_t>(S), static_cast<index_t>(rows), static_cast<index_t>(r0),
        static_cast<index_t>(heads), static_cast<float>(scale_s), static_cast<float>(scale_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // 32-bit indices when every element index fits, with the grid-stride loop's overshoot.
  const bool small = n + static_cast<int64_t>(blocks) * kThreads < (int64_t{1} << 32);
  auto by_index = [&](auto out_tag, auto grad_tag) {
    if (small) launch(out_tag, grad_tag, uint32_t{});
    else launch(out_tag, grad_tag, int64_t{});
  };
  if (!with_grad) {
    by_index(float{}, std::false_type{});
  } else if (d.scalar_type() == at::kHalf) {
    by_index(at::Half{}, std::true_type{});
  } else if (d.scalar_type() == at::kBFloat16) {
    by_index(at::BFloat16{}, std::true_type{});
  } else {
    TORCH_CHECK(d.scalar_type() == at::kFloat, "qk_chunk_residual: d must be float16, bfloat16 or float32");
    by_index(float{}, std::true_type{});
  }
  return partials;
}

at::Tensor attention_kl_rows_launch(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, int64_t r0,
                                   int64_t heads, double scale_s, double scale_t, const at::Tensor& d) {
  const int64_t rows = s.size(1), S = s.size(2), n_rows = s.size(0) * rows;
  const int64_t blocks = ceil_div(n_rows, kWarps);
  at::Tensor partials = at::empty({blocks}, s.options());
  if (blocks == 0) return partials;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto out_tag, auto grad_tag) {
    using out_t = decltype(out_tag);
    constexpr bool WITH_GRAD = decltype(grad_tag)::value;
    out_t* dp = WITH_GRAD ? static_cast<out_t*>(d.data_ptr()) : nullptr;
    attention_kl_rows_kernel<out_t, WITH_GRAD><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s.data_ptr<float>(), t.data_ptr<float>(), mask.data_ptr<bool>(), dp, partials.data_ptr<float>(), n_rows, S,
        rows, r0, heads, static_cast<float>(scale_s), static_cast<float>(scale_t));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!d.defined()) {
    launch(float{}, std::false_type{});
  } else if (d.scalar_type() == at::kHalf) {
    launch(at::Half{}, std::true_type{});
  } else if (d.scalar_type() == at::kBFloat16) {
    launch(at::BFloat16{}, std::true_type{});
  } else {
    TORCH_CHECK(d.scalar_type() == at::kFloat, "attention_kl_rows: d must be float16, bfloat16 or float32");
    launch(float{}, std::true_type{});
  }
  return partials;
}

at::Tensor projected_mse_residual_launch(const at::Tensor& p, const at::Tensor& ht, const at::Tensor& row_mask,
                                         const at::Tensor& g) {
  const int64_t cols = p.size(1), n = p.numel();
  const bool with_grad = g.defined();
  const bool vec4 = cols % 4 == 0 && aligned16(p.data_ptr()) && aligned16(ht.data_ptr()) &&
                    (!with_grad || aligned16(g.data_ptr()));
  const int64_t n_packs = vec4 ? n / 4 : n;
  const int64_t blocks = elementwise_blocks(n_packs);
  at::Tensor partials = at::empty({blocks}, p.options());
  if (blocks == 0) return partials;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* pp = p.data_ptr<float>();
  const float* hp = ht.data_ptr<float>();
  const bool* mp = row_mask.data_ptr<bool>();
  float* gp = with_grad ? g.data_ptr<float>() : nullptr;
  float* out = partials.data_ptr<float>();
  auto launch = [&](auto vec_tag, auto grad_tag, auto index_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    constexpr bool WITH_GRAD = decltype(grad_tag)::value;
    using index_t = decltype(index_tag);
    projected_mse_residual_kernel<VEC, WITH_GRAD, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pp, hp, mp, gp, out, static_cast<index_t>(n_packs), static_cast<index_t>(cols));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using V4 = std::integral_constant<int, 4>;
  using V1 = std::integral_constant<int, 1>;
  using G1 = std::true_type;
  using G0 = std::false_type;
  const bool small = n + static_cast<int64_t>(blocks) * kThreads * 4 < (int64_t{1} << 32);
  if (small) {
    if (vec4) with_grad ? launch(V4{}, G1{}, uint32_t{}) : launch(V4{}, G0{}, uint32_t{});
    else with_grad ? launch(V1{}, G1{}, uint32_t{}) : launch(V1{}, G0{}, uint32_t{});
  } else {
    if (vec4) with_grad ? launch(V4{}, G1{}, int64_t{}) : launch(V4{}, G0{}, int64_t{});
    else with_grad ? launch(V1{}, G1{}, int64_t{}) : launch(V1{}, G0{}, int64_t{});
  }
  return partials;
}

}  // namespace cuda
}  // namespace fastkd
