// verify_sample: lossless speculative sampling over a chain or a tree of drafts (torch-free).
//
// Part 1 (plain C++, also compiled into the CPU twin csrc/cpu/verify_sample.cpp): the sampling maths that the
// CUDA kernel, the CPU twin and the Python reference (kangaroo_kernels/reference/verify_sample.py) share bit
// for bit. Part 2 (nvcc only): the kernel, one CTA per batch row walking the tree.
//
// Per visited node v (row v+1 of the target logits, V entries):
//   z_i   = fl32(logit_i * inv_t), inv_t = fl32(1 / T)              (the scaled logits)
//   e_i   = sample_exp(z_i - max z)                                  (fp32, bit-reproducible; 0 below -87)
//   top-k: keep z_i >= the k-th largest z (ties kept; k = 0 or k >= V: off)
//   top-p: keep z_i >= t, t the largest z whose kept mass sum_{z_j >= t} e_j >= top_p * (top-k mass), ties kept
//   r0_i  = kept_i ? e_i : 0 (double), S = sum r0                   (the filtered target, unnormalised)
// Both filters are thresholds on z, found here by radix selection on order-preserving keys (no sort, no
// materialised softmax). Children c of v are tried in index order with residual r (mass n, r = r0 and n = S at
// first): accept iff u_c * q_c(x_c) < r(x_c) / n, where q_c is draft_probs[b, c] or one-hot(x_c); on rejection
// r <- max(0, r / n - q_c), n <- sum r (in place, in a per-row double workspace). A zero residual ends the
// node and falls back to r0. With no accepted child the final token is the smallest i with r_i > 0 and
// prefix(r)_i > u_N * n (largest i with r_i > 0 if rounding leaves none). Every sum is in fp64, so the three
// implementations differ only by the summation order (~1e-16 relative). A row with a NaN, a +inf, or no finite
// value emits -1 and ends the walk.
// Per-row settings (temperature_rows / top_k_rows / top_p_rows, [B]) replace the scalars row by row; a row with
// T <= 0 is greedy: its target is one-hot at the first argmax of the raw row, so the same walk is exact greedy
// verification. probs: the row holds probabilities, z_i = p_i and e_i = p_i (no exp, zeros stay zeros); a
// negative entry or no positive one makes the row invalid.
#pragma once

#include <cstdint>
#include <cstring>

#include "kangaroo/philox.h"

#if defined(__CUDACC__)
#define KANGAROO_VS_HD __host__ __device__ __forceinline__
#else
#define KANGAROO_VS_HD inline
#endif

