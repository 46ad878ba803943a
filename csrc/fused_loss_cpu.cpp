// Fused distillation losses on the CPU (OpenMP through at::parallel_for), registered as torch operators
// (torch.ops.<module name>.<op>, see the end of the file).
//
// The same functions, with the same arguments, are exported by the CUDA module (fused_loss_cuda.cpp),
// so one autograd Function per op (fastkd/ops/<op>.py) drives both.
// Inputs arrive contiguous float32 (the wrapper casts; float64 is kept, for gradcheck); masks arrive
// as torch.bool. attention_mse_qk also takes bfloat16, on CPUs that multiply it natively (the wrapper
// decides): its GEMMs then run in bf16 with float32 accumulation, and its gradients come back float32.
// Every gradient returned is of the *unnormalised* loss_sum; Python divides by the count of valid
// elements.
//
//   attention_mse_qk      sum over valid (b,h,i,j) of (ss*qs_i.ks_j - st*qt_i.kt_j)^2, no S x S tensor
//   attention_kl_qk       sum over real (b,h,i) of KL(softmax_j(st*qt_i.kt_j) || softmax_j(ss*qs_i.ks_j)), real j
//   projected_mse         sum over real rows of |hs W^T + b - ht|^2, chunked over rows
//   dropout_mask_scale    x * keep / (1 - p), keep drawn from a hash of (seed, index): dropout's forward and,
//                         with the same seed, its backward (float32, bfloat16, float16, float64)
//
// (Loops inside AT_DISPATCH lambdas use _Pragma: a #pragma line cannot appear inside a macro argument.)
//
// Masking trick used throughout: a pair (i, j) is valid when both tokens are real, so dropping the
// padded rows of both operands (or zeroing them) masks the pairs exactly, with no test in any inner
// loop.

// ATen and torch/library.h, not torch/extension.h: the latter adds the C++ frontend and pybind11, which
// made the first-use build more than twice as long (44 s against 18 s on a 2-core AVX2 EPYC).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>

using at::Tensor;

namespace {

// float32 in normal use; float64 too, so torch.autograd.gradcheck can check the gradients exactly;
// bfloat16 where the op says so (allow_bf16).
void check_input(const Tensor& x, const char* name, int64_t dims, const Tensor& like, bool allow_bf16 = false) {
  TORCH_CHECK(x.device().is_cpu(), "fastkd cpp loss: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  (allow_bf16 && x.scalar_type() == at::kBFloat16),
              "fastkd cpp loss: ", name, " must be float32 or float64", allow_bf16 ? " or bfloat16" : "",
              " (got ", x.scalar_type(), ")");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "fastkd cpp loss: ", name, " must have the dtype of the others");
  TORCH_CHECK(x.is_contiguous(), "fastkd cpp loss: ", name, " must be contiguous");
  TORCH_CHECK(x.dim() == dims, "fastkd cpp loss: ", name, " must have ", dims, " dims (got ", x.dim(), ")");
}

void check_mask(const Tensor& mask, int64_t rows, int64_t cols) {
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous(),
              "fastkd cpp loss: mask must be a contiguous CPU bool tensor");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols,
              "fastkd cpp loss: mask must be (B, S) = (", rows, ", ", cols, ")");
}

// Gram form vs tiled form of one problem with n valid rows, concatenated width d = ds + dt (per head).
//   tiled: D = A B^T tile by tile: 2 n^2 d flops, plus 4 n^2 ds for the two gradient products.
//   gram:  sum D^2 = <A^T A, B^T B>_F: 4 n d^2 flops for the two Gram matrices plus 4 n d ds for
//          the gradients; done in float64 (the loss is a difference of large sums), which costs
//          about twice as much per flop.
bool prefer_gram(int64_t n, int64_t d, int64_t ds, bool need_grad) {
  const double tiled = 2.0 * n * n * d + (need_grad ? 4.0 * n * n * ds : 0.0);
  const double gram = 2.0 * (4.0 * n * d * d + (need_grad ? 4.0 * n * d * ds : 0.0));
  return gram < tiled;
}

