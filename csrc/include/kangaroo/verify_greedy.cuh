// verify_greedy: greedy acceptance of a chain or a tree of drafts (torch-free).
//
// Row 0 of the target scores the root, row j + 1 scores draft node j. From the root, repeatedly take the first
// child c (increasing index; chain: the next node) of the current node with draft_tokens[c] >= 0 and
// draft_tokens[c] == argmax(row of the current node); stop when none matches. The argmax emitted at the stop
// is the correction / bonus token. A child is a node whose parent equals the current node (-1: the root), so
// nodes with out-of-range or non-topological parents are never reached (they behave as padding).
//
// argmax follows torch.argmax: fp32 comparisons, NaN above every number, ties (and -0 == +0) to the lowest
// index. Both are encoded in one order-preserving key per element (argmax_key), so a row's argmax is the max of
// (key << 32 | ~index) over its elements: cheap to reduce across threads and CTAs.
//
// Part 1 (plain C++): keys and the sequential walk, shared with the CPU twin (csrc/cpu/verify_greedy.cpp).
// Part 2 (nvcc only): the kernels; see verify_greedy_plan for how the work is split.
#pragma once

#include <cstdint>
#include <cstring>

#include "kangaroo/common.h"

namespace kangaroo {

enum class TargetKind : int { kTokens = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct VerifyGreedyParams {
  const int32_t* draft_tokens = nullptr;  // [B, N]
  const void* target = nullptr;           // logits [B, N+1, V] (contiguous) or tokens [B, N+1] int32
  const int32_t* parents = nullptr;       // [B, N] or nullptr (chain)
  int32_t* accept_len = nullptr;          // [B]
  int32_t* path = nullptr;                // [B, N+1]
  int32_t* tokens = nullptr;              // [B, N+1]
  int64_t B = 0;
  int N = 0;
  int64_t V = 0;  // vocabulary size (logits only)
  TargetKind kind = TargetKind::kTokens;
};

HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// Order-preserving key of x (a < b as torch.argmax compares <=> key(a) < key(b)); NaN gets the top key and
// -0 the key of +0. Every key is > 0, so 0 is "no element".
HOST_DEVICE uint32_t argmax_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  uint32_t u = float_bits(x);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (key, index) packed so that the max picks the larger key, then the lower index.
HOST_DEVICE uint64_t argmax_pack(uint32_t key, uint32_t index) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

HOST_DEVICE int32_t argmax_index(uint64_t packed) {
  return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(packed & 0xFFFFFFFFu));
}

// The sequential walk of one batch row (CPU twin). row_token(r) is the target token of row r (0..N).
template <typename RowToken>
int verify_greedy_walk_host(const VerifyGreedyParams& p, int64_t b, RowToken&& row_token) {
  const int N = p.N;
  const int32_t* draft = p.draft_tokens + b * N;
  const int32_t* par = p.parents ? p.parents + b * N : nullptr;
  int32_t* path = p.path + b * (N + 1);
  int32_t* tokens = p.tokens + b * (N + 1);
  for (int i = 0; i <= N; ++i) path[i] = tokens[i] = -1;
  int cur = -1, a = 0;
  for (;;) {
    const int32_t tok = row_token(cur + 1);
    tokens[a] = tok;
    int child = -1;
    for (int j = cur + 1; j < N; ++j) {
      if (par ? par[j] != cur : j != cur + 1) continue;
      if (draft[j] >= 0 && draft[j] == tok) {
        child = j;
        break;
      }
      if (!par) break;
    }
    if (child < 0) break;
    path[a++] = child;
    cur = child;
  }
  p.accept_len[b] = a;
  return a;
}

// How the CUDA path splits the work (a pure function of the shapes and the SM count).
//  - tokens: one warp per batch row walks the tree (no argmax).
//  - full: every row's argmax in parallel, each row split into `chunks` CTAs (one launch), then the walk
//    (a second launch, one warp per batch row) reduces the per-chunk maxima of the rows it visits. It reads
//    all B * (N+1) rows but with enough CTAs to fill the GPU, so for the usual Kangaroo sizes (a chain of <= 8,
//    or a small tree) it costs about one DRAM pass over a few MB plus two launches.
//  - lazy: one CTA per batch row alternates a block-wide argmax of the current node's row with the child
//    lookup, so it reads only the depth + 1 rows on the accepted path, but one row at a time with one SM.
//    Chosen when the full pass would read more than kLazyBytes (big trees x big batches x big vocabularies:
//    B = 8, N = 64, V = 152064 bf16 is 158 MB ~ 50 us of DRAM, whereas ~6 sequential row passes of 0.3 MB at
//    single-SM bandwidth are ~15 us).
// A single launch with a grid-wide "last CTA walks" counter would save one launch but needs a zeroed counter
// that persists across calls (or a memset launch), which costs the same and is fragile across streams.
struct VerifyGreedyPlan {
  enum Mode : int { kTokens = 0, kFull = 1, kLazy = 2 } mode = kTokens;
  int64_t chunk = 0;   // elements per CTA (full)
  int64_t chunks = 0;  // CTAs per row (full)
  size_t workspace_bytes = 0;
};

constexpr int64_t kLazyBytes = int64_t{32} << 20;
constexpr int64_t kMinChunk = 2048;    // elements per CTA in the full mode (>= 8 per thread)
constexpr int kFullCtasPerSm = 4;

inline int64_t target_elem_bytes(TargetKind k) {
  return (k == TargetKind::kBFloat16 || k == TargetKind::kFloat16) ? 2 : 4;
}

inline VerifyGreedyPlan verify_greedy_plan(const VerifyGreedyParams& p, int num_sms) {
  VerifyGreedyPlan plan;
  if (p.kind == TargetKind::kTokens) return plan;
  const int64_t rows = p.B * (p.N + 1);
  if (rows * p.V * target_elem_bytes(p.kind) > kLazyBytes) {
    plan.mode = VerifyGreedyPlan::kLazy;
    return plan;
  }
  plan.mode = VerifyGreedyPlan::kFull;
  const int64_t want = ceil_div<int64_t>(int64_t{kFullCtasPerSm} * (num_sms > 0 ? num_sms : 1), rows > 0 ? rows : 1);
  int64_t chunks = want < 1 ? 1 : want;
  const int64_t max_chunks = ceil_div<int64_t>(p.V, kMinChunk);
  if (chunks > max_chunks) chunks = max_chunks;
  plan.chunk = ceil_div<int64_t>(ceil_div<int64_t>(p.V, chunks), 8) * 8;  // whole 16-byte vectors of bf16
  plan.chunks = ceil_div<int64_t>(p.V, plan.chunk);
  plan.workspace_bytes = static_cast<size_t>(rows * plan.chunks) * sizeof(uint64_t);
  return plan;
}

}  // namespace kangaroo