namespace kangaroo {
namespace vsample {

// IEEE single operations that no compiler may contract into an FMA (host compilers: see the pragma at the
// top of csrc/cpu/verify_sample.cpp; torch's element-wise ops in the reference never fuse).
KANGAROO_VS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
KANGAROO_VS_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
KANGAROO_VS_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

KANGAROO_VS_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
KANGAROO_VS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

KANGAROO_VS_HD float scaled_logit(float logit, float inv_t) { return mul_rn(logit, inv_t); }

// Order-preserving key of a non-NaN float: a < b  <=>  key(a) < key(b); -0 and +0 share a key; -inf has the
// smallest key among non-NaN values, and it is > 0, so "key >= 0" selects everything.
KANGAROO_VS_HD uint32_t logit_key(float z) {
  uint32_t u = float_to_bits(z);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr float kExpFloor = -87.0f;  // below: exactly 0 (e^-87 ~ 1.6e-38, the smallest normal float is 1.2e-38)

// exp(x) for x <= 0, fp32, reproducible bit for bit on any IEEE machine: round(x / ln 2) by the 1.5 * 2^23
// trick, two-constant Cody-Waite reduction, degree-7 Taylor polynomial (error <= ~3 ulp), exact 2^k scaling.
// Every intermediate is a normal float for x in [-87, 0].
KANGAROO_VS_HD float sample_exp(float x) {
  const bool in_range = x >= kExpFloor;  // false for NaN too
  const float xc = in_range ? x : kExpFloor;
  const float k = sub_rn(add_rn(mul_rn(xc, 0x1.715476p+0f), 12582912.0f), 12582912.0f);
  const float r = sub_rn(sub_rn(xc, mul_rn(k, 0x1.63p-1f)), mul_rn(k, -0x1.bd0106p-13f));
  float p = 0x1.a01a02p-13f;                  // 1/5040
  p = add_rn(mul_rn(p, r), 0x1.6c16c2p-10f);  // 1/720
  p = add_rn(mul_rn(p, r), 0x1.111112p-7f);   // 1/120
  p = add_rn(mul_rn(p, r), 0x1.555556p-5f);   // 1/24
  p = add_rn(mul_rn(p, r), 0x1.555556p-3f);   // 1/6
  p = add_rn(mul_rn(p, r), 0.5f);
  p = add_rn(mul_rn(p, r), 1.0f);
  p = add_rn(mul_rn(p, r), 1.0f);
  const int ki = static_cast<int>(k);  // in [-126, 0]
  const float e = mul_rn(p, bits_to_float(static_cast<uint32_t>(ki + 127) << 23));
  return in_range ? e : 0.0f;
}

// One rejection step of the residual: max(0, r / n - q) (NaN -> 0).
KANGAROO_VS_HD double residual_step(double r, double n, double q) {
  const double v = r / n - q;
  return v > 0.0 ? v : 0.0;
}

// Acceptance test of a draft token x: u * q(x) < r(x) / n, i.e. u < min(1, p(x) / q(x)) with p = r / n.
KANGAROO_VS_HD bool accept_draft(double u, double qx, double rx, double n) { return u * qx < rx / n; }

// A target entry as the filters see it: the scaled logit, or the probability itself (probs mode: no exp, no log,
// so zeros stay zeros), and its unnormalised mass.
KANGAROO_VS_HD float node_value(float raw, float inv_t, bool probs) { return probs ? raw : scaled_logit(raw, inv_t); }
KANGAROO_VS_HD float node_weight(float z, float m, bool probs) { return probs ? z : sample_exp(sub_rn(z, m)); }

// A row's sampling settings: the per-row value where one is given, else the scalar. greedy: the target is
// one-hot at its first argmax (T <= 0, or a NaN T), which makes the same walk exact greedy verification.
struct RowSampling {
  float inv_t;
  int top_k;
  double top_p;
  bool greedy;
};

}  // namespace vsample

enum class LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Raw views of verify_sample's arguments (see kangaroo_kernels/verify_sample.py for the semantics).
struct VerifySampleParams {
  const int32_t* draft_tokens = nullptr;  // [B, N] contiguous; -1 (or any id outside [0, V)) = padding
  const void* logits = nullptr;           // [B, N+1, V], strides (logits_stride_b, logits_stride_n, 1)
  int64_t logits_stride_b = 0, logits_stride_n = 0;
  const float* draft_probs = nullptr;     // [B, N, V], strides (q_stride_b, q_stride_n, 1); null: one-hot drafts
  int64_t q_stride_b = 0, q_stride_n = 0;
  const int32_t* parents = nullptr;       // [B, N] contiguous; null: chain (node j's parent is j - 1)
  const float* uniforms_f32 = nullptr;    // [B, N+1] contiguous, or
  const double* uniforms_f64 = nullptr;   // [B, N+1] contiguous, or (both null) Philox(seed[b], offset[b] + j)
  const int64_t* seed = nullptr;          // [B]
  int64_t* offset = nullptr;              // [B], advanced by N + 1 when Philox is used
  double* workspace = nullptr;            // [workspace_rows, V] residual scratch, one row per CTA
  int workspace_rows = 0;                 // 1 <= workspace_rows <= B: the grid size
  float inv_t = 1.0f;                     // scalar settings, used for rows without a per-row value
  int top_k = 0;
  double top_p = 1.0;
  const float* temperature_rows = nullptr;  // [B] or null; a row with T <= 0 (or NaN) is greedy
  const int32_t* top_k_rows = nullptr;      // [B] or null
  const float* top_p_rows = nullptr;        // [B] or null
  bool probs = false;                       // the target holds probabilities (weights), not logits
  int B = 0, N = 0, V = 0;
  int32_t* accept_len = nullptr;  // [B]
  int32_t* path = nullptr;        // [B, N+1]
  int32_t* tokens = nullptr;      // [B, N+1]
};

namespace vsample {

KANGAROO_VS_HD float reciprocal_rn(float t) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(t);
#else
  return 1.0f / t;
#endif
}

KANGAROO_VS_HD RowSampling row_sampling(const VerifySampleParams& p, int64_t b) {
  RowSampling s{p.inv_t, p.top_k, p.top_p, false};
  if (p.temperature_rows != nullptr) {
    const float t = p.temperature_rows[b];
    s.greedy = !(t > 0.0f);
    s.inv_t = s.greedy ? 1.0f : reciprocal_rn(t);
  }
  if (p.top_k_rows != nullptr) {
    const int32_t k = p.top_k_rows[b];
    s.top_k = (k > 0 && k < p.V) ? k : 0;
  }
  if (p.top_p_rows != nullptr) {
    const float tp = p.top_p_rows[b];
    s.top_p = tp < 1.0f ? static_cast<double>(tp) : 1.0;  // NaN: off
  }
  return s;
}

}  // namespace vsample
}  // namespace kangaroo

