// Torch-free launcher of the merge_lookup_tree kernel (csrc/include/kangaroo/lookup_tree.cuh).
#include "kangaroo/lookup_tree.cuh"

namespace kangaroo {

cudaError_t merge_lookup_tree_launch(const MergeLookupParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(ceil_div<int64_t>(p.B, lookup_tree::kThreads));
  lookup_tree::merge_lookup_tree_kernel<<<grid, lookup_tree::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kangaroo