constexpr int64_t kTileRows = 64;  // query rows per tile in the tiled form: a 64 x S float tile stays in L2
constexpr double kTaskBytes = 1.0 * (1 << 20);  // per-thread working set a task may hold (float64 copies)

// Heads per task: several heads share one batched GEMM call (an ATen call costs microseconds, which
// at S=128 was half the op's time), bounded so there are tasks for every thread and the per-thread
// float64 copies stay small.
int64_t heads_per_task(int64_t B, int64_t H, int64_t S, int64_t d) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_tasks = std::max<int64_t>(1, (B * H) / (4 * threads));
  const int64_t by_memory = std::max<int64_t>(1, static_cast<int64_t>(kTaskBytes / (2.0 * 8.0 * S * d)));
  return std::min({H, by_tasks, by_memory});
}

// One task of a Q/K op: one batch row b and heads h0 .. h0 + nh - 1, on the row's n real positions.
struct QKTask {
  int64_t b, h0, nh, n;
  const Tensor* real;  // (n,) indices of the real positions
  bool full;           // n == S: no gather needed

  // x (B, H, S, width) -> (nh, n, width): this task's heads, real rows only.
  Tensor operator()(const Tensor& x) const {
    const Tensor heads = x[b].narrow(0, h0, nh);
    return full ? heads : heads.index_select(1, *real);
  }
};

// What a task returns: its loss partial and, with need_grad, its (nh, n, ds) gradients.
struct QKTaskResult {
  double loss;
  Tensor gq, gk;
};

// The frame both Q/K ops share: the input checks (equal head counts), then one task per batch row and
// chunk of heads in parallel. A pair (i, j) is valid when both tokens are real, so each task works on
// the real rows only and the masking is exact with no test in any loop; an all-padded row has no task.
// Each task writes its own (b, h) slices of the gradients (no two threads write the same memory) and
// its own loss partial (summed in float64, in a fixed order: deterministic).
// bfloat16 inputs (allow_bf16) get float32 gradients: they are accumulated over tiles, and the caller
// rounds them once into the parameters' dtype.
template <typename TaskFn>
std::vector<Tensor> qk_tasks(const Tensor& qs, const Tensor& ks, const Tensor& qt, const Tensor& kt,
                             const Tensor& mask, bool need_grad, bool allow_bf16, TaskFn&& run_task) {
  check_input(qs, "qs", 4, qs, allow_bf16);
  check_input(ks, "ks", 4, qs, allow_bf16);
  check_input(qt, "qt", 4, qs, allow_bf16);
  check_input(kt, "kt", 4, qs, allow_bf16);
  const int64_t B = qs.size(0), H = qs.size(1), S = qs.size(2), ds = qs.size(3), dt = qt.size(3);
  TORCH_CHECK(ks.sizes() == qs.sizes(), "fastkd cpp loss: ks must have the shape of qs");
  TORCH_CHECK(qt.size(0) == B && qt.size(1) == H && qt.size(2) == S && kt.sizes() == qt.sizes(),
              "fastkd cpp loss: qt and kt must be (B, H, S, dt) with the student's B, H, S (equal head counts)");
  check_mask(mask, B, S);
  at::NoGradGuard no_grad;

  std::vector<Tensor> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b] = mask[b].nonzero().squeeze(1);

  const int64_t hc = heads_per_task(B, H, S, ds + dt);
  const int64_t chunks = (H + hc - 1) / hc;
  Tensor partial = at::zeros({B * chunks}, qs.options().dtype(at::kDouble));
  const auto grad_type = qs.scalar_type() == at::kBFloat16 ? at::kFloat : qs.scalar_type();
  Tensor dqs = need_grad ? at::zeros(qs.sizes(), qs.options().dtype(grad_type)) : Tensor();
  Tensor dks = need_grad ? at::zeros(ks.sizes(), ks.options().dtype(grad_type)) : Tensor();
  double* partial_ptr = partial.data_ptr<double>();

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / chunks, h0 = (t % chunks) * hc;
      const QKTask task{b, h0, std::min(hc, H - h0), rows[b].size(0), &rows[b], rows[b].size(0) == S};
      if (task.n == 0) continue;  // an all-padded row: no valid pair
      const QKTaskResult r = run_task(task);
      partial_ptr[t] = r.loss;
      if (!need_grad) continue;
      if (task.full) {
        dqs[b].narrow(0, h0, task.nh).copy_(r.gq);
        dks[b].narrow(0, h0, task.nh).copy_(r.gk);
      } else {
        dqs[b].narrow(0, h0, task.nh).index_copy_(1, *task.real, r.gq);
        dks[b].narrow(0, h0, task.nh).index_copy_(1, *task.real, r.gk);
      }
    }
  });
  return {partial.sum().to(grad_type), dqs, dks};
}