#if defined(__CUDACC__) || defined(KANGAROO_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kangaroo {
cudaError_t verify_sample_launch(const VerifySampleParams& p, LogitsDtype dtype, cudaStream_t stream);
}  // namespace kangaroo
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>

namespace kangaroo {
namespace vsample {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRadixBits = 4;
constexpr int kBins = 1 << kRadixBits;  // one warp reduces one bin: kBins == kWarps
constexpr int kScanItems = 8;           // contiguous elements per thread in the sampling scan
static_assert(kBins == kWarps, "the histogram reduction maps one warp to one bin");
constexpr size_t kHistBytes = sizeof(double) * kBins * kThreads;  // per-thread private histograms

__device__ __forceinline__ float load_logit(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_logit(const __half* p) { return __half2float(*p); }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct BlockShared {
  double d[kWarps];
  float f[kWarps];
  int i[kWarps];
  double bins[kBins];
  // walk state, written by thread 0 between barriers
  int accept;
  int found;
};

// Sum over the block; every thread gets the same bits (partials added in warp order).
__device__ __forceinline__ double block_sum(double v, BlockShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh.d[warp] = v;
  __syncthreads();
  double t = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += sh.d[w];
  return t;
}

__device__ __forceinline__ float block_max(float v, BlockShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) sh.f[warp] = v;
  __syncthreads();
  float t = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t = fmaxf(t, sh.f[w]);
  return t;
}

__device__ __forceinline__ int block_max_int(int v, BlockShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) sh.i[warp] = v;
  __syncthreads();
  int t = INT_MIN;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t = max(t, sh.i[w]);
  return t;
}

// Exclusive scan of one double per thread in thread order; *total gets the block sum.
__device__ __forceinline__ double block_exclusive_scan(double v, double* total, BlockShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
  __syncthreads();
  if (lane == 31) sh.d[warp] = incl;
  __syncthreads();
  double before = 0.0, t = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += sh.d[w];
    t += sh.d[w];
  }
  *total = t;
  return before + excl;
}

// The filtered target of one node: values max m, key threshold tau (keep key >= tau), kept mass S; a greedy
// row's target is one-hot at argmax (S = 1).
struct NodeTarget {
  bool valid;
  bool probs;
  float inv_t;
  float m;
  uint32_t tau;
  int argmax;  // >= 0: greedy row
  double S;
};

