// ngram_lookup: the tokens that followed the most recent earlier occurrence of the longest suffix (torch-free).
//
// Row b's committed sequence is h = history[b, :L], L = lens[b] clamped to [0, S]. End position e in [0, L-2]
// has match length m(e) = the largest m <= min(n_max, e + 1) with h[e-m+1 .. e] == h[L-m .. L-1]. The answer is
// the e with m(e) >= n_min that maximises (m(e), e): the longest suffix (n_min..n_max tokens), then its most
// recent earlier occurrence (overlapping the suffix is allowed). Its continuation h[e+1 .. min(e+M, L-1)], cut
// before the first value outside [0, 2^31), goes to tokens[b, :n[b]]; the rest of tokens[b] is -1, n[b] = 0 when
// nothing matches. Values are compared as stored (int64 history is never narrowed).
//
// Everything about one end position is local to it, so the answer is a max-reduction of the packed key
// (m << 32 | e) over e (0 = no candidate). The kernel gives each row one CTA, whose threads take end positions
// from the end of the row backwards in tiles of kThreads * kUnroll (coalesced loads, kUnroll in flight per
// thread). Most positions fail on their first comparison with h[L-1]; a hit compares backwards up to n_max
// tokens (L1/L2 hits). Once any thread of the CTA has reached the longest possible length min(n_max, L-1), the
// answer lies in this tile (later positions were scanned before), so the CTA stops: on repetitive text (code) the
// scan is short; on text without a maximal match it reads the row once. Then a warp-shuffle + shared-memory
// max over the CTA, and the CTA copies the continuation. No global atomics, no workspace, shapes static.
//
// Guards: lens outside [0, S] are clamped; every read is inside history[b, :L].
//
// Part 1 (plain C++): the per-row scan of the CPU twin. Part 2 (nvcc only): the kernel.
#pragma once

#include <cstdint>

#include "kangaroo/common.h"

namespace kangaroo {

struct NgramLookupParams {
  const void* history = nullptr;  // [B, S] int32 or int64, contiguous
  bool history_i64 = false;
  const int32_t* lens = nullptr;  // [B]
  int32_t* tokens = nullptr;      // [B, M]
  int32_t* n = nullptr;           // [B]
  int64_t B = 0;
  int64_t S = 0;  // < 2^31
  int n_min = 1, n_max = 1, M = 1;
};

HOST_DEVICE int ngram_row_len(int32_t len, int64_t S) {
  return len < 0 ? 0 : (static_cast<int64_t>(len) > S ? static_cast<int>(S) : len);
}

HOST_DEVICE uint64_t ngram_pack(int m, int e) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(m)) << 32) | static_cast<uint32_t>(e);
}

// Match length of end position e (h[e] == h[L-1] already known: starts counting at 1), capped at cap_e.
template <typename T>
HOST_DEVICE int ngram_match_len(const T* h, int L, int e, int cap_e) {
  int m = 1;
  while (m < cap_e && h[e - m] == h[L - 1 - m]) ++m;
  return m;
}

template <typename T>
HOST_DEVICE bool ngram_token_ok(T v) {
  return v >= 0 && static_cast<int64_t>(v) <= int64_t{0x7FFFFFFF};
}

// CPU twin: the whole row b (scan from the end, stop at the first maximal match, copy the continuation).
template <typename T>
inline void ngram_lookup_row_host(const NgramLookupParams& p, int64_t b) {
  const T* h = static_cast<const T*>(p.history) + b * p.S;
  const int L = ngram_row_len(p.lens[b], p.S);
  int32_t* out = p.tokens + b * p.M;
  const int cap = p.n_max < L - 1 ? p.n_max : L - 1;
  int best_m = 0, best_e = -1;
  if (cap >= p.n_min) {
    const T last = h[L - 1];
    for (int e = L - 2; e >= 0; --e) {
      if (h[e] != last) continue;
      const int m = ngram_match_len(h, L, e, cap < e + 1 ? cap : e + 1);
      if (m > best_m) {
        best_m = m;
        best_e = e;
        if (m == cap) break;
      }
    }
  }
  int count = 0;
  if (best_m >= p.n_min) {
    const int avail = L - 1 - best_e;
    const int want = p.M < avail ? p.M : avail;
    while (count < want && ngram_token_ok(h[best_e + 1 + count])) {
      out[count] = static_cast<int32_t>(h[best_e + 1 + count]);
      ++count;
    }
  }
  for (int k = count; k < p.M; ++k) out[k] = -1;
  p.n[b] = count;
}

}  // namespace kangaroo

#if defined(__CUDACC__) || defined(KANGAROO_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kangaroo {
cudaError_t ngram_lookup_launch(const NgramLookupParams& p, cudaStream_t stream);
}  // namespace kangaroo
#endif

#if defined(__CUDACC__)
namespace kangaroo {
namespace ngram {

constexpr int kThreads = 512;
constexpr int kUnroll = 8;  // end positions (loads) in flight per thread
constexpr int kTile = kThreads * kUnroll;

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t u = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) ngram_lookup_kernel(NgramLookupParams p) {
  __shared__ uint64_t s_max[kThreads / 32 + 1];
  __shared__ int s_bad;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const T* __restrict__ h = static_cast<const T*>(p.history) + b * p.S;
  const int L = ngram_row_len(p.lens[b], p.S);
  const int cap = p.n_max < L - 1 ? p.n_max : L - 1;  // the longest possible match length
  uint64_t best = 0;
  if (cap >= p.n_min) {  // CTA-uniform
    const T last = h[L - 1];
    for (int top = L - 2; top >= 0; top -= kTile) {
      T v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = top - u * kThreads - tid;
        v[u] = e >= 0 ? h[e] : last;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = top - u * kThreads - tid;
        if (e >= 0 && v[u] == last) {
          const int m = ngram_match_len(h, L, e, cap < e + 1 ? cap : e + 1);
          const uint64_t key = m >= p.n_min ? ngram_pack(m, e) : 0;
          best = key > best ? key : best;
        }
      }
      if (__syncthreads_or(static_cast<int>(best >> 32) == cap)) break;
    }
  }
  best = warp_max(best);
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) s_max[warp] = best;
  if (tid == 0) s_bad = p.M;
  __syncthreads();
  if (warp == 0) {
    best = warp_max(lane < kThreads / 32 ? s_max[lane] : 0);
    if (lane == 0) s_max[kThreads / 32] = best;
  }
  __syncthreads();
  best = s_max[kThreads / 32];
  int want = 0, e = 0;
  if (best != 0) {
    e = static_cast<int>(best & 0xFFFFFFFFu);
    const int avail = L - 1 - e;
    want = p.M < avail ? p.M : avail;
  }
  // the continuation ends before its first value outside [0, 2^31) (shared-memory min)
  for (int k = tid; k < want; k += kThreads) {
    if (!ngram_token_ok(h[e + 1 + k])) atomicMin(&s_bad, k);
  }
  __syncthreads();
  const int count = want < s_bad ? want : s_bad;
  int32_t* out = p.tokens + b * p.M;
  for (int k = tid; k < p.M; k += kThreads) out[k] = k < count ? static_cast<int32_t>(h[e + 1 + k]) : -1;
  if (tid == 0) p.n[b] = count;
}

}  // namespace ngram
}  // namespace kangaroo
#endif
