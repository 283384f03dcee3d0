// CPU kernel of kangaroo_kernels::lm_head_exit_int8 (semantics: kangaroo_kernels/reference/lm_head_exit_int8.py):
// one draft step's LM head on an int8 copy of the weights (per-row scales), fused with the argmax, the confidence
// 1 / sum(exp(logits - max)) and the exit flag; the [B, V] logits are never written.
//
// Why: on a CPU the draft step's LM-head GEMV is memory-bound, and the fp32 head is the largest read of a draft
// step (4096 x 256 fp32 = 4 MB, as much as a decoder layer). int8 reads a quarter of it. The draft is only a
// proposal (verification runs on the exact weights), so the draft head's precision changes acceptance, never output.
//
// The GEMV streams the weight once, column-major ([D, V] in memory: for each d a contiguous row over V), in blocks
// of kTile tokens whose fp32 accumulators stay in L1; the inner loop (int8 -> fp32 convert, FMA) is compiled for
// AVX-512, AVX2+FMA and baseline x86-64, picked at run time by the CPU (cpu_isa, simd.h): no CPU feature is
// assumed. Blocks run in parallel (at::parallel_for) and each keeps its own max / first argmax / sum of exp, merged
// in block order afterwards (so ties go to the lowest index, as torch.argmax).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/checks.h"
#include "cpu/simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include "cpu/ops_cpu.h"
#endif