template <typename T>
__device__ __forceinline__ double target_mass(const T* row, int i, const NodeTarget& t) {
  if (t.argmax >= 0) return i == t.argmax ? 1.0 : 0.0;
  const float z = node_value(load_logit(row + i), t.inv_t, t.probs);
  return logit_key(z) >= t.tau ? static_cast<double>(node_weight(z, t.m, t.probs)) : 0.0;
}

// Radix selection on the keys of the elements with key >= lo: the largest key t such that
// W(t) = sum over {key >= t} of w >= target, where w = 1 (kMass false: t is the target-th largest key) or
// w = e (kMass true: the top-p pivot). Four bits per pass, per-thread private histograms (no atomics, fixed
// summation order). Returns t; *w_at_least gets W(t).
template <bool kMass, typename T>
__device__ uint32_t radix_select(const T* row, int V, float inv_t, bool probs, float m, uint32_t lo, double target,
                                 double* hist, BlockShared& sh, double* w_at_least) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint32_t prefix = 0u;
  double above = 0.0, at_least = 0.0;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
#pragma unroll
    for (int bin = 0; bin < kBins; ++bin) hist[bin * kThreads + tid] = 0.0;
    const int hi_shift = shift + kRadixBits;
    for (int i = tid; i < V; i += kThreads) {
      const float z = node_value(load_logit(row + i), inv_t, probs);
      const uint32_t key = logit_key(z);
      if (key < lo) continue;
      if (hi_shift < 32 && (key >> hi_shift) != (prefix >> hi_shift)) continue;
      const double w = kMass ? static_cast<double>(node_weight(z, m, probs)) : 1.0;
      hist[((key >> shift) & (kBins - 1)) * kThreads + tid] += w;
    }
    __syncthreads();
    {
      double s = 0.0;
      for (int j = lane; j < kThreads; j += 32) s += hist[warp * kThreads + j];
      s = warp_sum(s);
      if (lane == 0) sh.bins[warp] = s;
    }
    __syncthreads();
    // every thread makes the same choice from the same shared bins
    int chosen = -1;
    double cum = above, next_above = above;
    for (int bin = kBins - 1; bin >= 0; --bin) {
      const double c2 = cum + sh.bins[bin];
      if (c2 >= target) {
        chosen = bin;
        next_above = cum;
        break;
      }
      cum = c2;
    }
    if (chosen < 0) {  // rounding left the target out of reach: keep every element with positive weight
      double acc = above;
      for (int bin = kBins - 1; bin >= 0; --bin) {
        if (sh.bins[bin] > 0.0) {
          chosen = bin;
          next_above = acc;
        }
        acc += sh.bins[bin];
      }
      if (chosen < 0) chosen = 0;
    }
    prefix |= static_cast<uint32_t>(chosen) << shift;
    above = next_above;
    at_least = above + sh.bins[chosen];
    __syncthreads();  // bins and hist are rewritten by the next pass
  }
  *w_at_least = at_least;
  return prefix;
}

