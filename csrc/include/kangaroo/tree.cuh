// build_tree: topology of a draft tree given by parent indices (torch-free).
//
// parents[b, j] = -1: node j is a child of the root (the last committed token); otherwise its parent index.
// Node j is real iff j < num_nodes[b] and its parent is -1 or a real node p < j (so a node with an out-of-range
// or non-topological parent is padding, and so is everything below it). Padding nodes get depth -1, an empty
// mask row and no links. For real nodes: depth = 1 + depth(parent) (root children: 1); mask row j has bit
// (i % 32) of word i / 32 set iff i is an ancestor of j or i == j; children are linked in increasing index
// order (first_child, next_sibling; the root's list starts at root_first_child), -1 when none.
//
// Part 1 (plain C++): the sequential definition, used as the CPU twin (csrc/cpu/tree.cpp).
// Part 2 (nvcc only): the kernel, one CTA per batch row, one thread per node.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "kangaroo/common.h"

namespace kangaroo {

struct BuildTreeParams {
  const int32_t* parents = nullptr;    // [B, N]
  const int32_t* num_nodes = nullptr;  // [B] or nullptr (all N nodes)
  int32_t* depth = nullptr;            // [B, N]
  int32_t* mask = nullptr;             // [B, N, W]
  int32_t* first_child = nullptr;      // [B, N]
  int32_t* next_sibling = nullptr;     // [B, N]
  int32_t* root_first_child = nullptr; // [B]
  int64_t B = 0;
  int N = 0;
  int W = 0;  // ceil(N / 32)
};

HOST_DEVICE int tree_num_nodes(const BuildTreeParams& p, int64_t b) {
  if (p.num_nodes == nullptr) return p.N;
  const int n = p.num_nodes[b];
  return n < 0 ? 0 : (n > p.N ? p.N : n);
}

// Batch row b, sequentially (the CPU twin). `last` is scratch of N + 1 ints.
inline void build_tree_row_host(const BuildTreeParams& p, int64_t b, std::vector<int32_t>& last) {
  const int N = p.N, W = p.W;
  const int32_t* par = p.parents + b * N;
  int32_t* depth = p.depth + b * N;
  int32_t* mask = p.mask + b * N * W;
  int32_t* fc = p.first_child + b * N;
  int32_t* ns = p.next_sibling + b * N;
  const int n = tree_num_nodes(p, b);
  last.assign(N + 1, -1);  // last[q + 1]: the last linked child of q (q = -1: the root)
  p.root_first_child[b] = -1;
  if (N > 0) std::memset(mask, 0, sizeof(int32_t) * N * W);
  for (int j = 0; j < N; ++j) {
    depth[j] = -1;
    fc[j] = -1;
    ns[j] = -1;
  }
  for (int j = 0; j < n; ++j) {
    const int q = par[j];
    if (!(q == -1 || (q >= 0 && q < j && depth[q] > 0))) continue;  // padding
    depth[j] = q == -1 ? 1 : depth[q] + 1;
    if (q >= 0) std::memcpy(mask + j * W, mask + q * W, sizeof(int32_t) * W);
    mask[j * W + j / 32] |= static_cast<int32_t>(1u << (j % 32));
    const int prev = last[q + 1];
    if (prev < 0) {
      (q == -1 ? p.root_first_child[b] : fc[q]) = j;
    } else {
      ns[prev] = j;
    }
    last[q + 1] = j;
  }
}

}  // namespace kangaroo

#if defined(__CUDACC__) || defined(KANGAROO_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace kangaroo {
cudaError_t build_tree_launch(const BuildTreeParams& p, cudaStream_t stream);
}  // namespace kangaroo
#endif

#if defined(__CUDACC__)
namespace kangaroo {
namespace tree {

constexpr int kMaxThreads = 1024;

// Phase 1: every thread walks its nodes' ancestor chains (depth <= N steps), which decides validity, depth and
// the mask row without any cross-thread dependency. Phase 2 (after the barrier, when all depths are visible):
// links by scanning the later nodes, O(N) per node; N is a tree width (tens), so this beats a sort.
__global__ void build_tree_kernel(BuildTreeParams p) {
  const int64_t b = blockIdx.x;
  const int N = p.N, W = p.W;
  const int32_t* par = p.parents + b * N;
  int32_t* depth = p.depth + b * N;
  int32_t* mask = p.mask + b * N * W;
  const int n = tree_num_nodes(p, b);

  for (int j = threadIdx.x; j < N; j += blockDim.x) {
    int32_t* row = mask + static_cast<int64_t>(j) * W;
    for (int w = 0; w < W; ++w) row[w] = 0;
    bool valid = j < n;
    int d = 1;
    int word = j / 32;
    uint32_t bits = 1u << (j % 32);
    for (int cur = j; valid;) {
      const int q = par[cur];
      if (q == -1) break;
      if (q < 0 || q >= cur) {
        valid = false;
        break;
      }
      if (q / 32 != word) {  // ancestors come in decreasing order: flush the finished word
        row[word] = static_cast<int32_t>(bits);
        word = q / 32;
        bits = 0;
      }
      bits |= 1u << (q % 32);
      ++d;
      cur = q;
    }
    if (valid) {
      row[word] = static_cast<int32_t>(bits);
    } else {
      for (int w = 0; w < W; ++w) row[w] = 0;
    }
    depth[j] = valid ? d : -1;
  }
  __syncthreads();

  int32_t* fc = p.first_child + b * N;
  int32_t* ns = p.next_sibling + b * N;
  for (int j = threadIdx.x; j < N; j += blockDim.x) {
    int first = -1, next = -1;
    if (depth[j] > 0) {
      const int q = par[j];
      for (int k = j + 1; k < N && (first < 0 || next < 0); ++k) {
        if (depth[k] <= 0) continue;
        const int qk = par[k];
        if (first < 0 && qk == j) first = k;
        if (next < 0 && qk == q) next = k;
      }
    }
    fc[j] = first;
    ns[j] = next;
  }
  if (threadIdx.x == 0) {
    int first = -1;
    for (int k = 0; k < N && first < 0; ++k) {
      if (depth[k] > 0 && par[k] == -1) first = k;
    }
    p.root_first_child[b] = first;
  }
}

}  // namespace tree
}  // namespace kangaroo
#endif