namespace kangaroo {
namespace {

// The GEMV runs over tiles of up to kTile tokens (16 KB of fp32 accumulators: L1), wide so that each of the D weight
// rows it reads is 4 KB contiguous (512-token tiles ran 4x slower on a 32000 x 1024 head: a page per row and
// tile); the exit statistics are kept per kStat-token block, a partition fixed whatever the thread count.
constexpr int64_t kTile = 4096, kStat = 512;

// y[j] = sum_d x[d] * q[d * V + v0 + j] for j < n (q column-major [V, D], i.e. [D, V] in memory).
template <Isa>
KANGAROO_BODY void gemv_block_int8_body(const float* x, const int8_t* q, int64_t D, int64_t V, int64_t v0,
                                        int64_t n, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = 0.f;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {  // four weight rows per pass: one accumulator load/store per four FMAs
    const float x0 = x[d], x1 = x[d + 1], x2 = x[d + 2], x3 = x[d + 3];
    const int8_t* r0 = q + d * V + v0;
    const int8_t* r1 = r0 + V;
    const int8_t* r2 = r1 + V;
    const int8_t* r3 = r2 + V;
    for (int64_t j = 0; j < n; ++j)
      y[j] += x0 * static_cast<float>(r0[j]) + x1 * static_cast<float>(r1[j]) + x2 * static_cast<float>(r2[j]) +
              x3 * static_cast<float>(r3[j]);
  }
  for (; d < D; ++d) {
    const float xd = x[d];
    const int8_t* r = q + d * V + v0;
    for (int64_t j = 0; j < n; ++j) y[j] += xd * static_cast<float>(r[j]);
  }
}
KANGAROO_ISA_DISPATCH(cpu_isa, void, gemv_block_int8,
                      (const float* x, const int8_t* q, int64_t D, int64_t V, int64_t v0, int64_t n, float* y),
                      (x, q, D, V, v0, n, y))

// gemv_block_int8 for four rows at once (x: 4 rows D apart; y: 4 rows ldy apart), so a batch streams the weight
// once per four rows instead of once per row; n <= 1024 keeps the four accumulator rows (16 KB) in L1.
template <Isa>
KANGAROO_BODY void gemv_block_int8_x4_body(const float* x, const int8_t* q, int64_t D, int64_t V, int64_t v0,
                                           int64_t n, float* y, int64_t ldy) {
  float* y0 = y;
  float* y1 = y + ldy;
  float* y2 = y + 2 * ldy;
  float* y3 = y + 3 * ldy;
  for (int64_t j = 0; j < n; ++j) y0[j] = y1[j] = y2[j] = y3[j] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float a0 = x[d], a1 = x[D + d], a2 = x[2 * D + d], a3 = x[3 * D + d];
    const int8_t* r = q + d * V + v0;
    for (int64_t j = 0; j < n; ++j) {
      const float w = static_cast<float>(r[j]);
      y0[j] += a0 * w;
      y1[j] += a1 * w;
      y2[j] += a2 * w;
      y3[j] += a3 * w;
    }
  }
}
KANGAROO_ISA_DISPATCH(cpu_isa, void, gemv_block_int8_x4,
                      (const float* x, const int8_t* q, int64_t D, int64_t V, int64_t v0, int64_t n, float* y,
                       int64_t ldy),
                      (x, q, D, V, v0, n, y, ldy))

#if defined(__x86_64__) && defined(__GNUC__)
// The same two GEMVs with explicit int8 -> fp32 conversions (one vpmovsxbd + vcvtdq2ps per 16 weights), for CPUs
// with AVX-512 or AVX2 + FMA: GCC 12 auto-vectorizes the loops above with a two-stage widening and lane extracts
// (~2.5x the port-5 shuffles), which made the demo head (4096 x 256) run at ~4 multiply-adds a cycle. Eight weight
// rows per pass over the L1 accumulators; every token of a tile, vector lanes and scalar tail alike, sums
// y = fma(x[d], w[d], y) in increasing d, so equal weight columns give equal logits (the ties of torch.argmax).

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own `__m512i __Y = __Y;` in avx512fintrin.h

__attribute__((target("fma"))) inline float fma_ss(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

// Rows [d0, d1) of the tile into y[0, n) (accumulating), R of them per pass.
template <int R>
__attribute__((target("avx512f,fma"))) void gemv_rows_avx512(const float* x, const int8_t* q, int64_t V, int64_t v0,
                                                             int64_t n, float* y, int64_t d0, int64_t d1) {
  const int64_t n16 = n & ~int64_t{15};
  for (int64_t d = d0; d + R <= d1; d += R) {
    __m512 xs[R];
    for (int k = 0; k < R; ++k) xs[k] = _mm512_set1_ps(x[d + k]);
    const int8_t* r = q + d * V + v0;
    for (int64_t j = 0; j < n16; j += 16) {
      __m512 acc = _mm512_loadu_ps(y + j);
      for (int k = 0; k < R; ++k) {
        const __m128i w8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k * V + j));
        acc = _mm512_fmadd_ps(xs[k], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w8)), acc);
      }
      _mm512_storeu_ps(y + j, acc);
    }
    for (int64_t j = n16; j < n; ++j)
      for (int k = 0; k < R; ++k) y[j] = fma_ss(x[d + k], static_cast<float>(r[k * V + j]), y[j]);
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const float* x, const int8_t* q, int64_t V, int64_t v0,
                                                        int64_t n, float* y, int64_t d0, int64_t d1) {
  const int64_t n8 = n & ~int64_t{7};
  for (int64_t d = d0; d + R <= d1; d += R) {
    __m256 xs[R];
    for (int k = 0; k < R; ++k) xs[k] = _mm256_set1_ps(x[d + k]);
    const int8_t* r = q + d * V + v0;
    for (int64_t j = 0; j < n8; j += 8) {
      __m256 acc = _mm256_loadu_ps(y + j);
      for (int k = 0; k < R; ++k) {
        const __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + k * V + j));
        acc = _mm256_fmadd_ps(xs[k], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)), acc);
      }
      _mm256_storeu_ps(y + j, acc);
    }
    for (int64_t j = n8; j < n; ++j)
      for (int k = 0; k < R; ++k) y[j] = fma_ss(x[d + k], static_cast<float>(r[k * V + j]), y[j]);
  }
}

// y[0, n) = the tile's dot products (gemv_block_int8's result up to rounding): 8 rows a pass, then 1.
template <bool Avx512>
void gemv_int8_simd(const float* x, const int8_t* q, int64_t D, int64_t V, int64_t v0, int64_t n, float* y) {
  std::memset(y, 0, sizeof(float) * n);
  const int64_t d8 = D & ~int64_t{7};
  if constexpr (Avx512) {
    gemv_rows_avx512<8>(x, q, V, v0, n, y, 0, d8);
    gemv_rows_avx512<1>(x, q, V, v0, n, y, d8, D);
  } else {
    gemv_rows_avx2<8>(x, q, V, v0, n, y, 0, d8);
    gemv_rows_avx2<1>(x, q, V, v0, n, y, d8, D);
  }
}

#pragma GCC diagnostic pop

#endif

// One row's tile: the explicit-conversion kernel where the CPU has AVX-512 or AVX2 + FMA (cpu_isa), else the
// baseline build of gemv_block_int8.
void gemv_int8(const float* x, const int8_t* q, int64_t D, int64_t V, int64_t v0, int64_t n, float* y) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return gemv_int8_simd<true>(x, q, D, V, v0, n, y);
    case Isa::kAvx2:
      return gemv_int8_simd<false>(x, q, D, V, v0, n, y);
    case Isa::kBaseline:
      break;
  }