#if defined(__CUDACC__) || defined(KANGAROO_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kangaroo {
// Number of SMs of the current device (cached).
int verify_greedy_num_sms();
// workspace: plan.workspace_bytes of device memory (unused contents; may be nullptr when 0).
cudaError_t verify_greedy_launch(const VerifyGreedyParams& p, const VerifyGreedyPlan& plan, void* workspace,
                                 cudaStream_t stream);
}  // namespace kangaroo
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kangaroo {
namespace vgreedy {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kFullThreads = 256;
constexpr int kLazyThreads = 1024;
constexpr int kWalkWarps = 4;  // batch rows per CTA of the walk kernel
constexpr int kUnroll = 4;     // 16-byte loads in flight per thread

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float lo(uint32_t w) { return __uint_as_float(w); }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ __forceinline__ static float hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
};
template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
  }
  __device__ __forceinline__ static float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};

__device__ __forceinline__ float load_elem(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_elem(const __nv_bfloat16* p) {
  return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}
__device__ __forceinline__ float load_elem(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// Running argmax of one thread. Indices arrive in increasing order, so a strict > keeps the first maximum.
struct ThreadMax {
  uint32_t key = 0;
  uint32_t index = 0;
  __device__ __forceinline__ void add(float x, int64_t i) {
    const uint32_t k = argmax_key(x);
    if (k > key) {
      key = k;
      index = static_cast<uint32_t>(i);
    }
  }
  template <typename T>
  __device__ __forceinline__ void add_vec(const uint4& v, int64_t i0) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    if constexpr (Elem<T>::kVec == 4) {
#pragma unroll
      for (int e = 0; e < 4; ++e) add(Elem<T>::lo(w[e]), i0 + e);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        add(Elem<T>::lo(w[e]), i0 + 2 * e);
        add(Elem<T>::hi(w[e]), i0 + 2 * e + 1);
      }
    }
  }
  __device__ __forceinline__ uint64_t packed() const { return key ? argmax_pack(key, index) : 0; }
};

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Packed argmax of row[begin, end) over the CTA; every thread gets the result. smem: kThreads / 32 + 1 slots.
// 16-byte loads from the first 16-byte aligned element on (rows of odd V are not aligned), scalar head/tail.
template <typename T, int kThreads>
__device__ uint64_t block_argmax(const T* __restrict__ row, int64_t begin, int64_t end, uint64_t* smem) {
  constexpr int kVec = Elem<T>::kVec;
  const int tid = threadIdx.x;
  ThreadMax m;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row + begin);
  int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
  if (head > end - begin) head = end - begin;
  if (tid < head) m.add(load_elem(row + begin + tid), begin + tid);
  const int64_t vbegin = begin + head;
  const int64_t nvec = (end - vbegin) / kVec;
  const uint4* vp = reinterpret_cast<const uint4*>(row + vbegin);
  int64_t v = tid;
  for (; v + (kUnroll - 1) * kThreads < nvec; v += kUnroll * kThreads) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = __ldg(vp + v + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) m.add_vec<T>(r[u], vbegin + (v + u * kThreads) * kVec);
  }
  for (; v < nvec; v += kThreads) m.add_vec<T>(__ldg(vp + v), vbegin + v * kVec);
  for (int64_t i = vbegin + nvec * kVec + tid; i < end; i += kThreads) m.add(load_elem(row + i), i);

  constexpr int kWarps = kThreads / 32;
  uint64_t best = warp_max(m.packed());
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) smem[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = warp_max(lane < kWarps ? smem[lane] : 0);
    if (lane == 0) smem[kWarps] = best;
  }
  __syncthreads();
  best = smem[kWarps];
  __syncthreads();  // smem is reused by the next call
  return best;
}