// attention_mse_qk's tiled form on bfloat16 inputs: the GEMMs in bf16 with float32 accumulation (oneDNN's
// AVX512-BF16 / AMX kernels), the sums and the gradients' accumulation over tiles in float32 or wider.
// ATen's CPU GEMMs return bf16, so each product is rounded once, and what is rounded matters:
//   - the scores' difference, not each model's scores: D' = [qs | -r qt] [ks | kt]^T in one GEMM, with
//     r = scale_t / scale_s and D = scale_s D', so D' is rounded relative to |D'|, however close the
//     student's scores are to the teacher's (two bf16 score tensors subtracted would lose that);
//   - the operands are exact: where r is a power of two (1 for equal head widths) r qt is exact in bf16;
//     otherwise r qt is split into bf16 hi + lo (B repeats kt for lo), which carries it to about 2^-16
//     of itself, where one bf16 rounding of r qt would err by 2^-9 of the teacher's scores: as much as
//     rounding each model's scores, for a student close to its teacher.
// loss_sum = scale_s^2 sum D'^2, dqs = 2 scale_s^2 D' ks, dks = 2 scale_s^2 D'^T qs.
QKTaskResult mse_tiles_bf16(const QKTask& take, const Tensor& qs, const Tensor& ks, const Tensor& qt,
                            const Tensor& kt, double scale_s, double scale_t, bool need_grad) {
  const int64_t nh = take.nh, n = take.n, ds = qs.size(3);
  const Tensor q_s = take(qs), k_s = take(ks);  // (nh, n, ds) bf16
  const Tensor q_t = take(qt), k_t = take(kt);
  const double ratio = scale_t / scale_s;
  int exponent = 0;
  Tensor A, Bt;
  if (std::frexp(ratio, &exponent) == 0.5) {  // a power of two: -r qt is exact in bf16
    A = at::cat({q_s, q_t.mul(-ratio)}, 2);
    Bt = at::cat({k_s, k_t}, 2).transpose(1, 2);  // (nh, d, n)
  } else {
    const Tensor scaled = q_t.to(at::kFloat).mul_(-ratio);
    const Tensor hi = scaled.to(at::kBFloat16);
    const Tensor lo = scaled.sub_(hi.to(at::kFloat)).to(at::kBFloat16);
    A = at::cat({q_s, hi, lo}, 2);
    Bt = at::cat({k_s, k_t, k_t}, 2).transpose(1, 2);
  }
  const double s2 = scale_s * scale_s;
  QKTaskResult r{0.0, Tensor(), Tensor()};
  if (need_grad) {
    r.gq = at::empty({nh, n, ds}, qs.options().dtype(at::kFloat));
    r.gk = at::zeros({nh, n, ds}, qs.options().dtype(at::kFloat));
  }
  for (int64_t i0 = 0; i0 < n; i0 += kTileRows) {
    const int64_t m = std::min(kTileRows, n - i0);
    const Tensor D = at::bmm(A.narrow(1, i0, m), Bt);  // (nh, m, n) bf16
    r.loss += s2 * D.to(at::kFloat).square_().sum(at::kDouble).item<double>();
    if (need_grad) {
      r.gq.narrow(1, i0, m).copy_(at::bmm(D, k_s)).mul_(2.0 * s2);
      r.gk.add_(at::bmm(D.transpose(1, 2), q_s.narrow(1, i0, m)), 2.0 * s2);
    }
  }
  return r;
}

}  // namespace

