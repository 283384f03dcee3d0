// Torch-free launcher of the build_tree kernel (csrc/include/kangaroo/tree.cuh).
#include "kangaroo/tree.cuh"

namespace kangaroo {

cudaError_t build_tree_launch(const BuildTreeParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const int threads = p.N <= 32 ? 32 : (p.N >= tree::kMaxThreads ? tree::kMaxThreads : ceil_div(p.N, 32) * 32);
  tree::build_tree_kernel<<<static_cast<unsigned>(p.B), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kangaroo