// The first child of `cur` whose draft equals tok, or -1. Called by a full warp; the result is warp-uniform.
__device__ __forceinline__ int find_child(const int32_t* draft, const int32_t* par, int N, int cur, int32_t tok) {
  if (par == nullptr) {
    const int j = cur + 1;
    return (j < N && draft[j] >= 0 && draft[j] == tok) ? j : -1;
  }
  const int lane = threadIdx.x & 31;
  for (int base = cur + 1; base < N; base += 32) {
    const int j = base + lane;
    const bool hit = j < N && par[j] == cur && draft[j] >= 0 && draft[j] == tok;
    const unsigned m = __ballot_sync(kFullMask, hit);
    if (m) return base + __ffs(m) - 1;
  }
  return -1;
}

// Fills the -1 padding of path / tokens once the walk accepted `a` nodes.
__device__ __forceinline__ void finish_row(const VerifyGreedyParams& p, int64_t b, int a, int tid, int nthreads) {
  int32_t* path = p.path + b * (p.N + 1);
  int32_t* tokens = p.tokens + b * (p.N + 1);
  for (int i = tid; i <= p.N; i += nthreads) {
    if (i >= a) path[i] = -1;
    if (i > a) tokens[i] = -1;
  }
  if (tid == 0) p.accept_len[b] = a;
}