#endif
  gemv_block_int8(x, q, D, V, v0, n, y);
}

struct BlockStat {
  float max;    // NaN when the block holds a NaN logit
  int64_t arg;  // first index of the max (of the first NaN), relative to the block
  float sum;    // sum of exp(logit - max) over the block
};

// Scales the block's raw dot products y[0, n) by sc into logits (in place) and returns their statistics. The two
// max pass is an `omp simd` reduction (compiled with -fopenmp-simd: vectorized without -ffast-math), the exp sum
// runs on the ISA's vectors (exp_nonpositive_vec: GCC 12 leaves the scalar exp's loop scalar on AVX2).
template <Isa I>
KANGAROO_BODY BlockStat block_stats_body(float* y, const float* sc, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int nans = 0;
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int64_t j = 0; j < n; ++j) {
    const float v = y[j] * sc[j];
    y[j] = v;
    m = v > m ? v : m;
    nans += v != v;
  }
  BlockStat st{m, 0, 0.f};
  if (nans > 0) {  // torch.argmax picks the first NaN; the row's conf is NaN
    while (!std::isnan(y[st.arg])) ++st.arg;
    st.max = std::numeric_limits<float>::quiet_NaN();
    return st;
  }
  while (st.arg + 1 < n && y[st.arg] != m) ++st.arg;  // the first index of the max
  if (!std::isfinite(m)) return st;  // all -inf (sum 0) or a +inf logit (conf NaN, decided by the caller)
  constexpr int W = kVecWidth<I>;
  typedef typename VecOf<W>::f V;
  V acc = V{};  // the tail's padding is -inf: exp 0
  int64_t j = 0;
  for (; j + W <= n; j += W) acc += exp_nonpositive_vec<W>(load_vec<V>(y + j) - m);
  if (j < n) {
    float buf[W];
    for (int k = 0; k < W; ++k) buf[k] = j + k < n ? y[j + k] : -std::numeric_limits<float>::infinity();
    acc += exp_nonpositive_vec<W>(load_vec<V>(buf) - m);
  }
  float lanes[W];
  store_vec(lanes, acc);
  float sum = 0.f;
  for (int k = 0; k < W; ++k) sum += lanes[k];
  st.sum = sum;
  return st;
}
KANGAROO_ISA_DISPATCH(cpu_isa, BlockStat, block_stats, (float* y, const float* sc, int64_t n),
                      (y, sc, n))

// x rounded to the dtype of `hidden` (rms_norm_ref rounds its intermediate and its product to hidden's dtype).
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// The draft head's input in fp32: RMSNorm(hidden) with rms_norm_ref's rounding, or hidden itself.
template <typename T>
void normed_input(const at::Tensor& hidden, const std::optional<at::Tensor>& norm_weight, double eps,
                  std::vector<float>& x) {
  const int64_t B = hidden.size(0), D = hidden.size(1);
  const T* h = hidden.data_ptr<T>();
  const T* w = norm_weight ? norm_weight->data_ptr<T>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const T* hb = h + b * D;
    float* xb = x.data() + b * D;
    if (!w) {
      for (int64_t d = 0; d < D; ++d) xb[d] = static_cast<float>(hb[d]);
      continue;
    }
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<float>(hb[d]) * static_cast<float>(hb[d]);
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d)
      xb[d] = round_to<T>(static_cast<float>(w[d]) * round_to<T>(static_cast<float>(hb[d]) * r));
  }
}

}  // namespace