std::vector<Tensor> attention_mse_qk(const Tensor& qs, const Tensor& ks, const Tensor& qt, const Tensor& kt,
                                     const Tensor& mask, double scale_s, double scale_t, bool need_grad) {
  const bool bf16 = qs.scalar_type() == at::kBFloat16;
  return qk_tasks(qs, ks, qt, kt, mask, need_grad, /*allow_bf16=*/true, [&](const QKTask& take) {
    const int64_t nh = take.nh, n = take.n, ds = qs.size(3), d = ds + qt.size(3);
    if (bf16 && !prefer_gram(n, d, ds, need_grad)) return mse_tiles_bf16(take, qs, ks, qt, kt, scale_s, scale_t, need_grad);
    if (bf16) {  // the Gram form in float64 from the exact bf16 values (the scales applied in float64)
      const Tensor Ad = at::cat({take(qs).to(at::kDouble) * scale_s, take(qt).to(at::kDouble) * (-scale_t)}, 2);
      const Tensor Bd = at::cat({take(ks), take(kt)}, 2).to(at::kDouble);
      const Tensor GA = at::bmm(Ad.transpose(1, 2), Ad), GB = at::bmm(Bd.transpose(1, 2), Bd);
      QKTaskResult r{(GA * GB).sum().item<double>(), Tensor(), Tensor()};
      if (need_grad) {
        r.gq = at::bmm(Ad, GB.narrow(2, 0, ds)).mul_(2.0 * scale_s).to(at::kFloat);
        r.gk = at::bmm(Bd, GA.narrow(2, 0, ds)).mul_(2.0).to(at::kFloat);
      }
      return r;
    }
    const Tensor q_s = take(qs), k_s = take(ks);  // (nh, n, ds)
    // D = A B^T with A = [ss qs | -st qt], B = [ks | kt]: one product over ds + dt per pair.
    const Tensor A = at::cat({q_s * scale_s, take(qt) * (-scale_t)}, 2);  // (nh, n, d)
    const Tensor Bm = at::cat({k_s, take(kt)}, 2);                         // (nh, n, d)
    QKTaskResult r{0.0, Tensor(), Tensor()};  // gradients of this task's loss_sum
    if (prefer_gram(n, d, ds, need_grad)) {
      const Tensor Ad = A.to(at::kDouble), Bd = Bm.to(at::kDouble);
      const Tensor GA = at::bmm(Ad.transpose(1, 2), Ad), GB = at::bmm(Bd.transpose(1, 2), Bd);  // (nh, d, d)
      r.loss = (GA * GB).sum().item<double>();
      if (need_grad) {
        // d/dA sum (A B^T)^2 = 2 A (B^T B); the student's columns of A carry the factor ss.
        r.gq = at::bmm(Ad, GB.narrow(2, 0, ds)).mul_(2.0 * scale_s).to(qs.scalar_type());
        r.gk = at::bmm(Bd, GA.narrow(2, 0, ds)).mul_(2.0).to(qs.scalar_type());
      }
      return r;
    }
    if (need_grad) {
      r.gq = at::empty({nh, n, ds}, qs.options());
      r.gk = at::zeros({nh, n, ds}, qs.options());
    }
    const Tensor Bt = Bm.transpose(1, 2);
    for (int64_t i0 = 0; i0 < n; i0 += kTileRows) {
      const int64_t m = std::min(kTileRows, n - i0);
      const Tensor D = at::bmm(A.narrow(1, i0, m), Bt);  // (nh, m, n): one tile of score differences
      r.loss += D.square().sum(at::kDouble).item<double>();
      if (need_grad) {
        r.gq.narrow(1, i0, m).copy_(at::bmm(D, k_s).mul_(2.0 * scale_s));
        r.gk.baddbmm_(D.transpose(1, 2), q_s.narrow(1, i0, m), 1.0, 2.0 * scale_s);
      }
    }
    return r;
  });
}