// Per-(row, chunk) packed argmax into partial[row * chunks + chunk].
template <typename T>
__global__ void __launch_bounds__(kFullThreads)
    argmax_chunks_kernel(const T* __restrict__ logits, int64_t V, int64_t chunk, int64_t chunks,
                         uint64_t* __restrict__ partial) {
  __shared__ uint64_t smem[kFullThreads / 32 + 1];
  const int64_t row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < V ? begin + chunk : V;
  const uint64_t best = block_argmax<T, kFullThreads>(logits + row * V, begin, end, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = best;
}

// One warp per batch row. partial == nullptr: the target holds tokens.
__global__ void __launch_bounds__(kWalkWarps * 32)
    walk_kernel(VerifyGreedyParams p, const uint64_t* __restrict__ partial, int64_t chunks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWalkWarps + (threadIdx.x >> 5);
  if (b >= p.B) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int N = p.N;
  const int32_t* draft = p.draft_tokens + b * N;
  const int32_t* par = p.parents ? p.parents + b * N : nullptr;
  int32_t* path = p.path + b * (N + 1);
  int32_t* tokens = p.tokens + b * (N + 1);
  int cur = -1, a = 0;
  for (;;) {
    const int64_t row = b * (N + 1) + cur + 1;
    int32_t tok;
    if (partial == nullptr) {
      tok = static_cast<const int32_t*>(p.target)[row];
    } else {
      uint64_t best = 0;
      for (int64_t c = lane; c < chunks; c += 32) {
        const uint64_t v = partial[row * chunks + c];
        best = v > best ? v : best;
      }
      tok = argmax_index(warp_max(best));
    }
    const int child = find_child(draft, par, N, cur, tok);
    if (lane == 0) {
      tokens[a] = tok;
      if (child >= 0) path[a] = child;
    }
    if (child < 0) break;
    ++a;
    cur = child;
  }
  __syncwarp();
  finish_row(p, b, a, lane, 32);
}

// One CTA per batch row: argmax of the current node's row, then the child lookup (warp 0), repeat.
template <typename T>
__global__ void __launch_bounds__(kLazyThreads) lazy_kernel(VerifyGreedyParams p) {
  __shared__ uint64_t smem[kLazyThreads / 32 + 1];
  __shared__ int s_child;
  const int64_t b = blockIdx.x;
  const int N = p.N;
  const T* logits = static_cast<const T*>(p.target);
  const int32_t* draft = p.draft_tokens + b * N;
  const int32_t* par = p.parents ? p.parents + b * N : nullptr;
  int cur = -1, a = 0;
  for (;;) {
    const int64_t row = b * (N + 1) + cur + 1;
    const int32_t tok = argmax_index(block_argmax<T, kLazyThreads>(logits + row * p.V, 0, p.V, smem));
    if (threadIdx.x < 32) {
      const int child = find_child(draft, par, N, cur, tok);
      if (threadIdx.x == 0) {
        s_child = child;
        p.tokens[b * (N + 1) + a] = tok;
        if (child >= 0) p.path[b * (N + 1) + a] = child;
      }
    }
    __syncthreads();
    const int child = s_child;
    __syncthreads();  // s_child is rewritten next step
    if (child < 0) break;
    ++a;
    cur = child;
  }
  finish_row(p, b, a, threadIdx.x, kLazyThreads);
}

template <typename T>
cudaError_t launch_typed(const VerifyGreedyParams& p, const VerifyGreedyPlan& plan, void* workspace,
                         cudaStream_t stream) {
  if (plan.mode == VerifyGreedyPlan::kLazy) {
    lazy_kernel<T><<<static_cast<unsigned>(p.B), kLazyThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const int64_t rows = p.B * (p.N + 1);
  auto* partial = static_cast<uint64_t*>(workspace);
  argmax_chunks_kernel<T><<<static_cast<unsigned>(rows * plan.chunks), kFullThreads, 0, stream>>>(
      static_cast<const T*>(p.target), p.V, plan.chunk, plan.chunks, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  walk_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(p.B, kWalkWarps)), kWalkWarps * 32, 0, stream>>>(
      p, partial, plan.chunks);
  return cudaGetLastError();
}

}  // namespace vgreedy
}  // namespace kangaroo
#endif