template <typename T>
__device__ NodeTarget node_target(const T* row, const VerifySampleParams& p, const RowSampling& rs, double* hist,
                                  BlockShared& sh) {
  const int V = p.V;
  const bool probs = p.probs;
  // greedy rows select on the raw values (the argmax of logits / T for any T > 0)
  const float inv_t = rs.greedy ? 1.0f : rs.inv_t;
  float m = -INFINITY;
  int bad = 0;
  for (int i = threadIdx.x; i < V; i += kThreads) {
    const float z = node_value(load_logit(row + i), inv_t, probs);
    bad |= (isnan(z) || z == INFINITY || (probs && z < 0.0f)) ? 1 : 0;
    m = fmaxf(m, z);
  }
  m = block_max(m, sh);
  bad = block_max_int(bad, sh);
  NodeTarget t;
  t.valid = !bad && (probs ? m > 0.0f : m > -INFINITY);
  t.probs = probs;
  t.inv_t = inv_t;
  t.m = m;
  t.tau = 0u;
  t.argmax = -1;
  t.S = 0.0;
  if (!t.valid) return t;
  if (rs.greedy) {
    int first = INT_MIN;  // the first index holding the max, as -index
    for (int i = threadIdx.x; i < V; i += kThreads) {
      if (node_value(load_logit(row + i), inv_t, probs) == m) first = max(first, -i);
    }
    t.argmax = -block_max_int(first, sh);
    t.S = 1.0;
    return t;
  }
  double w;
  if (rs.top_k > 0 && rs.top_k < V) {
    t.tau = radix_select<false>(row, V, inv_t, probs, m, 0u, static_cast<double>(rs.top_k), hist, sh, &w);
  }
  double part = 0.0;
  for (int i = threadIdx.x; i < V; i += kThreads) part += target_mass(row, i, t);
  t.S = block_sum(part, sh);
  if (rs.top_p < 1.0) {
    t.tau = radix_select<true>(row, V, inv_t, probs, m, t.tau, rs.top_p * t.S, hist, sh, &w);
    t.S = w;
  }
  return t;
}

__device__ __forceinline__ double row_uniform(const VerifySampleParams& p, int b, int j, int64_t seed,
                                              int64_t offset) {
  const int64_t at = static_cast<int64_t>(b) * (p.N + 1) + j;
  if (p.uniforms_f32 != nullptr) return static_cast<double>(p.uniforms_f32[at]);
  if (p.uniforms_f64 != nullptr) return p.uniforms_f64[at];
  return philox_uniform(seed, offset + j);
}

// The first child of v after node `after` with a valid draft token, or -1.
__device__ __forceinline__ int next_child(const VerifySampleParams& p, int b, int v, int after) {
  const int32_t* d = p.draft_tokens + static_cast<int64_t>(b) * p.N;
  if (p.parents == nullptr) {
    const int c = v + 1;
    return (after == v && c < p.N && d[c] >= 0 && d[c] < p.V) ? c : -1;
  }
  const int32_t* par = p.parents + static_cast<int64_t>(b) * p.N;
  for (int c = after + 1; c < p.N; ++c) {
    if (par[c] == v && d[c] >= 0 && d[c] < p.V) return c;
  }
  return -1;
}