// KL(softmax(A_t) || softmax(A_s)) summed over real query rows, A = scale * q k^T per head, keys real.
// Equal head counts (the caller compares head-averaged distributions, a different quantity, on the
// reference). Tiled over query rows like attention_mse_qk's tiled form: a tile holds both models'
// scores for its rows against every real key, (nh, m, n), so each row's log-sum-exp is exact in one
// pass and nothing of size S x S exists. Per tile: logp = log_softmax(A), kl += sum p_t (logp_t - logp_s),
// G = p_s - p_t (d kl / d A_s), dqs = scale_s G ks, dks += scale_s G^T qs.
std::vector<Tensor> attention_kl_qk(const Tensor& qs, const Tensor& ks, const Tensor& qt, const Tensor& kt,
                                    const Tensor& mask, double scale_s, double scale_t, bool need_grad) {
  return qk_tasks(qs, ks, qt, kt, mask, need_grad, /*allow_bf16=*/false, [&](const QKTask& take) {
    const int64_t nh = take.nh, n = take.n, ds = qs.size(3);
    const Tensor q_s = take(qs), k_s = take(ks), q_t = take(qt), k_t = take(kt);
    const Tensor ks_T = k_s.transpose(1, 2), kt_T = k_t.transpose(1, 2);
    QKTaskResult r{0.0, Tensor(), Tensor()};
    if (need_grad) {
      r.gq = at::empty({nh, n, ds}, qs.options());
      r.gk = at::zeros({nh, n, ds}, qs.options());
    }
    for (int64_t i0 = 0; i0 < n; i0 += kTileRows) {
      const int64_t m = std::min(kTileRows, n - i0);
      const Tensor qs_tile = q_s.narrow(1, i0, m);
      const Tensor logp_s = at::log_softmax(at::bmm(qs_tile, ks_T).mul_(scale_s), 2);  // (nh, m, n)
      const Tensor logp_t = at::log_softmax(at::bmm(q_t.narrow(1, i0, m), kt_T).mul_(scale_t), 2);
      const Tensor p_t = logp_t.exp();
      r.loss += (p_t * (logp_t - logp_s)).sum(at::kDouble).item<double>();
      if (need_grad) {
        const Tensor G = logp_s.exp().sub_(p_t);  // d kl / d A_s
        r.gq.narrow(1, i0, m).copy_(at::bmm(G, k_s).mul_(scale_s));
        r.gk.baddbmm_(G.transpose(1, 2), qs_tile, 1.0, scale_s);
      }
    }
    return r;
  });
}