void lm_head_exit_int8_cpu(const at::Tensor& hidden, const at::Tensor& qweight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& active,
                           double threshold, double eps, const at::Tensor& token, const at::Tensor& conf,
                           const at::Tensor& active_out, const at::Tensor& token_prob) {
  const c10::Device dev = hidden.device();
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be [B, D], got ", shape_str(hidden));
  const int64_t B = hidden.size(0), D = hidden.size(1);
  TORCH_CHECK_VALUE(hidden.is_contiguous() && dev.is_cpu(), "hidden must be a contiguous CPU tensor");
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(1) == D && qweight.scalar_type() == at::kChar,
                    "qweight must be [V, D=", D, "] int8, got ", shape_str(qweight), " ", qweight.scalar_type());
  const int64_t V = qweight.size(0);
  TORCH_CHECK_VALUE(qweight.stride(0) == 1 && qweight.stride(1) == V && qweight.device() == dev,
                    "qweight must be a column-major CPU tensor (strides (1, V)), as quantize_lm_head makes it");
  check_meta("scale", scale, {V}, "[V]", dev);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat, "scale must be float32");
  if (norm_weight) {
    check_meta("norm_weight", *norm_weight, {D}, "[D]", dev);
    TORCH_CHECK_VALUE(norm_weight->scalar_type() == hidden.scalar_type(), "norm_weight must be in hidden's dtype");
  }
  check_meta("token", token, {B}, "[B]", dev);
  check_meta("conf", conf, {B}, "[B]", dev);
  check_meta("active_out", active_out, {B}, "[B]", dev);
  check_meta("token_prob", token_prob, {B}, "[B]", dev);
  TORCH_CHECK_VALUE(token.scalar_type() == at::kInt && conf.scalar_type() == at::kFloat &&
                        active_out.scalar_type() == at::kBool && token_prob.scalar_type() == at::kFloat,
                    "token/conf/active_out/token_prob must be int32/float32/bool/float32");
  if (active) {
    check_meta("active", *active, {B}, "[B]", dev);
    TORCH_CHECK_VALUE(active->scalar_type() == at::kBool, "active must be bool");
  }
  if (B == 0 || V == 0) return;

  std::vector<float> x(B * D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "lm_head_exit_int8",
                                  [&] { normed_input<scalar_t>(hidden, norm_weight, eps, x); });

  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* sc = scale.data_ptr<float>();
  const int64_t nblk = (V + kStat - 1) / kStat;  // statistics blocks
  const int64_t per_tile = std::clamp<int64_t>((nblk + at::get_num_threads() - 1) / at::get_num_threads(), 1,
                                               kTile / kStat);
  const int64_t ntiles = (nblk + per_tile - 1) / per_tile;
  std::vector<BlockStat> stats(nblk * B);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(4 * kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k0 = t * per_tile, k1 = std::min(nblk, k0 + per_tile);
      const int64_t v0 = k0 * kStat, n = std::min(k1 * kStat, V) - v0;
      for (int64_t b = 0; b < B;) {
        const int64_t rows = B - b >= 4 ? 4 : 1;
        if (rows == 4) {
          for (int64_t j0 = 0; j0 < n; j0 += 1024)
            gemv_block_int8_x4(x.data() + b * D, q, D, V, v0 + j0, std::min<int64_t>(1024, n - j0),
                               y.data() + j0, kTile);
        } else {
          gemv_int8(x.data() + b * D, q, D, V, v0, n, y.data());
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t u0 = k * kStat;
            BlockStat st = block_stats(y.data() + r * kTile + (u0 - v0), sc + u0, std::min(kStat, V - u0));
            st.arg += u0;
            stats[(b + r) * nblk + k] = st;
          }
        b += rows;
      }
    }
  });

  const bool* act = active ? active->data_ptr<bool>() : nullptr;
  int32_t* tok = token.data_ptr<int32_t>();
  float* cf = conf.data_ptr<float>();
  float* tp = token_prob.data_ptr<float>();
  bool* ao = active_out.data_ptr<bool>();  // may alias active: act[b] is read before ao[b] is written
  const float thr = static_cast<float>(threshold);
  for (int64_t b = 0; b < B; ++b) {
    const BlockStat* st = stats.data() + b * nblk;
    float m = st[0].max;
    int64_t arg = st[0].arg;
    bool bad = std::isnan(m);
    for (int64_t k = 1; k < nblk && !bad; ++k) {
      if (std::isnan(st[k].max)) {  // a NaN logit: torch.argmax picks the first NaN
        arg = st[k].arg;
        bad = true;
      } else if (st[k].max > m) {  // strictly: ties stay with the lower block
        m = st[k].max;
        arg = st[k].arg;
      }
    }
    float c = nan;  // NaN, +inf or all -inf logits: conf NaN (the row exits), as the reference
    if (!bad && std::isfinite(m)) {
      float s = 0.f;
      for (int64_t k = 0; k < nblk; ++k) s += st[k].sum * std::exp(st[k].max - m);
      c = 1.f / s;
    }
    const bool a_in = act ? act[b] : true;
    tok[b] = static_cast<int32_t>(arg);
    cf[b] = c;
    tp[b] = c;
    ao[b] = a_in && (c >= thr);
  }
}

}  // namespace kangaroo

TORCH_LIBRARY_IMPL(kangaroo_kernels, CPU, m) {
  m.impl("lm_head_exit_int8", &kangaroo::below_autograd<&kangaroo::lm_head_exit_int8_cpu>::call);
}