// Walks batch row b with the whole block; r is this block's residual workspace row.
template <typename T>
__device__ void sample_row(const VerifySampleParams& p, int b, double* r, double* hist, BlockShared& sh) {
  const int tid = threadIdx.x, N = p.N, V = p.V;
  int32_t* path = p.path + static_cast<int64_t>(b) * (N + 1);
  int32_t* tokens = p.tokens + static_cast<int64_t>(b) * (N + 1);
  for (int i = tid; i <= N; i += kThreads) {
    path[i] = -1;
    tokens[i] = -1;
  }
  const bool philox = p.uniforms_f32 == nullptr && p.uniforms_f64 == nullptr;
  const int64_t seed = philox ? p.seed[b] : 0, offset = philox ? p.offset[b] : 0;
  const int32_t* d = p.draft_tokens + static_cast<int64_t>(b) * N;
  const T* logits = static_cast<const T*>(p.logits) + b * p.logits_stride_b;
  const RowSampling rs = row_sampling(p, b);
  __syncthreads();

  int v = -1, accepted = 0;
  while (true) {
    const T* row = logits + (v + 1) * p.logits_stride_n;
    const NodeTarget tgt = node_target(row, p, rs, hist, sh);
    if (!tgt.valid) break;  // tokens[accepted] stays -1
    // children in index order against the residual (r0 on the fly while k == 0, then the workspace)
    int k = 0;
    double n = tgt.S;
    int c = next_child(p, b, v, v);
    int acc_child = -1;
    while (c >= 0) {
      const int x = d[c];
      const float* q = p.draft_probs == nullptr ? nullptr : p.draft_probs + b * p.q_stride_b + c * p.q_stride_n;
      if (tid == 0) {
        const double rx = k == 0 ? target_mass(row, x, tgt) : r[x];
        const double qx = q == nullptr ? 1.0 : static_cast<double>(q[x]);
        sh.accept = accept_draft(row_uniform(p, b, c, seed, offset), qx, rx, n) ? 1 : 0;
      }
      __syncthreads();
      if (sh.accept) {
        acc_child = c;
        break;
      }
      double part = 0.0;
      for (int i = tid; i < V; i += kThreads) {
        const double ri = k == 0 ? target_mass(row, i, tgt) : r[i];
        const double qi = q == nullptr ? (i == x ? 1.0 : 0.0) : static_cast<double>(q[i]);
        const double nv = residual_step(ri, n, qi);
        r[i] = nv;
        part += nv;
      }
      const double n_new = block_sum(part, sh);  // its barriers also publish r to thread 0
      if (!(n_new > 0.0)) {  // nothing left (e.g. p == q): fall back to the filtered target
        k = 0;
        n = tgt.S;
        break;
      }
      ++k;
      n = n_new;
      c = next_child(p, b, v, c);
    }
    if (acc_child >= 0) {
      if (tid == 0) {
        path[accepted] = acc_child;
        tokens[accepted] = d[acc_child];
      }
      ++accepted;
      v = acc_child;
      continue;
    }
    // inverse CDF over the residual in vocabulary order
    const double target = row_uniform(p, b, N, seed, offset) * n;
    if (tid == 0) sh.found = INT_MAX;
    double carry = 0.0;
    int last_pos = -1;
    for (int base = 0; base < V; base += kThreads * kScanItems) {
      const int i0 = base + tid * kScanItems;
      double vals[kScanItems];
      double local = 0.0;
#pragma unroll
      for (int j = 0; j < kScanItems; ++j) {
        const int i = i0 + j;
        vals[j] = i < V ? (k == 0 ? target_mass(row, i, tgt) : r[i]) : 0.0;
        local += vals[j];
        if (vals[j] > 0.0) last_pos = i;
      }
      double tile_total;
      double run = carry + block_exclusive_scan(local, &tile_total, sh);
#pragma unroll
      for (int j = 0; j < kScanItems; ++j) {
        run += vals[j];
        if (vals[j] > 0.0 && run > target) {
          atomicMin(&sh.found, i0 + j);
          break;
        }
      }
      carry += tile_total;
      __syncthreads();
      if (sh.found != INT_MAX) break;
    }
    int tok = sh.found;
    if (tok == INT_MAX) tok = block_max_int(last_pos, sh);
    if (tid == 0) tokens[accepted] = tok;
    break;
  }
  if (tid == 0) {
    p.accept_len[b] = accepted;
    if (philox) p.offset[b] = offset + (N + 1);
  }
}

// One CTA per batch row; with more rows than workspace rows, blocks stride over the batch.
// minBlocks = 1: without it ptxas (CUDA 13, sm_80) capped the kernel at 64 registers and spilled 40 bytes. It runs
// one CTA per row (a few dozen at most), so occupancy is not what bounds it (tests/test_cuda_resource_usage.py).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) verify_sample_kernel(const VerifySampleParams p) {
  extern __shared__ double hist[];
  __shared__ BlockShared sh;
  double* r = p.workspace + static_cast<int64_t>(blockIdx.x) * p.V;
  for (int b = blockIdx.x; b < p.B; b += gridDim.x) {
    sample_row<T>(p, b, r, hist, sh);
    __syncthreads();  // the next row reuses the shared state
  }
}

template <typename T>
cudaError_t launch_verify_sample(const VerifySampleParams& p, cudaStream_t stream) {
  auto kernel = verify_sample_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kHistBytes));
  if (err != cudaSuccess) return err;
  const int grid = p.workspace_rows < p.B ? p.workspace_rows : p.B;
  kernel<<<grid, kThreads, kHistBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vsample
}  // namespace kangaroo
#endif  // __CUDACC__