std::vector<Tensor> projected_mse(const Tensor& hs, const Tensor& ht, const Tensor& row_mask, const Tensor& weight,
                                  const Tensor& bias, bool need_grad, int64_t chunk_rows) {
  check_input(hs, "hs", 2, hs);
  check_input(ht, "ht", 2, hs);
  const int64_t N = hs.size(0), Ds = hs.size(1), Dt = ht.size(1);
  TORCH_CHECK(ht.size(0) == N, "fastkd cpp loss: ht must have the rows of hs");
  TORCH_CHECK(row_mask.device().is_cpu() && row_mask.scalar_type() == at::kBool && row_mask.is_contiguous() &&
                  row_mask.dim() == 1 && row_mask.size(0) == N,
              "fastkd cpp loss: row_mask must be a contiguous CPU bool tensor of N rows");
  const bool projected = weight.defined() && weight.numel() > 0;
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (projected) {
    check_input(weight, "weight", 2, hs);
    TORCH_CHECK(weight.size(0) == Dt && weight.size(1) == Ds, "fastkd cpp loss: weight must be (Dt, Ds)");
  } else {
    TORCH_CHECK(Ds == Dt && !has_bias, "fastkd cpp loss: without a projection the widths must match and there is no bias");
  }
  if (has_bias) {
    check_input(bias, "bias", 1, hs);
    TORCH_CHECK(bias.size(0) == Dt, "fastkd cpp loss: bias must be (Dt,)");
  }
  TORCH_CHECK(chunk_rows >= 1, "fastkd cpp loss: chunk_rows must be positive");
  at::NoGradGuard no_grad;

  Tensor partial = at::empty({N}, hs.options().dtype(at::kDouble));
  Tensor dhs = need_grad ? at::empty_like(hs) : Tensor();
  Tensor dweight = need_grad && projected ? at::zeros_like(weight) : Tensor();
  Tensor dbias = need_grad && has_bias ? at::zeros_like(bias) : Tensor();
  const bool* mp = row_mask.data_ptr<bool>();
  double* pp = partial.data_ptr<double>();
  const Tensor wt = projected ? weight.t() : Tensor();

  for (int64_t c0 = 0; c0 < N; c0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - c0);
    const Tensor h_c = hs.narrow(0, c0, n);
    // P: the projected chunk (n, Dt); overwritten below by G = 2 (P - ht) on real rows, 0 on padding.
    Tensor P = projected ? (has_bias ? at::addmm(bias, h_c, wt) : at::mm(h_c, wt)) : h_c.clone();
    AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "projected_mse", [&] {
      scalar_t* P_ptr = P.data_ptr<scalar_t>();
      const scalar_t* t_ptr = ht.data_ptr<scalar_t>() + c0 * Dt;
      at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* pr = P_ptr + r * Dt;
          if (!mp[c0 + r]) {
            pp[c0 + r] = 0.0;
            std::fill(pr, pr + Dt, scalar_t(0));
            continue;
          }
          const scalar_t* tr = t_ptr + r * Dt;
          scalar_t acc = 0;
_Pragma("omp simd reduction(+ : acc)")
          for (int64_t j = 0; j < Dt; ++j) {
            const scalar_t v = pr[j] - tr[j];
            acc += v * v;
            pr[j] = scalar_t(2) * v;
          }
          pp[c0 + r] = acc;
        }
      });
    });
    if (need_grad) {
      if (projected) {
        Tensor dh_c = dhs.narrow(0, c0, n);
        at::mm_out(dh_c, P, weight);   // (n, Dt) x (Dt, Ds)
        dweight.addmm_(P.t(), h_c);    // (Dt, n) x (n, Ds)
        if (has_bias) dbias.add_(P.sum(0));
      } else {
        dhs.narrow(0, c0, n).copy_(P);
      }
    }
  }
  return {partial.sum().to(hs.scalar_type()), dhs, dweight, dbias};
}

// Dropout in one pass over the tensor, its mask never stored. ATen's CPU dropout draws one Mersenne-Twister
// number per element (bernoulli_) and multiplies in two more passes: a fifth of a bf16 distillation step on
// a 2-core Xeon. Here each 32-bit draw of a keyed counter hash (murmur3's finaliser twice, the seed's two
// halves as keys) gives two 16-bit uniforms, two elements' keep-or-drop (little-endian order: element
// 2c + k takes bits 16k.. of draw c). The drop probability is p rounded to t/65536, a kept element scaled
// by 65536/(65536 - t). 32-bit multiplies, so the hashing vectorises on AVX2 as on AVX-512 and the pass runs
// at memory speed. The mask is a pure function of (seed, element index): backward recomputes it from the
// seed, and the result does not depend on the thread count or how the work is split.
static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

constexpr int64_t kDropDraws = 32, kDropBlock = 2 * kDropDraws;  // draws, elements per block

