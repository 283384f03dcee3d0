// merge_lookup_tree: the lookup branch merged into the cycle's draft tree (torch-free).
//
// Base tree of row b: draft[b, :N] (-1 = absent node) with parents[b, :N] (-1 = child of the root), or a chain
// (no parents: node i under node i - 1). Lookup branch: look[b, :M], live up to its first -1 and to n_look[b]
// (clamped to [0, M]) when given: nl tokens. The walk follows the verifier: from the root, lookup token j is
// shared with the first child c (lowest index among the nodes c > cur with parents[c] == cur) of the current node
// whose draft[c] >= 0 equals look[j]; it stops at the first j without one (n_shared tokens). A parent that is not
// topological (< -1 or >= its node) links nothing, so such a node is never reached, as in the verifier. Live
// tokens j >= n_shared become node N + j: token look[j], parent the last shared node (-1: the root) for
// j = n_shared, else N + j - 1. Outputs, int32: tokens / parents [B, N+M] (the base as given, then the lookup
// slots; absent slots -1 / -1), source [B, N+M] (1: present base node, 2: on the lookup branch), n_shared [B],
// lookup_nodes [B, M] (the node of lookup token j, -1 past nl). Spec: kangaroo_kernels/reference/lookup_tree.py.
//
// One row is O(nl * N) compares on a few hundred bytes: the kernel gives each row one thread (a cycle has tens
// of nodes and B <= a few hundred rows), one launch instead of the ~40 (chain) to ~140 (tree) small tensor ops
// of a torch formulation.
//
// Part 1 (plain C++ / __host__ __device__): the row function, also the CPU twin. Part 2 (nvcc only): the kernel.
#pragma once

#include <cstdint>

#include "kangaroo/common.h"

namespace kangaroo {

struct MergeLookupParams {
  const int32_t* draft = nullptr;    // [B, N]
  const int32_t* look = nullptr;     // [B, M]
  const int32_t* n_look = nullptr;   // [B] or nullptr (all M)
  const int32_t* parents = nullptr;  // [B, N] or nullptr (a chain)
  int32_t* tokens = nullptr;         // [B, N + M]
  int32_t* parents_out = nullptr;    // [B, N + M]
  int32_t* source = nullptr;         // [B, N + M]
  int32_t* n_shared = nullptr;       // [B]
  int32_t* lookup_nodes = nullptr;   // [B, M]
  int64_t B = 0;
  int N = 0, M = 0;
};

HOST_DEVICE void merge_lookup_row(const MergeLookupParams& p, int64_t b) {
  const int N = p.N, M = p.M, W = N + M;
  const int32_t* d = p.draft + b * N;
  const int32_t* lk = p.look + b * M;
  const int32_t* par = p.parents == nullptr ? nullptr : p.parents + b * N;
  int32_t* tok = p.tokens + b * W;
  int32_t* po = p.parents_out + b * W;
  int32_t* src = p.source + b * W;
  int32_t* nodes = p.lookup_nodes + b * M;
  int nl_cap = M;
  if (p.n_look != nullptr) nl_cap = p.n_look[b] < 0 ? 0 : (p.n_look[b] < M ? p.n_look[b] : M);
  int nl = 0;
  while (nl < nl_cap && lk[nl] >= 0) ++nl;
  for (int i = 0; i < N; ++i) {
    tok[i] = d[i];
    po[i] = par == nullptr ? i - 1 : par[i];
    src[i] = d[i] >= 0 ? 1 : 0;
  }
  int ns = 0, cur = -1;
  for (; ns < nl; ++ns) {
    int child = -1;
    for (int c = cur + 1; c < N && child < 0; ++c) {
      if ((par == nullptr ? c - 1 : par[c]) == cur && d[c] >= 0 && d[c] == lk[ns]) child = c;
    }
    if (child < 0) break;
    nodes[ns] = child;
    src[child] |= 2;
    cur = child;
  }
  p.n_shared[b] = ns;
  for (int j = ns; j < M; ++j) {
    const bool live = j < nl;
    nodes[j] = live ? N + j : -1;
    tok[N + j] = live ? lk[j] : -1;
    po[N + j] = !live ? -1 : (j == ns ? cur : N + j - 1);
    src[N + j] = live ? 2 : 0;
  }
  for (int j = 0; j < ns; ++j) {  // lookup slots of shared tokens are absent
    tok[N + j] = -1;
    po[N + j] = -1;
    src[N + j] = 0;
  }
}

}  // namespace kangaroo

#if defined(__CUDACC__) || defined(KANGAROO_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kangaroo {
cudaError_t merge_lookup_tree_launch(const MergeLookupParams& p, cudaStream_t stream);
}  // namespace kangaroo
#endif

#if defined(__CUDACC__)
namespace kangaroo {
namespace lookup_tree {

constexpr int kThreads = 128;

__global__ void merge_lookup_tree_kernel(MergeLookupParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < p.B) merge_lookup_row(p, b);
}

}  // namespace lookup_tree
}  // namespace kangaroo
#endif
