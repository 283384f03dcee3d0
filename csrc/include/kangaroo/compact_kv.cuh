// compact_kv: moves the accepted tree nodes' K/V into consecutive cache positions, all layers at once
// (torch-free).
//
// Caches [L, B, Hk, S, Dh] (any strides with a contiguous last dim; dtype-agnostic: rows are copied as bytes).
// Tree node j of batch row b sits at position cache_lens[b] + j. For i < accept_len[b]: position
// cache_lens[b] + i <- position cache_lens[b] + path[b, i]; then cache_lens[b] += accept_len[b].
//
// Why a copy sequential in i is race-free, and why loading a group of sources before storing them is too:
// path is increasing (a root-to-leaf path in topological order), hence path[i] >= i. The step-i store goes to
// relative position i; it can only clobber a source path[k] == i of a step k <= i, i.e. of the same or an
// earlier step, never of a later one. So a step's source is never a destination of an earlier step, and the only
// constraint is "load of step k before store of step i whenever k <= i", which both orders satisfy. Different
// (layer, batch, head, lane) columns are disjoint, so one thread owns one column and needs no synchronisation.
//
// Guards (bad data is never validated on the hot path): accept_len is clamped to [0, N]; a step is skipped when
// path[b, i] is outside [0, N) or either position is outside [0, S); a row with cache_lens outside [0, S] is left
// alone, otherwise its new length is min(cache_lens + accept_len, S).
//
// Part 1 (plain C++): the CPU twin's per-column copy. Part 2 (nvcc only): the kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "kangaroo/common.h"

namespace kangaroo {

struct CompactKVParams {
  char* k = nullptr;             // k_cache base
  char* v = nullptr;             // v_cache base
  int64_t k_stride[4] = {};      // byte strides of L, B, Hk, S
  int64_t v_stride[4] = {};
  int32_t* cache_lens = nullptr; // [B]
  const int32_t* path = nullptr; // [B, N+1]
  const int32_t* accept_len = nullptr;  // [B]
  int64_t L = 0, B = 0, H = 0, S = 0;
  int64_t row_bytes = 0;  // Dh * element size
  int N = 0;              // path has N + 1 columns
};

HOST_DEVICE int compact_kv_accepted(const CompactKVParams& p, int64_t b) {
  const int a = p.accept_len[b];
  return a < 0 ? 0 : (a > p.N ? p.N : a);
}

// Source position of step i of row b (lens = cache_lens[b] in [0, S]), or -1 when nothing moves.
HOST_DEVICE int64_t compact_kv_source(const CompactKVParams& p, int64_t b, int64_t lens, int i) {
  const int j = p.path[b * (p.N + 1) + i];
  if (j == i || j < 0 || j >= p.N || lens + j >= p.S || lens + i >= p.S) return -1;
  return lens + j;
}

HOST_DEVICE int32_t compact_kv_new_len(const CompactKVParams& p, int64_t b, int32_t lens) {
  if (lens < 0 || lens > p.S) return lens;
  const int64_t n = static_cast<int64_t>(lens) + compact_kv_accepted(p, b);
  return static_cast<int32_t>(n < p.S ? n : p.S);
}

// CPU twin: moves the rows of one (layer, batch, head) column of both caches; lens is the old cache length.
inline void compact_kv_column_host(const CompactKVParams& p, int64_t l, int64_t b, int64_t h, int32_t lens) {
  if (lens < 0 || lens > p.S) return;
  const int a = compact_kv_accepted(p, b);
  char* kc = p.k + l * p.k_stride[0] + b * p.k_stride[1] + h * p.k_stride[2];
  char* vc = p.v + l * p.v_stride[0] + b * p.v_stride[1] + h * p.v_stride[2];
  for (int i = 0; i < a; ++i) {
    const int64_t src = compact_kv_source(p, b, lens, i);
    if (src < 0) continue;
    const int64_t dst = lens + i;
    std::memcpy(kc + dst * p.k_stride[3], kc + src * p.k_stride[3], p.row_bytes);
    std::memcpy(vc + dst * p.v_stride[3], vc + src * p.v_stride[3], p.row_bytes);
  }
}

}  // namespace kangaroo

#if defined(__CUDACC__) || defined(KANGAROO_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kangaroo {
cudaError_t compact_kv_launch(const CompactKVParams& p, cudaStream_t stream);
}  // namespace kangaroo
#endif

#if defined(__CUDACC__)
namespace kangaroo {
namespace ckv {

constexpr int kThreads = 256;
constexpr int kGroup = 8;  // steps whose loads are issued before their stores (see the header comment)

template <int kBytes>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<1> {
  using type = uint8_t;
};

// One thread per (layer, batch, head, kBytes-wide lane of the head dim), both caches.
template <int kBytes>
__global__ void __launch_bounds__(kThreads) compact_kv_kernel(CompactKVParams p, int64_t lanes, int64_t total) {
  using W = typename Word<kBytes>::type;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= total) return;
  const int64_t lane = t % lanes;
  int64_t r = t / lanes;
  const int64_t h = r % p.H;
  r /= p.H;
  const int64_t b = r % p.B;
  const int64_t l = r / p.B;
  const int32_t lens = p.cache_lens[b];
  if (lens < 0 || lens > p.S) return;
  const int a = compact_kv_accepted(p, b);
  char* kc = p.k + l * p.k_stride[0] + b * p.k_stride[1] + h * p.k_stride[2] + lane * kBytes;
  char* vc = p.v + l * p.v_stride[0] + b * p.v_stride[1] + h * p.v_stride[2] + lane * kBytes;
  for (int i0 = 0; i0 < a; i0 += kGroup) {
    W kbuf[kGroup], vbuf[kGroup];
    int64_t src[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      src[g] = i0 + g < a ? compact_kv_source(p, b, lens, i0 + g) : -1;
      if (src[g] >= 0) {
        kbuf[g] = *reinterpret_cast<const W*>(kc + src[g] * p.k_stride[3]);
        vbuf[g] = *reinterpret_cast<const W*>(vc + src[g] * p.v_stride[3]);
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (src[g] >= 0) {
        const int64_t dst = lens + i0 + g;
        *reinterpret_cast<W*>(kc + dst * p.k_stride[3]) = kbuf[g];
        *reinterpret_cast<W*>(vc + dst * p.v_stride[3]) = vbuf[g];
      }
    }
  }
}

// The length update runs after every column has read the old length (a second launch on the same stream).
__global__ void compact_kv_lens_kernel(CompactKVParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < p.B) p.cache_lens[b] = compact_kv_new_len(p, b, p.cache_lens[b]);
}

}  // namespace ckv
}  // namespace kangaroo
#endif