// Blocks [begin, end) of 64 elements; raw pointers, no Tensor call inside, so the compiler vectorises both loops.
template <typename scalar_t, typename acc_t>
static void dropout_blocks(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n, int64_t begin,
                           int64_t end, uint32_t key_lo, uint32_t key_hi, uint32_t threshold, acc_t keep_scale) {
  alignas(64) uint32_t draws[kDropDraws];
  alignas(64) uint16_t quarters[kDropBlock];
  alignas(64) acc_t factor[kDropBlock];
  for (int64_t b = begin; b < end; ++b) {
    const uint32_t first = static_cast<uint32_t>(b * kDropDraws);
    for (int64_t j = 0; j < kDropDraws; ++j) draws[j] = fmix32(fmix32((first + static_cast<uint32_t>(j)) ^ key_lo) ^ key_hi);
    std::memcpy(quarters, draws, sizeof(quarters));
    // x * 0 where dropped, as ATen does (a NaN stays NaN, for the bad-step check)
    for (int64_t k = 0; k < kDropBlock; ++k) factor[k] = quarters[k] >= threshold ? keep_scale : acc_t(0);
    const scalar_t* __restrict__ in = src + b * kDropBlock;
    scalar_t* __restrict__ out = dst + b * kDropBlock;
    const int64_t count = std::min<int64_t>(kDropBlock, n - b * kDropBlock);
    if (count == kDropBlock) {
      for (int64_t k = 0; k < kDropBlock; ++k) out[k] = static_cast<scalar_t>(static_cast<acc_t>(in[k]) * factor[k]);
    } else {
      for (int64_t k = 0; k < count; ++k) out[k] = static_cast<scalar_t>(static_cast<acc_t>(in[k]) * factor[k]);
    }
  }
}

static inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser: the seed spread over both keys
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

Tensor dropout_mask_scale(const Tensor& x, double p, const Tensor& seed_tensor) {
  // the seed as a 0-dim tensor: a traced graph (torch.compile) takes a new one without recompiling
  const int64_t seed = seed_tensor.item<int64_t>();
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "dropout_mask_scale: a contiguous CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_mask_scale: p must be in [0, 1)");
  TORCH_CHECK(std::llround(p * 65536.0) < 65536, "dropout_mask_scale: p rounds to 1 in 1/65536 steps");
  const int64_t n = x.numel();
  TORCH_CHECK(n <= (int64_t(1) << 33), "dropout_mask_scale: at most 2^33 elements (the 32-bit draw counter)");
  Tensor out = at::empty_like(x);
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 65536.0));  // dropped: draw < threshold
  const uint64_t key = mix64(static_cast<uint64_t>(seed));
  const uint32_t key_lo = static_cast<uint32_t>(key), key_hi = static_cast<uint32_t>(key >> 32);
  const int64_t blocks = (n + kDropBlock - 1) / kDropBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_mask_scale", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // 1 / the keep rate of the rounded threshold: the output's expectation is the input's
    const acc_t keep_scale = static_cast<acc_t>(65536.0 / (65536.0 - threshold));
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
      dropout_blocks<scalar_t, acc_t>(src, dst, n, begin, end, key_lo, key_hi, threshold, keep_scale);
    });
  });
  return out;
}

// TORCH_LIBRARY pastes its namespace argument unexpanded: one more macro level expands TORCH_EXTENSION_NAME
// (the build's module name, so two builds never share a namespace in one process).
#define FASTKD_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

FASTKD_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // attention-score MSE from Q/K: [loss_sum, dqs, dks]
  m.def("attention_mse_qk(Tensor qs, Tensor ks, Tensor qt, Tensor kt, Tensor mask, float scale_s, float scale_t, "
        "bool need_grad) -> Tensor[]", &attention_mse_qk);
  // attention-distribution KL from Q/K: [loss_sum, dqs, dks]
  m.def("attention_kl_qk(Tensor qs, Tensor ks, Tensor qt, Tensor kt, Tensor mask, float scale_s, float scale_t, "
        "bool need_grad) -> Tensor[]", &attention_kl_qk);
  // projected hidden-state MSE: [loss_sum, dhs, dweight, dbias]
  m.def("projected_mse(Tensor hs, Tensor ht, Tensor row_mask, Tensor weight, Tensor bias, bool need_grad, "
        "int chunk_rows) -> Tensor[]", &projected_mse);
  // dropout in one pass, the mask a function of (seed, index): out. A CPU kernel, not a composite one, so
  // Python can give it a shape function (torch.library.register_fake) and torch.compile traces through it.
  m.def("dropout_mask_scale(Tensor x, float p, Tensor seed) -> Tensor");
}

#define FASTKD_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

FASTKD_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("dropout_mask_scale", &dropout_mask_scale);
}
